"""The static-cache decode engine (a CUDA graph on GPU) gives the plain path's logits and tokens."""

import pytest
import torch
from conftest import tiny_model

import parscale
from parscale.engine import DecodeEngine


@pytest.mark.parametrize("family,streams", [("qwen2", 1), ("qwen2", 4), ("llama", 2), ("qwen3", 3)])
def test_engine_logits_equal_recompute(family, streams):
    model = tiny_model(streams=streams, family=family)
    ids = torch.randint(0, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    engine = DecodeEngine(model, batch_size=2, max_len=16)
    logits = engine.prefill(ids, mask)
    seq, full_mask = ids, mask
    for _ in range(5):
        ref = model(seq, attention_mask=full_mask)[:, -1]
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        nxt = ref.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], 1)
        logits = engine.decode(nxt)


@pytest.mark.parametrize("streams", [1, 2])
def test_generate_with_engine_equals_plain(streams):
    model = tiny_model(streams=streams)
    ids = torch.randint(0, 512, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for kwargs in (dict(), dict(do_sample=True, top_p=0.9, seed=3)):
        plain = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=10, use_engine=False, **kwargs)
        fast = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=10, use_engine=True, **kwargs)
        assert torch.equal(plain, fast)


def test_engine_is_reusable_and_bounded():
    model = tiny_model(streams=2)
    engine = DecodeEngine(model, batch_size=1, max_len=6)
    ids = torch.randint(0, 512, (1, 4))
    first = engine.prefill(ids)
    engine.decode(first.argmax(-1))
    again = engine.prefill(ids)  # a new request resets the cache; the prefix slots stay
    torch.testing.assert_close(first, again)
    engine.decode(again.argmax(-1))
    engine.decode(again.argmax(-1))
    with pytest.raises(ValueError, match="cache is full"):
        engine.decode(again.argmax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("streams", [1, 4])
def test_cuda_graph_engine_matches_plain(streams):
    model = tiny_model(streams=streams).cuda()
    ids = torch.randint(0, 512, (2, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    plain = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=20, use_engine=False)
    fast = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=20, use_engine=True)
    assert torch.equal(plain, fast)


def test_engine_registry_does_not_keep_models_alive():
    import gc
    import weakref

    model = tiny_model(streams=2)
    parscale.generate(model, torch.randint(0, 512, (1, 4)), max_new_tokens=3, use_engine=True)
    from parscale.engine import engine_for

    engine_for(model, 1, 7)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
