"""The skinny decode matmul (inference/skinny_matmul.py) equals F.linear: its fallback everywhere, its kernel
under Triton's CPU interpreter (where Triton is installed) and on a GPU (`pytest -m gpu`)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from parscale.inference.skinny_matmul import SkinnyConfig, default_config, kernel_available, skinny_linear

HAS_TRITON = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0


def test_fallback_is_f_linear_on_cpu():
    x, w, b = torch.randn(2, 3, 40), torch.randn(24, 40), torch.randn(24)
    assert not kernel_available(x, w)
    assert torch.equal(skinny_linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("rows,n", [(1, 1536), (8, 1536), (8, 16640), (16, 100)])
def test_default_config_spreads_narrow_matrices(rows, n):
    c = default_config(rows, n, 1536)
    assert (n + c.block_n - 1) // c.block_n >= min(512, n)  # enough programs for every multiprocessor
    assert c.block_m(rows) >= rows


INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from parscale.inference.skinny_matmul import SkinnyConfig, default_config, launch
    torch.manual_seed(0)
    worst = 0.0
    for rows in (1, 3, 8, 16):
        for n, k in ((40, 96), (33, 300)):
            x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
            ref = F.linear(x.double(), w.double(), b.double())
            for cfg in (default_config(rows, n, k), SkinnyConfig(1, 32), SkinnyConfig(4, 64),
                        SkinnyConfig(16, 64, use_dot=True)):
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
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (the interpreter runs the kernel on CPU)")
def test_kernel_equals_f_linear_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


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
        configs = [default_config(rows, n, k), SkinnyConfig(1, 512), SkinnyConfig(8, 128, num_warps=8)]
        if dtype != torch.float32:
            configs.append(SkinnyConfig(16, 128, use_dot=True))
        for cfg in configs:
            y = skinny_linear(x, w, b, cfg)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            # no worse than torch's own matmul in the same dtype (up to one rounding of the output)
            assert err <= max(2 * torch_err, 1e-6 if dtype == torch.float32 else 4e-3), (cfg, err, torch_err)


def test_use_skinny_matmul_keeps_parameters_and_state_dict():
    from conftest import tiny_model

    from parscale.inference.skinny_matmul import SkinnyLinear, use_skinny_matmul, uses_skinny_matmul

    model = tiny_model(streams=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    plain = model(ids)
    use_skinny_matmul(model)
    assert uses_skinny_matmul(model) and isinstance(model.model.layers[0].mlp.down_proj, SkinnyLinear)
    assert not any(isinstance(m, SkinnyLinear) for m in model.model.aggregate_layer.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(model(ids), plain)  # on CPU every product falls back to F.linear
    use_skinny_matmul(model, enable=False)
    assert not uses_skinny_matmul(model) and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def _tokens(model, ids, mask, **kw):
    import parscale

    return parscale.generate(model, ids, attention_mask=mask, max_new_tokens=16, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_engine_with_the_kernel_matches_the_plain_path(compile):
    """fp32 (where the kernel and torch's matmul differ only in summation order): the same tokens."""
    from conftest import tiny_model

    from parscale.inference.fuse import fuse_projections
    from parscale.inference.skinny_matmul import use_skinny_matmul

    torch.manual_seed(0)
    model = fuse_projections(tiny_model(streams=4)).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    plain = _tokens(model, ids, mask, use_engine=False)
    use_skinny_matmul(model)
    assert torch.equal(_tokens(model, ids, mask, use_engine=True, compile=compile), plain)
    with torch.no_grad():  # the weights change in place: the kernel reads the new ones
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    use_skinny_matmul(model, enable=False)
    plain = _tokens(model, ids, mask, use_engine=False)
    use_skinny_matmul(model)
    assert torch.equal(_tokens(model, ids, mask, use_engine=True, compile=compile), plain)


def test_tuned_configs_become_the_defaults(tmp_path):
    import json

    from parscale.inference import skinny_matmul

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps([{"rows": 8, "n": 1536, "k": 8320, "us": 9.0,
                                 "config": {"block_n": 32, "block_k": 64, "num_warps": 8, "num_stages": 4,
                                            "use_dot": True}}]))
    untuned = default_config(8, 1536, 8320)
    try:
        skinny_matmul.set_tuned_configs(path)
        assert default_config(8, 1536, 8320) == SkinnyConfig(32, 64, 8, 4, True)
        assert default_config(1, 1536, 8320) != SkinnyConfig(32, 64, 8, 4, True)  # another row count
    finally:
        skinny_matmul.set_tuned_configs([])
    assert default_config(8, 1536, 8320) == untuned
