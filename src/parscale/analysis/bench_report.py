"""Turn measured benchmark JSON into the paper's Figure 4 comparison, plots and a summary.

    parscale bench-report --latency benchmarks/raw/grid_graph_*.json --memory benchmarks/raw/memory_fresh.json \
        --out benchmarks [--lengths 64]

Per (shape, P, batch) the memory is the peak GiB and the latency the end-to-end seconds
(prefill + decode ms/token × output tokens), each averaged over the input = output lengths, as the
paper's Figure 4 does. The headline follows the paper's method on these measurements: the cost
increase of the 1.6B model going from P = 1 to P = 8, against the increase of the P = 1 model of
equal loss (the paper's Stack-V2-Python losses, interpolated linearly in loss along the P = 1 curve
1.6B → 2.8B → 4.4B), at batch 1 and with costs first averaged over the batch sizes. `lengths` keeps only
the points of those lengths (latency and memory alike), for grids measured at fewer lengths. The plot's title
and the summary name the GPU, engine and lengths the latency files hold.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from parscale.analysis.bench_files import LATENCY_KEYS, MEMORY_KEYS, read_bench_json
from parscale.analysis.scaling_law import paper_points
from parscale.io.files import write_json_atomic
from parscale.model.config import ModelConfig


def _paper_losses() -> dict[str, dict[int, float]]:
    """Final Stack-V2-Python training losses of the paper by benchmark shape and P, read from the shipped
    scaling-law points (paper_data/paper_stack.csv) by each preset's non-embedding parameter count."""
    points = paper_points("stack")
    by_key = {(int(n), int(p)): float(y) for n, p, y in zip(points.params, points.P, points.loss, strict=True)}
    return {shape: {p: by_key[(ModelConfig.preset(shape, parscale_n=p).param_counts()["non_embedding"], p)]
                    for p in (1, 2, 4, 8)} for shape in ("paper-1.6b", "paper-2.8b", "paper-4.4b")}


PAPER_LOSS = _paper_losses()


def _points(files, needs, lengths=None) -> list[dict]:
    out = []
    for f in files:
        out.extend(p for p in read_bench_json(f, needs)["points"] if lengths is None or p["length"] in lengths)
    return out


def describe(latency_files, lengths=None) -> dict:
    """What the latency files measured: GPUs, engines and input = output lengths (after the `lengths` filter)."""
    gpus, engines = set(), set()
    for f in latency_files:
        data = read_bench_json(f, LATENCY_KEYS)
        gpus.add(data.get("environment", {}).get("gpu", "unknown GPU"))
        engines.add(data.get("engine", "unknown"))
    return {"gpu": sorted(gpus), "engine": sorted(engines),
            "lengths": sorted({p["length"] for p in _points(latency_files, LATENCY_KEYS, lengths)})}


def aggregate(latency_files, memory_files, lengths=None) -> dict:
    """{(shape, P, batch): {'latency_s', 'memory_gib', 'decode_ms'}} averaged over lengths (all, or `lengths`)."""
    acc = defaultdict(lambda: defaultdict(list))
    for p in _points(latency_files, LATENCY_KEYS, lengths):
        key = (p["shape"], p["P"], p["batch"])
        acc[key]["latency_s"].append(p["latency_s"])
        acc[key]["decode_ms"].append(p["decode_ms_per_token"])
    for p in _points(memory_files, MEMORY_KEYS, lengths):
        acc[(p["shape"], p["P"], p["batch"])]["memory_gib"].append(p["peak_memory_gib"])
    if not acc:
        raise ValueError(f"no benchmark points{f' of length {sorted(lengths)}' if lengths else ''} in the files given")
    return {k: {m: sum(v) / len(v) for m, v in d.items()} for k, d in acc.items()}


def title(measured: dict) -> str:
    lengths = measured["lengths"]
    span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}..{lengths[-1]}, mean"
    return (f"Measured cost vs loss ({', '.join(measured['gpu'])}, {'/'.join(measured['engine'])} engine, bf16, "
            f"input = output length {span})")


def _equal_loss_cost(costs: dict, metric: str, batch, target: float) -> float:
    """Cost of the P = 1 model whose loss equals `target`, interpolated linearly in loss."""
    curve = sorted(((PAPER_LOSS[s][1], cost_of(costs, s, 1, batch, metric)) for s in PAPER_LOSS), reverse=True)
    for (l_hi, c_hi), (l_lo, c_lo) in zip(curve[:-1], curve[1:], strict=True):
        if l_lo <= target <= l_hi:
            return c_hi + (c_lo - c_hi) * (l_hi - target) / (l_hi - l_lo)
    raise ValueError(f"loss {target} is outside the P = 1 curve")


