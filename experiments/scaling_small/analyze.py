"""Tables, law fits and figures from the experiment's result files (CPU only; no run needed).

    python experiments/scaling_small/analyze.py

Reads results/*.json and writes into analysis/:
- points_{corpus}_{val|train}.csv: params (non-embedding, ParScale parameters included, as the paper
  counts them), P, loss, one row per run (seeds 0 and 1 where both exist);
- fit_{corpus}_{metric}.json / _law.png / _contours.png: `parscale fit` (Eq. 5 and Eq. 4, 1000
  bootstrap resamples of the runs);
- two_stage.png (held-out loss after switching P on), weights.png (aggregation-weight entropy over
  training), summary.json and summary.md (every table of the write-up).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "analysis"
WIDTHS = (96, 128, 192, 288)
STREAMS = (1, 2, 4, 8)
PAPER_K = {"code": ("Stack-V2 Python", 0.39), "english": ("Pile", 0.33)}


def load() -> dict[str, dict]:
    return {r["run"]: r for r in (json.loads(f.read_text()) for f in sorted((HERE / "results").glob("*.json")))}


def grid_runs(res, corpus, width, p) -> list[dict]:
    """The grid point's runs: seed 0 and, where it exists, seed 1."""
    return [res[n] for n in (f"{corpus}-h{width}-p{p}", f"{corpus}-h{width}-p{p}-seed1") if n in res]


def mean(xs):
    return sum(xs) / len(xs)


def write_points(res, corpus, metric) -> Path:
    key = "val_loss" if metric == "val" else "train_loss_final"
    rows = [f"{r['params_non_embedding']},{p},{r[key]:.6f}" for w in WIDTHS for p in STREAMS
            for r in grid_runs(res, corpus, w, p)]
    path = OUT / f"points_{corpus}_{metric}.csv"
    path.write_text("params,P,loss\n" + "\n".join(rows) + "\n")
    return path


def run_fit(csv: Path, stem: str) -> dict:
    cmd = [sys.executable, "-m", "parscale.cli", "fit", str(csv), "--bootstrap", "1000", "--seed", "0",
           "--plot", str(OUT / stem), "--out", str(OUT / f"{stem}.json")]
    subprocess.run(cmd, check=True, capture_output=True)
    result = json.loads((OUT / f"{stem}.json").read_text())
    result["command"] = "python -m parscale.cli " + " ".join(cmd[3:]).replace(str(HERE.parent.parent) + "/", "")
    return result


def grid_table(res, corpus) -> list[dict]:
    rows = []
    for w in WIDTHS:
        row = {"hidden": w, "params_non_embedding_p1": res[f"{corpus}-h{w}-p1"]["params_non_embedding"]}
        for p in STREAMS:
            runs = grid_runs(res, corpus, w, p)
            row[f"P{p}"] = {"val": [round(r["val_loss"], 4) for r in runs],
                            "train": [round(r["train_loss_final"], 4) for r in runs],
                            "val_mean": round(mean([r["val_loss"] for r in runs]), 4),
                            "train_mean": round(mean([r["train_loss_final"] for r in runs]), 4),
                            "wall_s": [r["wall_seconds"] for r in runs]}
        means = [row[f"P{p}"]["val_mean"] for p in STREAMS]
        row["monotonic_in_P"] = all(a > b for a, b in zip(means, means[1:], strict=False))
        row["gain_P8_vs_P1"] = round(means[0] - means[-1], 4)
        rows.append(row)
    return rows


