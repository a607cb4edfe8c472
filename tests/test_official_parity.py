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
