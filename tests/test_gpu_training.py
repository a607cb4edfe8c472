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
