"""Where the decode step's GPU time goes at P = 1 and P = 8: kernel times of one step, side by side.

    PYTHONPATH=src python scripts/profile_step.py --out profile.json [--shape paper-1.6b] [--compile] [--no-fuse]
        [--skinny-layers] [--decode-attention attention|rope]

Each P gets a random bf16 model of the shape (fused projections unless --no-fuse), an engine with a
128-token cache, a 64-token prompt and a few warm-up steps; then one step runs without a CUDA graph under
torch.profiler, so every kernel is seen with its device time (inside a graph the profiler would show one
replay). The step's host time does not matter here: the graph engine removes it. Kernels are grouped by
kind (GEMM, attention, the rest by the compiler's or aten's name) and the JSON lists each P's groups and
the P = 8 − P = 1 difference, largest first: what the P = 8 step spends its extra time on. With
--skinny-layers / --decode-attention the step runs parscale's kernels (as `parscale bench` with the same flags),
each seen under its own name: which of them costs what.
"""

import argparse
import collections
import sys
import time

import torch

from parscale.analysis.timeline import kernel_kind as kind
from parscale.io.files import write_json_atomic


def kernel_groups(prof, group=kind) -> dict:
    """The device kernels a torch.profiler run saw, folded by `group`: {group: {"calls", "us"}}."""
    groups = collections.defaultdict(lambda: {"calls": 0, "us": 0.0})
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        on_device = getattr(evt, "device_type", torch.autograd.DeviceType.CUDA) == torch.autograd.DeviceType.CUDA
        if total > 0 and on_device:
            g = groups[group(evt.key)]
            g["calls"] += evt.count
            g["us"] += total
    return groups


@torch.no_grad()
def profile_step(shape: str, streams: int, compile: bool, fuse: bool, skinny_layers: bool = False,
                 decode_attention: str | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from parscale.analysis.bench import random_model
    from parscale.inference.engine import DecodeEngine

    model = random_model(shape, streams)
    if fuse:
        from parscale.inference.fuse import fuse_projections

        fuse_projections(model)
    if skinny_layers:
        from parscale.inference.skinny_matmul import use_skinny_matmul

        use_skinny_matmul(model, fuse_layers=True)
    if decode_attention:
        from parscale.inference.decode_attention import use_decode_attention

        use_decode_attention(model, fold_rope=decode_attention == "rope")
    engine = DecodeEngine(model, 1, 128, use_graph=False, compile=compile)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), device="cuda")
    t0 = time.perf_counter()
    token = engine.prefill(ids).argmax(-1)
    for _ in range(4):  # the first compiles
        token = engine.decode(token).argmax(-1)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.decode(token)
        torch.cuda.synchronize()
    groups = kernel_groups(prof)
    del engine, model
    torch.cuda.empty_cache()
    return {"P": streams, "warmup_s": warmup_s, "kernels": sum(g["calls"] for g in groups.values()),
            "device_us": sum(g["us"] for g in groups.values()),
            "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["us"]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="paper-1.6b")
    ap.add_argument("--compile", action="store_true", help="the compiled step (torch.compile), as --engine compile")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false", help="separate q/k/v and gate/up projections")
    ap.add_argument("--skinny-layers", action="store_true", help="the layers as parscale's folded matmul kernels")
    ap.add_argument("--decode-attention", choices=("attention", "rope"), default=None,
                    help="the decode attention kernel (rope: with RoPE and the cache write folded in)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.skinny_layers and not args.fuse:
        sys.exit("error: --skinny-layers needs the fused projections (drop --no-fuse)")
    if not torch.cuda.is_available():
        sys.exit("error: profile_step.py profiles a CUDA GPU and none is available")
    runs = {p: profile_step(args.shape, p, args.compile, args.fuse, args.skinny_layers, args.decode_attention)
            for p in (1, 8)}
    names = set(runs[1]["groups"]) | set(runs[8]["groups"])
    diff = {n: runs[8]["groups"].get(n, {"us": 0.0})["us"] - runs[1]["groups"].get(n, {"us": 0.0})["us"]
            for n in names}
    result = {"shape": args.shape, "compile": args.compile, "fuse": args.fuse, "skinny_layers": args.skinny_layers,
              "decode_attention": args.decode_attention, "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
              "steps": runs, "p8_minus_p1_us": dict(sorted(diff.items(), key=lambda kv: -abs(kv[1])))}
    write_json_atomic(result, args.out)
    for p, r in runs.items():
        print(f"P={p}: {r['kernels']} kernels, {r['device_us'] / 1000:.3f} ms of device time")
    print("P=8 - P=1, largest:", ", ".join(f"{n} {d:+.0f} us" for n, d in list(result["p8_minus_p1_us"].items())[:8]))


if __name__ == "__main__":
    main()
