"""Measured decode latency, prefill time and peak memory of ParScale models on a CUDA GPU.

    parscale bench --shapes paper-1.6b,paper-2.8b,paper-4.4b --streams 1,2,4,8 --batches 1,2,4,8 \
        --lengths 64,128,256,512 --engine graph --out benchmarks/run.json

For each (shape, P) one model is built on the GPU with random bf16 weights (prefixes and aggregator
random too); for each (batch, length) a prompt of `length` random tokens is prefilled and `length`
tokens are decoded greedily (input = output length, as in the paper's Figure 4).
- decode ms/token: the median over chunks of 16 decode steps (each step = the model step + argmax
  on the device), timed with CUDA events after a warm-up pass;
- prefill ms: median of 3 timed prefills after one warm-up;
- peak memory: `torch.cuda.max_memory_allocated` from the weights alone (peak reset) through
  prefill and decode, with the cache sized to the run (length + length tokens);
- bytes per step: every weight once (embedding rows aside; a tied LM head counted once) plus the KV
  cache buffer the step reads, and the achieved bandwidth = bytes / decode time.
With --memory-only the decode is cut to 32 steps (the cache is preallocated at its full size, so the
peak is reached by then) and run in a fresh process per (shape, P), see scripts/gpu_grid.sh.
Engines: `graph` (static cache, eager kernels, one CUDA graph per step), `compile` (the same step
compiled by torch.compile, then captured), `plain` (eager, growing cache: the naive baseline).
With --anchors, transformers' own P = 1 model of each shape is timed first in the same process
(anchors.py: static cache, greedy generate, batch 1), so every speed claim can be a ratio within one run.
Progress and an ETA go to stderr; the JSON is rewritten after every point, atomically. With --resume an
existing --out file measured with the same settings is continued: its points are kept and skipped, and each
point records the process that measured it (`process`, an index into `processes`, the environments), so a
grid too long for one sitting is finished by the next; anchors are re-timed in every process and a point's
ratios are to the anchors of its own process.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from parscale.inference.cache import KVCache
from parscale.inference.engine import DecodeEngine
from parscale.io.files import write_json_atomic
from parscale.io.progress import progress_bar
from parscale.model.config import ModelConfig
from parscale.model.transformer import ParScaleForCausalLM, rope_inv_freq

CHUNK = 16


def random_model(shape: str, streams: int, device="cuda", dtype=torch.bfloat16) -> ParScaleForCausalLM:
    cfg = ModelConfig.preset(shape, parscale_n=streams, max_position_embeddings=4096)
    with torch.device("meta"):
        model = ParScaleForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rope_inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


class PlainRunner:
    """The naive baseline: eager kernels, a cache that grows, no graph."""

    def __init__(self, model, batch, max_len):
        self.model, self.batch, self.max_len = model, batch, max_len

    @torch.no_grad()
    def prefill(self, ids, mask=None):
        self.cache = KVCache.for_model(self.model, self.batch, self.max_len)
        return self.model(ids, cache=self.cache)[:, -1]

    @torch.no_grad()
    def decode(self, token):
        return self.model(token[:, None], cache=self.cache)[:, -1]


def _events_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bytes_per_step(model, runner) -> int:
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # shared (tied) tensors once
    weights += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                   if name.endswith(("weight_int8", ".scale")))  # int8-quantized projections (quantize.py)
    weights -= cfg.vocab_size * cfg.hidden_size * 2 if not cfg.tie_word_embeddings else 0  # embedding: rows only
    cache = runner.cache if isinstance(runner, DecodeEngine) else None
    kv = 0
    if cache is not None:  # the slots a step reads: all of them, or the bounded read of the last step
        kv = cache.nbytes() * (cache.prefix_len + cache.read_len) // (cache.prefix_len + cache.max_len)
    return weights + kv


def measure_point(model, batch: int, length: int, engine: str, memory_only: bool = False,
                  bounded_reads: bool | None = None, cache_len: int | None = None,
                  padded_prefill: bool | None = None, timeline: bool = False) -> dict:
    """One (batch, length) point: prompt and output of `length` tokens each, in a cache of 2 × length
    tokens or cache_len (to see what a long cache costs a short conversation). With `timeline`, also the
    kernels and idle time of 8 of the timed decode steps (timeline.step_timeline; each step includes the
    benchmark's argmax, as the timed steps do)."""
    device = model.model.embed_tokens.weight.device
    # The model keeps its last decode cache for the next request (setup_cache): released here, or a point
    # after a larger one reports the earlier point's cache as its own peak.
    model.release_cache()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    max_len = max(cache_len or 0, 2 * length)
    if engine == "plain":
        runner = PlainRunner(model, batch, max_len)
    else:
        runner = DecodeEngine(model, batch, max_len, use_graph=True, compile=engine == "compile",
                              bounded_reads=bounded_reads, padded_prefill=padded_prefill)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device, generator=gen)

    def decode_all(record=None, steps=length - 1):
        token = runner.prefill(ids).argmax(-1)
        done = 0
        while done < steps:
            n = min(CHUNK, steps - done)

            def chunk(n=n):
                nonlocal token
                for _ in range(n):
                    token = runner.decode(token).argmax(-1)

            ms = _events_ms(chunk)
            if record is not None and n == CHUNK:
                record.append(ms / n)
            done += n

    compile_start = time.perf_counter()
    decode_all(steps=2 * CHUNK)  # warm-up: graph capture (and compilation) happen here
    warmup_s = time.perf_counter() - compile_start
    per_token: list[float] = []
    decode_all(per_token, steps=2 * CHUNK if memory_only else length - 1)
    if not per_token:
        raise ValueError(f"length {length} is too short to time a chunk of {CHUNK} decode steps")
    prefill_ms = statistics.median(_events_ms(lambda: runner.prefill(ids)) for _ in range(3))
    peak = torch.cuda.max_memory_allocated()
    decode_ms = statistics.median(per_token)
    nbytes = bytes_per_step(model, runner)
    extra = {}
    if timeline:
        from parscale.analysis.timeline import step_timeline

        token = runner.prefill(ids).argmax(-1)

        def step():
            nonlocal token
            token = runner.decode(token).argmax(-1)

        step()
        extra["timeline"] = step_timeline(step, steps=8)
    return {**extra,
        "batch": batch, "length": length, "decode_ms_per_token": decode_ms,
        "decode_ms_min": min(per_token), "decode_ms_max": max(per_token), "prefill_ms": prefill_ms,
        "latency_s": (prefill_ms + decode_ms * length) / 1000.0, "peak_memory_bytes": peak,
        "peak_memory_gib": peak / 2**30, "bytes_per_step": nbytes,
        "achieved_bandwidth_tb_s": nbytes / (decode_ms / 1000.0) / 1e12, "warmup_s": warmup_s,
        "cache_len": max_len, "bounded_reads": isinstance(runner, DecodeEngine) and runner.bounded_reads,
        "padded_prefill": isinstance(runner, DecodeEngine) and runner.padded_prefill and runner.pads(batch, length),
    }


