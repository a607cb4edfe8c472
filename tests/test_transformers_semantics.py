"""The chat and sampling layer behaves as transformers does on the same files (each case differed before).

Chat templates are compared with transformers' own `apply_chat_template` on the same folder; the
decode engine is compared with the reference path after a request that left a non-finite value behind.
"""

import json

import pytest
import torch
from conftest import tiny_model
from test_everyday import CHATML, MESSAGES, chat_folder

import parscale
from parscale.inference.chat import apply_chat_template


def test_chat_template_jinja_file_wins_over_tokenizer_config_as_in_transformers(tmp_path):
    import transformers

    folder = chat_folder(tmp_path / "m", "chatml")
    (folder / "chat_template.jinja").write_text(CHATML.replace("You are a helpful assistant.", "From the file."))
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    ours = apply_chat_template(folder, MESSAGES, add_generation_prompt=True)
    assert "From the file." in theirs and ours == theirs


def test_content_none_is_left_out_as_in_transformers(tmp_path):
    import transformers

    folder = chat_folder(tmp_path / "m", "chatml")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.content is defined %}{{ m.content }}"
                "{% endif %}{% if m.tool_calls is defined %}[{{ m.tool_calls | length }} tool call]{% endif %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "chat_template.jinja").write_text(template)
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                    "name": "weather", "arguments": {}}}]},
                {"role": "tool", "content": "sunny"}]
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    if "None[1 tool call]" in theirs:  # seen with transformers 5.17; 5.25 drops keys whose value is None
        pytest.skip(f"transformers {transformers.__version__} renders content None literally; parscale follows "
                    "the transformers that leaves such keys out (inference/chat.py)")
    ours = apply_chat_template(folder, messages, add_generation_prompt=True)
    assert "None" not in theirs and ours == theirs


def test_load_adapter_and_add_streams_keep_the_generation_config(tmp_path):
    from parscale.model.convert import add_streams
    from parscale.training.adapter import load_adapter, save_adapter

    folder = tmp_path / "base"
    parscale.save(tiny_model(streams=1), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "max_new_tokens": 9}))
    base = parscale.load(folder)
    p4 = add_streams(base, 4, n_tokens=4)
    assert p4.generation_config == base.generation_config == {"eos_token_id": [2, 7], "max_new_tokens": 9}
    save_adapter(p4, tmp_path / "adapter", backbone=str(folder))
    assert load_adapter(folder, tmp_path / "adapter").generation_config == base.generation_config


@pytest.mark.parametrize("streams", [1, 4])
def test_a_non_finite_value_left_in_the_engine_cache_does_not_reach_the_next_request(streams):
    model = tiny_model(streams=streams)
    long = torch.randint(1, 500, (1, 40))
    short = torch.randint(1, 500, (1, 5))
    from parscale.inference.engine import engine_for

    parscale.generate(model, long, max_new_tokens=8, use_engine=True)  # the engine's cache now has 48 slots
    cache = engine_for(model).cache
    for buffer in (*cache.k, *cache.v):
        buffer[:, :, cache.prefix_len + 20 :] = float("nan")  # what an fp16 overflow would leave
    fast = parscale.generate(model, short, max_new_tokens=8, use_engine=True)
    plain = parscale.generate(model, short, max_new_tokens=8, use_engine=False)
    assert torch.equal(fast, plain)
