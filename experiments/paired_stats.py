"""Results by arm and seed, and paired comparisons across seeds, shared by the experiments' analyses.

Results are {(arm, seed): run} with each run's number to compare under "endpoint". A seed fixes the new
parameters' initialisation and the data order in every arm, so arm and base are compared seed by seed: the
gain is base − arm (positive: the arm ends lower), its standard error the paired differences' standard
deviation / √n, and `paired_t` adds the Student-t 95% interval and two-sided p-value with n − 1 degrees of
freedom.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def load_results(folder: Path) -> dict[tuple[str, int], dict]:
    """Every result file of a folder, {(arm, seed): run}."""
    out = {}
    for f in sorted(Path(folder).glob("*.json")):
        r = json.loads(f.read_text())
        out[(r["arm"], r["seed"])] = r
    return out


def paired(results, arm: str, base: str) -> dict | None:
    diffs = [
        results[(base, s)]["endpoint"] - results[(arm, s)]["endpoint"]
        for (a, s) in results
        if a == arm and (base, s) in results
    ]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"n": len(diffs), "mean": mean, "se": se, "diffs": diffs}


def paired_t(results, arm: str, base: str) -> dict | None:
    """`paired` with a Student-t 95% interval and two-sided p-value (n − 1 degrees of freedom)."""
    g = paired(results, arm, base)
    if g is None or g["se"] is None:
        return g
    from scipy import stats

    t = stats.t.ppf(0.975, g["n"] - 1)
    p = 2 * stats.t.sf(abs(g["mean"] / g["se"]), g["n"] - 1) if g["se"] > 0 else 0.0
    return {**g, "ci95": [g["mean"] - t * g["se"], g["mean"] + t * g["se"]], "p": p}
