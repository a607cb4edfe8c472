"""Chat templates and multi-turn chat: the prompt format of instruct checkpoints, rendered as transformers does.

    text = parscale.apply_chat_template("ParScale-1.8B-P8-Inst", [{"role": "user", "content": "Hi"}])

A folder's chat template is chat_template.jinja, else the `chat_template` of tokenizer_config.json (a
string, or a list of named templates of which "default" is used), else chat_template.json: transformers'
order. It is rendered with Jinja2 in the environment transformers' `apply_chat_template` uses (sandboxed,
trim_blocks, lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`), with the
messages (keys whose value is None dropped, as transformers 5.25 drops them; 5.17 rendered a literal "None"),
`add_generation_prompt` and the tokenizer's special tokens (bos_token, eos_token, ...) as variables, so
the same folder gives the same string. The rendered text already holds the special tokens, so it is
encoded without adding any. A reply ends at the end-of-turn token: the tokenizer_config's eos_token
(`<|im_end|>` for ChatML) together with generation_config.json's eos_token_id.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A folder without a usable chat template, or a template that refused the messages."""


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"{file} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # a serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(folder) -> dict[str, str]:
    """bos_token, eos_token, ... as strings, from special_tokens_map.json and tokenizer_config.json (which wins)."""
    folder = Path(folder)
    out = {}
    for source in (_read_json(folder / "special_tokens_map.json"), _read_json(folder / "tokenizer_config.json")):
        for key in SPECIAL_TOKEN_KEYS:
            text = _token_text(source.get(key))
            if text is not None:
                out[key] = text
    return out


def chat_template(folder) -> str:
    """The folder's chat template (see the module docstring); ChatTemplateError if it has none."""
    folder = Path(folder)
    template = None
    if (folder / "chat_template.jinja").is_file():  # as transformers: the file wins over tokenizer_config.json
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if not isinstance(template, str) or not template:
        raise ChatTemplateError(f"{str(folder)!r} has no chat template (tokenizer_config.json 'chat_template', "
                                f"chat_template.jinja or chat_template.json): it is not a chat model")
    return template


def _environment():
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need the jinja2 package (pip install jinja2)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(messages: list[dict]) -> list[dict]:
    """A copy whose last message's text ends with _CONTINUE_TAG (its last text block, for block content)."""
    import copy

    messages = copy.deepcopy(messages)
    if not messages:
        raise ChatTemplateError("continue_final_message needs a conversation to continue; it is empty")
    content = messages[-1].get("content")
    if isinstance(content, str):
        messages[-1]["content"] = content + _CONTINUE_TAG
        return messages
    for block in reversed(content if isinstance(content, list) else []):
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            block["text"] += _CONTINUE_TAG
            return messages
    raise ChatTemplateError("continue_final_message: the final message has no text to continue")


def apply_chat_template(tokenizer_dir, messages: list[dict], add_generation_prompt: bool = True,
                        template: str | None = None, continue_final_message: bool = False, **variables) -> str:
    """The prompt text for a conversation [{"role": ..., "content": ...}, ...] (see the module docstring).

    tokenizer_dir: a model folder (or Hub id) holding the tokenizer files; template overrides its template;
    continue_final_message: end the text inside the last message, without its end-of-turn, so that a reply
    continues it (an assistant prefill), as transformers' option of that name does; other keyword arguments
    become template variables (e.g. tools=[...], enable_thinking=False)."""
    from parscale.model.checkpoint import model_folder

    folder = Path(tokenizer_dir) if Path(tokenizer_dir).is_dir() else model_folder(tokenizer_dir)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    # as transformers does: keys whose value is None are dropped (an API's content=None beside tool_calls), which
    # templates handle as absent, where rendering them would print "None"
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if continue_final_message:
        messages = _tag_final_message(messages)
    source = template if template is not None else chat_template(folder)
    import jinja2

    try:
        compiled = _environment().from_string(source)
        text = compiled.render(messages=messages, tools=variables.pop("tools", None),
                               documents=variables.pop("documents", None),
                               add_generation_prompt=add_generation_prompt, **{**special_tokens(folder), **variables})
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template of {str(folder)!r} refused the conversation: {e}") from None
    if continue_final_message:
        if _CONTINUE_TAG.strip() not in text:
            raise ChatTemplateError(f"continue_final_message: the chat template of {str(folder)!r} does not "
                                    "render the final message as given, so there is nothing to continue")
        at = text.rindex(_CONTINUE_TAG.strip())
        # a template that keeps the message's spacing shows the whole tag; one that strips it, a trimmed one
        text = text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def stop_token_ids(folder, tokenizer, generation_config: dict | None = None) -> list[int]:
    """Ids that end a reply: generation_config's eos_token_id(s) and the tokenizer_config's eos_token."""
    ids = []
    eos = (generation_config or {}).get("eos_token_id")
    ids.extend(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    text = special_tokens(folder).get("eos_token")
    if text is not None and tokenizer.token_to_id(text) is not None:
        ids.append(tokenizer.token_to_id(text))
    return list(dict.fromkeys(int(i) for i in ids))
