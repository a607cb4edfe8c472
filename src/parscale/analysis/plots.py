"""Figures of the scaling law (matplotlib, PNG or SVG by the file's suffix).

- `plot_law(points, fit, path)`: the paper's Figure 2 form, loss against N (log scale) for each P,
  measured points and the fitted Eq. 5 curves.
- `plot_contours(fit, path)`: the paper's Figure 3 form, predicted loss over N and P as filled
  contours, with iso-loss lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_params_axis(ax, lo: float, hi: float) -> None:
    """Log N axis with labels at 1-2-5 steps (a range inside one decade would otherwise show one label)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = [m * 10.0**e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e9:g}B" if v >= 1e9 else f"{v / 1e6:g}M"))


def plot_law(points, fit, path, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    grid = np.geomspace(points.params.min() * 0.8, points.params.max() * 1.25, 200)
    for i, p in enumerate(sorted(set(points.P.tolist()))):
        color = f"C{i}"
        sel = points.P == p
        ax.scatter(points.params[sel], points.loss[sel], color=color, zorder=3, label=f"P = {int(p)}")
        ax.plot(grid, fit.predict(grid, p), color=color, lw=1.2)
    ax.set_xscale("log")
    _label_params_axis(ax, grid[0], grid[-1])
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or f"L = {fit.E:.4f} + ({fit.A:.3g} / (N·({fit.shape:.4f}·ln P + 1)))^{fit.alpha:.4f}"
                          f"   R² = {fit.r2:.4f}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)


def plot_contours(fit, path, n_range=(3e8, 1e10), max_p: int = 16) -> None:
    plt = _plt()
    ns = np.geomspace(*n_range, 200)
    ps = np.geomspace(1, max_p, 200)
    nn, pp = np.meshgrid(ns, ps)
    loss = fit.predict(nn, pp)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    filled = ax.contourf(nn, pp, loss, levels=20, cmap="viridis_r")
    lines = ax.contour(nn, pp, loss, levels=10, colors="white", linewidths=0.7)
    ax.clabel(lines, fmt="%.3f", fontsize=7)
    fig.colorbar(filled, ax=ax, label="predicted loss (nats per token)")
    ax.set_xscale("log")
    _label_params_axis(ax, *n_range)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4, 8, 16, not 2^k
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("parallel streams P")
    ax.set_title("predicted loss (Eq. 5) with iso-loss lines", fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
