"""The skinny decode matmul (inference/skinny_matmul.py) equals F.linear: its fallback everywhere, its kernel
under Triton's CPU interpreter (where Triton is installed) and on a GPU (`pytest -m gpu`)."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import run_interpreted

from parscale.inference.skinny_matmul import SkinnyConfig, default_config, kernel_available, skinny_linear


def test_fallback_is_f_linear_on_cpu():
    x, w, b = torch.randn(2, 3, 40), torch.randn(24, 40), torch.randn(24)
    assert not kernel_available(x, w)
    assert torch.equal(skinny_linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("rows,n", [(1, 1536), (8, 1536), (8, 16640), (16, 100)])
def test_default_config_spreads_narrow_matrices(rows, n):
    c = default_config(rows, n, 1536, dtype=torch.float32)
    assert (n + c.block_n - 1) // c.block_n >= min(512, n)  # enough programs for every multiprocessor
    assert c.block_m(rows) >= rows and not c.use_dot  # float32: never TF32
    c16 = default_config(rows, n, 1536, dtype=torch.bfloat16)
    assert c16.use_dot and c16.block_n >= 16 and c16.block_m(rows) >= rows


INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from parscale.inference.skinny_matmul import SkinnyConfig, default_config, launch
    torch.manual_seed(0)
    worst = 0.0
    for rows in (1, 3, 8, 16):
        for n, k in ((40, 96), (33, 300)):
            x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
            ref = F.linear(x.double(), w.double(), b.double())
            defaults = [default_config(rows, n, k, dtype=d) for d in (torch.float32, torch.bfloat16)]
            for cfg in (*defaults, SkinnyConfig(1, 32), SkinnyConfig(4, 64), SkinnyConfig(16, 64, use_dot=True)):
                for bias in (b, None):
                    y = launch(x, w, bias, cfg)
                    want = ref if bias is not None else ref - b.double()
                    assert y.shape == (rows, n) and y.dtype == torch.float32
                    worst = max(worst, ((y.double() - want).norm() / want.norm()).item())
    # bfloat16 weights and rows: the broadcast form (the interpreter's tl.dot is not exact in bf16)
    x, w = torch.randn(8, 300, dtype=torch.bfloat16), torch.randn(70, 300, dtype=torch.bfloat16)
    y = launch(x, w, None, SkinnyConfig(2, 128))
    ref = F.linear(x.float(), w.float())
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3
    assert torch.equal(launch(x.reshape(2, 4, 300), w, None, SkinnyConfig(2, 128)).reshape(8, 70), y)
    print(f"worst {worst:.2e}")
    assert worst < 1e-6, worst
    # the fused forms against the plain path's arithmetic (reference): RMSNorm before, gate, residual after
    from parscale.inference.skinny_matmul import reference
    fused = 0.0
    for rows in (1, 5, 16):
        n, k = 40, 96
        x, w, b = torch.randn(rows, k) * 3, torch.randn(n, k), torch.randn(n)
        g, r, r_half = torch.randn(k), torch.randn(rows, n), torch.randn(rows, n // 2)
        for cfg in (SkinnyConfig(1, 32), SkinnyConfig(4, 64), SkinnyConfig(16, 64, use_dot=True)):
            for kw in (dict(norm_weight=g, eps=1e-5), dict(swiglu=True), dict(residual=r),
                       dict(norm_weight=g, eps=1e-5, residual=r), dict(norm_weight=g, eps=1e-5, swiglu=True),
                       dict(swiglu=True, residual=r_half)):
                want = reference(x.double(), w.double(), b.double(), **{k_: (v.double() if torch.is_tensor(v)
                                 else v) for k_, v in kw.items()})
                y = launch(x, w, b, cfg, **kw)
                assert y.shape == want.shape, (y.shape, want.shape)
                fused = max(fused, ((y.double() - want).norm() / want.norm()).item())
    print(f"fused worst {fused:.2e}")
    assert fused < 1e-6, fused
""")

