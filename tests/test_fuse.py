"""Fused q/k/v and gate/up projections (inference/fuse.py): the same function as the unfused model on every
path (forward, generation, the decode engine), after in-place updates, load_state_dict and a dtype change;
the released state-dict names in and out; clear refusals."""

import copy

import pytest
import torch
from conftest import tiny_model

import parscale
from parscale.inference.engine import DecodeEngine
from parscale.inference.fuse import fuse_projections, is_fused
from parscale.inference.quantize import quantize_int8


def _prompt(t=12):
    ids = torch.randint(0, 512, (2, t), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def _close(a, b, dtype=torch.float32):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("streams", [1, 2, 4])
def test_a_fused_model_computes_what_the_unfused_one_computes(family, streams):
    plain = tiny_model(streams=streams, family=family)
    fused = fuse_projections(copy.deepcopy(plain))
    layer = fused.model.layers[0]
    assert is_fused(fused) and hasattr(layer.self_attn, "qkv_proj") and not hasattr(layer.self_attn, "q_proj")
    assert not hasattr(layer.mlp, "gate_proj") and hasattr(layer.mlp, "gate_up_proj")
    ids, mask = _prompt()
    with torch.no_grad():
        _close(fused(ids), plain(ids))
        _close(fused(ids, attention_mask=mask), plain(ids, attention_mask=mask))
    reference = parscale.generate(plain, ids, attention_mask=mask, max_new_tokens=10, use_engine=False)
    assert torch.equal(parscale.generate(fused, ids, attention_mask=mask, max_new_tokens=10, use_engine=False),
                       reference)
    assert torch.equal(parscale.generate(fused, ids, attention_mask=mask, max_new_tokens=10, use_engine=True),
                       reference)


def test_the_engine_on_a_fused_model_follows_recomputation_and_in_place_updates():
    model = fuse_projections(tiny_model(streams=4))
    engine = DecodeEngine(model, batch_size=2, max_len=40)
    ids, mask = _prompt()
    for update in (False, True):
        if update:  # an in-place change of the one fused tensor must reach the next request
            with torch.no_grad():
                model.model.layers[0].self_attn.qkv_proj.weight.mul_(1.5)
                model.model.layers[1].mlp.gate_up_proj.weight.add_(0.01)
        logits = engine.prefill(ids, mask, max_new_tokens=6)
        seq, full_mask = ids, mask
        for _ in range(6):
            with torch.no_grad():
                _close(logits, model(seq, attention_mask=full_mask)[:, -1])
            token = logits.argmax(-1)
            seq = torch.cat([seq, token[:, None]], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(token[:, None])], dim=1)
            logits = engine.decode(token)


def test_the_state_dict_keeps_the_released_names_both_ways():
    plain = tiny_model(streams=2)
    fused = fuse_projections(copy.deepcopy(plain))
    released = plain.state_dict()
    out = fused.state_dict()
    assert set(out) == set(released)
    for key, value in released.items():
        assert torch.equal(out[key], value), key
    # A released state dict with other weights, into the fused model, in place and by assignment.
    other = tiny_model(streams=2, seed=5)
    ids, _ = _prompt()
    with torch.no_grad():
        expected = other(ids)
    for assign in (False, True):
        target = fuse_projections(copy.deepcopy(plain))
        target.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, strict=True, assign=assign)
        with torch.no_grad():
            _close(target(ids), expected)
    with pytest.raises(RuntimeError, match=r"layers\.0\.self_attn\.q_proj\.weight missing"):  # named, not skipped
        broken = {k: v for k, v in released.items() if not k.endswith("layers.0.self_attn.q_proj.weight")}
        fuse_projections(copy.deepcopy(plain)).load_state_dict(broken, strict=True)