def seed_spread(res) -> dict:
    out = {}
    for p in (1, 4):
        names = [f"code-h192-p{p}", f"code-h192-p{p}-seed1", f"code-h192-p{p}-seed2"]
        vals = [res[n]["val_loss"] for n in names if n in res]
        m = mean(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        out[f"code-h192-p{p}"] = {"seeds": [round(v, 4) for v in vals], "mean": round(m, 4), "std": round(sd, 4)}
    for corpus in ("code", "english"):
        a, b = res[f"{corpus}-h192-p1"], res.get(f"{corpus}-h192-p1-rerun")
        if b:
            out[f"{corpus}-h192-p1 rerun (same seed)"] = [round(a["val_loss"], 4), round(b["val_loss"], 4)]
    # All paired seed-0 / seed-1 differences of each grid: the per-run standard deviation.
    for corpus in ("code", "english"):
        diffs = [res[f"{corpus}-h{w}-p{p}"]["val_loss"] - res[f"{corpus}-h{w}-p{p}-seed1"]["val_loss"]
                 for w in WIDTHS for p in STREAMS if f"{corpus}-h{w}-p{p}-seed1" in res]
        out[f"{corpus} run std (from {len(diffs)} seed pairs)"] = round(
            math.sqrt(sum(d * d for d in diffs) / len(diffs)) / math.sqrt(2), 4)
    return out


def p_effect(summary) -> dict:
    """Model-free: the mean over the four sizes of L(P=1) − L(P) (seed means), with a standard error from
    the corpus's own run-to-run spread (seed pairs) and the number of seeds at each point."""
    out = {}
    for corpus in ("code", "english"):
        sigma = next(v for k, v in summary["seed_spread"].items() if k.startswith(f"{corpus} run std"))
        rows = summary["grid"][corpus]
        out[corpus] = {"sigma_run": sigma}
        for p in STREAMS[1:]:
            gains = [r["P1"]["val_mean"] - r[f"P{p}"]["val_mean"] for r in rows]
            var = sum(sigma**2 * (1 / len(r["P1"]["val"]) + 1 / len(r[f"P{p}"]["val"])) for r in rows)
            out[corpus][f"P{p}"] = {"gain": round(mean(gains), 4), "se": round(math.sqrt(var) / len(rows), 4)}
    return out


def weights_table(res) -> list[dict]:
    rows = []
    for name, r in sorted(res.items()):
        if "stream_weight_mean_final" not in r or r["kind"] not in ("grid", "ablation", "seed"):
            continue
        w = r["stream_weight_mean_final"]
        p = len(w)
        rows.append({"run": name, "P": p, "smooth": r["train_config"].get("smooth", 0.1),
                     "entropy_final": round(r["stream_weight_entropy_final"], 3), "entropy_max": round(math.log(p), 3),
                     "max_weight": round(max(w), 3), "floor": round(r["train_config"].get("smooth", 0.1) / p, 4),
                     "collapsed": max(w) > 1 - r["train_config"].get("smooth", 0.1) * (1 - 1 / p) - 0.02})
    return rows


def stage_tables(res) -> dict:
    out = {}
    for corpus in ("code", "english"):
        base = res.get(f"{corpus}-h192-p1-rerun") or res[f"{corpus}-h192-p1"]
        for tag in ("2pct", "10pct"):
            rows = {"base (end of stage 1)": round(base["val_loss"], 4)}
            for p in STREAMS:
                r = res[f"{corpus}-h192-stage2-{tag}-p{p}"]
                rows[f"P{p}"] = {"val": round(r["val_loss"], 4), "train": round(r["train_loss_final"], 4),
                                 "tokens": r["tokens"]}
            out[f"{corpus} {tag}"] = rows
    frozen = {"backbone P1 (frozen, = code-h192-p1 rerun)": round(res["code-h192-p1-rerun"]["val_loss"], 4)}
    for p in STREAMS[1:]:
        r = res[f"code-h192-frozen-p{p}"]
        frozen[f"P{p}"] = {"val": round(r["val_loss"], 4), "train": round(r["train_loss_final"], 4),
                           "trainable": r["params_parscale"], "tokens": r["tokens"]}
    out["frozen"] = frozen
    return out


def plot_two_stage(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, corpus in zip(axes, ("code", "english"), strict=True):
        for i, p in enumerate(STREAMS):
            c = res[f"{corpus}-h192-stage2-10pct-p{p}"]["curve"]
            ax.plot(c["val_step"], c["val_loss"], "o-", color=f"C{i}", ms=3, label=f"P = {p} (10%)")
            c2 = res[f"{corpus}-h192-stage2-2pct-p{p}"]["curve"]
            ax.plot(c2["val_step"], c2["val_loss"], "x--", color=f"C{i}", ms=4, lw=0.8)
        ax.set_title(f"{corpus}: h192 P=1 base, then P switched on (x: 2% run)", fontsize=9)
        ax.set_xlabel("stage-2 step (64 × 512 tokens)")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_weights(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, corpus in zip(axes, ("code", "english"), strict=True):
        for i, w in enumerate(WIDTHS):
            for ls, p in zip((":", "--", "-"), STREAMS[1:], strict=True):
                c = res[f"{corpus}-h{w}-p{p}"]["curve"]
                ax.plot(c["step"], [e / math.log(p) for e in c["stream_weight_entropy"]], ls, color=f"C{i}", lw=1,
                        label=f"h{w} P{p}" if p == 8 or w == 96 else None)
        if corpus == "code":
            c = res["code-h192-p8-nosmooth"]["curve"]
            ax.plot(c["step"], [e / math.log(8) for e in c["stream_weight_entropy"]], "-", color="k", lw=1.5,
                    label="h192 P8, no smoothing")
        ax.set_title(f"{corpus}: aggregation-weight entropy / ln P (1 = uniform)  (: P2, -- P4, - P8)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary) -> str:
    lines = []
    for corpus in ("code", "english"):
        lines += [f"\n### {corpus}: held-out loss (mean of seeds; each seed listed)\n",
                  "| hidden | N (P=1) | P=1 | P=2 | P=4 | P=8 | falls in P | P1−P8 |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in summary["grid"][corpus]:
            cells = [f"{row[f'P{p}']['val_mean']:.4f} ({', '.join(f'{v:.3f}' for v in row[f'P{p}']['val'])})"
                     for p in STREAMS]
            lines.append(f"| {row['hidden']} | {row['params_non_embedding_p1'] / 1e6:.2f}M | " + " | ".join(cells)
                         + f" | {'yes' if row['monotonic_in_P'] else 'no'} | {row['gain_P8_vs_P1']:+.4f} |")
    lines += ["\n### Eq. 5 fits (`parscale fit`, 1000 bootstrap resamples of the runs, 95% intervals)\n",
              "| corpus | metric | points | E | A | α | k | R² | paper k |", "|---|---|---|---|---|---|---|---|---|"]
    for key, f in summary["fits"].items():
        corpus, metric = key.split("/")
        ci = f["eq5"]["ci95"]
        lines.append(f"| {corpus} | {metric} | {f['n_points']} | {f['E']:.3f} [{ci['E'][0]:.2f}, {ci['E'][1]:.2f}] | "
                     f"{f['A']:.3g} | {f['alpha']:.3f} [{ci['alpha'][0]:.2f}, {ci['alpha'][1]:.2f}] | "
                     f"{f['k']:.3f} [{ci['k'][0]:.2f}, {ci['k'][1]:.2f}] | {f['r2']:.3f} | "
                     f"{PAPER_K[corpus][1]} ({PAPER_K[corpus][0]}) |")
    lines += ["\n### Gain over P = 1, averaged over the four sizes (held-out loss; ± one standard error)\n",
              "| corpus | P=2 | P=4 | P=8 |", "|---|---|---|---|"]
    for corpus in ("code", "english"):
        e = summary["p_effect"][corpus]
        lines.append(f"| {corpus} | " + " | ".join(f"{e[f'P{p}']['gain']:+.3f} ± {e[f'P{p}']['se']:.3f}"
                                                   for p in STREAMS[1:]) + " |")
    return "\n".join(lines) + "\n"


def main():
    OUT.mkdir(exist_ok=True)
    res = load()
    summary = {"grid": {c: grid_table(res, c) for c in ("code", "english")}, "fits": {}}
    for corpus in ("code", "english"):
        for metric in ("val", "train"):
            f = run_fit(write_points(res, corpus, metric), f"fit_{corpus}_{metric}")
            summary["fits"][f"{corpus}/{metric}"] = {k: v for k, v in f.items() if k != "table"}
    summary["seed_spread"] = seed_spread(res)
    summary["p_effect"] = p_effect(summary)
    summary["stages"] = stage_tables(res)
    summary["weights"] = weights_table(res)
    summary["wall_seconds_total"] = round(sum(r["wall_seconds"] for r in res.values()), 1)
    summary["gpus"] = sorted({r["gpu"] for r in res.values()})
    summary["torch"] = sorted({r["torch"] for r in res.values()})
    plot_two_stage(res, OUT / "two_stage.png")
    plot_weights(res, OUT / "weights.png")
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (OUT / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(json.dumps({k: summary[k] for k in ("seed_spread", "p_effect", "stages")}, indent=1))


if __name__ == "__main__":
    main()
