"""A CPU pilot of the levers against stream collapse, on the `demo` shape (4 layers × 128, 8 prefix tokens).

    python experiments/streams_effect/cpu_pilot.py --data runs/demo/data --work /tmp/pilot

The `parscale demo` data (the standard library of the running Python, a 4,096-entry BPE), P = 4, paired
seeds 0 and 1, 200 steps of 16 × 128 tokens (lr 3e-3, 20 warm-up steps): the plain recipe against three
levers of levers.py, the z-loss and stream dropout at the settings `runs.py` gives them and a 100-step
warm-up of prefixes and aggregator (half this run; `runs.py` gives a quarter). It asks one thing a GPU
run is too dear to ask first: at a shape this shallow, does the plain recipe collapse, and which lever
keeps the streams used (cap / floor shares, weight entropy) without costing held-out loss? Writes
analysis/cpu_pilot.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LEVERS = {"plain": {}, "zloss": {"aggregator_z_loss": 1e-3}, "sdrop": {"stream_dropout": 0.1},
          "aggwarm": {"parscale_warmup": 100}}


def main(argv=None) -> None:
    import torch

    from parscale.training.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for lever, fields in LEVERS.items():
            out = Path(args.work) / f"{lever}-s{seed}"
            t0 = time.perf_counter()
            result = train(TrainConfig(model="demo", streams=4, data=args.data, out=str(out), steps=args.steps,
                                       batch_size=16, seq_len=128, lr=3e-3, warmup=20, eval_every=50,
                                       eval_batches=8, stream_batches=4, save_every=0, seed=seed, progress=False,
                                       **fields), overwrite=True)
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in records if "streams" in r]
            last = evals[-1]["streams"]
            rows.append({"lever": lever, "seed": seed, "val_loss": result["val_loss"],
                         "seconds": time.perf_counter() - t0,
                         "cap_share": last["cap_share"], "floor_share": last["floor_share"],
                         "weight_entropy": last["weight_entropy"], "loss_mix": last["loss_mix"],
                         "best_stream_alone": min(last["loss_stream"]), "loss_ensemble": last["loss_ensemble"],
                         "cap_share_curve": [[r["step"], r["streams"]["cap_share"]] for r in evals]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "cap_share_curve"}), flush=True)
    summary = {}
    for lever in LEVERS:
        mine = {r["seed"]: r for r in rows if r["lever"] == lever}
        base = {r["seed"]: r for r in rows if r["lever"] == "plain"}
        gains = [base[s]["val_loss"] - mine[s]["val_loss"] for s in mine]
        summary[lever] = {
            "val_loss_mean": statistics.fmean(r["val_loss"] for r in mine.values()),
            "paired_gain_over_plain": statistics.fmean(gains),
            "paired_gain_se": statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else None,
            "cap_share_mean": statistics.fmean(r["cap_share"] for r in mine.values()),
            "weight_entropy_mean": statistics.fmean(r["weight_entropy"] for r in mine.values()),
        }
    report = {"runs": rows, "summary": summary, "command": "python experiments/streams_effect/cpu_pilot.py "
              + " ".join(argv or []), "torch": torch.__version__, "python": platform.python_version(),
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads"}
    (HERE / "analysis").mkdir(exist_ok=True)
    (HERE / "analysis" / "cpu_pilot.json").write_text(json.dumps(report, indent=1) + "\n")
    for lever, s in summary.items():
        print(f"{lever:8s} loss {s['val_loss_mean']:.4f}  gain {s['paired_gain_over_plain']:+.4f}  "
              f"cap {s['cap_share_mean']:.2f}  entropy {s['weight_entropy_mean']:.3f}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
