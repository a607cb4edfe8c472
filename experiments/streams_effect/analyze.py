"""Analysis of the streams_effect runs: paired gains with standard errors, collapse, figure, tables.

    python experiments/streams_effect/analyze.py        # writes analysis/summary.json and analysis/*.png

For each seed s and arm a, the endpoint L(a, s) is the mean of the whole-split held-out losses at 90, 95
and 100% of training. Gains are paired by seed (the same backbone initialisation and data order):
Δ(a) = L(p1, s) − L(a, s), and against the prefix control Δ'(a) = L(p1prefix, s) − L(a, s); the
standard error of a mean of n paired differences is their standard deviation / √n. A run counts as
collapsed when its final stream diagnostics show one stream taking the largest weight the ε smoothing
allows on more than half of the tokens (cap_share > 0.5): its mix is then close to that one stream.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("p1", "p1prefix", "p2", "p4", "p8")
# Lever arms that have results; each is compared with the plain arm of the same P on the same seeds.
LEVERS = ("p4-zloss", "p4-aggwarm", "p4-sdrop", "p4-reparam", "p8-zloss", "p8-aggwarm", "p8-sdrop", "p8-reparam")
LABELS = {"p1": "P=1", "p1prefix": "P=1 + prefix", "p2": "P=2", "p4": "P=4", "p8": "P=8"}


def load() -> dict[tuple[str, int], dict]:
    out = {}
    for f in sorted((HERE / "results").glob("*.json")):
        r = json.loads(f.read_text())
        out[(r["arm"], r["seed"])] = r
    return out


def paired(results, arm: str, base: str) -> dict | None:
    diffs = [results[(base, s)]["endpoint"] - results[(arm, s)]["endpoint"]
             for (a, s) in results if a == arm and (base, s) in results]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"n": len(diffs), "mean": mean, "se": se, "diffs": diffs}


def collapsed(r: dict) -> bool | None:
    s = r.get("streams_final") or {}
    return None if "cap_share" not in s else s["cap_share"] > 0.5


def main() -> None:
    results = load()
    seeds = sorted({s for _, s in results})
    arms = [a for a in ARMS + LEVERS if any((a, s) in results for s in seeds)]
    table = {arm: {s: results[(arm, s)]["endpoint"] for s in seeds if (arm, s) in results} for arm in arms}
    summary = {"endpoints": table, "gain_vs_p1": {}, "gain_vs_prefix": {}, "lever_vs_plain": {}, "steps": {},
               "streams": {}}
    for arm in arms[1:]:
        summary["gain_vs_p1"][arm] = paired(results, arm, "p1")
    for arm in arms:
        if arm in LEVERS:  # the lever's own effect: the plain arm of the same P, same seeds
            summary["lever_vs_plain"][arm] = paired(results, arm, arm.split("-")[0])
    for lever in sorted({a.split("-")[1] for a in arms if a in LEVERS}):  # P = 4 -> 8 under one lever
        if f"p4-{lever}" in arms and f"p8-{lever}" in arms:
            summary["steps"][f"p8-{lever} vs p4-{lever}"] = paired(results, f"p8-{lever}", f"p4-{lever}")
    for arm in [a for a in arms if a not in ("p1", "p1prefix")]:
        summary["gain_vs_prefix"][arm] = paired(results, arm, "p1prefix")
        used = {"diffs": [], "seeds": []}
        for s in seeds:
            if (arm, s) in results and ("p1prefix", s) in results and collapsed(results[(arm, s)]) is False:
                used["diffs"].append(results[("p1prefix", s)]["endpoint"] - results[(arm, s)]["endpoint"])
                used["seeds"].append(s)
        summary["gain_vs_prefix"][arm + "_not_collapsed"] = used
    for (arm, s), r in sorted(results.items()):
        d = r.get("streams_final") or {}
        summary["streams"][f"{arm}-s{s}"] = {
            "endpoint": r["endpoint"], "collapsed": collapsed(r),
            **{k: d[k] for k in ("loss_mix", "loss_best_stream", "loss_ensemble", "kl_mean", "weight_entropy",
                                 "floor_share", "cap_share") if k in d},
            "hidden_cosine_last": d["hidden_cosine"][-1] if "hidden_cosine" in d else None}
    out = HERE / "analysis"
    out.mkdir(exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(results, seeds, arms, out / "endpoints.png")
    _plot_weights(results, out / "cap_share_curves.png")
    _print(summary, seeds)


def _plot(results, seeds, arms, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 * len(arms) + 2, 4))
    xs = {arm: i for i, arm in enumerate(arms)}
    for s in seeds:
        pts = [(xs[a], results[(a, s)]["endpoint"], collapsed(results[(a, s)])) for a in arms if (a, s) in results]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=f"C{s}", alpha=0.5, label=f"seed {s}")
        for x, y, c in pts:
            ax.plot(x, y, "x" if c else "o", color=f"C{s}", ms=9 if c else 6)
    ax.set_xticks(range(len(arms)), [LABELS.get(a, a) for a in arms], fontsize=8, rotation=20)
    ax.set_ylabel("held-out loss (mean of 90/95/100%)")
    ax.set_title("paired seeds; x = collapsed run (one stream at the ε cap)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_weights(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (arm, s), r in sorted(results.items()):
        curve = [(e["step"], e["streams"]["cap_share"]) for e in r["eval_curve"] if "streams" in e]
        if curve:
            ax.plot(*zip(*curve, strict=True), "o-" if collapsed(r) else "s--", label=f"{arm} s{s}", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("share of tokens with one stream at the ε cap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print(summary, seeds) -> None:
    print("endpoint (mean of the whole-split held-out loss at 90/95/100%)")
    print(f"{'arm':>9} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds))
    for arm, row in summary["endpoints"].items():
        print(f"{arm:>9} " + " ".join(f"{row[s]:8.4f}" if s in row else f"{'-':>8}" for s in seeds))
    for name, block in (("vs P=1", summary["gain_vs_p1"]), ("vs prefix control", summary["gain_vs_prefix"]),
                        ("of the lever (vs the plain arm of the same P)", summary["lever_vs_plain"]),
                        ("between P under one lever", summary["steps"])):
        print(f"paired gain {name}:")
        for arm, g in block.items():
            if g is None or "mean" not in g:
                continue
            se = f" ± {g['se']:.4f} (SE)" if g["se"] is not None else ""
            print(f"  {arm:>9}: {g['mean']:+.4f}{se} over {g['n']} seeds  {[round(d, 4) for d in g['diffs']]}")
    print("collapse (final diagnostics):")
    for name, d in summary["streams"].items():
        if d["collapsed"] is not None:
            print(f"  {name:>10}: {'COLLAPSED' if d['collapsed'] else 'used     '} endpoint {d['endpoint']:.4f} "
                  f"mix {d['loss_mix']:.3f} best stream {d['loss_best_stream']:.3f} ensemble "
                  f"{d['loss_ensemble']:.3f} KL {d['kl_mean']:.2f} cap {d['cap_share']:.2f} floor "
                  f"{d['floor_share']:.2f}")


if __name__ == "__main__":
    main()
