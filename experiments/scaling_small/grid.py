"""The small-scale parallel-scaling experiment: its runs, a multi-GPU scheduler, and per-run result files.

    python experiments/scaling_small/grid.py configs                 # (re)write configs/*.toml
    python experiments/scaling_small/grid.py run --corpus code english --data-root runs/scaling_data --per-gpu 3
    python experiments/scaling_small/grid.py list                    # runs and whether a result exists

Runs (one TOML each, all fields of `parscale train`):
- grid:      {corpus}-h{width}-p{P}: 4 widths × P ∈ {1, 2, 4, 8}, the same depth, head layout, tokens,
             batch, schedule and seed;
- two-stage: {corpus}-h192-p1 continued for 2% (and 10%) more tokens with P ∈ {1, 2, 4, 8}
             (P > 1: fresh prefixes and aggregator), at the base run's final learning rate, on the
             windows that follow the base run's in the same seeded order (unseen data);
- frozen:    adapters for P ∈ {2, 4, 8} on the frozen code-h192-p1 backbone, on a quarter of the grid's
             tokens (the same windows for every P, following the base run's);
- nosmooth:  code-h192-p8 without attention smoothing (ε = 0), against the ε = 0.1 default;
- seeds:     the whole code grid again with seed 1 (initialisation and data order), and code-h192-p1 / -p4
             with seed 2: the run-to-run spread, and a second sample of every code point.
`run` starts each run as its own `parscale train` process, `per_gpu` at a time on every visible GPU,
longest first and after the runs it starts from, skipping runs whose result file exists; then writes
results/{run}.json: settings, parameter counts, held-out loss (last evaluation), final training loss
(mean of the last 5% of steps, the paper's smoothed training loss), the curves (every 8th step), the
aggregation-weight statistics, wall time, GPU and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"

TOKENS = 2**25                  # per grid run: 1024 steps of 64 × 512
BATCH, SEQ = 64, 512
STEPS = TOKENS // (BATCH * SEQ)
WIDTHS = {96: 512, 128: 704, 192: 1024, 288: 1536}   # hidden size: SwiGLU size (≈ 5.33–5.5 × hidden)
STREAMS = (1, 2, 4, 8)
BASE_WIDTH = 192
SHAPE = {"num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
         "parscale_n_tokens": 8, "tie_word_embeddings": True}
TRAIN = {"batch_size": BATCH, "seq_len": SEQ, "lr": 2e-3, "min_lr_ratio": 0.1, "warmup": STEPS // 20,
         "schedule": "cosine", "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": STEPS // 8,
         "eval_batches": 24, "save_every": 0, "seed": 0, "compile": True, "progress": False}
CORPORA = ("code", "english")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def _toml(fields: dict) -> str:
    plain = [f"{k} = {_toml_value(v)}" for k, v in fields.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
              for k, v in fields.items() if isinstance(v, dict)]
    return "\n".join(plain) + "".join(tables) + "\n"


def runs() -> dict[str, dict]:
    """Every run: {name: {"train": TrainConfig fields, "after": base run or None, "kind": ..., "cost": ...}}."""
    out: dict[str, dict] = {}
    for corpus in CORPORA:
        for width, ffn in WIDTHS.items():
            for p in STREAMS:
                shape = {**SHAPE, "hidden_size": width, "intermediate_size": ffn}
                out[f"{corpus}-h{width}-p{p}"] = {
                    "kind": "grid", "corpus": corpus, "after": None, "cost": p * width**2 * STEPS,
                    "train": {"model": "small", "streams": p, "steps": STEPS, **TRAIN, "model_overrides": shape}}
        base = f"{corpus}-h{BASE_WIDTH}-p1"
        out[base]["cost"] = float("inf")  # started first: the two-stage and frozen runs start from it
        for share, tag in ((0.02, "2pct"), (0.10, "10pct")):
            steps = max(1, round(STEPS * share))
            for p in STREAMS:
                out[f"{corpus}-h{BASE_WIDTH}-stage2-{tag}-p{p}"] = {
                    "kind": "two-stage", "corpus": corpus, "after": base, "cost": p * BASE_WIDTH**2 * steps,
                    "train": {"model": "@checkpoint", "streams": p, "steps": steps, **TRAIN, "n_tokens": 8,
                              "data_start": STEPS * BATCH,
                              "lr": TRAIN["lr"] * TRAIN["min_lr_ratio"], "min_lr_ratio": 1.0,
                              "warmup": max(1, steps // 10), "eval_every": max(1, steps // 10), "compile": False}}
        if corpus == "code":
            steps = STEPS // 4
            for p in STREAMS[1:]:
                out[f"{corpus}-h{BASE_WIDTH}-frozen-p{p}"] = {
                    "kind": "frozen", "corpus": corpus, "after": base, "cost": p * BASE_WIDTH**2 * steps,
                    "train": {"model": "@checkpoint", "streams": p, "steps": steps, **TRAIN, "trainable": "parscale",
                              "n_tokens": 8, "data_start": STEPS * BATCH,
                              "warmup": steps // 20, "eval_every": steps // 8, "compile": False}}
        if corpus == "english":  # a second seed for the three smaller widths (the fourth did not fit the GPU time)
            for width in (96, 128, 192):
                for p in STREAMS:
                    grid_run = out[f"{corpus}-h{width}-p{p}"]
                    out[f"{corpus}-h{width}-p{p}-seed1"] = {
                        **grid_run, "kind": "seed", "cost": p * width**2 * STEPS,
                        "train": {**grid_run["train"], "seed": 1}}
        if corpus == "code":
            grid8 = out[f"{corpus}-h{BASE_WIDTH}-p8"]
            replicas = [(w, p, 1) for w in WIDTHS for p in STREAMS] + [(BASE_WIDTH, 1, 2), (BASE_WIDTH, 4, 2)]
            for width, p, seed in replicas:
                grid_run = out[f"{corpus}-h{width}-p{p}"]
                out[f"{corpus}-h{width}-p{p}-seed{seed}"] = {
                    **grid_run, "kind": "seed", "cost": p * width**2 * STEPS,
                    "train": {**grid_run["train"], "seed": seed}}
            out[f"{corpus}-h{BASE_WIDTH}-p8-nosmooth"] = {
                **grid8, "kind": "ablation", "train": {**grid8["train"], "smooth": 0.0}}
    return out


def write_configs() -> None:
    CONFIGS.mkdir(exist_ok=True)
    for name, run in runs().items():
        (CONFIGS / f"{name}.toml").write_text(f"# {run['kind']} run of experiments/scaling_small (grid.py configs)\n"
                                              + _toml(run["train"]))
    print(f"wrote {len(runs())} configs to {CONFIGS}")


def _curves(metrics: list[dict]) -> dict:
    keep = [m for m in metrics if m["step"] % 8 == 0 or m["step"] == metrics[-1]["step"] or "val_loss" in m]
    curve = {"step": [m["step"] for m in keep], "loss": [round(m["loss"], 5) for m in keep],
             "lr": [m["lr"] for m in keep]}
    if "stream_weight_mean" in metrics[0]:
        curve["stream_weight_mean"] = [[round(w, 4) for w in m["stream_weight_mean"]] for m in keep]
        curve["stream_weight_entropy"] = [round(m["stream_weight_entropy"], 4) for m in keep]
    evals = [m for m in metrics if "val_loss" in m]
    curve["val_step"] = [m["step"] for m in evals]
    curve["val_loss"] = [m["val_loss"] for m in evals]
    return curve


def summarize(name: str, run: dict, out_dir: Path, seconds: float, gpu: str) -> dict:
    import torch

    from parscale.model.config import ModelConfig

    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    if not metrics:
        raise RuntimeError(f"{name}: no metrics were written")
    config = json.loads((out_dir / "checkpoints/latest/model/config.json").read_text())
    counts = ModelConfig.from_hf_dict(config).param_counts()
    tail = metrics[-max(1, len(metrics) // 20):]
    steady = [m["tokens_per_s"] for m in metrics[len(metrics) // 10:]] or [metrics[-1]["tokens_per_s"]]
    result = {
        "run": name, "kind": run["kind"], "corpus": run["corpus"], "after": run["after"],
        "P": run["train"]["streams"], "hidden_size": config["hidden_size"],
        "params_non_embedding": counts["non_embedding"], "params_parscale": counts["parscale"],
        "params_total": counts["total"], "tokens": metrics[-1]["tokens"], "steps": metrics[-1]["step"],
        "val_loss": [m for m in metrics if "val_loss" in m][-1]["val_loss"],
        "train_loss_final": sum(m["loss"] for m in tail) / len(tail), "train_loss_last": metrics[-1]["loss"],
        "wall_seconds": round(seconds, 1), "tokens_per_s_median": sorted(steady)[len(steady) // 2],
        "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
        "train_config": run["train"], "curve": _curves(metrics),
    }
    if "stream_weight_mean" in metrics[-1]:
        result["stream_weight_mean_final"] = metrics[-1]["stream_weight_mean"]
        result["stream_weight_entropy_final"] = metrics[-1]["stream_weight_entropy"]
    return result


def _launch(name: str, run: dict, data: Path, runs_dir: Path, gpu: int) -> subprocess.Popen:
    config = CONFIGS / f"{run.get('config', name)}.toml"
    cmd = [sys.executable, "-m", "parscale.cli", "train", "--config", str(config), "--data", str(data),
           "--out", str(runs_dir / run.get("out", name))]
    if run["after"]:
        cmd += ["--model", str(runs_dir / run["after"] / "checkpoints" / "latest" / "model")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    log = open(runs_dir / f"{name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_all(corpora: list[str], data_root: Path, runs_dir: Path, gpus: list[int], per_gpu: int, only: list[str],
            deadline: float, results: Path = RESULTS) -> int:
    import torch

    todo = {n: r for n, r in runs().items() if r["corpus"] in corpora and (not only or any(o in n for o in only))}
    results.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    done = {n for n in todo if (RESULTS / f"{n}.json").exists() or (results / f"{n}.json").exists()}
    # A dependent run whose base finished on another machine needs the base's checkpoint: train the base
    # again (same settings and seed) into its folder; its result is kept as {base}-rerun, which also
    # shows how reproducible a run is.
    for base in sorted({todo[n]["after"] for n in todo if n not in done and todo[n]["after"]}):
        if base in done and not (runs_dir / base / "checkpoints" / "latest" / "model").is_dir():
            todo[f"{base}-rerun"] = {**todo[base], "config": base, "out": base, "kind": "rerun"}
    order = {"rerun": 0, "grid": 1, "ablation": 1, "two-stage": 2, "frozen": 2, "seed": 3}

    def priority(n):  # bases first, then the grid (largest first), then runs that start from a base, then seeds
        return -1 if todo[n]["cost"] == float("inf") else order[todo[n]["kind"]], -todo[n]["cost"]

    pending = sorted((n for n in todo if n not in done and not (results / f"{n}.json").exists()), key=priority)
    active: dict[str, tuple] = {}
    failed = 0
    print(f"[grid] {len(pending)} runs to do on GPUs {gpus}, {per_gpu} per GPU", flush=True)
    while pending or active:
        for name, (proc, gpu, t0) in list(active.items()):
            if proc.poll() is None:
                continue
            del active[name]
            seconds = time.time() - t0
            if proc.returncode:
                failed += 1
                print(f"[grid] FAILED {name} (exit {proc.returncode}); see {runs_dir / name}.log", flush=True)
                continue
            result = summarize(name, todo[name], runs_dir / todo[name].get("out", name), seconds,
                               torch.cuda.get_device_name(gpu))
            (results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            print(f"[grid] done {name}: held-out {result['val_loss']:.4f}, train {result['train_loss_final']:.4f}, "
                  f"{seconds:.0f} s, {result['tokens_per_s_median']:,.0f} tok/s", flush=True)
        busy = {g: sum(1 for _, gg, _ in active.values() if gg == g) for g in gpus}
        for name in list(pending):
            after = todo[name]["after"]
            if after and not (runs_dir / after / "checkpoints" / "latest" / "model").is_dir():
                if not ({after, f"{after}-rerun"} & (set(pending) | set(active))):
                    print(f"[grid] skipping {name}: its base run {after} is not here", flush=True)
                    pending.remove(name)
                continue
            free = [g for g in gpus if busy[g] < per_gpu]
            if not free or time.time() > deadline:
                break
            gpu = min(free, key=lambda g: busy[g])
            data = data_root / todo[name]["corpus"] / "data"
            active[name] = (_launch(name, todo[name], data, runs_dir, gpu), gpu, time.time())
            busy[gpu] += 1
            pending.remove(name)
            print(f"[grid] start {name} on GPU {gpu}", flush=True)
        if time.time() > deadline and not active:
            print(f"[grid] deadline reached; {len(pending)} runs left", flush=True)
            break
        time.sleep(2)
    return failed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("configs")
    sub.add_parser("list")
    r = sub.add_parser("run")
    r.add_argument("--corpus", choices=CORPORA, nargs="+", required=True)
    r.add_argument("--data-root", required=True, help="holds {corpus}/data, token shards built by `parscale data`")
    r.add_argument("--runs-dir", default="runs/scaling_small", help="checkpoints and logs")
    r.add_argument("--per-gpu", type=int, default=3, help="runs at a time on each GPU")
    r.add_argument("--only", nargs="*", default=[], help="run names containing one of these strings")
    r.add_argument("--start-before", type=float, default=1e9, help="start no run after this many seconds")
    r.add_argument("--results", default=str(RESULTS), help="where result files go (default: results/ here)")
    args = ap.parse_args(argv)
    if args.cmd == "configs":
        write_configs()
    elif args.cmd == "list":
        for name, run in runs().items():
            print(f"{'done' if (RESULTS / f'{name}.json').exists() else '    '}  {name}  ({run['kind']})")
    else:
        import torch

        gpus = list(range(torch.cuda.device_count())) or sys.exit("no GPU visible")
        failed = run_all(args.corpus, Path(args.data_root), Path(args.runs_dir), gpus, args.per_gpu, args.only,
                         time.time() + args.start_before, Path(args.results))
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
