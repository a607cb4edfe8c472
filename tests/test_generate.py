"""Generation: sampling reproducibility, EOS handling, and one clear error per bad request."""

import pytest
import torch
from conftest import tiny_model

import parscale


@pytest.fixture(scope="module")
def model():
    return tiny_model(streams=2)


def test_seeded_sampling_is_reproducible(model):
    ids = torch.randint(0, 512, (2, 5))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=50, top_p=0.95)
    a = parscale.generate(model, ids, seed=11, **kw)
    b = parscale.generate(model, ids, seed=11, **kw)
    c = parscale.generate(model, ids, seed=12, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_1_is_greedy(model):
    ids = torch.randint(0, 512, (1, 5))
    greedy = parscale.generate(model, ids, max_new_tokens=8)
    sampled = parscale.generate(model, ids, max_new_tokens=8, do_sample=True, top_k=1, seed=0)
    assert torch.equal(greedy, sampled)


def test_eos_stops_and_pads(model):
    ids = torch.randint(0, 512, (2, 5))
    free = parscale.generate(model, ids, max_new_tokens=10)
    eos = int(free[0, 2])
    out = parscale.generate(model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=-1)
    row = out[0].tolist()
    first = row.index(eos)
    assert all(t == -1 for t in row[first + 1 :])
    assert row[: first + 1] == free[0, : first + 1].tolist()


def test_greedy_matches_argmax_of_recompute(model):
    ids = torch.randint(0, 512, (1, 6))
    out = parscale.generate(model, ids, max_new_tokens=5)
    seq = ids
    for i in range(5):
        nxt = model(seq)[:, -1].argmax(-1)
        assert int(nxt) == int(out[0, i])
        seq = torch.cat([seq, nxt[:, None]], 1)


@pytest.mark.parametrize("ids,kwargs,message", [
    (torch.zeros(1, 0, dtype=torch.long), {}, "empty"),
    (torch.tensor([[1, 2, 600]]), {}, "outside the vocabulary"),
    (torch.tensor([[1, -2]]), {}, "outside the vocabulary"),
    (torch.ones(1, 500, dtype=torch.long), {"max_new_tokens": 20}, "exceeds"),
    (torch.ones(1, 3, dtype=torch.long), {"max_new_tokens": -1}, "max_new_tokens"),
    (torch.ones(1, 3, dtype=torch.long), {"attention_mask": torch.zeros(1, 3)}, "no real token"),
    (torch.ones(1, 3, dtype=torch.long), {"attention_mask": torch.ones(1, 4)}, "shape"),
    (torch.ones(1, 3), {}, "integer"),
    # Settings that used to be ignored or misread silently.
    (torch.ones(1, 3, dtype=torch.long), {"temperature": -1.0}, "temperature must be a finite number >= 0"),
    (torch.ones(1, 3, dtype=torch.long), {"temperature": float("nan"), "do_sample": True}, "temperature"),
    (torch.ones(1, 3, dtype=torch.long), {"top_k": -5, "do_sample": True}, "top_k"),
    (torch.ones(1, 3, dtype=torch.long), {"top_p": float("nan"), "do_sample": True}, "top_p"),
    (torch.ones(1, 3, dtype=torch.long), {"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    (torch.ones(1, 3, dtype=torch.long), {"attention_mask": torch.tensor([[1, 1, 0]])}, "not left-padded"),
    (torch.ones(1, 3, dtype=torch.long), {"attention_mask": torch.tensor([[0, 2, 1]])}, "only 1"),
])
def test_bad_requests(model, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        parscale.generate(model, ids, **kwargs)


def test_seeded_sampling_leaves_the_global_rng_alone(model):
    # (unseeded sampling draws from the global RNG, as transformers' does: test_bad_input.py)
    ids = torch.randint(0, 512, (1, 4))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    parscale.generate(model, ids, max_new_tokens=4, do_sample=True, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_a_forward_beyond_the_models_positions_is_refused(model):
    model(torch.ones(1, 512, dtype=torch.long))  # exactly the model's positions: fine
    with pytest.raises(ValueError, match="513 positions .* exceed the model's 512"):
        model(torch.ones(1, 513, dtype=torch.long))
