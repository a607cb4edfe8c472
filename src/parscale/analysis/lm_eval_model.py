"""parscale models inside lm-evaluation-harness (optional extra: `pip install parscale[eval]`).

Registers the model name `parscale` with lm-eval's registry when imported. The stock `lm_eval`
command imports only its own models, so run it through `parscale-lm-eval`, which imports this module
and then hands every argument to lm-eval's own command line:

    parscale-lm-eval --model parscale --model_args pretrained=DIR,dtype=bfloat16 \
        --tasks parscale_ppl_example --include_path examples/lm_eval_tasks

`adapter=FOLDER` puts a frozen-backbone adapter (training/adapter.py) on the P = 1 model of `pretrained`: the
P-stream model it makes scores as the same model saved whole would.

Scoring follows lm-eval's `hf` model (0.4.13) so numbers are comparable: text is encoded with the
tokenizer's own added tokens (a post-processor's BOS, as Llama 3's, is kept; `add_bos_token=true|false`
forces it, as for `hf`), unless it already starts with the prefix token's text; the prefix token is the
folder's bos_token (tokenizer_config.json / special_tokens_map.json), else the EOS token; a context's
trailing spaces move to the continuation; an empty context becomes the prefix token, its continuation
encoded without added tokens; continuations are scored given at most `max_length` tokens; rolling
log-likelihoods use lm-eval's own disjoint windows with the prefix token in front. Requests are
batched longest-first with right padding (causal attention never lets a real token see the padding
after it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import parscale
from parscale.inference.chat import ChatTemplateError, apply_chat_template, special_tokens
from parscale.inference.chat import chat_template as chat_template_of
from parscale.model.checkpoint import model_folder, parse_dtype


def _stop_watcher(tokenizer, stops: list[str]):
    """An on_token callback for one request: True once the text generated so far holds a stop string."""
    produced = []

    def reached_a_stop(token) -> bool:
        produced.append(int(token[0]))
        text = tokenizer.decode(produced, skip_special_tokens=False)
        return any(stop and stop in text for stop in stops)

    return reached_a_stop


@register_model("parscale")
class ParScaleLM(LM):
    def __init__(self, pretrained: str, dtype=None, device: str | None = None, batch_size: int | str = 8,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | str | None = None, prefix_token_id: int | None = None,
                 think_end_token: str | int | None = None, enable_thinking: bool | None = None,
                 chat_template_args: dict | None = None, revision: str | None = None, adapter: str | None = None,
                 **unknown):
        super().__init__()
        if unknown:  # swallowed settings change scores silently: name them instead
            raise ValueError(f"model_args the parscale model does not take: {', '.join(sorted(unknown))} (it takes "
                             f"pretrained, dtype, device, batch_size, max_length, max_gen_toks, add_bos_token, "
                             f"prefix_token_id, think_end_token, enable_thinking, chat_template_args, revision, "
                             f"adapter)")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's command line defaults to cuda
        self.model = parscale.load(pretrained, dtype=parse_dtype(dtype), device=device, revision=revision)
        if adapter:
            from parscale.training.adapter import load_adapter

            self.model = load_adapter(self.model, adapter)
        self.tokenizer = parscale.load_tokenizer(pretrained, revision=revision)
        self._torch_device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        positions = self.model.config.max_position_embeddings
        self.max_length = int(max_length or positions)
        if self.max_length > positions:  # lm-eval's hf would run past the trained positions; parscale refuses to
            raise ValueError(f"max_length {self.max_length} exceeds the model's {positions} positions")
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("true", "1")
        self.folder = model_folder(pretrained, revision)
        self.pretrained = str(pretrained)
        # lm-eval's `hf` reads the end-of-text and BOS tokens from the tokenizer files (tokenizer_config.json,
        # special_tokens_map.json); a folder whose tokenizer names none falls back to config.json's EOS id.
        named = special_tokens(self.folder)
        self.bos_token_id = self._token_id(named.get("bos_token"))
        eos = self._token_id(named.get("eos_token"))
        if eos is None:
            eos = self.model.config.eos_token_id
            eos = eos[0] if isinstance(eos, list) else eos
        self.eot_token_id = eos if eos is not None else self.tokenizer.token_to_id("<|endoftext|>")
        if self.eot_token_id is None:
            raise ValueError(f"{pretrained}: neither the tokenizer files nor config.json name an EOS token")
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        # The ids generation stops at, as transformers' generate: generation_config.json's, else config.json's.
        ids = self.model.generation_config.get("eos_token_id", self.model.config.eos_token_id)
        self.stop_ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
        self.think_end_token = (int(think_end_token) if isinstance(think_end_token, str) and think_end_token.isdigit()
                                else think_end_token)
        if enable_thinking and think_end_token is None:
            raise ValueError("enable_thinking=True needs think_end_token (the text or id that ends the thinking), "
                             "as for lm-eval's hf model")
        self.chat_template_args = dict(chat_template_args or {})
        if enable_thinking is not None:
            self.chat_template_args["enable_thinking"] = enable_thinking

    def _token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tokenizer.token_to_id(text)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes and what rolling windows start from (lm-eval's `hf`: the prefix_token_id
        model arg, else BOS, else EOS)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.bos_token_id if self.bos_token_id is not None else self.eot_token_id

    # chat templates (`lm_eval --apply_chat_template`), rendered as lm-eval's `hf` model renders them ------
    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return chat_template_of(self.folder) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for lm-eval's chat history; without a generation prompt the last (assistant) message is
        continued. A template that refuses a system turn is tried again without it, as `hf` does."""
        render = functools.partial(apply_chat_template, self.folder, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=not add_generation_prompt, **self.chat_template_args)
        try:
            return render(chat_history)
        except ChatTemplateError as e:
            if "refused the conversation" not in str(e) or not any(m["role"] == "system" for m in chat_history):
                raise
            return render([m for m in chat_history if m["role"] != "system"])

    # ------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token if self.add_bos_token is not None else True
            if text.startswith(self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)):
                add_special_tokens = False  # the text brings its own BOS
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            # the continuation without added tokens, after the prefix token (unless it starts with it)
            cont = self.encode(continuation, add_special_tokens=False)
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """Log-probability of each continuation given its context, and whether it is the greedy one."""
        for _, cont in pairs:  # what lm-eval's `hf` model asserts, as one clear error
            if not 0 < len(cont) <= self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored: it needs 1 to max_length "
                                 f"= {self.max_length} tokens")
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=len(order) < 2 * self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs = []
            for i in idx:
                ctx, cont = pairs[i]
                inputs.append((ctx + cont)[-(self.max_length + 1):][:-1])
            width = max(len(x) for x in inputs)
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for row, x in enumerate(inputs):
                batch[row, : len(x)] = torch.tensor(x)
            logprobs = F.log_softmax(self.model(batch.to(self._torch_device)).float(), dim=-1)
            for row, i in enumerate(idx):
                cont = torch.tensor(pairs[i][1], device=self._torch_device)
                n, t = len(cont), len(inputs[row])
                lp = logprobs[row, t - n : t]
                results[i] = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self._score(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            wins = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(ll for ll, _ in self._score(wins, "rolling")))
        return out

    def _encode_context(self, context: str) -> list[int]:
        """A generation context encoded as `hf` encodes a batch of them: no added tokens when it starts with the
        BOS text, else add_bos_token if given, else the tokenizer's own added tokens."""
        bos = self.tokenizer.decode([self.bos_token_id], skip_special_tokens=False) if self.bos_token_id is not None \
            else None
        add = False if bos and context.startswith(bos) else (self.add_bos_token if self.add_bos_token is not None
                                                              else True)
        return self.tokenizer.encode(context, add_special_tokens=add).ids

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """As lm-eval's `hf` model: the request's settings normalised by lm-eval (do_sample / temperature, the
        max_gen_toks aliases), `until` plus the EOS token's text as stop strings, generation ending at the
        folder's end ids or a stop string, the text decoded without special tokens and cut at the first stop
        (after the thinking, with think_end_token). Sampling draws from torch's global RNG, which lm-eval's
        --seed sets, so k repeats differ and a run repeats."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm or len(requests) < 4):
            context, gen_kwargs = req.args
            kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = kwargs.pop("max_gen_toks")
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0))
            settings = {k: kwargs.pop(k) for k in ("top_k", "top_p", "repetition_penalty") if k in kwargs}
            kwargs.pop("max_length", None)  # `hf` overrides it with context + max_gen_toks, as here
            if kwargs:
                raise ValueError(f"generation settings the parscale model does not implement: {sorted(kwargs)}")
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen} must be less than max_length {self.max_length}")
            ids = self._encode_context(context)[-(self.max_length - max_gen):] or [self.prefix_token_id]
            max_new = min(max_gen, self.model.config.max_position_embeddings - len(ids))
            new = parscale.generate(self.model, torch.tensor([ids]), max_new_tokens=max_new, do_sample=do_sample,
                                    temperature=temperature if do_sample else None, eos_token_id=self.stop_ids or None,
                                    on_token=_stop_watcher(self.tokenizer, until), **settings)[0].tolist()
            if isinstance(self.think_end_token, int) and self.think_end_token in new:
                new = new[len(new) - new[::-1].index(self.think_end_token):]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if isinstance(self.think_end_token, int):
                text = text.lstrip()
            think = self.think_end_token if isinstance(self.think_end_token, str) else None
            out.append(postprocess_generated_text(generation=text, stop=until, think_end_token=think))
        return out


def main() -> None:
    """`parscale-lm-eval`: lm-eval's own command line with the `parscale` model registered. A model that
    cannot be loaded (wrong path, bad dtype or device) is one `error:` line and exit code 2, as for `parscale`."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from parscale.model.checkpoint import CheckpointError

    try:
        cli_evaluate()
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
