"""Every training option runs on a CUDA GPU (bf16 autocast, fused AdamW) and resumes exactly there."""

import json

import pytest
import torch
from test_train import _cfg, _losses

import parscale
from parscale.training.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OPTIONS = {
    "plain": {},
    "prefix_reparam": dict(prefix_reparam=True, reparam_latent=8, reparam_hidden=16),
    "activation_checkpointing": dict(activation_checkpointing=True),
    "compile": dict(compile=True),
    "grad_accum": dict(grad_accum=2),
    "wsd": dict(schedule="wsd"),
    "loss_chunk_rows": dict(loss_chunk_rows=50),
    "loss_chunk_rows+compile": dict(loss_chunk_rows=50, compile=True),
    # the recycling experiment's setting (experiments/recycle_smollm2): compiled, layers recomputed, backbone frozen
    "activation_checkpointing+compile": dict(activation_checkpointing=True, compile=True),
    "activation_checkpointing+compile+frozen": dict(activation_checkpointing=True, compile=True, trainable="parscale"),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_trains_and_resumes_on_cuda(data_dir, tmp_path, option):
    kw = dict(OPTIONS[option], device="cuda", steps=6, save_every=3, eval_every=3)
    result = train(_cfg(data_dir, tmp_path / "full", **kw))
    losses = _losses(tmp_path / "full")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] and result["val_loss"] is not None
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["peak_memory_gib"] for r in rows]  # a high-water mark: positive, never falling
    assert peaks[0] > 0 and peaks == sorted(peaks)
    train(_cfg(data_dir, tmp_path / "part", **kw), stop_after=3)
    train(_cfg(data_dir, tmp_path / "part", **kw), resume=True)
    assert _losses(tmp_path / "part") == pytest.approx(losses, abs=2e-3)  # bf16 autocast: not bit-exact
    model = parscale.load(tmp_path / "full", device="cuda")
    assert torch.isfinite(model(torch.ones(1, 4, dtype=torch.long, device="cuda"))).all()


def test_frozen_backbone_adapter_on_cuda(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "base", streams=1, steps=2, device="cuda"))
    base = tmp_path / "base" / "checkpoints" / "latest" / "model"
    train(_cfg(data_dir, tmp_path / "a", model=str(base), streams=2, trainable="parscale", steps=3, device="cuda"))
    from parscale.training.adapter import load_adapter

    before = parscale.load(base, device="cuda")
    model = load_adapter(before, tmp_path / "a" / "adapter")
    after = parscale.load(tmp_path / "a", device="cuda")
    ids = torch.randint(0, after.config.vocab_size, (2, 6), device="cuda")
    torch.testing.assert_close(model(ids), after(ids))


@pytest.mark.parametrize("option", ["plain", "grad_accum"])
def test_training_steps_do_not_wait_for_the_device(data_dir, tmp_path, monkeypatch, option):
    """Between two metric reads no training step makes the host wait for the GPU: from each step's
    `StepMetrics.add` until the next read, CUDA sync debugging is set to raise on any synchronising call."""
    from parscale.training.step_metrics import StepMetrics

    real_add, real_read, checked = StepMetrics.add, StepMetrics.read, []

    def add(self, *args):
        real_add(self, *args)
        torch.cuda.set_sync_debug_mode("error")
        checked.append(len(self.rows))

    def read(self, *args):
        torch.cuda.set_sync_debug_mode("default")
        return real_read(self, *args)

    monkeypatch.setattr(StepMetrics, "add", add)
    monkeypatch.setattr(StepMetrics, "read", read)
    try:
        train(_cfg(data_dir, tmp_path / "run", **OPTIONS[option], device="cuda", steps=12, log_every=6,
                   eval_every=0, save_every=0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked.count(1) == 2 and max(checked) == 6  # two windows of 6 steps, 5 steps of each checked


def test_chunked_loss_equals_the_plain_path_under_bf16_autocast():
    """On CUDA under bf16 autocast (the trainer's setting) the chunked loss and its gradients equal lm_head +
    float32 cross-entropy within bf16 matmul rounding."""
    import torch.nn.functional as F

    from parscale.training.chunked_loss import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4, 256, 512, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(8192, 512, device="cuda", generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, 8192, (4, 256), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten())
        out = linear_cross_entropy(hidden, weight, targets, 300)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    grads = torch.autograd.grad(out, (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())
