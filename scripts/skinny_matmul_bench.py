"""Time the skinny matmul (inference/skinny_matmul.py) against torch's matmul on a model's decode projections.

For every projection of one decoder layer of a preset (fused q/k/v, o, fused gate/up, down) and the LM head,
at each row count (P·B of a decode step), this checks every candidate block configuration against F.linear
and times it: a CUDA graph runs the product over `--copies` distinct weight copies (more bytes than the L2
cache holds, so every read comes from memory), replayed `--reps` times; the median replay over the copies
gives µs per product and TB/s over the weight bytes; the best is timed again with what SkinnyDecoderLayer folds
into that product (RMSNorm, residual add, SiLU gate: `folded`). The summary adds up one decode step's projections
(layers × the layer's four + the head) with torch's matmul and with the best candidate of each shape. Last, one
layer's decode attention: the plain path against inference/decode_attention.py's kernel.

    PYTHONPATH=src python scripts/skinny_matmul_bench.py --preset paper-1.6b --rows 1,8 --out skinny.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from parscale.inference.skinny_matmul import SkinnyConfig, default_config, launch
from parscale.model.config import ModelConfig


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each decode product: the fused forms the engine runs (inference/fuse.py)."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {
        "qkv": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d, h),
        "o": (h, cfg.num_attention_heads * d),
        "gate_up": (2 * cfg.intermediate_size, h),
        "down": (h, cfg.intermediate_size),
        "lm_head": (cfg.vocab_size, h),
    }


# What SkinnyDecoderLayer folds into each product (inference/skinny_matmul.py): timed at the best config too.
FOLDED = {"qkv": "norm", "o": "residual", "gate_up": "norm_swiglu", "down": "residual"}


def candidates(quick: bool) -> list[SkinnyConfig]:
    """Block shapes whose weight tile gives every thread 8 to 64 elements (16-byte loads at least, registers
    to spare), in the broadcast form and the tl.dot form."""
    out = []
    for bn, bk, warps in itertools.product((1, 2, 4, 8, 16), (128, 256, 512, 1024), (1, 2, 4, 8)):
        per_thread = bn * bk // (32 * warps)
        if 8 <= per_thread <= 64 and not (quick and warps in (1, 8)):
            out.append(SkinnyConfig(block_n=bn, block_k=bk, num_warps=warps, num_stages=3))
    # tl.dot: more bytes in flight per program (a larger K slice, deeper pipelining) is what a product with few
    # programs needs (down at 8 rows: 96 programs of 16 rows for 132 multiprocessors, H100 measurement)
    for bn, bk, stages in itertools.product((16, 32, 64), (64, 128, 256, 512), (3, 4, 5)):
        if bk == 512 and bn == 64:
            continue  # 64 KB of weights a stage
        if not quick or (stages == 3 and bk < 512) or (bn == 16 and bk >= 256 and stages >= 4):
            out.append(SkinnyConfig(block_n=bn, block_k=bk, num_warps=4, num_stages=stages, use_dot=True))
    return out


DEVICE = "cuda"  # where the timings run (a CPU smoke run of the attention timings, interpreted, sets "cpu")


def time_graph(fn, reps: int) -> float:
    """Median ms of one replay of a CUDA graph that calls fn once (warmed up and captured here)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_products(product, x, weights, reps: int) -> float:
    """Median ms of one graph replay that computes product(x, w) for every weight copy."""
    outs = [None] * len(weights)

    def run():
        for i, w in enumerate(weights):
            outs[i] = product(x, w)

    return time_graph(run, reps)


# The attention kernels' settings timed: query heads per program (0: the whole group) × shares of the slots, with
# element-wise tile products, and the tl.dot form (which pads the group to 16 rows) for the whole group and one head.
VARIANTS = ([(per, splits, False) for per in (0, 1, 2, 4) for splits in (1, 2, 4, 8)]
            + [(per, splits, True) for per in (0, 1) for splits in (1, 2, 4, 8)])