def cost_of(costs: dict, shape: str, p: int, batch, metric: str) -> float:
    """A point's cost (batch "avg": the mean over the batches measured); one error naming a point the files
    do not hold (e.g. a latency grid of some shapes given with a memory grid of all)."""
    if batch == "avg":
        values = [v[metric] for (s, pp, _), v in costs.items() if s == shape and pp == p and metric in v]
    else:
        values = [costs[(shape, p, batch)][metric]] if metric in costs.get((shape, p, batch), {}) else []
    if not values:
        source = "memory" if metric == "memory_gib" else "latency"
        raise ValueError(f"the headline needs the {metric} of {shape} at P = {p}, batch {batch}: no such point in "
                         f"the {source} files given")
    return sum(values) / len(values)


def headline(costs: dict, batches=(1, "avg")) -> dict:
    base, streams = "paper-1.6b", 8
    out = {}
    for batch in batches:
        row = {}
        for metric in ("memory_gib", "latency_s"):
            p1 = cost_of(costs, base, 1, batch, metric)
            p8 = cost_of(costs, base, streams, batch, metric)
            eq = _equal_loss_cost(costs, metric, batch, PAPER_LOSS[base][streams])
            row[metric] = {"P1": p1, "P8": p8, "equal_loss_P1": eq, "parscale_increase": p8 - p1,
                           "parameter_increase": eq - p1, "ratio": (eq - p1) / (p8 - p1)}
        out[f"batch_{batch}"] = row
    return out


def plot_figure4(costs: dict, path: Path, heading: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({b for (_, _, b) in costs})
    fig, axes = plt.subplots(2, len(batches), figsize=(4 * len(batches), 7), squeeze=False)
    markers = {"paper-1.6b": "o", "paper-2.8b": "s", "paper-4.4b": "^"}
    colors = {1: "tab:blue", 2: "tab:orange", 4: "tab:green", 8: "tab:red"}
    for col, batch in enumerate(batches):
        for row, (metric, label) in enumerate((("memory_gib", "peak memory (GiB)"), ("latency_s", "latency (s)"))):
            ax = axes[row][col]
            for shape, marker in markers.items():
                here = [p for p in (1, 2, 4, 8) if metric in costs.get((shape, p, batch), {})]  # measured points
                ax.plot([costs[(shape, p, batch)][metric] for p in here], [PAPER_LOSS[shape][p] for p in here],
                        color="gray", lw=0.8, zorder=1)
                for p in here:
                    ax.scatter(costs[(shape, p, batch)][metric], PAPER_LOSS[shape][p], marker=marker,
                               color=colors[p], zorder=2, label=f"{shape[6:]} P={p}" if col == 0 else None)
            p1 = [s for s in markers if metric in costs.get((s, 1, batch), {})]
            ax.plot([costs[(s, 1, batch)][metric] for s in p1], [PAPER_LOSS[s][1] for s in p1], "k--", lw=1)
            ax.set_xlabel(label)
            ax.set_title(f"batch {batch}")
            if col == 0:
                ax.set_ylabel("Stack-V2-Python loss (paper)")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(heading)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(costs: dict) -> str:
    lines = ["| shape | P | batch | decode ms/token | latency s | peak GiB |", "|---|---|---|---|---|---|"]
    for (shape, p, b), v in sorted(costs.items()):
        lines.append(f"| {shape[6:]} | {p} | {b} | {v.get('decode_ms', float('nan')):.2f} | "
                     f"{v.get('latency_s', float('nan')):.3f} | {v.get('memory_gib', float('nan')):.3f} |")
    return "\n".join(lines)


def report(latency_files, memory_files, out_dir: Path, lengths=None) -> dict:
    costs = aggregate(latency_files, memory_files, lengths)
    measured = describe(latency_files, lengths)
    summary = {"headline": headline(costs), "measured": measured,
               "costs": [{"shape": s, "P": p, "batch": b, **v} for (s, p, b), v in sorted(costs.items())],
               "sources": {"latency": [str(f) for f in latency_files], "memory": [str(f) for f in memory_files]}}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, out_dir / "summary.json")
    plot_figure4(costs, out_dir / "figure4_measured.png", title(measured))
    return summary