def test_a_fused_model_saves_the_released_format(tmp_path):
    plain = tiny_model(streams=4)
    parscale.save(plain, tmp_path / "plain")
    parscale.save(fuse_projections(copy.deepcopy(plain)), tmp_path / "fused")
    a = parscale.load(tmp_path / "plain").state_dict()
    b = parscale.load(tmp_path / "fused").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_dtype_change_after_fusing_equals_fusing_after_it():
    plain = tiny_model(streams=4).to(torch.bfloat16)
    fused = fuse_projections(copy.deepcopy(tiny_model(streams=4))).to(torch.bfloat16)
    assert fused.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    out = fused.state_dict()
    assert all(torch.equal(out[k], v) for k, v in plain.state_dict().items())  # the conversion is per element
    ids, mask = _prompt()
    with torch.no_grad():
        _close(fused(ids, attention_mask=mask), plain(ids, attention_mask=mask), torch.bfloat16)
    assert torch.equal(parscale.generate(fused, ids, attention_mask=mask, max_new_tokens=8, use_engine=True),
                       parscale.generate(fused, ids, attention_mask=mask, max_new_tokens=8, use_engine=False))


def test_training_steps_on_a_fused_model_equal_those_on_the_unfused_one():
    """What `scripts/profile_train.py --fuse` times is the same training: the trainer's loss, backward, clipping
    and AdamW on a fused model give the unfused model's losses and, split back into the released names, its
    weights after every step."""
    from parscale.training.distributed import LossModule

    plain = tiny_model(streams=2).train()
    fused = fuse_projections(copy.deepcopy(plain)).train()
    tokens = torch.randint(0, 512, (3, 4, 17), generator=torch.Generator().manual_seed(5))
    runs = []
    for model in (plain, fused):
        step = LossModule(model, autocast=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        losses = []
        for batch in tokens:
            opt.zero_grad(set_to_none=True)
            loss, _ = step(batch[:, :-1], batch[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    (plain_losses, plain_state), (fused_losses, fused_state) = runs
    assert plain_losses[0] != plain_losses[-1]  # the steps changed the model
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    assert fused_state.keys() == plain_state.keys()
    # Adam divides by the root of the squared gradient, so where a gradient is near zero the rounding of a
    # different summation order (one matmul instead of three) moves a weight by a visible fraction of a step:
    # the weights are compared to 1e-4, a hundredth of the lr (1e-5 failed on one embedding entry by 2.7e-5).
    for name, value in plain_state.items():
        torch.testing.assert_close(fused_state[name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_fusing_refuses_what_it_cannot_do():
    model = fuse_projections(tiny_model(streams=2))
    with pytest.raises(ValueError, match="fused already"):
        fuse_projections(model)
    with pytest.raises(ValueError, match="fused"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="quantized"):
        fuse_projections(quantize_int8(tiny_model(streams=2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_engine_on_a_fused_model_matches_its_plain_path(dtype):
    model = fuse_projections(tiny_model(streams=4)).cuda().to(dtype)
    ids, mask = (t.cuda() for t in _prompt())
    plain = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=20, use_engine=False)
    assert torch.equal(parscale.generate(model, ids, attention_mask=mask, max_new_tokens=20, use_engine=True), plain)
    with torch.no_grad():  # in place, between requests: the captured graphs read the same tensor
        model.model.layers[0].self_attn.qkv_proj.weight.mul_(1.5)
    plain = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=20, use_engine=False)
    assert torch.equal(parscale.generate(model, ids, attention_mask=mask, max_new_tokens=20, use_engine=True), plain)


def test_cli_fuse_flag_generates_the_same_text(tmp_path, capsys):
    """generate fuses by default (--no-fuse keeps the loaded layout); both give the same text."""
    from parscale.cli import main
    from parscale.inference.fuse import fuse_wanted

    assert fuse_wanted(None, None) and not fuse_wanted(None, "int8") and not fuse_wanted(False, None)
    assert main(["new", "--preset", "tiny", "--streams", "2", "--out", str(tmp_path / "m")]) == 0
    texts = []
    for extra in (["--no-fuse"], [], ["--fuse"]):
        capsys.readouterr()
        args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "8", *extra]
        assert main(args) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and texts[0].strip()
    # int8 alone (the default does not fuse it) works; the two weight options exclude each other, with one clear error.
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "2",
                 "--quantize", "int8"]) == 0
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "ab", "--fuse", "--quantize", "int8"]) != 0
    assert "fuse, or quantize, not both" in capsys.readouterr().err