def time_attention(cfg: ModelConfig, rows: int, slots: int, reps: int) -> dict:
    """One layer's decode attention (`rows` queries, each against `slots` cached keys, of which the first 113 are
    seen), timed over a copy of the cache per layer (more bytes than the L2 cache holds): the plain path's grouped
    attention (its kernels in one graph) against inference/decode_attention.py's kernel at each split of a KV
    head's query group over programs (heads{per}), each unsplit and split over the slots in shares (_split{n}:
    flash-decoding, the second kernel included). µs per layer and the kernel's largest relative error."""
    from parscale.inference.decode_attention import launch
    from parscale.model.transformer import _grouped_decode_attention

    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dev, dtype = DEVICE, torch.bfloat16
    q = torch.randn(rows, 1, heads, d, device=dev, dtype=dtype).transpose(1, 2)
    caches = [(torch.randn(rows, kv, slots, d, device=dev, dtype=dtype),
               torch.randn(rows, kv, slots, d, device=dev, dtype=dtype)) for _ in range(cfg.num_hidden_layers)]
    blocked = torch.zeros(rows, 1, 1, slots, dtype=torch.bool, device=dev)
    blocked[..., 113:] = True  # a 48-slot prefix and 64 + 1 tokens written; the rest of the read unwritten
    out = {"rows": rows, "slots": slots, "heads": heads, "kv_heads": kv, "head_dim": d}
    layers = len(caches)

    def each_layer(fn):
        return lambda: [fn(k, v) for k, v in caches]

    out["plain_us"] = time_graph(each_layer(lambda k, v: _grouped_decode_attention(q, k, v, blocked)), reps) \
        * 1e3 / layers
    want = _grouped_decode_attention(q.float(), caches[0][0].float(), caches[0][1].float(), blocked)
    for per, splits, dot in VARIANTS:
        name = f"kernel_heads{per}" + (f"_split{splits}" if splits > 1 else "") + ("_dot" if dot else "")
        try:
            got = launch(q, caches[0][0], caches[0][1], blocked, heads_per_program=per,
                         slot_splits=splits, use_dot=dot).float()
            ms = time_graph(each_layer(lambda k, v, per=per, splits=splits, dot=dot: launch(
                q, k, v, blocked, heads_per_program=per, slot_splits=splits, use_dot=dot)), reps)
            out[f"{name}_us"] = ms * 1e3 / layers
            out[f"{name}_rel_err"] = ((got - want).norm() / want.norm()).item()
        except Exception as exc:  # a split Triton cannot build
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    out.update(time_rope_attention(cfg, rows, slots, reps, caches, blocked))
    return out


