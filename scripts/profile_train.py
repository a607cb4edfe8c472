"""Where a training step's GPU time goes: kernel groups of a few steps of `parscale train`'s step, P = 1 and P = 4.

    PYTHONPATH=src python scripts/profile_train.py --out profile_train.json [--model 125m] [--streams 1,4]
        [--batch-size 16] [--seq-len 512] [--no-compile] [--compile-mode max-autotune-no-cudagraphs] [--fuse]
        [--activation-checkpointing] [--loss-chunk-rows 4096]

The step is the trainer's (training/distributed.LossModule: forward, next-token loss under bf16 autocast,
compiled unless --no-compile, in torch.compile's default mode unless --compile-mode names another: inductor's
gemm autotuning is the one compiler lever the profile leaves open), then backward, gradient clipping and fused
AdamW, on random tokens of the preset's vocabulary (speed does not depend on the data). After warm-up steps (the
first compiles), `steps` steps run under torch.profiler and, separately, between two CUDA events: the JSON holds
each P's kernel groups (GEMM, attention by backend, the compiler's kernels by their ops, the optimizer) with
their device time per step, the step's wall time, the share of it the device was busy (summed kernel time / wall
time: below 1 means the GPU waited for the host or sat in gaps between kernels), tokens/s and MFU counted as the
trainer counts it (train.flops_per_token against the GPU's bf16 peak). --fuse trains the model with its q/k/v and
gate/up projections fused (inference/fuse.py: 4 matmuls per layer instead of 7, the same function and the same
optimizer arithmetic, tests/test_fuse.py), to measure what fewer, larger gemms would buy the trainer.
--activation-checkpointing and --loss-chunk-rows are the trainer's options of the same names (the paper's sizes
at sequence 2048 need them to fit); the JSON holds each run's peak memory.
"""

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import kernel_groups, kind  # noqa: E402  (the decode profile's kernel groups)

from parscale.io.files import write_json_atomic  # noqa: E402
from parscale.model.config import ModelConfig  # noqa: E402
from parscale.model.transformer import build_model  # noqa: E402
from parscale.training.distributed import LossModule  # noqa: E402
from parscale.training.train import (  # noqa: E402
    PEAK_BF16_FLOPS,
    apply_activation_checkpointing,
    flops_per_token,
)


def train_kind(name: str) -> str:
    lowered = name.lower()
    if "adam" in lowered or "multi_tensor" in lowered:
        return "optimizer and clipping (multi-tensor)"
    if "nll_loss" in lowered or "log_softmax" in lowered or "cross_entropy" in lowered:
        return "cross-entropy"
    return kind(name)


def profile_training(model_name: str, streams: int, batch: int, seq_len: int, compile: bool, warmup: int,
                     steps: int, compile_mode: str | None = None, fuse: bool = False,
                     activation_checkpointing: bool = False, loss_chunk_rows: int = 0) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cfg = ModelConfig.preset(model_name, parscale_n=streams)
    model = build_model(cfg, seed=0).cuda()
    if fuse:
        from parscale.inference.fuse import fuse_projections

        fuse_projections(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    model.train()
    loss_module = LossModule(model, autocast=True, loss_chunk_rows=loss_chunk_rows)
    step_fn = torch.compile(loss_module, mode=compile_mode) if compile else loss_module
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device="cuda", generator=gen) for _ in range(4)]

    def step(i):
        tokens = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss, _ = step_fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        step(i)
    end.record()
    end.synchronize()
    wall_ms = start.elapsed_time(end) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    groups = kernel_groups(prof, train_kind)
    per_step = {name: {"calls": g["calls"] / steps, "us_per_step": g["us"] / steps}
                for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["us"])}
    device_ms = sum(g["us_per_step"] for g in per_step.values()) / 1000
    tokens_per_s = batch * seq_len / (wall_ms / 1000)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(0)), None)
    return {"P": streams, "compile": compile, "compile_mode": compile_mode if compile else None, "fused": fuse,
            "activation_checkpointing": activation_checkpointing, "loss_chunk_rows": loss_chunk_rows,
            "batch": batch, "seq_len": seq_len, "warmup_s": warmup_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "step_ms": wall_ms, "device_ms": device_ms, "device_busy": device_ms / wall_ms,
            "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token(cfg, seq_len) / peak if peak else None,
            "kernels_per_step": sum(g["calls"] for g in per_step.values()), "groups": per_step}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="125m")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode (default, max-autotune-no-cudagraphs, ...); default: the trainer's")
    ap.add_argument("--fuse", action="store_true", help="q/k/v and gate/up projections fused (inference/fuse.py)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward")
    ap.add_argument("--loss-chunk-rows", type=int, default=0,
                    help="> 0: the LM head and cross-entropy in chunks of this many rows (training/chunked_loss.py)")
    ap.add_argument("--warmup", type=int, default=8, help="steps before timing (the first compiles)")
    ap.add_argument("--steps", type=int, default=5, help="steps timed and profiled")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: profile_train.py profiles a CUDA GPU and none is available")
    runs = []
    for p in args.streams.split(","):
        runs.append(profile_training(args.model, int(p), args.batch_size, args.seq_len, args.compile, args.warmup,
                                     args.steps, args.compile_mode, args.fuse, args.activation_checkpointing,
                                     args.loss_chunk_rows))
        gc.collect()
        torch._dynamo.reset()  # the compiled step holds the model alive otherwise
        torch.cuda.empty_cache()
    result = {"model": args.model, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "command": " ".join(["python", *sys.argv]), "runs": runs}
    write_json_atomic(result, args.out)
    for r in runs:
        top = ", ".join(f"{n} {g['us_per_step'] / 1000:.2f} ms" for n, g in list(r["groups"].items())[:6])
        print(f"P={r['P']}: {r['step_ms']:.2f} ms/step, device busy {r['device_busy']:.0%}, "
              f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu'] or 0:.1%}, peak {r['peak_memory_gib']:.1f} GiB; {top}")


if __name__ == "__main__":
    main()