@torch.no_grad()
def kernel_report(model, batch: int, length: int, top: int = 12) -> list[dict]:
    """CUDA kernels of one eager (uncaptured) static decode step, heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    engine = DecodeEngine(model, batch, 2 * length, use_graph=False)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device="cuda")
    token = engine.prefill(ids).argmax(-1)
    for _ in range(3):
        token = engine.decode(token).argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.decode(token)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total > 0:
            rows.append({"kernel": evt.key[:120], "calls": evt.count, "total_us": total})
    rows.sort(key=lambda r: -r["total_us"])
    return rows[:top]


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": props.total_memory / 2**30, "driver": driver,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["parscale", *sys.argv[1:]]),
            # compiler settings given through the environment change the kernels a compiled step runs
            "inductor_env": {k: v for k, v in sorted(os.environ.items())
                             if k.startswith(("TORCHINDUCTOR_", "PARSCALE_"))}}


def anchor_ratios(point: dict, anchors: list[dict]) -> dict[str, float]:
    """A point's decode ms/token over each anchor's measured in the same process, where the two are alike
    (shape, batch and prompt length): {anchor name: ratio}; below 1 the ParScale point is faster."""
    return {a["anchor"]: point["decode_ms_per_token"] / a["decode_ms_per_token"] for a in anchors
            if (a["shape"], a["batch"], a["length"]) == (point["shape"], point["batch"], point["length"])
            and a.get("process", 0) == point.get("process", 0)}


# What makes two runs' points comparable: a resumed file must have been measured with the same values.
RESUME_SETTINGS = ("engine", "dtype", "quantize", "fuse", "skinny", "skinny_layers", "decode_attention",
                   "pdl", "memory_only", "requested")
# Files written before a setting existed ran without it.
SETTINGS_BEFORE_RECORDED = {"skinny": False, "skinny_layers": False, "decode_attention": None,
                            "pdl": False}


def resumed(out: Path, fresh: dict) -> dict:
    """The result in `out` to continue, checked against this run's settings (`fresh`), with this process
    added to its `processes`; `fresh` itself when there is nothing to resume."""
    if not out.exists():
        return fresh
    try:
        old = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume: {out} is not a bench JSON file ({e})") from None
    if not isinstance(old, dict) or not isinstance(old.get("points"), list):
        raise ValueError(f"--resume: {out} is not a bench JSON file (no 'points' list)")
    for key in RESUME_SETTINGS:
        if old.get(key, SETTINGS_BEFORE_RECORDED.get(key)) != fresh[key]:
            raise ValueError(f"--resume: {out} was measured with {key} = {old.get(key)!r} and this run asks for "
                             f"{fresh[key]!r}; its points would not be comparable (write to another --out)")
    for key in ("gpu", "torch"):  # a grid is one GPU model and one software stack
        was, now = old.get("environment", {}).get(key), fresh["environment"][key]
        if was != now:
            raise ValueError(f"--resume: {out} was measured with {key} {was!r}, this process has {now!r}; "
                             "its points would not be comparable (write to another --out)")
    old.setdefault("processes", [old["environment"]])
    old["processes"].append(fresh["environment"])
    old.setdefault("kernels", [])
    old.setdefault("anchors", [])
    return old


def run(shapes, streams, batches, lengths, engine: str, out: Path, kernels: bool = False,
        memory_only: bool = False, bounded_reads: bool | None = None, cache_len: int | None = None,
        quantize: str | None = None, anchors: bool = False, padded_prefill: bool | None = None,
        fuse: bool | None = None, gptfast_model: str | None = None, resume: bool = False,
        skinny: bool = False, skinny_layers: bool = False, decode_attention: str | None = None,
        pdl: bool = False) -> dict:
    """Time every (shape, P, batch, length) point and write the JSON to `out` as it goes. `fuse`: fused q/k/v
    and gate/up projections; None (the default) fuses unless `quantize`, as `parscale generate` does.
    `resume`: continue `out` if it exists (the module docstring says how). `skinny`: the decode projections
    through inference/skinny_matmul.py's kernel; `skinny_layers`: with the layers' norms, gate and residual adds
    folded into it (SkinnyDecoderLayer; implies `skinny`, needs `fuse`); `decode_attention`: each decode step's
    attention through inference/decode_attention.py's kernel ("attention"), with RoPE and the cache write folded
    in ("rope"); `pdl`: parscale's kernels launched with programmatic dependent launch where they run eagerly
    (the graph engine; inference/triton_support.py)."""
    from parscale.inference.fuse import fuse_wanted

    if not torch.cuda.is_available():
        raise ValueError("parscale bench measures a CUDA GPU and none is available")
    fuse = fuse_wanted(fuse, quantize)
    skinny = skinny or skinny_layers
    if skinny_layers and not fuse:
        raise ValueError("--skinny-layers folds the norms into the fused q/k/v and gate/up products: it needs "
                         "fused projections (drop --no-fuse / --quantize)")
    if decode_attention not in (None, "attention", "rope"):
        raise ValueError(f"decode_attention is 'attention' or 'rope', got {decode_attention!r}")
    if pdl:
        from parscale.inference.triton_support import set_pdl

        set_pdl(True)
    if gptfast_model:  # a wrong path fails now, not after minutes of other anchors
        from parscale.analysis.anchors import load_gptfast_module

        load_gptfast_module(gptfast_model)
    env = environment()
    result = {"environment": env, "processes": [env], "engine": engine, "dtype": "bfloat16", "quantize": quantize,
              "fuse": fuse, "skinny": skinny, "skinny_layers": skinny_layers,
              "decode_attention": decode_attention, "pdl": pdl, "memory_only": memory_only,
              "requested": {"bounded_reads": bounded_reads, "padded_prefill": padded_prefill, "cache_len": cache_len},
              "points": [], "kernels": [], "anchors": []}
    if resume:
        result = resumed(out, result)
    process = len(result["processes"]) - 1
    done = {(q["shape"], q["P"], q["batch"], q["length"]) for q in result["points"]}
    kernels_done = {(k["shape"], k["P"], k["batch"]) for k in result["kernels"]}
    # Anchors first, on an empty GPU, so a ratio to them is measured in this very process: transformers' model
    # (--anchors), then the user's copy of gpt-fast's model.py (--gptfast-model), a compiled plain decoder.
    from parscale.analysis.anchors import gptfast_anchor, hf_static_cache_anchor

    timers = ([lambda shape: hf_static_cache_anchor(shape, batch=1, length=lengths[0])] if anchors else []) + (
        [lambda shape: gptfast_anchor(shape, gptfast_model, batch=1, length=lengths[0])] if gptfast_model else [])
    for timer in timers:
        for shape in shapes:
            row = {**timer(shape), "process": process}
            result["anchors"].append(row)
            version = f", transformers {row['transformers']}" if "transformers" in row else ""
            print(f"{shape} anchor ({row['anchor']}{version}): {row['decode_ms_per_token']:.3f} ms/token",
                  file=sys.stderr, flush=True)
            gc.collect()
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            write_json_atomic(result, out)
    todo = {shape: {p: [(b, length) for b in batches for length in lengths if (shape, p, b, length) not in done]
                    for p in streams} for shape in shapes}
    if resume and done:
        print(f"resuming {out}: {len(done)} points kept", file=sys.stderr, flush=True)
    bar = progress_bar(total=sum(len(v) for by_p in todo.values() for v in by_p.values()), desc="bench", unit="point")
    for shape in shapes:
        for p in streams:
            kernel_batches = [b for b in sorted({1, max(batches)}) if kernels and (shape, p, b) not in kernels_done]
            if not todo[shape][p] and not kernel_batches:
                continue  # measured by an earlier process
            model = random_model(shape, p)
            if quantize == "int8":
                from parscale.inference.quantize import quantize_int8

                quantize_int8(model)
            if fuse:
                from parscale.inference.fuse import fuse_projections

                fuse_projections(model)
            if skinny:
                from parscale.inference.skinny_matmul import use_skinny_matmul

                use_skinny_matmul(model, fuse_layers=skinny_layers)
            if decode_attention:
                from parscale.inference.decode_attention import use_decode_attention

                use_decode_attention(model, fold_rope=decode_attention == "rope")
            counts = model.config.param_counts()
            for b in kernel_batches:
                result["kernels"].append({"shape": shape, "P": p, "batch": b, "length": 64,
                                          "step": "eager, uncaptured (each point's timeline has the engine's own)",
                                          "top": kernel_report(model, b, 64), "process": process})
                gc.collect()
            for b, length in todo[shape][p]:
                point = {"shape": shape, "P": p, "non_embedding_params": counts["non_embedding"],
                         **measure_point(model, b, length, engine, memory_only, bounded_reads, cache_len,
                                         padded_prefill, timeline=kernels), "process": process}
                point["vs_anchors"] = anchor_ratios(point, result["anchors"])
                gc.collect()  # engines sit in reference cycles: free their caches and graphs now
                result["points"].append(point)
                ratios = "".join(f", {r:.3f}x {name}" for name, r in point["vs_anchors"].items())
                bar.write(f"{shape} P={p} B={b} L={length}: "
                          f"{point['decode_ms_per_token']:.3f} ms/token, prefill {point['prefill_ms']:.1f} ms, "
                          f"{point['peak_memory_gib']:.3f} GiB, {point['achieved_bandwidth_tb_s']:.2f} TB/s"
                          + ratios)
                bar.update(1)
                write_json_atomic(result, out)
            del model
            gc.collect()
            torch._dynamo.reset()  # compiled steps hold the old model alive otherwise
            torch.cuda.empty_cache()
    bar.close()
    return result
