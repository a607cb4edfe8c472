"""Shared helpers for the CPU test suite."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and p.name.startswith("official_"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tiny_model(streams=1, family="qwen2", seed=0, **overrides):
    import parscale

    preset = {"qwen2": "tiny", "llama": "tiny-llama", "qwen3": "tiny-qwen3"}[family]
    cfg = parscale.ModelConfig.preset(preset, parscale_n=streams, **overrides)
    model = parscale.build_model(cfg, seed=seed).eval()
    # Make the output far from degenerate: a fresh model's zero aggregator gives uniform weights.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "aggregate_layer" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model
