"""Analytic cost model: memory and latency of ParScale inference for any shape, P, batch and length.

Memory = weights + KV cache (the engine's static buffer: prefix + input + output slots per stream)
+ prefill activations (hidden states, MLP intermediates and the logits of every prompt position)
+ a constant runtime overhead (cuBLAS workspaces, graph pools).

Latency = prefill + output tokens × decode step.
- A decode step sums, over every operation, max(FLOPs / (peak · compute efficiency),
  bytes / (bandwidth · memory efficiency)) — every weight read once, a GEMM over P·B rows (the LM head
  and aggregator over B rows), attention reading the whole static KV buffer — plus a per-layer
  floor for the many small kernels each layer launches (launch-to-launch time inside a CUDA graph).
- Prefill is max(compute time, per-layer floor of eager launches).

The two floors and the runtime overhead depend on the engine, not on the model, so they are
calibrated once from the measured H100 benchmark at its smallest point (1.6B, P = 1, batch 1,
length 64; benchmarks/README.md) and the model is validated on every other measured point
(`parscale cost --validate FILE.json`). GPU specs are datasheet peak numbers with the measured
device-to-device bandwidth of an H100 (3.0 TB/s) standing in for its datasheet 3.35 TB/s.

It models the engine as it was when benchmarks/raw was measured: the whole static cache read every step,
the LM head applied to every prompt position and the prompt prefilled eagerly. The engine now bounds its
reads (graph engine), applies the head to the last position only and prefills through captured graphs
of the padded prompt (graph engine; measured on an H200, 1.6B, batch 1: 7.5 ms instead of 26.8 at 64
tokens), so until it is re-calibrated on new measurements the model over-predicts memory by up to
batch × prompt × vocab × 2 bytes, long-cache decode time, and prefill time at short prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Engine:
    """Engine-dependent constants, calibrated on the measured H100 run (see module docstring)."""

    decode_layer_floor_s: float = 108.7e-6  # graph engine: (5.252 − 1.339 ms) / 36 layers
    prefill_layer_floor_s: float = 1.70e-3  # eager prefill: 61.1 ms / 36 layers, launch-bound
    runtime_overhead_bytes: float = 0.095 * 2**30  # 3.482 GiB measured − 3.387 GiB modelled


ENGINES = {"graph": Engine(), "compile": Engine(decode_layer_floor_s=53.7e-6)}  # (3.271 − 1.339 ms) / 36
# The measured point the engine constants were calibrated on: validation leaves it out.
CALIBRATION_POINT = {"shape": "paper-1.6b", "P": 1, "batch": 1, "length": 64}


def _gemm(m, k, n, gpu: GPU, bytes_per=2):
    flops = 2.0 * m * k * n
    nbytes = (k * n + m * k + m * n) * bytes_per
    return max(flops / (gpu.bf16_flops * gpu.compute_eff), nbytes / (gpu.bandwidth * gpu.mem_eff))


def decode_step_s(cfg: ModelConfig, batch: int, cache_slots: int, gpu: GPU, engine: Engine) -> float:
    """One decode step: P·B rows through every layer, cache of `cache_slots` (prefix included) read."""
    p, h, hd = cfg.parscale_n, cfg.hidden_size, cfg.head_dim
    m = p * batch
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = (_gemm(m, h, q_out, gpu) + 2 * _gemm(m, h, kv_out, gpu) + _gemm(m, q_out, h, gpu)
                 + 2 * _gemm(m, h, cfg.intermediate_size, gpu) + _gemm(m, cfg.intermediate_size, h, gpu))
    kv_bytes = 2 * m * kv_out * cache_slots * 2
    attn_flops = 4.0 * m * cfg.num_attention_heads * cache_slots * hd
    per_layer += max(kv_bytes / (gpu.bandwidth * gpu.mem_eff), attn_flops / (gpu.bf16_flops * gpu.compute_eff))
    total = cfg.num_hidden_layers * (per_layer + engine.decode_layer_floor_s)
    total += _gemm(batch, h, cfg.vocab_size, gpu)
    if p > 1:
        total += _gemm(batch, p * h, h, gpu) + _gemm(batch, h, p, gpu)
    return total


def prefill_s(cfg: ModelConfig, batch: int, length: int, gpu: GPU, engine: Engine) -> float:
    p = cfg.parscale_n
    rows = p * batch * length
    counts = cfg.param_counts()
    flops = 2.0 * rows * (counts["non_embedding"] - counts["parscale"])
    flops += 2.0 * batch * length * cfg.hidden_size * cfg.vocab_size  # LM head on every position
    q = length + cfg.prefix_len
    flops += cfg.num_hidden_layers * 4.0 * p * batch * cfg.num_attention_heads * cfg.head_dim * q * q / 2
    compute = flops / (gpu.bf16_flops * gpu.compute_eff)
    weights = counts["total"] * 2 / (gpu.bandwidth * gpu.mem_eff)
    return max(compute, weights, cfg.num_hidden_layers * engine.prefill_layer_floor_s)


def memory_bytes(cfg: ModelConfig, batch: int, in_len: int, out_len: int, engine: Engine) -> dict:
    from parscale.analysis.memory import kv_cache_bytes, weight_bytes

    weights = weight_bytes(cfg, 2)
    kv = kv_cache_bytes(cfg, batch, in_len + out_len, 2)
    rows = cfg.parscale_n * batch * in_len
    activations = rows * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 2
    activations += batch * in_len * cfg.vocab_size * 2
    return {"weights": weights, "kv_cache": kv, "activations": activations,
            "overhead": engine.runtime_overhead_bytes,
            "total": weights + kv + activations + engine.runtime_overhead_bytes}


def predict(cfg: ModelConfig, batch: int, in_len: int, out_len: int, gpu: GPU | str = "h100",
            engine: Engine | str = "graph") -> dict:
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    engine = ENGINES[engine] if isinstance(engine, str) else engine
    slots = cfg.prefix_len + in_len + out_len  # the static buffer is read whole every step
    step = decode_step_s(cfg, batch, slots, gpu, engine)
    pre = prefill_s(cfg, batch, in_len, gpu, engine)
    mem = memory_bytes(cfg, batch, in_len, out_len, engine)
    return {"decode_ms_per_token": step * 1e3, "prefill_ms": pre * 1e3, "latency_s": pre + out_len * step,
            "memory_gib": mem["total"] / 2**30, "memory": mem}


def validate(latency_files, memory_files, gpu="h100", engine="graph") -> dict:
    """Per-point relative error of the model against measured benchmark JSON: timings from
    `latency_files`, peak memory from `memory_files` (measured one process per model); the calibration
    point is left out."""
    metrics = {"decode_ms_per_token": ("decode_ms_per_token", latency_files),
               "latency_s": ("latency_s", latency_files), "memory_gib": ("peak_memory_gib", memory_files)}
    rows, summary = [], {}
    for key, (measured_key, files) in metrics.items():
        errs = []
        for f in files:
            for p in json.loads(Path(f).read_text())["points"]:
                if all(p[k] == v for k, v in CALIBRATION_POINT.items()):
                    continue  # judged only on points it was not calibrated on
                cfg = ModelConfig.preset(p["shape"], parscale_n=p["P"])
                pred = predict(cfg, p["batch"], p["length"], p["length"], gpu, engine)[key]
                err = (pred - p[measured_key]) / p[measured_key]
                errs.append(abs(err))
                rows.append({"metric": key, "shape": p["shape"], "P": p["P"], "batch": p["batch"],
                             "length": p["length"], "measured": p[measured_key], "predicted": pred, "error": err})
        summary[key] = {"points": len(errs), "mean_abs_error": sum(errs) / len(errs), "max_abs_error": max(errs),
                        "share_within_15pct": sum(e <= 0.15 for e in errs) / len(errs)}
    return {"gpu": gpu, "engine": engine, "summary": summary, "points": rows}
