"""The decode-step timeline (analysis/timeline.py): kernels, busy, span and idle time per step from device
intervals, and on CUDA from a real profiled graph replay."""

from types import SimpleNamespace

import pytest
import torch

from parscale.analysis.timeline import device_intervals, step_timeline, timeline_stats


def test_idle_time_is_the_span_minus_the_union_of_kernel_intervals():
    # two steps: kernels at [0,10) [12,20) [15,18) (overlaps the one before) [30,40); gaps of 2 and 10 µs
    stats = timeline_stats([(12, 20), (0, 10), (15, 18), (30, 40)], steps=2)
    assert stats["kernels_per_step"] == 2.0
    assert stats["busy_us_per_step"] == pytest.approx((10 + 8 + 10) / 2)
    assert stats["span_us_per_step"] == pytest.approx(40 / 2)
    assert stats["idle_us_per_step"] == pytest.approx(12 / 2)
    assert stats["idle_share"] == pytest.approx(12 / 40)
    assert stats["largest_gaps_us"] == [10, 2]


def test_a_kernel_inside_another_does_not_end_the_busy_stretch_early():
    # [0, 50) holds [5, 10); the next kernel starts at 40, inside the first: no gap at all
    stats = timeline_stats([(0, 50), (5, 10), (40, 60)], steps=1)
    assert stats["idle_us_per_step"] == 0 and stats["busy_us_per_step"] == 60 and stats["largest_gaps_us"] == []


def test_no_device_activity_and_bad_step_counts():
    assert timeline_stats([], steps=3)["kernels_per_step"] == 0.0
    with pytest.raises(ValueError, match="steps must be at least 1"):
        timeline_stats([(0, 1)], steps=0)


def test_only_device_events_with_a_duration_are_kept():
    def event(device, start, end):
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [event(cuda, 0, 5), event(cpu, 1, 9), event(cuda, 7, 7), event(cuda, 8, 12)]
    assert device_intervals(events) == [(0.0, 5.0), (8.0, 12.0)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_captured_graph_replay_shows_its_kernels_one_by_one():
    """Inside a CUDA graph the profiler still sees each kernel: 3 element-wise kernels per replay."""
    x = torch.ones(1 << 16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):
            y = ((x + 1) * 2).neg()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ((x + 1) * 2).neg()
    stats = step_timeline(graph.replay, steps=4)
    assert stats["kernels_per_step"] == 3
    assert stats["busy_us_per_step"] > 0 and stats["idle_us_per_step"] >= 0
    assert torch.equal(y, torch.full_like(x, -4.0))


def test_kernels_are_tallied_per_step_by_kind():
    """Every GEMM alike, a generated kernel by its ops (its number dropped), the rest by name; per step, the
    heaviest first, and what is past `top` in one row."""
    from parscale.analysis.timeline import kernel_kind, kernels_by_kind

    assert kernel_kind("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT") == "gemm"
    assert kernel_kind("triton_per_fused_add_mean_mul_3") == "triton_per_fused_add_mean_mul"
    assert kernel_kind("flash_fwd_splitkv_kernel") == "attention"   # not a GEMM for its "splitk"
    assert kernel_kind("_decode_attention_kernel") == "attention"
    named = [(0, 10, "nvjet_a"), (10, 14, "triton_poi_fused_add_0"), (20, 30, "nvjet_b"),
             (30, 32, "triton_poi_fused_add_1"), (40, 41, "memset")]
    rows = kernels_by_kind(named, steps=2)
    assert rows == [{"kind": "gemm", "calls_per_step": 1.0, "us_per_step": 10.0},
                    {"kind": "triton_poi_fused_add", "calls_per_step": 1.0, "us_per_step": 3.0},
                    {"kind": "memset", "calls_per_step": 0.5, "us_per_step": 0.5}]
    top = kernels_by_kind(named, steps=2, top=1)
    assert top[1] == {"kind": "(other)", "calls_per_step": 1.5, "us_per_step": 3.5}
