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
import sys
from itertools import pairwise
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from paired_stats import load_results, paired, paired_t  # noqa: E402  (experiments/paired_stats.py, shared)

ARMS = ("p1", "p1prefix", "p2", "p4", "p8")
# Lever arms that have results; each is compared with the plain arm of the same P on the same seeds.
LEVERS = tuple(f"p{p}-{lever}" for p in (2, 4, 8) for lever in ("zloss", "aggwarm", "sdrop", "reparam"))
# The P = 1 width ladder: hidden size -> arm (256 is the recipe's own P = 1), all at the recipe's lr 2e-3.
LADDER = {192: "ladder-h192-p1", 256: "p1", 384: "ladder-h384-p1"}
# The learning-rate check of the ladder: hidden size -> {lr: arm}. The tuned ladder takes, at each width,
# the lr whose mean endpoint is lowest (192 has only the recipe's lr).
# The same ladder at ~100M tokens (each width at its best lr at 39M: 384 at 1e-3), for a local k at that length.
LONG_LADDER = {192: "long-ladder-h192-p1", 256: "long-p1", 384: "long-ladder-h384-p1"}
LR_CANDIDATES = {192: {1e-3: "lr-h192-p1-lr0.001", 2e-3: "ladder-h192-p1", 4e-3: "lr-h192-p1-lr0.004"},
                 256: {2e-3: "p1", 1e-3: "lr-h256-p1-lr0.001", 5e-4: "lr-h256-p1-lr0.0005", 4e-3: "lr-h256-p1-lr0.004"},
                 384: {2e-3: "ladder-h384-p1", 1e-3: "lr-h384-p1-lr0.001", 5e-4: "lr-h384-p1-lr0.0005"}}
# The same check for the two arms the parallel part is read between (the prefix control, P = 4 + warm-up).
LR_CANDIDATES_ARMS = {arm: {2e-3: arm, 1e-3: f"lr-{arm}-lr0.001", 4e-3: f"lr-{arm}-lr0.004"}
                      for arm in ("p1prefix", "p4-aggwarm")}
LR_CANDIDATES_ARMS["p4-aggwarm"][8e-3] = "lr-p4-aggwarm-lr0.008"
# Student's t quantile for a two-sided 95% interval with n - 1 degrees of freedom (n = 2, 3, 4, 5 seeds).
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}
LABELS = {"p1": "P=1", "p1prefix": "P=1 + prefix", "p2": "P=2", "p4": "P=4", "p8": "P=8"}


def load(folder: Path = HERE / "results") -> dict[tuple[str, int], dict]:
    return load_results(folder)


def arm_config(results, arm: str):
    """(the ModelConfig of an arm's runs, their training settings), or None if the arm has no result."""
    from parscale.model.config import ModelConfig

    run = next((r for (a, _), r in results.items() if a == arm), None)
    if run is None:
        return None
    st = run["settings"]
    return ModelConfig.preset("small", **st["model_overrides"], vocab_size=8192, parscale_n=st["streams"],
                              parscale_n_tokens=st["n_tokens"], parscale_p1_prefix=st.get("p1_prefix", False)), st


def arm_parameters(results, arm: str) -> dict | None:
    """Parameter counts of an arm (parscale's param_counts of the run's model shape and P)."""
    found = arm_config(results, arm)
    return found[0].param_counts() if found else None


# The matched controls at ~100M tokens: what the parallel part is read against once the prefix control
# has the same warm-up lever as the P > 1 arms (and once it also has P = 8's prefix parameters).
MATCHED_COMPARISONS = (
    ("long-p1prefix-aggwarm", "long-p1prefix", "the warm-up lever on the prefix control"),
    ("long-p1prefix", "long-p1", "the prefix over plain P = 1"),
    ("long-p1prefix384-aggwarm", "long-p1prefix-aggwarm", "384 prefix tokens instead of 48 (both with the lever)"),
    ("long-p2-aggwarm", "long-p1prefix-aggwarm", "P = 2 over the matched control"),
    ("long-p4-aggwarm", "long-p1prefix-aggwarm", "P = 4 over the matched control"),
    ("long-p8-aggwarm", "long-p1prefix-aggwarm", "P = 8 over the matched control"),
    ("long-p8-aggwarm", "long-p1prefix384-aggwarm", "P = 8 over the parameter-matched control"),
    ("long-p8-aggwarm", "long-p1prefix", "P = 8 over the unmatched control (as first reported)"),
    ("long-p8", "long-p1prefix", "plain P = 8 (no lever) over the prefix control"),
)


def matched_controls(results) -> dict:
    rows = []
    for arm, base, what in MATCHED_COMPARISONS:
        g = paired_t(results, arm, base)
        if g is not None:
            gpus = sorted({results[(a, s)]["environment"]["gpu"] for a in (arm, base) for s in range(10)
                           if (a, s) in results})
            rows.append({"arm": arm, "base": base, "what": what, **g, "gpus": gpus})
    arms = ("long-p1", "long-p1prefix", "long-p1prefix-aggwarm", "long-p1prefix384-aggwarm", "long-p2-aggwarm",
            "long-p4-aggwarm", "long-p8-aggwarm")
    params = {arm: arm_parameters(results, arm) for arm in arms}
    return {"comparisons": rows, "parameters": {a: c for a, c in params.items() if c},
            "endpoints": {a: {s: results[(a, s)]["endpoint"] for s in range(10) if (a, s) in results} for a in arms}}


# Generality (runs.py ENGLISH): the headline arms on the English corpus with its own BPE, paired by seed, in nats
# and in bits per byte of the validation text (data/english-data-manifest.json: val_bytes over val_tokens).
ENGLISH_COMPARISONS = (
    ("en-p1prefix-aggwarm", "en-p1", "the prefix control (with the lever) over plain P = 1"),
    ("en-p8-aggwarm", "en-p1prefix-aggwarm", "P = 8 over the matched control"),
    ("en-p8-aggwarm", "en-p1", "P = 8 over plain P = 1"),
)


def english(results) -> dict:
    manifest = json.loads((HERE / "data" / "english-data-manifest.json").read_text())
    bytes_per_token = manifest["val_bytes"] / manifest["val_tokens"]
    to_bpb = 1 / (math.log(2) * bytes_per_token)
    rows = []
    for arm, base, what in ENGLISH_COMPARISONS:
        g = paired_t(results, arm, base)
        if g is not None:
            rows.append({"arm": arm, "base": base, "what": what, **g, "mean_bits_per_byte": g["mean"] * to_bpb})
    arms = {}
    for (arm, s), r in results.items():
        if arm.startswith("en-"):
            arms.setdefault(arm, {})[s] = r["endpoint"]
    table = {arm: {"n": len(v), "mean": statistics.fmean(v.values()), "bits_per_byte": statistics.fmean(v.values())
                   * to_bpb, "se": statistics.stdev(v.values()) / math.sqrt(len(v)) if len(v) > 1 else None,
                   "endpoints": v} for arm, v in sorted(arms.items())}
    return {"bytes_per_token": bytes_per_token, "comparisons": rows, "arms": table}


