"""A benchmark point's peak memory is its own: not raised by what an earlier point on the same model left."""

import pytest
import torch
from conftest import tiny_model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_point_after_a_larger_one_reports_the_same_peak_as_alone():
    """The model keeps its last decode cache for the next request; the benchmark measured the next point's peak
    from an allocation that still held it, so a 64-token point after a 512-token one of half the batch reported
    0.79 GiB more than its own at 2.8B P = 8, batch 8 (benchmarks/README.md)."""
    from parscale.analysis.bench import measure_point

    # Every prompt here goes through the captured prefill (P · batch · length < 4,096 rows), warmed up on the
    # engine's one side stream: an eager prefill would run cuBLAS on the default stream for the first time and
    # add that stream's workspace (tens of MiB, kept for the process's life) to every later point.
    model = tiny_model(streams=2, num_hidden_layers=4).cuda().to(torch.bfloat16)
    alone = measure_point(model, 1, 64, "graph", memory_only=True)["peak_memory_bytes"]
    large = measure_point(model, 4, 256, "graph", memory_only=True)
    after = measure_point(model, 1, 64, "graph", memory_only=True)["peak_memory_bytes"]
    cfg = model.config
    large_cache = 2 * cfg.num_hidden_layers * 4 * cfg.parscale_n * cfg.num_key_value_heads * 512 * cfg.head_dim * 2
    assert large["peak_memory_bytes"] - alone > large_cache // 2  # the earlier point's cache is worth detecting
    assert abs(after - alone) < large_cache // 20, (alone, after, large_cache)
