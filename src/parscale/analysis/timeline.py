"""How many kernels a decode step runs on the GPU and how long the GPU sits idle between them.

A small-batch decode step is bound less by its bytes than by its kernels: each one has a fixed cost and a gap
before the next, even inside a CUDA graph. `step_timeline(step, steps)` runs `step` that many times under
torch.profiler (CUDA activity: the kernels a captured graph replays are seen one by one) and reduces the
device kernels' [start, end) intervals with `timeline_stats`:

- kernels per step;
- busy time per step: the union of the kernel intervals (overlapping kernels count once);
- span per step: first kernel start to last kernel end, over the steps;
- idle per step: span − busy (launch gaps, a graph's node-to-node latency, the host where it waits), and its
  share of the span;
- the largest gaps, for where they sit;
- the device time per step by kernel kind (`kernel_kind`: every GEMM alike, attention alike, each generated
  Triton kernel by its ops, anything else by its name): where the busy time goes, in the step as it really runs
  (compiled and captured), not in an eager stand-in.

The benchmark records this for every point it times (`parscale bench --kernels`): the numbers to compare
before and after a change to the step.
"""

from __future__ import annotations

import re


def timeline_stats(intervals: list[tuple[float, float]], steps: int, largest: int = 5) -> dict:
    """Kernel count, busy, span and idle time per step (µs) of device-kernel [start, end) intervals covering
    `steps` steps."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not intervals:
        return {"kernels_per_step": 0.0, "busy_us_per_step": 0.0, "span_us_per_step": 0.0, "idle_us_per_step": 0.0,
                "idle_share": None, "largest_gaps_us": []}
    ordered = sorted(intervals)
    busy, gaps = 0.0, []
    start, end = ordered[0]
    for s, e in ordered[1:]:
        if s > end:             # a gap: the GPU ran no kernel in (end, s)
            busy += end - start
            gaps.append(s - end)
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = end - ordered[0][0]   # the last merged stretch ends at the latest end
    idle = span - busy
    return {"kernels_per_step": len(ordered) / steps, "busy_us_per_step": busy / steps,
            "span_us_per_step": span / steps, "idle_us_per_step": idle / steps,
            "idle_share": idle / span if span > 0 else None,
            "largest_gaps_us": sorted(gaps, reverse=True)[:largest]}


def kernel_kind(name: str) -> str:
    """A kernel name folded into a group: every GEMM alike, every attention kernel alike, every generated
    (Triton) kernel by its ops, anything else by the first 80 characters of its name."""
    lowered = name.lower()
    # attention first: flash-decoding's kernels are named "splitkv", which the GEMM test would take
    if any(k in lowered for k in ("flash", "fmha", "attention", "sdpa", "efficient_attention")):
        return "attention"
    if any(k in lowered for k in ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "splitk")):
        return "gemm"
    if name.startswith("triton_"):
        return re.sub(r"_\d+$", "", name)  # triton_per_fused_add_mean_mul_3 -> triton_per_fused_add_mean_mul
    return name[:80]


def device_events(events) -> list[tuple[float, float, str]]:
    """[start, end) in µs and the name of every device (CUDA) activity among a profiler's events: kernels,
    copies, sets."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    out = []
    for evt in events:
        if getattr(evt, "device_type", None) != cuda:
            continue
        start, end = evt.time_range.start, evt.time_range.end
        if end > start:
            out.append((float(start), float(end), getattr(evt, "name", "")))
    return out


def device_intervals(events) -> list[tuple[float, float]]:
    """[start, end) in µs of every device (CUDA) activity among a profiler's events."""
    return [(start, end) for start, end, _ in device_events(events)]


def kernels_by_kind(named: list[tuple[float, float, str]], steps: int, top: int = 15) -> list[dict]:
    """Device time and calls per step by `kernel_kind`, heaviest first (the first `top`, then the rest in one
    row named "(other)")."""
    groups: dict[str, list[float]] = {}
    for start, end, name in named:
        g = groups.setdefault(kernel_kind(name), [0, 0.0])
        g[0] += 1
        g[1] += end - start
    rows = sorted(({"kind": k, "calls_per_step": c / steps, "us_per_step": us / steps}
                   for k, (c, us) in groups.items()), key=lambda r: -r["us_per_step"])
    if len(rows) > top:
        rest = rows[top:]
        rows = rows[:top] + [{"kind": "(other)", "calls_per_step": sum(r["calls_per_step"] for r in rest),
                              "us_per_step": sum(r["us_per_step"] for r in rest)}]
    return rows


def step_timeline(step, steps: int = 8) -> dict:
    """Run `step()` `steps` times under torch.profiler (after the caller's warm-up) and return timeline_stats of
    the device activity it saw, with its kernels by kind. CUDA only."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    named = device_events(prof.events())
    return {**timeline_stats([(start, end) for start, end, _ in named], steps),
            "kernels_by_kind": kernels_by_kind(named, steps)}
