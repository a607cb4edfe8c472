"""Parity with the transformers implementations of Qwen2, Llama (llama3 / linear RoPE) and Qwen3."""

import pytest
import torch

pytest.importorskip("transformers")
from hf_oracle import VARIANTS, make_hf_model  # noqa: E402

import parscale  # noqa: E402
from parscale.model.convert import add_streams  # noqa: E402


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, folder)
    return hf, parscale.load(folder), folder


def test_logits_match(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_padded_logits_and_greedy_match(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 300, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    out = ours(ids, attention_mask=mask)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, 6:], ref[1, 6:], atol=1e-4, rtol=1e-4)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[:, 20:]
    assert torch.equal(parscale.generate(ours, ids, attention_mask=mask, max_new_tokens=12), expected)


def test_saved_folder_loads_back_in_transformers(pair, tmp_path):
    import transformers

    hf, ours, _ = pair
    parscale.save(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_converted_model_runs(pair, tmp_path):
    _, ours, _ = pair
    new = add_streams(ours, 2, n_tokens=4)
    parscale.save(new, tmp_path / "p2")
    again = parscale.load(tmp_path / "p2")
    ids = torch.randint(0, 300, (1, 9))
    assert torch.equal(again(ids), new(ids))


def test_generation_config_and_repetition_penalty_match_transformers(pair, tmp_path):
    """A folder's generation_config.json is used as transformers uses it, repetition penalty included."""
    import json
    import shutil

    hf, _, folder = pair
    shutil.copytree(folder, tmp_path / "m")
    settings = {"max_new_tokens": 9, "do_sample": False, "repetition_penalty": 1.5}
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(settings))
    ours = parscale.load(tmp_path / "m")
    ids = torch.randint(0, 300, (2, 12))
    expected = hf.generate(ids, pad_token_id=0, eos_token_id=None, **settings)[:, 12:]
    plain = hf.generate(ids, pad_token_id=0, eos_token_id=None, max_new_tokens=9, do_sample=False)[:, 12:]
    assert not torch.equal(expected, plain)  # the penalty changes these tokens, so the check has teeth
    assert torch.equal(parscale.generate(ours, ids), expected)  # settings from the file
    assert torch.equal(parscale.generate(ours, ids, generation_config={}, max_new_tokens=9), plain)