# Post-training at this scale (runs.py TWO_STAGE): every ts-/fz- run of a seed continues the same stage-1
# checkpoint (long-p1 of that seed), so each arm is read against P = 1 and the prefix control continued alike.
POST_TRAINING_PCTS = (2, 5, 20)


def post_training_comparisons(pct: int) -> list[tuple[str, str, str]]:
    rows = [(f"ts-p1prefix-plus{pct}", f"ts-p1-plus{pct}", "two-stage: the prefix control over P = 1 continued")]
    for p in (2, 4, 8):
        rows += [(f"ts-p{p}-plus{pct}", f"ts-p1-plus{pct}", f"two-stage: P = {p} over P = 1 continued"),
                 (f"ts-p{p}-plus{pct}", f"ts-p1prefix-plus{pct}", f"two-stage: P = {p} over the prefix control")]
    if pct == 5:
        rows += [("ts-p4-bbinit-plus5", "ts-p4-plus5", "two-stage: backbone-initialised prefixes over random (P = 4)"),
                 ("ts-p1prefix-bbinit-plus5", "ts-p1prefix-plus5", "two-stage: backbone-initialised prefix control "
                  "over random"),
                 ("ts-p4-bbinit-plus5", "ts-p1prefix-bbinit-plus5", "two-stage: P = 4 over the prefix control, "
                  "both backbone-initialised")]
    rows += [(f"fz-p{p}-plus{pct}", f"fz-p1prefix-plus{pct}", f"frozen backbone: P = {p} over the prefix control")
             for p in (2, 4, 8)]
    if pct == 5:
        rows += [("fz-p8-bbinit-plus5", "fz-p8-plus5", "frozen backbone: backbone-initialised prefixes over random "
                  "(P = 8)"),
                 ("fz-p1prefix-bbinit-plus5", "fz-p1prefix-plus5", "frozen backbone: backbone-initialised prefix "
                  "control over random")]
    rows += [(f"fz-p8-bbinit-plus{pct}", f"fz-p1prefix-bbinit-plus{pct}", "frozen backbone: P = 8 over the prefix "
              "control, both backbone-initialised")]
    return rows


def stage1_endpoints() -> dict[int, float]:
    """The frozen backbone's own held-out loss per seed: the last whole-split evaluation of the stage-1 run
    whose checkpoint the stage-2 runs continued (results/stage1_again/ where stage 1 was trained again)."""
    out = {}
    for folder in (HERE / "results", HERE / "results" / "stage1_again"):   # the re-trained one wins
        for f in sorted(folder.glob("long-p1-s*.json")):
            r = json.loads(f.read_text())
            full = r["val_loss_full"]
            out[r["seed"]] = full[max(full, key=int)]
    return out


def stage1_loss(run: dict) -> float | None:
    """The last loss of the stage-1 checkpoint a stage-2 run continued (its result's `stage1` record)."""
    return (run.get("stage1") or {}).get("val_loss_full")


def load_again(folder: Path = HERE / "results" / "again") -> dict[tuple[str, int], list[dict]]:
    """Runs trained again beside a committed result (runner --again: controls of a later stage 1), by arm and
    seed; a run trained again more than once has several."""
    out = {}
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        out.setdefault((r["arm"], r["seed"]), []).append(r)
    return out


def pair_by_checkpoint(runs: dict, again: dict, arm: str, base: str, start) -> dict:
    """{(arm, seed): run, (base, seed): run} for every seed where a run of the arm and one of the base continued
    the same stage-1 checkpoint (start(run, seed): that checkpoint's last loss), taken from the committed runs
    (`runs`, one per arm and seed) and those trained again (`again`, lists); the committed pair first, so one
    seed gives one pair however often its runs were trained."""
    out = {}
    for s in sorted({k[1] for k in list(runs) + list(again) if k[0] == arm}):
        arms = ([runs[(arm, s)]] if (arm, s) in runs else []) + again.get((arm, s), [])
        bases = ([runs[(base, s)]] if (base, s) in runs else []) + again.get((base, s), [])
        pair = next(((a, b) for a in arms for b in bases if start(a, s) == start(b, s)), None)
        if pair is not None:
            out[(arm, s)], out[(base, s)] = pair
    return out


def post_training(results, again: dict | None = None) -> dict:
    """Two-stage and frozen-backbone arms at their last whole-split loss: paired comparisons per stage-2 length,
    and each arm's mean ± SE over seeds with its drop below the stage-1 model's last loss on the same seeds
    (below_stage1 > 0: stage 2 ended lower than it started). A run trained again (`again`, load_again) enters
    only the paired comparisons, as the partner of a run that continued its checkpoint; the arm table is of the
    committed runs."""
    fallback = stage1_endpoints()

    def read_last(r):   # stage-2 runs are read at their last whole-split loss (they evaluate at 100% only)
        return {**r, "endpoint": r["val_loss_full"][max(r["val_loss_full"], key=int)]}

    def is_post(key, r):
        return key[0].startswith(("ts-", "fz-")) and r.get("val_loss_full")

    last = {key: read_last(r) for key, r in results.items() if is_post(key, r)}
    last_again = {key: [read_last(r) for r in rs if is_post(key, r)] for key, rs in (again or {}).items()}

    def start_of(run, seed):   # the last loss of the stage-1 checkpoint a run continued
        found = stage1_loss(run)
        return found if found is not None else fallback.get(seed)

    def start(key):
        return start_of(last[key], key[1])

    rows, arms = [], {}
    for pct in POST_TRAINING_PCTS:
        for arm, base, what in post_training_comparisons(pct):
            g = paired_t(pair_by_checkpoint(last, last_again, arm, base, start_of), arm, base)
            if g is not None:
                rows.append({"pct": pct, "arm": arm, "base": base, "what": what, **g})
    for (arm, s), r in last.items():
        arms.setdefault(arm, {})[s] = r["endpoint"]
    table = {}
    for arm, by_seed in sorted(arms.items()):
        v = list(by_seed.values())
        drop = [start((arm, s)) - f for s, f in by_seed.items() if start((arm, s)) is not None]
        # the same drop as a paired test: each seed's stage-2 result against the checkpoint it started from
        own = {(name, s): {"endpoint": f} for s, f in by_seed.items() if start((arm, s)) is not None
               for name, f in ((arm, f), ("stage 1", start((arm, s))))}
        table[arm] = {"n": len(v), "mean": statistics.fmean(v),
                      "se": statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None,
                      "below_stage1": statistics.fmean(drop) if drop else None,
                      "below_stage1_test": paired_t(own, arm, "stage 1"), "endpoints": by_seed}
    return {"comparisons": rows, "arms": table, "stage1_final": fallback}


