"""Analytic cost model: memory and latency of ParScale inference for any shape, P, batch and length.

It models the decode engine as it runs today (inference/engine.py): fused projections, the LM head on the
last prompt position only, bounded cache reads and a padded prompt prefilled through captured graphs.

Memory = weights + KV cache (the engine's static buffer: prefix + input + output slots per stream)
+ prefill activations (hidden states and MLP intermediates of the padded prompt, the last position's logits)
+ a constant runtime overhead (cuBLAS workspaces, graph pools).

Latency = prefill + output tokens × decode step.
- A decode step sums, over every operation, max(FLOPs / (peak · compute efficiency),
  bytes / (bandwidth · memory efficiency)) — every weight read once, a GEMM over P·B rows (the LM head
  and aggregator over B rows), attention reading the cache slots the step reads (with bounded reads the
  smallest of 256, 512, ... that holds the tokens written, at the middle of the answer) — plus a per-layer
  floor for the small kernels each layer launches (launch-to-launch time inside a CUDA graph).
- Prefill is max(compute time, one read of the weights, a per-layer floor): the captured floor when the
  padded prompt has fewer than 4,096 rows (P · batch · padded length), else the eager one.

The floors and the runtime overhead depend on the engine, not on the model: `calibrate` derives them from one
measured point (1.6B, P = 1, batch 1, 64 + 64 tokens; for the graph engine a second one of 64 rows sets how
its floor grows with P · batch) and the model is validated on every other measured point (`parscale cost
--validate-latency ... --validate-memory ...`, which leaves those points out). ENGINES
holds the constants calibrated on one H200 (benchmarks/raw, CALIBRATION_FILES; a test re-derives them from
those files). GPU specs are datasheet peak numbers with measured device-to-device bandwidths standing in
for the datasheet ones; the floors were measured on an H200 and are used as they are for the other GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from parscale.analysis.bench_files import LATENCY_KEYS, MEMORY_KEYS, read_bench_json
from parscale.inference.engine import DecodeEngine
from parscale.model.config import ModelConfig


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bandwidth: float  # bytes/s
    bf16_flops: float  # dense FLOP/s
    mem_eff: float = 0.9
    compute_eff: float = 0.7


GPUS = {
    "h100": GPU("H100 80GB", 79.2, 3.0e12, 989e12),
    "h200": GPU("H200 141GB", 139.8, 4.3e12, 989e12),
    "a100": GPU("A100 80GB", 79.2, 1.9e12, 312e12),
}

# The engine's own read and padding steps, so that the model cannot drift from what it models.
READ_STEP, PREFILL_STEP = DecodeEngine.READ_STEP, DecodeEngine.PREFILL_STEP
PREFILL_GRAPH_MAX_ROWS = DecodeEngine.PREFILL_GRAPH_MAX_ROWS


@dataclass(frozen=True)
class Engine:
    """Engine-dependent constants (see the module docstring); `calibrate` sets the floors and the overhead."""

    decode_layer_floor_s: float  # at one row
    prefill_layer_floor_s: float  # the padded prompt replayed from captured graphs
    runtime_overhead_bytes: float
    eager_prefill_layer_floor_s: float = 0.74e-3  # graph engine, eager prefill: 26.8 ms / 36 layers (H200)
    bounded_reads: bool = True
    padded_prefill: bool = True
    decode_floor_per_doubling_s: float = 0.0  # the floor's growth per doubling of the step's rows (P · batch)


# Calibrated by `calibrate` on the CALIBRATION_POINT of CALIBRATION_FILES (one H200, torch 2.11.0+cu130).
ENGINES = {
    "graph": Engine(decode_layer_floor_s=93.525e-6, prefill_layer_floor_s=171.79e-6,
                    runtime_overhead_bytes=0.069171 * 2**30, decode_floor_per_doubling_s=4.5615e-6),
    # the compiled engine as `parscale bench --engine compile --padded-prefill` runs it (whole-cache reads)
    "compile": Engine(decode_layer_floor_s=35.607e-6, prefill_layer_floor_s=96.648e-6,
                      runtime_overhead_bytes=0.12361 * 2**30, bounded_reads=False),
}
# The measured points the engine constants were calibrated on: validation leaves them out. The graph engine's
# floor grows with the rows of a step (it keeps every element-wise kernel separate), so a point of many rows
# sets that growth; the compiled engine's P = 8 / P = 1 is 1.02-1.04 and keeps a flat floor.
CALIBRATION_POINT = {"shape": "paper-1.6b", "P": 1, "batch": 1, "length": 64}
MANY_ROWS_POINT = {"shape": "paper-1.6b", "P": 8, "batch": 8, "length": 64}
CALIBRATION_FILES = {"graph": ("h200_grid_graph_small.json", "h200_memory_fresh.json"),
                     "compile": ("h200_headline_compile_1.6b_b1.json", "h200_headline_compile_1.6b_b1.json")}


def _gemm(m, k, n, gpu: GPU, bytes_per=2):
    flops = 2.0 * m * k * n
    nbytes = (k * n + m * k + m * n) * bytes_per
    return max(flops / (gpu.bf16_flops * gpu.compute_eff), nbytes / (gpu.bandwidth * gpu.mem_eff))


def _doubling(start: int, at_least: int, cap: int) -> int:
    length = start
    while length < at_least:
        length *= 2
    return min(length, cap)


def read_slots(cfg: ModelConfig, in_len: int, out_len: int, engine: Engine) -> int:
    """Cache slots (prefix included) a decode step reads, at the middle of the answer."""
    max_len = in_len + out_len
    read = _doubling(READ_STEP, in_len + out_len // 2, max_len) if engine.bounded_reads else max_len
    return cfg.prefix_len + read


def prefill_rows(cfg: ModelConfig, batch: int, in_len: int, engine: Engine) -> tuple[int, bool]:
    """Rows the prompt runs as (P · batch · padded length) and whether they replay captured graphs."""
    padded = _doubling(PREFILL_STEP, in_len, cfg.max_position_embeddings)
    padded = max(in_len, padded)
    rows = cfg.parscale_n * batch * padded
    if engine.padded_prefill and rows < PREFILL_GRAPH_MAX_ROWS:
        return rows, True
    return cfg.parscale_n * batch * in_len, False


def decode_step_s(cfg: ModelConfig, batch: int, cache_slots: int, gpu: GPU, engine: Engine) -> float:
    """One decode step: P·B rows through every layer, `cache_slots` (prefix included) read."""
    p, h, hd = cfg.parscale_n, cfg.hidden_size, cfg.head_dim
    m = p * batch
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = (_gemm(m, h, q_out + 2 * kv_out, gpu) + _gemm(m, q_out, h, gpu)
                 + _gemm(m, h, 2 * cfg.intermediate_size, gpu) + _gemm(m, cfg.intermediate_size, h, gpu))
    kv_bytes = 2 * m * kv_out * cache_slots * 2
    attn_flops = 4.0 * m * cfg.num_attention_heads * cache_slots * hd
    per_layer += max(kv_bytes / (gpu.bandwidth * gpu.mem_eff), attn_flops / (gpu.bf16_flops * gpu.compute_eff))
    floor = engine.decode_layer_floor_s + engine.decode_floor_per_doubling_s * math.log2(m)
    total = cfg.num_hidden_layers * (per_layer + floor)
    total += _gemm(batch, h, cfg.vocab_size, gpu)
    if p > 1:
        total += _gemm(batch, p * h, h, gpu) + _gemm(batch, h, p, gpu)
    return total


def prefill_s(cfg: ModelConfig, batch: int, length: int, gpu: GPU, engine: Engine) -> float:
    rows, captured = prefill_rows(cfg, batch, length, engine)
    per_row_len = rows // (cfg.parscale_n * batch)
    counts = cfg.param_counts()
    flops = 2.0 * rows * (counts["non_embedding"] - counts["parscale"])
    flops += 2.0 * batch * cfg.hidden_size * cfg.vocab_size  # LM head on the last position
    q = per_row_len + cfg.prefix_len
    flops += cfg.num_hidden_layers * 4.0 * cfg.parscale_n * batch * cfg.num_attention_heads * cfg.head_dim * q * q / 2
    compute = flops / (gpu.bf16_flops * gpu.compute_eff)
    weights = counts["total"] * 2 / (gpu.bandwidth * gpu.mem_eff)
    floor = engine.prefill_layer_floor_s if captured else engine.eager_prefill_layer_floor_s
    return max(compute, weights, cfg.num_hidden_layers * floor)


def memory_bytes(cfg: ModelConfig, batch: int, in_len: int, out_len: int, engine: Engine) -> dict:
    from parscale.analysis.memory import kv_cache_bytes, weight_bytes

    weights = weight_bytes(cfg, 2)
    kv = kv_cache_bytes(cfg, batch, in_len + out_len, 2)
    rows, _ = prefill_rows(cfg, batch, in_len, engine)
    activations = rows * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 2
    activations += batch * cfg.vocab_size * 2
    return {"weights": weights, "kv_cache": kv, "activations": activations,
            "overhead": engine.runtime_overhead_bytes,
            "total": weights + kv + activations + engine.runtime_overhead_bytes}


def calibrate(latency_point: dict, memory_point: dict, gpu: GPU | str = "h200", engine: Engine | str = "graph",
              many_rows_point: dict | None = None) -> Engine:
    """The engine constants that make the model reproduce one measured point exactly: the decode floor from
    its ms/token, the prefill floor from its prefill (assumed floor-bound, as short prompts are) and the
    overhead from its peak memory. With `many_rows_point` (the same shape and length, more P · batch rows) the
    floor's growth per doubling of the rows is set to reproduce that point's ms/token too."""
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    base = ENGINES[engine] if isinstance(engine, str) else engine
    cfg = ModelConfig.preset(latency_point["shape"], parscale_n=latency_point["P"])
    b, n = latency_point["batch"], latency_point["length"]
    bare = replace(base, decode_layer_floor_s=0.0, runtime_overhead_bytes=0.0, decode_floor_per_doubling_s=0.0)
    layers = cfg.num_hidden_layers

    def floor_of(point):  # the per-layer floor that point needs, over the rows' own GEMMs and attention
        c = ModelConfig.preset(point["shape"], parscale_n=point["P"])
        m = point["length"]
        modelled = decode_step_s(c, point["batch"], read_slots(c, m, m, bare), gpu, bare)
        return (point["decode_ms_per_token"] / 1e3 - modelled) / layers, math.log2(point["P"] * point["batch"])

    decode_floor, rows_log = floor_of(latency_point)
    per_doubling = 0.0
    if many_rows_point is not None:
        many_floor, many_log = floor_of(many_rows_point)
        per_doubling = (many_floor - decode_floor) / (many_log - rows_log)
        decode_floor -= per_doubling * rows_log
    prefill_floor = latency_point["prefill_ms"] / 1e3 / layers
    overhead = memory_point["peak_memory_gib"] * 2**30 - memory_bytes(cfg, b, n, n, bare)["total"]
    return replace(base, decode_layer_floor_s=decode_floor, prefill_layer_floor_s=prefill_floor,
                   runtime_overhead_bytes=overhead, decode_floor_per_doubling_s=per_doubling)


def calibration_point(path, point: dict | None = None) -> dict:
    """The CALIBRATION_POINT (or `point`) of a measured bench JSON (the first, if a grid holds it twice)."""
    point = point or CALIBRATION_POINT
    for p in read_bench_json(path)["points"]:
        if all(p.get(k) == v for k, v in point.items()):
            return p
    raise ValueError(f"{path} has no point {point}")


def check_workload(cfg: ModelConfig, batch: int, in_len: int, out_len: int) -> None:
    """One clear error for a workload the model cannot run (the formulas would return a number for it)."""
    if batch < 1:
        raise ValueError(f"the batch (--batch) must be at least 1, got {batch}")
    if in_len < 1 or out_len < 0:
        raise ValueError(f"the prompt (--input-len) needs at least 1 token and the answer (--output-len) at least 0, "
                         f"got {in_len} and {out_len}")
    if in_len + out_len > cfg.max_position_embeddings:
        raise ValueError(f"{in_len} + {out_len} tokens exceed the model's {cfg.max_position_embeddings} positions")


def predict(cfg: ModelConfig, batch: int, in_len: int, out_len: int, gpu: GPU | str = "h200",
            engine: Engine | str = "graph") -> dict:
    check_workload(cfg, batch, in_len, out_len)
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    engine = ENGINES[engine] if isinstance(engine, str) else engine
    step = decode_step_s(cfg, batch, read_slots(cfg, in_len, out_len, engine), gpu, engine)
    pre = prefill_s(cfg, batch, in_len, gpu, engine)
    mem = memory_bytes(cfg, batch, in_len, out_len, engine)
    return {"decode_ms_per_token": step * 1e3, "prefill_ms": pre * 1e3, "latency_s": pre + out_len * step,
            "memory_gib": mem["total"] / 2**30, "memory": mem}


def validate(latency_files, memory_files, gpu="h200", engine="graph") -> dict:
    """Per-point relative error of the model against measured benchmark JSON: timings from
    `latency_files`, peak memory from `memory_files` (measured one process per model); the calibration
    point is left out."""
    if not latency_files and not memory_files:
        raise ValueError("nothing to validate against: give measured bench JSON (--validate-latency / "
                         "--validate-memory)")
    metrics = {"decode_ms_per_token": ("decode_ms_per_token", latency_files, LATENCY_KEYS),
               "latency_s": ("latency_s", latency_files, LATENCY_KEYS),
               "memory_gib": ("peak_memory_gib", memory_files, MEMORY_KEYS)}
    rows, summary = [], {}
    for key, (measured_key, files, needs) in metrics.items():
        if not files:  # only the metrics whose measurements were given
            continue
        errs = []
        for f in files:
            for p in read_bench_json(f, needs)["points"]:
                if any(all(p[k] == v for k, v in c.items()) for c in (CALIBRATION_POINT, MANY_ROWS_POINT)):
                    continue  # judged only on points it was not calibrated on
                cfg = ModelConfig.preset(p["shape"], parscale_n=p["P"])
                pred = predict(cfg, p["batch"], p["length"], p["length"], gpu, engine)[key]
                err = (pred - p[measured_key]) / p[measured_key]
                errs.append(abs(err))
                rows.append({"metric": key, "shape": p["shape"], "P": p["P"], "batch": p["batch"],
                             "length": p["length"], "measured": p[measured_key], "predicted": pred, "error": err})
        if not errs:
            raise ValueError(f"{', '.join(map(str, files))}: no points besides the calibration points")
        summary[key] = {"points": len(errs), "mean_abs_error": sum(errs) / len(errs), "max_abs_error": max(errs),
                        "share_within_15pct": sum(e <= 0.15 for e in errs) / len(errs)}
    return {"gpu": gpu, "engine": engine, "summary": summary, "points": rows}
