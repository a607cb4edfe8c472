"""Model behaviour: P=1 is the plain model, caching, padding, initialisation, parameter counts."""

import pytest
import torch
from conftest import tiny_model

import parscale
from parscale import KVCache, ModelConfig


def test_p1_has_no_parscale_parameters():
    model = tiny_model(streams=1)
    names = [n for n, _ in model.named_parameters()]
    assert not any("prefix" in n or "aggregate" in n for n in names)


def test_p1_parscale_type_equals_plain_model():
    plain = tiny_model(streams=1)
    cfg = plain.config.replace(parscale_n=1)
    other = parscale.ParScaleForCausalLM(cfg)
    other.load_state_dict(plain.state_dict(), strict=True)
    ids = torch.randint(0, 512, (2, 17))
    assert torch.equal(plain(ids), other.eval()(ids))


@pytest.mark.parametrize("streams", [2, 4])
def test_streams_see_only_their_own_prefix(streams):
    """Changing stream 0's prefix moves stream 0 only; a stream-major layout bug would leak across rows."""
    model = tiny_model(streams=streams)
    ids = torch.randint(0, 512, (3, 9))
    before = model.forward_streams(ids)
    assert before.shape == (streams, 3, 9, 64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.prefix_k[0].add_(1.0)
            layer.self_attn.prefix_v[0].mul_(-2.0)
    after = model.forward_streams(ids)
    assert (after[0] - before[0]).abs().amin(-1).gt(0).all()  # every token of stream 0 moved
    torch.testing.assert_close(after[1:], before[1:], atol=0, rtol=0)  # no other stream did
    # Row b of the batch equals that sequence computed alone.
    hidden, weights = model.forward_hidden(ids)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 9))
    for b in range(3):
        alone, _ = model.forward_hidden(ids[b : b + 1])
        torch.testing.assert_close(alone[0], hidden[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["build_model", "to", "load"])
def test_rope_frequencies_stay_fp32(how, tmp_path):
    cfg = ModelConfig.preset("tiny", parscale_n=2, max_position_embeddings=8192)
    if how == "build_model":
        model = parscale.build_model(cfg, dtype=torch.bfloat16)
    elif how == "to":
        model = parscale.build_model(cfg).to(torch.bfloat16)
    else:
        parscale.save(parscale.build_model(cfg), tmp_path / "m")
        model = parscale.load(tmp_path / "m", dtype="bfloat16")
    from parscale.model.transformer import rope_inv_freq

    assert model.model.rope_inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rope_inv_freq, rope_inv_freq(cfg))


