"""Analysis of the recycling runs: each arm against its control, seed by seed, in nats and bits per byte.

    python experiments/recycle_smollm2/analyze.py      # writes analysis/summary.json and analysis/curves.png

A run's endpoint is its last whole-split held-out loss. Arms are compared with a control of their own kind on
the same seeds (experiments/paired_stats.py: gain = control − arm, Student-t 95% intervals): the frozen arms
with the frozen P = 1 + prefix adapter, the full arms with P = 1 and P = 1 + prefix trained alike, and each
lever arm (`-agglr*`) with the plain arm of its P. The same comparisons run on the bits per byte of the whole
held-out split and of the split without the files that have a path twin in the training packages
(`heldout_by_package`, runner.py: `parscale eval` on the held-out files, each token with at least 256 tokens
of context, so its losses are lower than the trainer's, whose windows start without context). Along training,
the 16-batch held-out loss every 60 steps gives each comparison's gain curve (how fast the new parameters
adapt). The starting model (`start-p1`, one step at lr 1e-12) is the arm table's reference when its result is
here. A run that put one stream at the ε cap on more than half of the held-out tokens at its end
(`streams_final.verdict == "collapsed"`) is counted as collapsed: its mix is then close to one stream.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from paired_stats import load_results, paired_t  # noqa: E402  (experiments/paired_stats.py, shared)

START = "start-p1"
CONTROLS = {"frozen": ("frozen-p1prefix",), "full": ("full-p1", "full-p1prefix")}
# What each comparison reads: the run's endpoint (nats), or its bits per byte over a part of the held-out split.
MEASURES = {"nats": lambda r: r.get("endpoint"),
            "bits_per_byte": lambda r: ((r.get("heldout_by_package") or {}).get("all") or {}).get("bits_per_byte"),
            "bits_per_byte_without_twins":
                lambda r: ((r.get("heldout_by_package") or {}).get("without_twins") or {}).get("bits_per_byte")}


def load(folder: Path = HERE / "results") -> dict[tuple[str, int], dict]:
    return load_results(folder)


def bases_of(arm: str) -> list[str]:
    """The arms an arm is compared with: its kind's controls, and for a lever arm the plain arm of its P."""
    kind = arm.split("-")[0]
    if kind not in CONTROLS or arm in CONTROLS[kind]:
        return []
    bases = list(CONTROLS[kind])
    if "-agglr" in arm:
        bases.append(arm.split("-agglr")[0])
    return bases


def comparisons(results) -> list[dict]:
    """Every arm against each of its bases, paired by seed, in each measure (rows without a pair are left out)."""
    rows = []
    for arm in sorted({a for a, _ in results}):
        for base in bases_of(arm):
            row = {"arm": arm, "base": base}
            for name, read in MEASURES.items():
                values = {key: {"endpoint": v} for key, r in results.items() if key[0] in (arm, base)
                          if (v := read(r)) is not None}
                row[name] = paired_t(values, arm, base)
            if row["nats"] is not None:
                rows.append(row)
    return rows


def arm_table(results) -> dict[str, dict]:
    """Each arm's seeds: mean endpoint (± SE over seeds), bits per byte, how far below the starting model,
    how many runs collapsed, the final largest stream weight, wall seconds and the GPU-seconds they stand for."""
    start = [r["endpoint"] for (a, _), r in results.items() if a == START]
    start_loss = statistics.fmean(start) if start else None
    table = {}
    for arm in sorted({a for a, _ in results}):
        runs = [r for (a, _), r in sorted(results.items()) if a == arm]
        ends = [r["endpoint"] for r in runs]
        bpb = [v for r in runs if (v := MEASURES["bits_per_byte"](r)) is not None]
        finals = [r.get("streams_final") or {} for r in runs]
        weights = [max(f["weight_mean"]) for f in finals if f.get("weight_mean")]
        table[arm] = {
            "n": len(runs), "seeds": [r["seed"] for r in runs], "mean": statistics.fmean(ends),
            "se": statistics.stdev(ends) / len(ends) ** 0.5 if len(ends) > 1 else None,
            "bits_per_byte": statistics.fmean(bpb) if bpb else None,
            "below_start": start_loss - statistics.fmean(ends) if start_loss is not None else None,
            "collapsed": sum(f.get("verdict") == "collapsed" for f in finals),
            "largest_weight": statistics.fmean(weights) if weights else None,
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in runs) if all("wall_seconds" in r for r in runs)
            else None,
            # its share of the GPU: wall time over the mean number of runs on the card (runner.py's gpu_sharing)
            "gpu_seconds": statistics.fmean(r["wall_seconds"] / r["gpu_sharing"]["mean_runs_on_gpu"] for r in runs)
            if all("wall_seconds" in r and "gpu_sharing" in r for r in runs) else None}
    return table