# A tiny model whose decoder layers run through the kernel under the interpreter (skinny_linear's dispatch
# pointed at `launch`): its logits and greedy tokens against the plain model's, float32.
INTERPRETED_MODEL = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from conftest import randomize_norms, tiny_model
    import parscale
    from parscale.inference import skinny_matmul as sm
    from parscale.inference.fuse import fuse_projections
    sm.kernel_available = lambda x, w: x.numel() // x.shape[-1] <= sm.MAX_ROWS
    sm._call_kernel = lambda x, w, b, c, **kw: sm.launch(x, w, b, c, **kw)
    model = randomize_norms(fuse_projections(tiny_model(streams=2)))
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    plain_logits = model(ids)
    plain = parscale.generate(model, ids, max_new_tokens=8, use_engine=False)
    sm.use_skinny_matmul(model, fuse_layers=True)
    logits = model(ids)
    err = ((logits - plain_logits).norm() / plain_logits.norm()).item()
    print(f"logits rel err {err:.2e}")
    assert err < 1e-5, err
    assert torch.equal(parscale.generate(model, ids, max_new_tokens=8, use_engine=False), plain)
""")


def test_kernel_equals_f_linear_under_the_interpreter():
    run_interpreted(INTERPRETED, timeout=600)


def test_skinny_layers_equal_the_plain_model_under_the_interpreter():
    run_interpreted(INTERPRETED_MODEL, timeout=600)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_plain_models_arithmetic(dtype):
    """The fallback (and the kernel tests' oracle) computes each fused product exactly as the model's layer."""
    from conftest import tiny_model

    from parscale.inference.fuse import fuse_projections
    from parscale.inference.skinny_matmul import reference

    layer = fuse_projections(tiny_model(streams=2)).to(dtype).model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight.normal_()
    x = torch.randn(3, 5, layer.input_layernorm.weight.shape[0], dtype=dtype)
    norm, qkv = layer.input_layernorm, layer.self_attn.qkv_proj
    assert torch.equal(reference(x, qkv.weight, qkv.bias, norm_weight=norm.weight, eps=norm.eps), qkv(norm(x)))
    gate, up = layer.mlp.gate_up_proj(x).chunk(2, dim=-1)
    act = reference(x, layer.mlp.gate_up_proj.weight, swiglu=True)
    assert torch.equal(act, torch.nn.functional.silu(gate) * up)
    assert torch.equal(reference(act, layer.mlp.down_proj.weight, residual=x), x + layer.mlp(x))


def _run_layers_through_reference(monkeypatch):
    """skinny_linear as if the kernel ran (rows <= MAX_ROWS), computing with `reference`: what
    SkinnyDecoderLayer wires together is then checked on any machine."""
    from parscale.inference import skinny_matmul as sm

    calls = []

    def fake_kernel(x, w, b, c, **kw):
        calls.append(sorted(k for k, v in kw.items() if k != "eps" and v is not None and v is not False))
        return sm.reference(x, w, b, **kw)

    monkeypatch.setattr(sm, "kernel_available", lambda x, w: x.numel() // x.shape[-1] <= sm.MAX_ROWS)
    monkeypatch.setattr(sm, "_call_kernel", fake_kernel)
    return calls


def test_skinny_layers_compute_the_plain_layers(monkeypatch):
    from conftest import randomize_norms, same_state, state_snapshot, tiny_model

    import parscale
    from parscale.inference.fuse import fuse_projections
    from parscale.inference.skinny_matmul import SkinnyDecoderLayer, use_skinny_matmul, uses_skinny_layers

    model = tiny_model(streams=2)
    with pytest.raises(ValueError, match="fuse the model's projections first"):
        use_skinny_matmul(model, fuse_layers=True)
    model = randomize_norms(fuse_projections(model))
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    plain_logits = model(ids)
    plain = parscale.generate(model, ids, max_new_tokens=8, use_engine=False)
    before = state_snapshot(model)
    calls = _run_layers_through_reference(monkeypatch)
    use_skinny_matmul(model, fuse_layers=True)
    assert uses_skinny_layers(model) and isinstance(model.model.layers[1], SkinnyDecoderLayer)
    assert torch.equal(model(ids), plain_logits)  # 2 streams x 6 tokens = 12 rows: the kernel's path
    layers = model.config.num_hidden_layers
    assert calls[:4] == [["norm_weight"], ["residual"], ["norm_weight", "swiglu"], ["residual"]]
    assert len(calls) == 4 * layers + 1  # four per layer and the LM head
    assert torch.equal(parscale.generate(model, ids, max_new_tokens=8, use_engine=False), plain)
    assert same_state(model, before)
    use_skinny_matmul(model, enable=False)
    assert not uses_skinny_layers(model) and type(model.model.layers[0]) is parscale.model.transformer.DecoderLayer


def test_fp32_products_ignore_measured_dot_configs(tmp_path):
    """A tl.dot config measured on bf16 would compute float32 in TF32: float32 keeps the exact form."""
    from parscale.inference import skinny_matmul

    tuned = SkinnyConfig(32, 64, 8, 4, True)
    skinny_matmul.set_tuned_configs([{"rows": 8, "n": 1536, "k": 8320, "config": tuned.__dict__}])
    try:
        assert default_config(8, 1536, 8320, dtype=torch.bfloat16) == tuned
        assert default_config(8, 1536, 8320, dtype=torch.float32) != tuned
    finally:
        skinny_matmul.set_tuned_configs([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 8, 16])
def test_fused_forms_on_gpu(dtype, rows):
    """RMSNorm before, gate, residual after: no further from the exact result than the plain path in the
    same dtype."""
    from parscale.inference.skinny_matmul import reference

    torch.manual_seed(rows)
    n, k = 1536, 1536
    x = torch.randn(rows, k, device="cuda", dtype=dtype) * 3
    w = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
    g = 1 + 0.3 * torch.randn(k, device="cuda", dtype=dtype)
    r = torch.randn(rows, n, device="cuda", dtype=dtype)
    for kw in (dict(norm_weight=g, eps=1e-6), dict(swiglu=True), dict(residual=r),
               dict(norm_weight=g, eps=1e-6, swiglu=True)):
        exact = reference(x.double(), w.double(), None,
                          **{a: (v.double() if torch.is_tensor(v) else v) for a, v in kw.items()})
        plain_err = ((reference(x, w, None, **kw).double() - exact).norm() / exact.norm()).item()
        for cfg in (default_config(rows, n, k, dtype=dtype), SkinnyConfig(4, 256),
                    SkinnyConfig(16, 128, use_dot=True)):
            err = ((skinny_linear(x, w, None, cfg, **kw).double() - exact).norm() / exact.norm()).item()
            assert err <= max(2 * plain_err, 4e-3), (kw.keys(), cfg, err, plain_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 8, 16])
def test_kernel_equals_f_linear_on_gpu(dtype, rows):
    torch.manual_seed(rows)
    for n, k in ((1920, 1536), (1536, 8320), (1000, 200)):
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
        b = torch.randn(n, device="cuda", dtype=dtype)
        ref = F.linear(x.double(), w.double(), b.double())
        torch_err = ((F.linear(x, w, b).double() - ref).norm() / ref.norm()).item()
        # every form in every dtype: the tl.dot form in fp32 too (IEEE there, not Triton's default TF32)
        configs = [default_config(rows, n, k, dtype=dtype), default_config(rows, n, k, dtype=torch.bfloat16),
                   SkinnyConfig(1, 512), SkinnyConfig(8, 128, num_warps=8), SkinnyConfig(16, 128, use_dot=True)]
        for cfg in configs:
            y = skinny_linear(x, w, b, cfg)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            # no worse than torch's own matmul in the same dtype (up to one rounding of the output); in fp32 the
            # kernel sums in another order than cuBLAS (1.2e-6 measured on an H100 for the 16 x 256 dot form,
            # cuBLAS 1.1e-7), while a dot that ran in TF32 is off by ~5e-4: the floor sits between the two
            assert err <= max(2 * torch_err, 1e-5 if dtype == torch.float32 else 4e-3), (cfg, err, torch_err)


def test_use_skinny_matmul_keeps_parameters_and_state_dict():
    from conftest import same_state, state_snapshot, tiny_model

    from parscale.inference.skinny_matmul import SkinnyLinear, use_skinny_matmul, uses_skinny_matmul

    model = tiny_model(streams=2)
    before = state_snapshot(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    plain = model(ids)
    use_skinny_matmul(model)
    assert uses_skinny_matmul(model) and isinstance(model.model.layers[0].mlp.down_proj, SkinnyLinear)
    assert not any(isinstance(m, SkinnyLinear) for m in model.model.aggregate_layer.modules())
    assert same_state(model, before)
    assert torch.equal(model(ids), plain)  # on CPU every product falls back to F.linear
    use_skinny_matmul(model, enable=False)
    assert not uses_skinny_matmul(model) and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def _tokens(model, ids, mask, **kw):
    import parscale

    return parscale.generate(model, ids, attention_mask=mask, max_new_tokens=16, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("fuse_layers", [False, True])
def test_engine_with_the_kernel_matches_the_plain_path(compile, fuse_layers):
    """fp32 (where the kernel and torch's matmul differ only in summation order): each decode step's logits within
    that error of the plain path's, and the same tokens; again after a weight changes in place. The plain path
    runs first in the same engine, so a compiled step that kept the plain code (inference/class_swap.py) fails."""
    from conftest import decode_step_logits, tiny_model

    from parscale.inference.fuse import fuse_projections
    from parscale.inference.skinny_matmul import use_skinny_matmul

    torch.manual_seed(0)
    model = fuse_projections(tiny_model(streams=4)).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    fed = list(torch.randint(0, model.config.vocab_size, (12, 2), device="cuda"))
    for _ in range(2):
        plain = _tokens(model, ids, mask, use_engine=False)
        plain_logits = decode_step_logits(model, ids, mask, fed, compile=compile)
        use_skinny_matmul(model, fuse_layers=fuse_layers)
        logits = decode_step_logits(model, ids, mask, fed, compile=compile)
        err = ((logits - plain_logits).norm() / plain_logits.norm()).item()
        assert 0 < err < 1e-5, err  # 0: the kernel did not run
        assert torch.equal(_tokens(model, ids, mask, use_engine=True, compile=compile), plain)
        use_skinny_matmul(model, enable=False)
        with torch.no_grad():  # the weights change in place: the kernel reads the new ones
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)


def test_tuned_configs_become_the_defaults(tmp_path):
    import json

    from parscale.inference import skinny_matmul

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps([{"rows": 8, "n": 1536, "k": 8320, "us": 9.0,
                                 "config": {"block_n": 32, "block_k": 64, "num_warps": 8, "num_stages": 4,
                                            "use_dot": True}}]))
    untuned = default_config(8, 1536, 8320, dtype=torch.bfloat16)
    try:
        skinny_matmul.set_tuned_configs(path)
        assert default_config(8, 1536, 8320, dtype=torch.bfloat16) == SkinnyConfig(32, 64, 8, 4, True)
        # another row count
        assert default_config(1, 1536, 8320, dtype=torch.bfloat16) != SkinnyConfig(32, 64, 8, 4, True)
    finally:
        skinny_matmul.set_tuned_configs([])
    assert default_config(8, 1536, 8320, dtype=torch.bfloat16) == untuned