def heldout_comparisons(results, again: dict | None = None) -> dict:
    """The matched and the post-training comparisons again on the per-package held-out scores of the runs that
    have them (runs.py --heldout-corpus): the whole held-out set, the same without the files that have a
    training twin, and each package apart. Paired by seed, as the endpoints are (post-training runs only with
    runs that continued the same stage-1 checkpoint, a control trained again (`again`, load_again) included);
    empty until such runs exist."""
    def score(r, get):
        v = get(r["heldout_by_package"]) if r.get("heldout_by_package") else None
        return None if v is None else {"endpoint": v, "stage1": r.get("stage1")}

    def measure(get) -> tuple[dict, dict]:
        committed = {key: m for key, r in results.items() if (m := score(r, get)) is not None}
        trained_again = {key: [m for r in rs if (m := score(r, get)) is not None] for key, rs in (again or {}).items()}
        return committed, trained_again

    def same_start(scored, arm, base) -> dict:
        return pair_by_checkpoint(*scored, arm, base, lambda run, seed: stage1_loss(run))

    comparisons = list(MATCHED_COMPARISONS) + [row for pct in POST_TRAINING_PCTS
                                               for row in post_training_comparisons(pct)]
    out = {"all": [], "without_twins": [], "packages": {}}
    whole = measure(lambda h: h.get("all", {}).get("loss"))
    scored = measure(lambda h: h.get("without_twins", {}).get("loss"))
    packages = sorted({p for r in results.values() for p in (r.get("heldout_by_package") or {}).get("packages", {})})
    for arm, base, what in comparisons:
        for name, by_run in (("all", whole), ("without_twins", scored)):
            g = paired_t(same_start(by_run, arm, base), arm, base)
            if g is not None:
                out[name].append({"arm": arm, "base": base, "what": what, **g})
        for package in packages:
            by_run = measure(lambda h, p=package: h["packages"].get(p, {}).get("loss"))
            g = paired_t(same_start(by_run, arm, base), arm, base)
            if g is not None:
                out["packages"].setdefault(package, []).append({"arm": arm, "base": base, **g})
    return out


def rerun_spread(results) -> dict | None:
    """The same run twice on one GPU: the first attempts of the ~100M-token P = 1 arms (results_stopped/, cut
    by a time limit) against their complete re-runs (same config, seed and GPU model), compared on the mean of
    the whole-split evaluations both have. Seeds fix the initialisation and the data order, not the bf16
    floating-point path, so this is the run-to-run noise that paired seeds leave."""
    diffs = []
    for f in sorted((HERE / "results_stopped").glob("*.json")):
        first = json.loads(f.read_text())
        arm, seed = first["run"].rsplit("-s", 1)
        again = results.get((arm, int(seed)))
        if again is None:
            continue
        common = sorted(set(first["val_loss_full"]) & set(again["val_loss_full"]))
        diffs.append({"run": first["run"], "evaluations": common, "difference": statistics.fmean(
            again["val_loss_full"][k] - first["val_loss_full"][k] for k in common)})
    if not diffs:
        return None
    d = [row["difference"] for row in diffs]
    return {"runs": diffs, "mean": statistics.fmean(d), "sd": statistics.stdev(d) if len(d) > 1 else None,
            "max_abs": max(abs(x) for x in d)}


def doubling_steps(results, chain: list[str]) -> list[dict]:
    """Paired gain of each arm of `chain` over the one before it, with its t-based 95% interval and p-value.
    (The experiment first counted a step when it exceeded 2 SE; at n = 3 that is p ≈ 0.18, so the t-test's
    p is the reading now, `exceeds_2se` kept for the record.)"""
    steps = []
    for before, after in pairwise(chain):
        g = paired_t(results, after, before)
        if g is None:
            continue
        steps.append({"from": before, "to": after, **g, "exceeds_2se": g["se"] is not None and g["mean"] > 2 * g["se"]})
    return steps


def non_embedding_params(hidden: int) -> int:
    """Non-embedding parameters of the recipe's P = 1 model at this width (the ladder's shape rule)."""
    from runs import SHAPE  # (alone: whether isort calls `runs` first- or third-party depends on the tree)

    return _count_non_embedding({**SHAPE, "hidden_size": hidden, "intermediate_size": 4 * hidden})


def _count_non_embedding(shape: dict) -> int:
    from parscale.model.config import ModelConfig

    return ModelConfig.preset("small", **shape, vocab_size=8192, parscale_n=1).param_counts()["non_embedding"]


def ladder(results, arms_by_width: dict[int, str] = LADDER) -> dict:
    """Slope of the endpoint in ln N over the P = 1 width ladder, per seed, with its SE.

    A local slope means something only where loss falls steadily with N: every segment between
    neighbouring widths must be negative by more than 2 SE (a straight fit through a curve that turns
    up is not a slope). Then L(P) − L(1) ≈ slope · ln(1 + k ln P) gives k = (exp(Δ_P / −slope) − 1) / ln P."""
    seeds = sorted({s for a, s in results if a in arms_by_width.values()})
    widths = sorted(arms_by_width)
    n = {h: non_embedding_params(h) for h in widths}
    per_seed, by_seed, segments = [], {}, {f"{a}->{b}": [] for a, b in pairwise(widths)}
    for s in seeds:
        pts = [(math.log(n[h]), results[(arms_by_width[h], s)]["endpoint"]) for h in widths
               if (arms_by_width[h], s) in results]
        if len(pts) < len(widths):
            continue
        mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
        per_seed.append(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts))
        by_seed[s] = per_seed[-1]
        for (a, b), ((xa, ya), (xb, yb)) in zip(pairwise(widths), pairwise(pts), strict=True):
            segments[f"{a}->{b}"].append((yb - ya) / (xb - xa))

    def mean_se(v):
        return (
            {
                "mean": statistics.fmean(v),
                "se": statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None,
                "per_seed": v,
            }
            if v
            else None
        )

    slope = mean_se(per_seed)
    fits = [mean_se(v) for v in segments.values()]
    usable = all(f is not None and f["se"] is not None and f["mean"] < -2 * f["se"] for f in fits)
    return {
        "arms": dict(arms_by_width),
        "non_embedding_params": n,
        "endpoints": {
            h: {s: results[(arms_by_width[h], s)]["endpoint"] for s in seeds if (arms_by_width[h], s) in results}
            for h in widths
        },
        "slope_per_ln_n": slope,
        "slope_by_seed": by_seed,
        "segment_slopes": {k: mean_se(v) for k, v in segments.items()},
        "every_segment_negative_by_2se": usable,
    }