def gain_curves(results) -> list[dict]:
    """Each comparison's paired gain (base − arm) on the 16-batch held-out loss at every evaluation step both
    arms reached on every paired seed: {arm, base, steps, tokens, mean, se, n}."""
    curves = {key: {e["step"]: e["val_loss"] for e in r.get("eval_curve") or []} for key, r in results.items()}
    out = []
    for arm in sorted({a for a, _ in results}):
        for base in bases_of(arm):
            seeds = sorted(s for (a, s) in results if a == arm and (base, s) in results
                           and curves[(arm, s)] and curves[(base, s)])
            if not seeds:
                continue
            steps = sorted(set.intersection(*(set(curves[(arm, s)]) & set(curves[(base, s)]) for s in seeds)))
            diffs = [[curves[(base, s)][t] - curves[(arm, s)][t] for s in seeds] for t in steps]
            st = results[(arm, seeds[0])]["settings"]
            out.append({"arm": arm, "base": base, "n": len(seeds), "steps": steps,
                        "tokens": [t * st["batch_size"] * st["seq_len"] for t in steps],
                        "mean": [statistics.fmean(d) for d in diffs],
                        "se": [statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None for d in diffs]})
    return out


def _plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({c["arm"].split("-")[0] for c in curves})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for c in curves:
            if c["arm"].split("-")[0] != kind or c["base"] not in CONTROLS[kind]:
                continue
            x = [t / 1e6 for t in c["tokens"]]
            ax.plot(x, c["mean"], marker="o", label=f"{c['arm']} vs {c['base']} (n = {c['n']})")
            if all(e is not None for e in c["se"]):
                ax.fill_between(x, [m - e for m, e in zip(c["mean"], c["se"], strict=True)],
                                [m + e for m, e in zip(c["mean"], c["se"], strict=True)], alpha=0.2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("gain over the control (nats, 16 held-out batches)")
        ax.set_title(f"{kind}: gain along training (mean ± SE over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print(summary: dict) -> None:
    print("arm                       n   held-out loss      bits/byte  below start  collapsed  largest weight")
    for arm, t in summary["arms"].items():
        se = f" ± {t['se']:.4f}" if t["se"] is not None else "         "
        bpb = f"{t['bits_per_byte']:.4f}" if t["bits_per_byte"] is not None else "   –  "
        below = f"{t['below_start']:+.4f}" if t["below_start"] is not None else "   –   "
        weight = f"{t['largest_weight']:.3f}" if t["largest_weight"] is not None else "–"
        print(f"{arm:25s} {t['n']:2d}  {t['mean']:.4f}{se}  {bpb:>9s}  {below:>11s}  {t['collapsed']:9d}  {weight}")
    print("\ngain = control − arm (nats; paired by seed; 95% t interval where n > 1)")
    for row in summary["comparisons"]:
        g = row["nats"]
        interval = f" [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}], p = {g['p']:.3f}" if "ci95" in g else ""
        print(f"  {row['arm']:25s} vs {row['base']:18s} {g['mean']:+.4f} (n = {g['n']}){interval}")


def main() -> None:
    from parscale.io.files import write_json_atomic

    results = load()
    if not results:
        sys.exit(f"no results in {HERE / 'results'}")
    summary = {"arms": arm_table(results), "comparisons": comparisons(results), "gain_curves": gain_curves(results)}
    out = HERE / "analysis"
    out.mkdir(exist_ok=True)
    write_json_atomic(summary, out / "summary.json")
    if summary["gain_curves"]:
        _plot(summary["gain_curves"], out / "curves.png")
    _print(summary)


if __name__ == "__main__":
    main()