def time_rope_attention(cfg: ModelConfig, rows: int, slots: int, reps: int, caches, blocked) -> dict:
    """The kernel the engine runs with `--decode-attention rope` (RoPE, the cache write and the attention, from the
    projections' output) at each heads × splits pair, over the same per-layer caches: µs per layer (rope_heads*).
    Its arithmetic is tested against the plain path elsewhere (tests/test_decode_attention.py)."""
    from parscale.inference.decode_attention import launch_rope

    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dev, dtype = DEVICE, torch.bfloat16
    q = torch.randn(rows, 1, heads * d, device=dev, dtype=dtype)
    k = torch.randn(rows, 1, kv * d, device=dev, dtype=dtype)
    v = torch.randn(rows, 1, kv * d, device=dev, dtype=dtype)
    angle = torch.rand(rows, 1, 1, d, device=dev)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    pos = torch.tensor([112 - cfg.parscale_n_tokens], device=dev)  # the slot the step writes: 112 (see above)
    out = {}
    for per, splits, dot in VARIANTS:
        name = f"rope_heads{per}" + (f"_split{splits}" if splits > 1 else "") + ("_dot" if dot else "")
        try:
            ms = time_graph(lambda per=per, splits=splits, dot=dot: [launch_rope(
                q, k, v, cos, sin, kc, vc, pos, cfg.parscale_n_tokens, slots, blocked, heads,
                heads_per_program=per, slot_splits=splits, use_dot=dot) for kc, vc in caches], reps)
            out[f"{name}_us"] = ms * 1e3 / len(caches)
        except Exception as exc:  # a split Triton cannot build
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def write(results: dict, args) -> None:
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    if args.tuned_out:
        tuned = [{"rows": p["rows"], "n": p["n"], "k": p["k"], "config": p["best"]["config"],
                  "us": p["best"]["us"], "torch_us": p["torch_us"], "gpu": results["gpu"]}
                 for p in results["shapes"].values() if p["best"]]
        with open(args.tuned_out, "w") as f:
            json.dump(tuned, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper-1.6b")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--copies", type=int, default=8, help="distinct weight copies per timed graph")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer candidates")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tuned-out", default=None,
                    help="also write the best config of each (rows, N, K) here: PARSCALE_SKINNY_CONFIGS=this file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    dev, dtype = DEVICE, torch.bfloat16
    results = {"preset": args.preset, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "copies": args.copies, "reps": args.reps,
               "command": "python scripts/skinny_matmul_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "shapes": {}}
    shapes = projection_shapes(cfg)
    t0 = time.time()
    for name, (n, k) in shapes.items():
        copies = 1 if name == "lm_head" else args.copies
        weights = [torch.randn(n, k, device=dev, dtype=dtype) * k**-0.5 for _ in range(copies)]
        gb = n * k * 2 * copies / 1e9
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k, device=dev, dtype=dtype)
            ref32 = F.linear(x.float(), weights[0].float())
            torch_out = F.linear(x, weights[0])
            torch_err = ((torch_out.float() - ref32).norm() / ref32.norm()).item()
            torch_ms = time_products(lambda x, w: F.linear(x, w), x, weights, args.reps)
            point = {"n": n, "k": k, "rows": rows, "weight_mb": n * k * 2 / 1e6, "torch_us": torch_ms * 1e3 / copies,
                     "torch_tbs": gb / torch_ms, "torch_rel_err": torch_err, "default": None, "candidates": []}
            todo = candidates(args.quick) + [default_config(rows, n, k, dtype=dtype)]
            for i, c in enumerate(todo):
                try:
                    y = launch(x, weights[0], None, c)
                    err = ((y.float() - ref32).norm() / ref32.norm()).item()
                    ms = time_products(lambda x, w, c=c: launch(x, w, None, c), x, weights, args.reps)
                except Exception as exc:  # a config Triton cannot build (registers, shared memory)
                    point["candidates"].append({"config": c.__dict__, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                entry = {"config": c.__dict__, "us": ms * 1e3 / copies, "tbs": gb / ms, "rel_err": err}
                if i == len(todo) - 1:
                    point["default"] = entry
                else:
                    point["candidates"].append(entry)
            ok = [e for e in point["candidates"] if "us" in e and e["rel_err"] < 2e-2]
            best = min(ok, key=lambda e: e["us"]) if ok else None
            point["best"] = best
            fold = FOLDED.get(name)
            if best and fold:  # the same product with what SkinnyDecoderLayer folds into it, at the best config
                c = SkinnyConfig(**best["config"])
                out_n = n // 2 if fold == "norm_swiglu" else n
                norm = {"norm_weight": torch.ones(k, device=dev, dtype=dtype), "eps": 1e-6}
                kw = {"norm": norm, "norm_swiglu": {**norm, "swiglu": True},
                      "residual": {"residual": torch.randn(rows, out_n, device=dev, dtype=dtype)}}[fold]
                ms = time_products(lambda x, w, c=c, kw=kw: launch(x, w, None, c, **kw), x, weights, args.reps)
                point["folded"] = {"fold": fold, "us": ms * 1e3 / copies, "tbs": gb / ms}
            results["shapes"][f"{name}/rows{rows}"] = point
            write(results, args)  # as it goes: a run stopped by its time limit keeps the shapes it finished
            print(f"{name:8s} rows {rows:2d} N {n:6d} K {k:5d}: torch {point['torch_us']:8.2f} us "
                  f"{point['torch_tbs']:.2f} TB/s | best {best['us'] if best else float('nan'):8.2f} us "
                  f"{best['tbs'] if best else float('nan'):.2f} TB/s {best['config'] if best else ''} "
                  f"| default {point['default']['us'] if point['default'] else float('nan'):8.2f} us "
                  f"| folded {point.get('folded', {}).get('us', float('nan')):8.2f} us "
                  f"[{time.time() - t0:.0f} s]", flush=True)
        del weights
        torch.cuda.empty_cache()
    layers = cfg.num_hidden_layers
    for rows in [int(r) for r in args.rows.split(",")]:
        tot = {"torch": 0.0, "best": 0.0, "default": 0.0}
        for name in shapes:
            p = results["shapes"][f"{name}/rows{rows}"]
            times = 1 if name == "lm_head" else layers
            tot["torch"] += times * p["torch_us"]
            tot["best"] += times * (p["best"]["us"] if p["best"] else p["torch_us"])
            tot["default"] += times * (p["default"]["us"] if p["default"] else p["torch_us"])
        results[f"step_projections_us_rows{rows}"] = tot
        print(f"one step's projections, rows {rows}: " + ", ".join(f"{k} {v:.0f} us" for k, v in tot.items()))
    write(results, args)
    slots = cfg.parscale_n_tokens + 256  # the prefix and the graph engine's shortest bounded read
    results["attention"] = [time_attention(cfg, rows, slots, args.reps) for rows in [int(r) for r in
                                                                                     args.rows.split(",")]]
    for a in results["attention"]:
        print(f"decode attention, rows {a['rows']}, {a['slots']} slots: plain {a['plain_us']:.2f} us/layer | " +
              ", ".join(f"{k} {v:.2f}" for k, v in a.items() if k.startswith(("kernel", "rope")) and k.endswith("_us")))
    write(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