def eq5_fit(results, arms: dict[int, str], ladder_arms: dict[int, str] = LADDER, seeds=(0, 1, 2),
            diagnostics: bool = True) -> dict | None:
    """The paper's Eq. 5 fitted (its procedure, parscale.analysis.scaling_law) to every seed's endpoints of
    the P = 1 ladder and of `arms` (P -> arm at the recipe's width). With one width for P > 1, k is pinned
    by the P = 1 ladder's slope alone, so the fit is only as good as that slope (see ladder())."""
    import numpy as np

    from parscale.analysis import scaling_law as law

    n = {h: non_embedding_params(h) for h in ladder_arms}
    rows = [(n[h], 1, results[(arm, s)]["endpoint"]) for h, arm in ladder_arms.items() for s in seeds
            if (arm, s) in results]
    rows += [(n[256], p, results[(arm, s)]["endpoint"]) for p, arm in arms.items() for s in seeds
             if (arm, s) in results]
    if len({(N, P) for N, P, _ in rows}) < 5:
        return None
    N, P, L = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    points = law.Points(N, P, L)
    best = law.fit(points)
    if not diagnostics:
        return {"points": len(rows), **best.as_dict()}
    # Does the design pin k at all? (parscale fit's identification check: halving or doubling k, the other
    # parameters refitted, must raise the objective >= 1.5x.) And k with alpha held at the paper's 0.19.
    alpha_paper = 0.19

    def fixed_alpha(x):
        return law._objective([x[0], x[1], alpha_paper, x[2]], points, "eq5")

    from scipy.optimize import minimize

    held = min((minimize(fixed_alpha, [e0, a0, k0], method="L-BFGS-B", bounds=[(1e-8, None)] * 3)
                for e0 in (1.0, 1.5, best.E) for a0 in np.logspace(-11, -3, 9) for k0 in (0.1, 0.4, 1.0, 3.0)),
               key=lambda r: r.fun)
    return {"points": len(rows), "distinct_cells": len({(a, b) for a, b, _ in rows}), **best.as_dict(),
            "k_profile": law.k_profile(points, best),
            "alpha_fixed_0.19": {"k": float(held.x[2]), "objective_ratio": float(held.fun / best.objective)}}


def eq5_seed_bootstrap(results, arms: dict[int, str], ladder_arms: dict[int, str]) -> dict | None:
    """95% percentile interval of Eq. 5's k over resampled seeds. The seeds pair the arms, so a resample takes
    n seeds with replacement and refits every arm's points of those seeds together; with n = 3 seeds all 27
    equally likely draws are covered exactly (10 distinct seed sets, each fitted once and counted by its
    multiplicity). Each refit searches the paper's whole grid of starting points: here the fit has many
    minima, and refits started from the best fit (as scaling_law.bootstrap does) stay in its basin and
    give a falsely narrow interval (all 27 at k = 1.56 for the plain arms, against 1.05 .. 327 searched)."""
    import itertools
    from collections import Counter

    import numpy as np

    seeds = sorted({s for a, s in results if a in arms.values()})
    if len(seeds) < 2:
        return None
    sets = Counter(tuple(sorted(pick)) for pick in itertools.product(seeds, repeat=len(seeds)))
    ks = []
    for pick, count in sets.items():
        f = eq5_fit(results, arms, ladder_arms, seeds=pick, diagnostics=False)
        if f is not None:
            ks += [f["k"]] * count
    if not ks:
        return None
    return {"draws": len(ks), "seed_sets": len(sets), "k_2.5%": float(np.percentile(ks, 2.5)),
            "k_97.5%": float(np.percentile(ks, 97.5)), "k_median": float(np.median(ks))}


def learning_rate_check(results, candidates=LR_CANDIDATES) -> dict:
    """Endpoint (mean ± SE over seeds, and seed 0 alone) of every (row, lr) of `candidates`, and the best lr per
    row: by the mean, and by seed 0 alone, the comparison that stays paired where some lrs ran one seed only."""
    out = {}
    for key, by_lr in candidates.items():
        row = {}
        for lr, arm in by_lr.items():
            v = [results[(arm, s)]["endpoint"] for s in range(3) if (arm, s) in results]
            if v:
                row[lr] = {"arm": arm, "n": len(v), "mean": statistics.fmean(v),
                           "se": statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None,
                           "seed0": results[(arm, 0)]["endpoint"] if (arm, 0) in results else None}
        if row:
            best = min(row, key=lambda lr: row[lr]["mean"])
            with_seed0 = [lr for lr in row if row[lr]["seed0"] is not None]
            lrs = sorted(row)
            out[key] = {"by_lr": row, "best_lr": best, "best_arm": row[best]["arm"],
                        # the best lr is bracketed when a smaller and a larger one were tried and are worse
                        "bracketed": lrs[0] < best < lrs[-1],
                        "best_lr_seed0": min(with_seed0, key=lambda lr: row[lr]["seed0"]) if with_seed0 else None}
    return out


def local_k(results, lad: dict, arm: str, base: str, streams: int) -> dict | None:
    """k from the ladder's slope: per seed, Δ = L(base) − L(arm) and k = (exp(Δ / −slope) − 1) / ln P, with
    the seed's own slope; mean, SE and the t-based 95% interval over seeds. None unless every segment of
    the ladder falls by more than 2 SE (see ladder())."""
    if not lad["every_segment_negative_by_2se"]:
        return None
    slopes = lad["slope_by_seed"]
    ks = [(math.exp((results[(base, s)]["endpoint"] - results[(arm, s)]["endpoint"]) / -slopes[s]) - 1)
          / math.log(streams) for s in slopes if (arm, s) in results and (base, s) in results]
    if len(ks) < 2:
        return None
    mean, se = statistics.fmean(ks), statistics.stdev(ks) / math.sqrt(len(ks))
    t = T95.get(len(ks), 1.96)
    return {"arm": arm, "base": base, "P": streams, "per_seed": ks, "mean": mean, "se": se,
            "ci95": [mean - t * se, mean + t * se]}


def collapse_map(results) -> dict:
    """P = 4 over depth x prefix tokens, plain and with the warm-up lever: per seed, the endpoint and the
    final stream diagnostics (the depth-8, 48-token cells are the d8-p4 arms)."""
    out = {}
    for depth in (4, 8, 12):
        for n in (8, 48):
            for suffix in ("", "-aggwarm"):
                arm = f"p4{suffix}" if (depth, n) == (8, 48) else f"map-d{depth}-n{n}-p4{suffix}"
                cell = {}
                for (a, s), r in sorted(results.items()):
                    if a != arm:
                        continue
                    d = r.get("streams_final") or {}
                    cell[s] = {
                        "endpoint": r["endpoint"],
                        "collapsed": collapsed(r),
                        "cap_share": d.get("cap_share"),
                        "kl_mean": d.get("kl_mean"),
                        "mix_minus_best_stream": d["loss_mix"] - d["loss_best_stream"]
                        if "loss_best_stream" in d
                        else None,
                    }
                if cell:
                    out[f"depth {depth}, {n} tokens{', warm-up' if suffix else ''}"] = cell
    return out


def collapsed(r: dict) -> bool | None:
    s = r.get("streams_final") or {}
    return None if "cap_share" not in s else s["cap_share"] > 0.5


