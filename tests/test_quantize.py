"""Weight-only int8: the layer computes with exactly its dequantized weight, the error is bounded by the
rounding, and every fast path (the decode engine, after a dtype change) equals the plain path of the same
quantized model."""

import pytest
import torch
from conftest import tiny_model

import parscale
from parscale.inference.quantize import Int8Linear, is_quantized, quantize_int8


def test_int8_linear_computes_with_its_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * torch.logspace(-3, 0, 48)[:, None])  # rows of all sizes
    q = Int8Linear(linear)
    x = torch.randn(5, 64, generator=g)
    reference = torch.nn.functional.linear(x.double(), q.dequantized().double(), linear.bias.double())
    assert torch.linalg.norm(q(x).double() - reference) / torch.linalg.norm(reference) < 1e-6
    # Round to nearest: every weight within half a step of its row's scale.
    error = (q.dequantized() - linear.weight).abs()
    assert bool((error <= q.scale[:, None] / 2 + 1e-9).all())
    assert q.weight_int8.dtype == torch.int8 and int(q.weight_int8.abs().max()) == 127


def test_quantized_model_is_close_and_its_fast_paths_equal_its_plain_path():
    model = tiny_model(streams=4)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = model(ids)
    quantize_int8(model)
    assert is_quantized(model) and sum(isinstance(m, Int8Linear) for m in model.modules()) == 7 * 2
    with torch.no_grad():
        after = model(ids)
    assert 0 < float(torch.linalg.norm(after - before) / torch.linalg.norm(before)) < 0.02  # changed, a little
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    plain = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=8, use_engine=False)
    fast = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=8, use_engine=True)
    assert torch.equal(plain, fast)
    model.to(torch.bfloat16)  # the int8 tensors keep their dtype, the scales follow the model
    assert model.model.layers[0].mlp.up_proj.weight_int8.dtype == torch.int8
    assert model.model.layers[0].mlp.up_proj.scale.dtype == torch.bfloat16
    plain = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=8, use_engine=False)
    fast = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=8, use_engine=True)
    assert torch.equal(plain, fast)
    with pytest.raises(ValueError, match="quantized already"):
        quantize_int8(model)


@pytest.mark.parametrize("streams", [1, 2])
def test_the_compiled_engine_on_int8_weights_equals_the_plain_path(streams):
    """Compiled, a decode step's projections (P · batch rows, few) are the fp32 reduction of Int8Linear.forward;
    the engine gives the plain path's tokens and a full recomputation's logits."""
    import parscale.inference.quantize as quantize
    from parscale.inference.engine import engine_for

    model = quantize_int8(tiny_model(streams=streams))
    rows = []
    forward = quantize.Int8Linear.forward

    def spy(self, x):
        rows.append((torch.compiler.is_compiling(), x.numel() // x.shape[-1]))
        return forward(self, x)

    ids = torch.randint(0, 512, (1, 7))
    plain = parscale.generate(model, ids, max_new_tokens=6, use_engine=False)
    quantize.Int8Linear.forward = spy
    try:
        engine = engine_for(model, compile=True)
        logits = engine.prefill(ids, None, max_new_tokens=2)
        token = logits.argmax(-1)
        step = engine.decode(token)
    finally:
        quantize.Int8Linear.forward = forward
    assert (True, streams) in rows  # the compiled decode step went through forward with P · batch rows
    with torch.no_grad():
        full = model(torch.cat([ids, token[:, None]], dim=1))[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    fast = parscale.generate(model, ids, max_new_tokens=6, use_engine=True, compile=True)
    assert torch.equal(plain, fast)


def test_int8_matvec_form_equals_the_linear_form_under_compile():
    """The reduction written for a few rows computes what F.linear on the dequantized weight computes, and so
    does the F.linear form compiled for more rows."""
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(96, 40)
    q = Int8Linear(linear)
    x = torch.randn(1, 1, 96, generator=g)
    compiled = torch.compile(q, fullgraph=True, dynamic=False)
    reference = torch.nn.functional.linear(x.double(), q.dequantized().double(), linear.bias.double())
    assert torch.linalg.norm(compiled(x).double() - reference) / torch.linalg.norm(reference) < 1e-6
    x8 = torch.randn(3, 8, 96, generator=g)  # 24 rows: the F.linear form
    reference = torch.nn.functional.linear(x8.double(), q.dequantized().double(), linear.bias.double())
    assert torch.linalg.norm(compiled(x8).double() - reference) / torch.linalg.norm(reference) < 1e-6


def test_a_quantized_model_is_not_saved(tmp_path):
    with pytest.raises(parscale.CheckpointError, match="int8-quantized"):
        parscale.save(quantize_int8(tiny_model(streams=2)), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_cli_quantize_flag(tmp_path, capsys):
    from parscale.cli import main

    assert main(["new", "--preset", "tiny", "--streams", "2", "--out", str(tmp_path / "m")]) == 0
    (tmp_path / "t.txt").write_text("some text to score " * 40)
    for extra in ([], ["--quantize", "int8"]):
        assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--out",
                     str(tmp_path / f"e{len(extra)}.json")] + extra) == 0
    import json

    plain, quantized = (json.loads((tmp_path / f"e{n}.json").read_text()) for n in (0, 2))
    assert quantized["quantize"] == "int8" and plain["quantize"] is None
    assert quantized["loss"] != plain["loss"] and abs(quantized["loss"] - plain["loss"]) < 0.05
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "3",
                 "--quantize", "int8"]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_engine_warns_about_int8_speed_on_cuda():
    from parscale.inference.engine import DecodeEngine

    model = quantize_int8(tiny_model(streams=2)).cuda()
    with pytest.warns(UserWarning, match="save memory, not time"):
        DecodeEngine(model, compile=True)
