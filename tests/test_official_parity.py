"""Checkpoints written by the official ParScale implementation: logits and greedy tokens must match."""

import json

import pytest
import torch
from conftest import FIXTURES, OFFICIAL

import parscale


@pytest.fixture(scope="module", params=OFFICIAL)
def official(request):
    folder = FIXTURES / request.param
    return parscale.load(folder), json.loads((folder / "expected.json").read_text())


def test_there_are_several_official_fixtures():
    assert len(OFFICIAL) >= 3


def test_logits_match(official):
    model, expected = official
    ids = torch.tensor(expected["input_ids"])
    logits = model(ids[:1])[0]
    torch.testing.assert_close(logits, torch.tensor(expected["logits_row0"]), atol=1e-5, rtol=1e-5)


def test_greedy_tokens_match(official):
    model, expected = official
    ids = torch.tensor(expected["input_ids"])
    out = parscale.generate(model, ids[:1], max_new_tokens=16)
    assert out[0].tolist() == expected["greedy_row0_16"]


def test_padded_batch_greedy_matches(official):
    model, expected = official
    ids, mask = torch.tensor(expected["input_ids"]), torch.tensor(expected["attention_mask"])
    assert not mask.all(), "the fixture must contain padding"
    out = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=8)
    assert out.tolist() == expected["greedy_batch_padded_8"]


def test_official_fixtures_cover_variants():
    configs = [json.loads((FIXTURES / n / "config.json").read_text()) for n in OFFICIAL]
    assert {c["parscale_n"] for c in configs} >= {2, 4, 8}
    assert {c["tie_word_embeddings"] for c in configs} == {True, False}
    assert {c["parscale_attn_smooth"] for c in configs} >= {0.0, 0.1}


# Measured on these random fixtures (CPU, torch 2.13): bf16 1.1e-2 to 2.0e-2, fp16 1.4e-3 to 2.5e-3 —
# 8× apart, as their 8- and 11-bit mantissas predict; fp32 ~5e-7. The bounds are twice the largest.
LOW_PRECISION_BOUND = {"bfloat16": 4e-2, "float16": 5e-3}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_logits_are_close_to_the_official_fp32_logits(dtype):
    """Loading in bf16 / fp16 (cast while loading, RoPE kept in fp32) stays within half-precision rounding
    of the official fp32 logits (relative error norm) on every fixture."""
    for name in OFFICIAL:
        folder = FIXTURES / name
        expected = json.loads((folder / "expected.json").read_text())
        model = parscale.load(folder, dtype=dtype)
        with torch.no_grad():
            logits = model(torch.tensor(expected["input_ids"])[:1])[0].float()
        ref = torch.tensor(expected["logits_row0"])
        err = float((logits - ref).norm() / ref.norm())
        assert err < LOW_PRECISION_BOUND[dtype], (name, dtype, err)