def main() -> None:
    results = load()
    seeds = sorted({s for _, s in results})
    arms = [a for a in ARMS + LEVERS if any((a, s) in results for s in seeds)]
    table = {arm: {s: results[(arm, s)]["endpoint"] for s in seeds if (arm, s) in results} for arm in arms}
    summary = {
        "endpoints": table,
        "gain_vs_p1": {},
        "gain_vs_prefix": {},
        "lever_vs_plain": {},
        "steps": {},
        "streams": {},
    }
    for arm in arms[1:]:
        summary["gain_vs_p1"][arm] = paired(results, arm, "p1")
    for arm in arms:
        if arm in LEVERS:  # the lever's own effect: the plain arm of the same P, same seeds
            summary["lever_vs_plain"][arm] = paired(results, arm, arm.split("-")[0])
    # The levers against each other: the warm-up lever (the one the later arms use) minus each other lever
    # of the same P, paired by seed (positive: the warm-up lever's loss is lower).
    summary["aggwarm_vs_lever"] = {arm: paired(results, f"{arm.split('-')[0]}-aggwarm", arm) for arm in arms
                                   if arm in LEVERS and not arm.endswith("-aggwarm")
                                   and any((f"{arm.split('-')[0]}-aggwarm", s) in results for s in seeds)}
    # Each doubling of P: plain from P = 1, and under each lever from the prefix control (the lever arms'
    # own P = 1 is the control, since every P > 1 arm has the prefix).
    summary["steps"]["plain"] = doubling_steps(results, ["p1", "p2", "p4", "p8"])
    for lever in sorted({a.split("-")[1] for a in arms if a in LEVERS}):
        chain = ["p1prefix"] + [f"p{p}-{lever}" for p in (2, 4, 8)]
        if all(any((a, s) in results for s in seeds) for a in chain):
            summary["steps"][lever] = doubling_steps(results, chain)
    summary["ladder"] = ladder(results)
    summary["learning_rate_check"] = lr_check = learning_rate_check(results)
    tuned = {h: row["best_arm"] for h, row in lr_check.items()}
    summary["learning_rate_check_arms"] = learning_rate_check(results, LR_CANDIDATES_ARMS)
    summary["ladder_tuned"] = lad = ladder(results, tuned) if len(tuned) == len(LADDER) else None
    plain_arms = {2: "p2", 4: "p4", 8: "p8"}
    warm_arms = {2: "p2-aggwarm", 4: "p4-aggwarm", 8: "p8-aggwarm"}
    summary["eq5_fit"] = {"plain": eq5_fit(results, plain_arms), "warm-up": eq5_fit(results, warm_arms)}
    if lad:
        summary["eq5_fit_tuned_ladder"] = {
            name: {"fit": eq5_fit(results, arms, tuned), "seed_bootstrap": eq5_seed_bootstrap(results, arms, tuned)}
            for name, arms in (("plain", plain_arms), ("warm-up", warm_arms))}
        # k from the tuned ladder's slope: the whole gain over plain P = 1, and the parallel part alone
        # (over the prefix control), for each P under the warm-up lever
        summary["local_k"] = [k for k in (local_k(results, lad, arm, base, p) for p, arm in warm_arms.items()
                                          for base in ("p1", "p1prefix")) if k]
    # ~100M tokens: the arms that carry the result, paired by seed against their own P = 1 and prefix control.
    long_arms = [a for a in ("long-p1prefix", "long-p2-aggwarm", "long-p4-aggwarm", "long-p8-aggwarm")
                 if any((a, s) in results for s in seeds)]
    summary["long"] = {arm: {"vs_p1": paired(results, arm, "long-p1"),
                             "vs_prefix": paired(results, arm, "long-p1prefix") if arm != "long-p1prefix" else None}
                       for arm in long_arms}
    summary["long_doubling"] = doubling_steps(results, long_arms)  # from the prefix control, each P that ran
    summary["long_ladder"] = long_lad = ladder(results, LONG_LADDER)
    summary["long_local_k"] = [k for k in (local_k(results, long_lad, f"long-p{p}-aggwarm", base, p) for p in (2, 4, 8)
                                           for base in ("long-p1", "long-p1prefix")) if k]
    # Eq. 5 at ~100M tokens: the width ladder of this length and the warm-up arms, with the seed bootstrap
    long_warm = {p: f"long-p{p}-aggwarm" for p in (2, 4, 8)}
    summary["long_eq5_fit"] = None if not long_lad["slope_per_ln_n"] else {
        "fit": eq5_fit(results, long_warm, LONG_LADDER),
        "seed_bootstrap": eq5_seed_bootstrap(results, long_warm, LONG_LADDER)}
    summary["matched_controls"] = matched_controls(results)
    summary["heldout_by_package"] = heldout_comparisons(results, load_again())
    summary["post_training"] = post_training(results, load_again())
    # the first stage-2 runs, without their controls (kept apart: they continued an earlier stage-1 checkpoint)
    summary["post_training_first"] = post_training(load(HERE / "results" / "post_training_first"))
    summary["english"] = english(results)
    summary["rerun_spread"] = rerun_spread(results)
    # The base arms ran on an H100, the later ones on an H200: the prefix control on both, paired by seed.
    summary["gpu_confound"] = paired(results, "repeat-p1prefix", "p1prefix")
    summary["gain_vs_prefix_same_gpu"] = {arm: paired(results, arm, "repeat-p1prefix") for arm in warm_arms.values()}
    summary["collapse_map"] = collapse_map(results)
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
            "endpoint": r["endpoint"],
            "collapsed": collapsed(r),
            "gpu": r["environment"]["gpu"],
            **{
                k: d[k]
                for k in (
                    "loss_mix",
                    "loss_best_stream",
                    "loss_ensemble",
                    "kl_mean",
                    "weight_entropy",
                    "floor_share",
                    "cap_share",
                )
                if k in d
            },
            "hidden_cosine_last": d["hidden_cosine"][-1] if "hidden_cosine" in d else None,
        }
    out = HERE / "analysis"
    out.mkdir(exist_ok=True)
    summary["compute"] = _plot_compute(results, out / "loss_vs_tokens_and_flops.png")
    summary["post_training_curves"] = post_training_curves(results, load_again())
    if summary["post_training_curves"]:
        _plot_post_training(summary["post_training_curves"], out / "post_training_curves.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(results, seeds, arms, out / "endpoints.png")
    _plot_weights(results, out / "cap_share_curves.png")
    _plot_p_and_n(results, summary["ladder_tuned"] or summary["ladder"], summary["long_ladder"],
                  out / "loss_vs_p_and_n.png")
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


# The ~100M-token arms on the compute axis: P = 1 at three widths (the ladder), the prefix controls and P = 2,
# 4, 8 with the warm-up lever.
COMPUTE_ARMS = ("long-ladder-h192-p1", "long-p1", "long-ladder-h384-p1", "long-p1prefix-aggwarm",
                "long-p1prefix384-aggwarm", "long-p2-aggwarm", "long-p4-aggwarm", "long-p8-aggwarm", "long-p8")


def arm_flops_per_token(results, arm: str) -> float | None:
    """Training FLOPs per token of an arm: parscale's flops_per_token (6 x (P x backbone + LM head + aggregator)
    + P x attention over prefix and sequence), the count the library's MFU uses."""
    from parscale.training.train import flops_per_token

    found = arm_config(results, arm)
    return flops_per_token(found[0], found[1]["seq_len"]) if found else None


def post_training_curves(results, again: dict | None = None) -> dict:
    """Along stage 2: each post-training comparison's paired gain at every evaluation step (the 16-batch held-out
    evaluation, `eval_curve`; pairs only runs that continued the same stage-1 checkpoint, a control trained again
    (`again`, load_again) included as in `post_training`), and each arm's KL between its streams there (seed mean,
    committed runs). {pct: {"gains": [{arm, base, what, steps, tokens, mean, se, n}], "kl": {arm: {"steps", "kl"}}}}."""
    def is_post(key, r):
        return key[0].startswith(("ts-", "fz-")) and r.get("eval_curve")

    def with_curve(r):
        return {**r, "curve": {e["step"]: e for e in r["eval_curve"]}}

    runs = {key: with_curve(r) for key, r in results.items() if is_post(key, r)}
    runs_again = {key: [with_curve(r) for r in rs if is_post(key, r)] for key, rs in (again or {}).items()}
    curves = {key: r["curve"] for key, r in runs.items()}

    def start_of(run, seed):
        return stage1_loss(run)

    out = {}
    for pct in POST_TRAINING_PCTS:
        gains = []
        for arm, base, what in post_training_comparisons(pct):
            paired = pair_by_checkpoint(runs, runs_again, arm, base, start_of)
            seeds = [s for (a, s) in paired if a == arm]
            if len(seeds) < 2:
                continue
            pc = {key: r["curve"] for key, r in paired.items()}
            steps = sorted(set.intersection(*(set(pc[(arm, s)]) & set(pc[(base, s)]) for s in seeds)))
            diffs = [[pc[(base, s)][t]["val_loss"] - pc[(arm, s)][t]["val_loss"] for s in seeds] for t in steps]
            st = paired[(arm, seeds[0])]["settings"]
            gains.append({"arm": arm, "base": base, "what": what, "steps": steps, "n": len(seeds),
                          "tokens": [t * st["batch_size"] * st["seq_len"] for t in steps],
                          "mean": [statistics.fmean(d) for d in diffs],
                          "se": [statistics.stdev(d) / math.sqrt(len(d)) for d in diffs]})
        kl = {}
        for arm in sorted({a for (a, _) in curves if a.endswith(f"-plus{pct}")}):
            arm_curves = [c for (a, _), c in curves.items() if a == arm]
            steps = sorted(set.intersection(*(set(c) for c in arm_curves)))
            values = [[c[t].get("streams", {}).get("kl_mean") for c in arm_curves] for t in steps]
            if steps and all(v is not None for row in values for v in row):
                kl[arm] = {"steps": steps, "kl": [statistics.fmean(row) for row in values]}
        if gains:
            out[pct] = {"gains": gains, "kl": kl}
    return out


def _plot_post_training(curves: dict, path) -> None:
    """The paired gains along stage 2 (mean ± SE over seeds) and the streams' KL, one row per stage-2 length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 2, figsize=(12, 4.2 * len(curves)), squeeze=False)
    for (pct, c), (gain_ax, kl_ax) in zip(sorted(curves.items()), axes, strict=True):
        for i, g in enumerate(c["gains"]):
            x = [t / 1e6 for t in g["tokens"]]
            gain_ax.errorbar(x, g["mean"], yerr=g["se"], marker=".", capsize=3, color=f"C{i}",
                             label=f"{g['what']} (n = {g['n']})")
        gain_ax.axhline(0, color="gray", lw=0.8)
        gain_ax.set_xlabel("stage-2 tokens (millions)")
        gain_ax.set_ylabel("paired gain (nats/token, 16-batch evaluation)")
        gain_ax.set_title(f"+{pct}%: gain over the control along stage 2")
        gain_ax.legend(fontsize=7)
        for i, (arm, k) in enumerate(sorted(c["kl"].items())):
            kl_ax.plot(k["steps"], k["kl"], marker=".", color=f"C{i}", label=arm)
        kl_ax.set_xlabel("stage-2 step")
        kl_ax.set_ylabel("KL between streams (nats, seed mean)")
        kl_ax.set_title(f"+{pct}%: do the streams become different?")
        kl_ax.legend(fontsize=7)
        for ax in (gain_ax, kl_ax):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_compute(results, path) -> dict:
    """Held-out loss (the 16-batch evaluation every 750 steps, mean of the seeds) against training tokens and
    against training FLOPs, for the ~100M-token arms. Returns each arm's FLOPs per token and its final point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(12, 4.5))
    out = {}
    for i, arm in enumerate(COMPUTE_ARMS):
        runs = [r for (a, _), r in sorted(results.items()) if a == arm]
        if not runs:
            continue
        st = runs[0]["settings"]
        per_token = arm_flops_per_token(results, arm)
        steps = [e["step"] for e in runs[0]["eval_curve"]]
        curves = [[e["val_loss"] for e in r["eval_curve"]] for r in runs if len(r["eval_curve"]) == len(steps)]
        mean = [statistics.fmean(c) for c in zip(*curves, strict=True)]
        tokens = [s * st["batch_size"] * st["seq_len"] for s in steps]
        label = f"{arm.removeprefix('long-')} ({len(curves)} seeds)"
        style = "--" if "p1" in arm and "prefix" not in arm else "-"
        by_tokens.plot([t / 1e6 for t in tokens], mean, style, marker=".", color=f"C{i}", label=label)
        by_flops.plot([t * per_token for t in tokens], mean, style, marker=".", color=f"C{i}", label=label)
        out[arm] = {"flops_per_token": per_token, "seeds": len(curves), "final_tokens": tokens[-1],
                    "final_flops": tokens[-1] * per_token, "final_eval_loss_mean": mean[-1]}
    by_tokens.set_xlabel("training tokens (millions)")
    by_flops.set_xlabel("training FLOPs (6 x params x tokens, P streams counted, + attention)")
    by_flops.set_xscale("log")
    for ax in (by_tokens, by_flops):
        ax.set_ylabel("held-out loss (nats/token, 16-batch evaluation, seed mean)")
        ax.set_ylim(top=2.6)
        ax.grid(alpha=0.3)
    by_tokens.set_title("Loss against training tokens (~100M-token arms)")
    by_flops.set_title("Loss against training compute")
    by_flops.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return out


def _plot_p_and_n(results, lad, long_lad, path) -> None:
    """Left: mean endpoint ± SE against P, plain and under the warm-up lever (whose P = 1 is the prefix
    control). Middle: the same at ~100M tokens, every seed. Right: the P = 1 width ladders at 39M and ~100M
    tokens (each width at its best learning rate where one was checked) against non-embedding parameters,
    every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_se(arm):
        v = [r["endpoint"] for (a, _), r in results.items() if a == arm]
        return (statistics.fmean(v), statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0) if v else None

    fig, (left, long, right) = plt.subplots(1, 3, figsize=(15, 4))
    for label, chain in (("plain (P = 1: no prefix)", ["p1", "p2", "p4", "p8"]),
                         ("warm-up lever (P = 1: prefix control)", ["p1prefix", "p2-aggwarm", "p4-aggwarm",
                                                                    "p8-aggwarm"])):
        pts = [(p, mean_se(a)) for p, a in zip((1, 2, 4, 8), chain, strict=True) if mean_se(a)]
        left.errorbar([p for p, _ in pts], [m for _, (m, _) in pts], yerr=[se for _, (_, se) in pts], marker="o",
                      capsize=3, label=label)
    left.set_xscale("log", base=2)
    left.set_xlabel("P (streams)")
    left.set_ylabel("held-out loss (mean of 3 seeds ± SE)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    # ~100M tokens: every seed and the mean, the prefix control at P = 1 beside the plain P = 1
    for label, chain, color in (("plain P = 1", {1: "long-p1"}, "C0"),
                                ("warm-up lever (P = 1: prefix control)",
                                 {1: "long-p1prefix", 2: "long-p2-aggwarm", 4: "long-p4-aggwarm",
                                  8: "long-p8-aggwarm"}, "C1")):
        pts = [(p, mean_se(a), [r["endpoint"] for (b, _), r in results.items() if b == a]) for p, a in chain.items()]
        pts = [(p, m, seeds) for p, m, seeds in pts if m]
        for p, _, seeds in pts:
            long.plot([p] * len(seeds), seeds, ".", color=color, alpha=0.5)
        if pts:
            long.errorbar([p for p, _, _ in pts], [m for _, (m, _), _ in pts], yerr=[se for _, (_, se), _ in pts],
                          marker="o", capsize=3, color=color, label=label)
    long.set_xscale("log", base=2)
    long.set_xlabel("P (streams)")
    long.set_ylabel("held-out loss, ~100M tokens")
    long.legend(fontsize=8)
    long.grid(alpha=0.3)
    for ladder_, color, label in ((lad, "C2", "39M tokens"), (long_lad, "C3", "~100M tokens")):
        for i, (h, row) in enumerate(ladder_["endpoints"].items() if ladder_ else ()):
            n = ladder_["non_embedding_params"][h]
            right.plot([n] * len(row), list(row.values()), "o", color=color, alpha=0.6,
                       label=label if i == 0 else None)
            lr = results[(ladder_["arms"][h], next(iter(row)))]["settings"].get("lr") if row else None
            right.annotate(f"h{h}" + (f", lr {lr:g}" if lr else ""), (n, min(row.values())),
                           textcoords="offset points", xytext=(4, -10), fontsize=8)
    right.legend(fontsize=8)
    right.set_xscale("log")
    right.set_xlabel("non-embedding parameters (P = 1)")
    right.set_ylabel("held-out loss, every seed")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_slope(label: str, lad: dict) -> None:
    """A ladder's slope in ln N and its segments, if it has one."""
    sl = lad["slope_per_ln_n"]
    if not sl:
        return
    print(f"{label}: slope per ln N {sl['mean']:+.4f} ± {sl['se'] or 0:.4f}; segments "
          + ", ".join(f"{k}: {v['mean']:+.4f} ± {v['se'] or 0:.4f}" for k, v in lad["segment_slopes"].items() if v)
          + ("" if lad["every_segment_negative_by_2se"] else "  -> not every segment < -2 SE: no local k"))


def _print_local_k(prefix: str, ks: list[dict]) -> None:
    for k in ks:
        print(f"{prefix}local k of {k['arm']} over {k['base']}: {k['mean']:.3f} ± {k['se']:.3f} "
              f"(95% t-interval {k['ci95'][0]:.3f} .. {k['ci95'][1]:.3f}) "
              f"per seed {[round(x, 3) for x in k['per_seed']]}")


def _print_eq5(label: str, f: dict) -> None:
    """An Eq. 5 fit with its seed bootstrap ({"fit": ..., "seed_bootstrap": ...}), if the fit exists."""
    if not f["fit"]:
        return
    b = f["seed_bootstrap"]
    print(f"{label} ({f['fit']['points']} points): k {f['fit']['k']:.3g}, alpha {f['fit']['alpha']:.3f}, "
          f"R2 {f['fit']['r2']:.3f}; seed bootstrap k 95% {b['k_2.5%']:.3g} .. {b['k_97.5%']:.3g} "
          f"({b['draws']} draws, {b['seed_sets']} seed sets)")


def _print(summary, seeds) -> None:
    print("endpoint (mean of the whole-split held-out loss at 90/95/100%)")
    print(f"{'arm':>9} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds))
    for arm, row in summary["endpoints"].items():
        print(f"{arm:>9} " + " ".join(f"{row[s]:8.4f}" if s in row else f"{'-':>8}" for s in seeds))
    for name, block in (
        ("vs P=1", summary["gain_vs_p1"]),
        ("vs prefix control", summary["gain_vs_prefix"]),
        ("of the lever (vs the plain arm of the same P)", summary["lever_vs_plain"]),
        ("of the warm-up lever over each other lever of the same P", summary["aggwarm_vs_lever"]),
    ):
        print(f"paired gain {name}:")
        for arm, g in block.items():
            if g is None or "mean" not in g:
                continue
            se = f" ± {g['se']:.4f} (SE)" if g["se"] is not None else ""
            print(f"  {arm:>9}: {g['mean']:+.4f}{se} over {g['n']} seeds  {[round(d, 4) for d in g['diffs']]}")
    print("each doubling of P (paired; counts when > 2 SE):")
    for chain, steps in summary["steps"].items():
        for st in steps:
            se = f" ± {st['se']:.4f}" if st["se"] is not None else ""
            print(
                f"  {chain:>8}: {st['from']:>11} -> {st['to']:<11} {st['mean']:+.4f}{se} "
                f"{'> 2 SE' if st['exceeds_2se'] else 'not > 2 SE'}"
                + (f", t-test p = {st['p']:.3f}" if "p" in st else "")
            )
    lad = summary["ladder"]
    if lad["slope_per_ln_n"]:
        print("P = 1 width ladder (endpoint by hidden size; non-embedding parameters):")
        for h, row in lad["endpoints"].items():
            print(
                f"  h{h} ({lad['non_embedding_params'][h] / 1e6:.2f}M): " + " ".join(f"{v:.4f}" for v in row.values())
            )
        sl = lad["slope_per_ln_n"]
        print(
            f"  slope per ln N {sl['mean']:+.4f} ± {sl['se']:.4f}; segments "
            + ", ".join(f"{k}: {v['mean']:+.4f} ± {v['se']:.4f}" for k, v in lad["segment_slopes"].items() if v)
            + ("" if lad["every_segment_negative_by_2se"] else "  -> not every segment < -2 SE: no local k")
        )
    checks = {f"h{h}": row for h, row in summary["learning_rate_check"].items()}
    checks.update(summary["learning_rate_check_arms"])
    for name, row in checks.items():
        print(f"  lr check {name}: " + ", ".join(
            f"{lr:g} " + (f"{v['mean']:.4f} ± {v['se']:.4f} (n {v['n']})" if v["se"] is not None
                          else f"{v['mean']:.4f} (n 1)") + (f" s0 {v['seed0']:.4f}" if v["seed0"] else "")
            for lr, v in sorted(row["by_lr"].items()))
              + f"  best {row['best_lr']:g}{'' if row['bracketed'] else ' (not bracketed)'}"
              + (f", by seed 0 {row['best_lr_seed0']:g}" if row["best_lr_seed0"] else ""))
    tl = summary["ladder_tuned"]
    if tl:
        _print_slope(f"  tuned ladder {tl['arms']}", tl)
    _print_local_k("  ", summary.get("local_k", []))
    for name, f in summary.get("eq5_fit_tuned_ladder", {}).items():
        _print_eq5(f"Eq. 5 fit, tuned ladder + {name} arms", f)
    g = summary["gpu_confound"]
    if g:
        print(f"prefix control, H200 repeat - H100 original: {-g['mean']:+.4f} ± {g['se']:.4f} (paired)")
        for arm, v in summary["gain_vs_prefix_same_gpu"].items():
            if v:
                print(f"  {arm} over the H200 prefix control: {v['mean']:+.4f} ± {v['se']:.4f}")
    for arm, g in summary["long"].items():
        print(f"  ~100M tokens, {arm}: " + "; ".join(
            f"{name} {v['mean']:+.4f} ± {v['se'] or 0:.4f} ({v['n']} seeds)" for name, v in g.items() if v))
    for g in summary["long_doubling"]:
        print(f"  ~100M tokens, {g['to']} over {g['from']}: {g['mean']:+.4f} ± {g['se'] or 0:.4f} ({g['n']} seeds)"
              f"{' > 2 SE' if g['exceeds_2se'] else ''}" + (f", t-test p = {g['p']:.3f}" if "p" in g else ""))
    _print_slope("  ~100M tokens, width ladder", summary["long_ladder"])
    _print_local_k("  ~100M tokens, ", summary["long_local_k"])
    if summary["long_eq5_fit"]:
        _print_eq5("  ~100M tokens, Eq. 5 fit, width ladder + warm-up arms", summary["long_eq5_fit"])
    r = summary["rerun_spread"]
    if r:
        print(f"  the same run twice ({len(r['runs'])} runs): re-run - first {r['mean']:+.4f}, sd {r['sd'] or 0:.4f}, "
              f"largest {r['max_abs']:.4f}: " + ", ".join(f"{x['run']} {x['difference']:+.4f}" for x in r["runs"]))
    for name, f in summary["eq5_fit"].items():
        if f:
            print(f"Eq. 5 fit, ladder + {name} arms ({f['points']} points): k {f['k']:.3g}, E {f['E']:.4f}, "
                  f"alpha {f['alpha']:.3f}, R2 {f['r2']:.3f}")
    print("collapse map (P = 4; per seed: endpoint, cap share, KL, mix - best stream):")
    for cell, row in summary["collapse_map"].items():
        print(
            f"  {cell:>26}: "
            + "; ".join(
                f"s{s} {v['endpoint']:.4f} cap {v['cap_share']:.2f} KL {v['kl_mean']:.2f} "
                f"{v['mix_minus_best_stream']:+.3f}"
                for s, v in row.items()
            )
        )
    m = summary["matched_controls"]
    print("matched controls at ~100M tokens (paired; mean ± SE, t-based 95% interval, two-sided p):")
    for row in m["comparisons"]:
        ci = row.get("ci95")
        print(f"  {row['what']}: {row['mean']:+.4f} ± {row['se'] or 0:.4f} (n = {row['n']}"
              + (f", 95% {ci[0]:+.4f} .. {ci[1]:+.4f}, p = {row['p']:.3g}" if ci else "")
              + f"; {', '.join(row['gpus'])})")
    for arm, c in m["parameters"].items():
        print(f"  {arm}: non-embedding {c['non_embedding'] / 1e6:.2f}M, ParScale {c['parscale'] / 1e6:.3f}M")
    pt = summary["post_training"]
    if pt["arms"]:
        print("post-training from long-p1's checkpoint (last loss, mean ± SE; below the stage-1 model's last loss):")
        for arm, row in pt["arms"].items():
            test = row.get("below_stage1_test") or {}
            print(f"  {arm}: {row['mean']:.4f} ± {row['se'] or 0:.4f} (n = {row['n']})"
                  + (f", {row['below_stage1']:+.4f} below stage 1" if row["below_stage1"] is not None else "")
                  + (f" (± {test['se']:.4f}, p = {test['p']:.3g})" if test.get("p") is not None else ""))
        for row in pt["comparisons"]:
            ci = row.get("ci95")
            print(f"  +{row['pct']}%: {row['what']}: {row['mean']:+.4f} ± {row['se'] or 0:.4f} (n = {row['n']}"
                  + (f", 95% {ci[0]:+.4f} .. {ci[1]:+.4f}, p = {row['p']:.3g}" if ci else "") + ")")
    for pct, c in summary["post_training_curves"].items():
        print(f"along stage 2 (+{pct}%; paired gain at each 16-batch evaluation, mean ± SE; streams' KL):")
        for g in c["gains"]:
            print(f"  {g['what']}: " + ", ".join(f"step {t} {m:+.4f} ± {e:.4f}"
                                                 for t, m, e in zip(g["steps"], g["mean"], g["se"], strict=True)))
        for arm, k in c["kl"].items():
            print(f"  {arm} KL: " + ", ".join(f"{v:.3f}" for v in k["kl"]))
    held = summary["heldout_by_package"]
    if held["all"]:
        print("held-out set scored per package (runs that have it; paired gain, mean ± SE): whole set / without "
              "the files with a training twin / the three largest packages")
        by_pair = {(r["arm"], r["base"]): r for r in held["without_twins"]}
        for row in held["all"]:
            pair = (row["arm"], row["base"])
            apart = [f"{name} {g['mean']:+.4f}" for name in ("torchmetrics", "onnxscript", "lightning")
                     for g in held["packages"].get(name, []) if (g["arm"], g["base"]) == pair]
            twin = by_pair.get(pair)
            print(f"  {row['what']}: {row['mean']:+.4f} ± {row['se'] or 0:.4f} / "
                  + (f"{twin['mean']:+.4f} ± {twin['se'] or 0:.4f}" if twin else "–")
                  + f" (n = {row['n']}); " + ", ".join(apart))
    en = summary["english"]
    if en["arms"]:
        print(f"English (own 8k BPE, one epoch; {en['bytes_per_token']:.3f} bytes per validation token):")
        for arm, row in en["arms"].items():
            print(f"  {arm}: {row['mean']:.4f} ± {row['se'] or 0:.4f} nats, {row['bits_per_byte']:.4f} bits/byte "
                  f"(n = {row['n']})")
        for row in en["comparisons"]:
            ci = row.get("ci95")
            interval = f", 95% {ci[0]:+.4f} .. {ci[1]:+.4f}, p = {row['p']:.3g}" if ci else ""
            print(f"  {row['what']}: {row['mean']:+.4f} ± {row['se'] or 0:.4f} nats = "
                  f"{row['mean_bits_per_byte']:+.4f} bits/byte (n = {row['n']}{interval})")
    print("collapse (final diagnostics):")
    for name, d in summary["streams"].items():
        if d["collapsed"] is not None:
            print(
                f"  {name:>10}: {'COLLAPSED' if d['collapsed'] else 'used     '} endpoint {d['endpoint']:.4f} "
                f"mix {d['loss_mix']:.3f} best stream {d['loss_best_stream']:.3f} ensemble "
                f"{d['loss_ensemble']:.3f} KL {d['kl_mean']:.2f} cap {d['cap_share']:.2f} floor "
                f"{d['floor_share']:.2f}"
            )


if __name__ == "__main__":
    main()