def test_prefix_is_used():
    model = tiny_model(streams=2)
    ids = torch.randint(0, 512, (1, 6))
    before = model(ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.prefix_k[1].add_(1.0)
    assert not torch.allclose(before, model(ids))


def test_smoothing_floor():
    model = tiny_model(streams=4)
    with torch.no_grad():
        model.model.aggregate_layer[2].bias.copy_(torch.tensor([50.0, 0, 0, 0]))
    _, w = model.forward_hidden(torch.randint(0, 512, (1, 5)))
    assert w.min() >= 0.1 / 4 - 1e-6


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("streams", [1, 2, 4])
def test_cached_decode_equals_recompute(family, streams):
    model = tiny_model(streams=streams, family=family)
    ids = torch.randint(0, 512, (2, 12))
    full = model(ids)
    cache = KVCache.for_model(model, 2, 12)
    parts = [model(ids[:, :7], cache=cache)]
    for i in range(7, 12):
        parts.append(model(ids[:, i : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("streams", [1, 3])
def test_padded_row_equals_unpadded(streams):
    model = tiny_model(streams=streams)
    ids = torch.randint(0, 512, (1, 10))
    padded = torch.cat([torch.full((1, 4), 7), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 4:], model(ids), atol=1e-5, rtol=1e-5)
    batch = torch.cat([padded, torch.randint(0, 512, (1, 14))])
    bmask = torch.cat([mask, torch.ones(1, 14, dtype=torch.long)])
    alone = parscale.generate(model, ids, max_new_tokens=6)
    together = parscale.generate(model, batch, attention_mask=bmask, max_new_tokens=6)
    assert together[0].tolist() == alone[0].tolist()


def test_fresh_model_is_finite_and_prefixes_are_initialised():
    model = parscale.build_model(ModelConfig.preset("tiny", parscale_n=4), seed=3)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    prefix = model.model.layers[0].self_attn.prefix_k
    assert prefix.std() > 0.05  # not left at zero
    k_scale = model.model.layers[0].self_attn.k_proj.weight.std() * model.config.hidden_size**0.5
    assert 0.5 < (prefix.std() / k_scale).item() < 2.0
    logits = model(torch.randint(0, 512, (2, 8)))
    assert torch.isfinite(logits).all()


def test_init_is_seeded():
    a = parscale.build_model(ModelConfig.preset("tiny", parscale_n=2), seed=5)
    b = parscale.build_model(ModelConfig.preset("tiny", parscale_n=2), seed=5)
    c = parscale.build_model(ModelConfig.preset("tiny", parscale_n=2), seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


PAPER_COUNTS = {  # paper.md §3: non-embedding parameters for P = 1, 2, 4, 8
    "paper-0.5b": (535_813_376, 538_195_842, 540_577_412, 545_340_552),
    "paper-0.7b": (693_753_856, 696_738_818, 699_722_756, 705_690_632),
    "paper-1.1b": (1_088_376_320, 1_092_762_882, 1_097_148_164, 1_105_918_728),
    "paper-1.6b": (1_571_472_384, 1_577_522_690, 1_583_571_460, 1_595_669_000),
    "paper-2.8b": (2_774_773_760, 2_784_937_986, 2_795_100_164, 2_815_424_520),
    "paper-4.4b": (4_353_203_200, 4_368_529_922, 4_383_854_084, 4_414_502_408),
}


@pytest.mark.parametrize("preset", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(preset):
    for p, expected in zip((1, 2, 4, 8), PAPER_COUNTS[preset], strict=True):
        assert ModelConfig.preset(preset, parscale_n=p).param_counts()["non_embedding"] == expected


@pytest.mark.parametrize("family,streams", [("qwen2", 1), ("qwen2", 4), ("llama", 2), ("qwen3", 2)])
def test_param_count_matches_module(family, streams):
    model = tiny_model(streams=streams, family=family)
    counts = model.config.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["parscale"] == sum(p.numel() for n, p in model.named_parameters()
                                     if "prefix" in n or "aggregate" in n)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="parscale_n"):
        ModelConfig.preset("tiny", parscale_n=0)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("nope")
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig.preset("tiny", rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_seed_gives_the_same_backbone_for_every_p():
    """Paired seeds: the backbone of seed s is identical for P = 1, the prefix control and P = 2, 4, 8."""
    models = [parscale.build_model(ModelConfig.preset("tiny", parscale_n=p), seed=7) for p in (1, 2, 4, 8)]
    models.append(parscale.build_model(ModelConfig.preset("tiny", parscale_p1_prefix=True), seed=7))
    ref = models[0].state_dict()
    for m in models[1:]:
        state = m.state_dict()
        for k, v in ref.items():
            assert torch.equal(state[k], v), (m.config.parscale_n, k)
    other = parscale.build_model(ModelConfig.preset("tiny", parscale_n=4), seed=8).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


def test_p1_prefix_control(tmp_path):
    cfg = ModelConfig.preset("tiny", parscale_p1_prefix=True, parscale_n_tokens=6)
    model = parscale.build_model(cfg, seed=0).eval()
    assert model.model.layers[0].self_attn.prefix_k.shape == (1, 2, 6, 16)
    assert not hasattr(model.model, "aggregate_layer")
    assert cfg.param_counts()["parscale"] == 2 * 2 * 2 * 6 * 16
    plain = parscale.build_model(ModelConfig.preset("tiny"), seed=0).eval()
    ids = torch.randint(0, 512, (2, 9))
    assert not torch.allclose(model(ids), plain(ids))  # the prefix is attended to
    cache = KVCache.for_model(model, 2, 12)
    full = model(ids)
    step = torch.cat([model(ids[:, :5], cache=cache)[:, -1:], model(ids[:, 5:], cache=cache)], 1)
    torch.testing.assert_close(step, full[:, 4:], atol=1e-5, rtol=1e-5)  # cached decode = recompute
    parscale.save(model, tmp_path / "c")
    again = parscale.load(tmp_path / "c")
    assert again.config.parscale_p1_prefix and torch.equal(again(ids), model(ids))
    with pytest.raises(ValueError, match="needs parscale_n = 1"):
        ModelConfig.preset("tiny", parscale_n=2, parscale_p1_prefix=True)
