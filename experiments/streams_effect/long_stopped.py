"""The ~100M-token arms compared on the evaluations every run of them has: the mean of the whole-split
held-out losses at 90% and 95% of training (steps 5,400 and 5,700 of 6,000).

    python experiments/streams_effect/long_stopped.py

The P = 1 and prefix-control runs of this length were stopped at step 5,990 (5 of 6) by a time limit,
before their 100% evaluation (results_stopped/); the P = 4 + warm-up runs finished (results/). Gains are
paired by seed, with SE = sd / sqrt(n).
"""

import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
POINTS = ("5400", "5700")


def two_point(arm: str, seed: int) -> float:
    for folder in ("results", "results_stopped"):
        f = HERE / folder / f"{arm}-s{seed}.json"
        if f.is_file():
            full = json.loads(f.read_text())["val_loss_full"]
            return statistics.fmean(full[p] for p in POINTS)
    raise FileNotFoundError(f"no result for {arm}-s{seed}")


def main() -> None:
    seeds = (0, 1, 2)
    arms = ("long-p1", "long-p1prefix", "long-p4-aggwarm")
    table = {a: [two_point(a, s) for s in seeds] for a in arms}
    for a, v in table.items():
        print(f"{a:>16}: " + " ".join(f"{x:.4f}" for x in v))
    for arm, base in (("long-p1prefix", "long-p1"), ("long-p4-aggwarm", "long-p1"),
                      ("long-p4-aggwarm", "long-p1prefix")):
        d = [b - a for a, b in zip(table[arm], table[base], strict=True)]
        print(f"{arm} over {base}: {statistics.fmean(d):+.4f} ± {statistics.stdev(d) / math.sqrt(len(d)):.4f} "
              f"(per seed {', '.join(f'{x:+.4f}' for x in d)})")


if __name__ == "__main__":
    main()
