"""The stream experiment's analysis rules (experiments/streams_effect/analyze.py) on made-up endpoints:
when a doubling of P counts, and when the P = 1 width ladder gives a slope at all."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "streams_effect"


def _experiment_modules():
    """(experiments/runner.py, experiments/streams_effect/runs.py) as modules."""
    paths = [str(EXPERIMENT), str(EXPERIMENT.parent)]
    sys.path[:0] = paths
    try:
        # import_module: isort would sort `runs` by whether a runs/ folder happens to exist in the checkout
        runner, runs = importlib.import_module("runner"), importlib.import_module("runs")
    finally:
        for p in paths:
            sys.path.remove(p)
    return runner, runs


@pytest.fixture(scope="module")
def analyze():
    sys.path.insert(0, str(EXPERIMENT))
    try:
        import analyze

        yield analyze
    finally:
        sys.path.remove(str(EXPERIMENT))


def _results(endpoints: dict[str, list[float]]) -> dict:
    return {
        (arm, s): {"endpoint": v, "environment": {"gpu": None}}
        for arm, vs in endpoints.items()
        for s, v in enumerate(vs)
    }


def test_a_doubling_counts_only_above_two_standard_errors(analyze):
    results = _results(
        {
            "p1": [2.30, 2.31, 2.29],
            "p2": [2.20, 2.21, 2.19],  # 0.10 on every seed
            "p4": [2.19, 2.23, 2.17],
        }
    )  # +0.01, −0.02, +0.02
    steps = analyze.doubling_steps(results, ["p1", "p2", "p4"])
    assert [(s["from"], s["to"]) for s in steps] == [("p1", "p2"), ("p2", "p4")]
    assert steps[0]["mean"] == pytest.approx(0.10) and steps[0]["exceeds_2se"]
    assert steps[1]["mean"] == pytest.approx(0.01 / 3) and not steps[1]["exceeds_2se"]


def test_the_ladder_gives_a_slope_only_where_loss_falls_at_every_width(analyze):
    n = {h: analyze.non_embedding_params(h) for h in analyze.LADDER}
    assert n[192] < n[256] < n[384]
    slope = -0.1
    falling = {arm: [2.0 + slope * math.log(n[h]) + 0.001 * s for s in range(3)] for h, arm in analyze.LADDER.items()}
    lad = analyze.ladder(_results(falling))
    assert lad["slope_per_ln_n"]["mean"] == pytest.approx(slope)
    assert lad["every_segment_negative_by_2se"]
    turning_up = dict(
        falling, **{analyze.LADDER[384]: [falling[analyze.LADDER[256]][s] + 0.02 + 0.001 * s**2 for s in range(3)]}
    )
    lad = analyze.ladder(_results(turning_up))
    assert lad["slope_per_ln_n"]["mean"] < 0  # a straight fit still slopes down ...
    assert not lad["every_segment_negative_by_2se"]  # ... but the curve turns up: no local k


def test_the_tuned_ladder_takes_each_widths_best_learning_rate(analyze):
    cands = analyze.LR_CANDIDATES
    endpoints = {cands[192][2e-3]: [2.40, 2.41, 2.39],
                 cands[256][2e-3]: [2.30, 2.31, 2.29], cands[256][1e-3]: [2.33, 2.34, 2.32],
                 cands[384][2e-3]: [2.32, 2.33, 2.31], cands[384][1e-3]: [2.22, 2.23, 2.21],
                 cands[384][5e-4]: [2.35, 2.36, 2.34]}
    check = analyze.learning_rate_check(_results(endpoints))
    assert {h: row["best_lr"] for h, row in check.items()} == {192: 2e-3, 256: 2e-3, 384: 1e-3}
    # bracketed only where both a smaller and a larger lr were tried and lost
    assert [check[h]["bracketed"] for h in (192, 256, 384)] == [False, False, True]
    assert check[384]["by_lr"][1e-3]["mean"] == pytest.approx(2.22)


def test_the_learning_rate_check_also_compares_lrs_on_seed_0_alone(analyze):
    """An lr run on seed 0 only is compared with the others' seed 0, not with their mean over seeds: here the
    three-seed mean of 2e-3 is pulled down by easy seeds 1 and 2, while on seed 0 itself 4e-3 is better."""
    cands = analyze.LR_CANDIDATES_ARMS["p4-aggwarm"]
    endpoints = {cands[2e-3]: [2.30, 2.20, 2.20], cands[1e-3]: [2.35], cands[4e-3]: [2.28]}
    row = analyze.learning_rate_check(_results(endpoints), analyze.LR_CANDIDATES_ARMS)["p4-aggwarm"]
    assert row["best_lr"] == 2e-3 and row["bracketed"]
    assert row["best_lr_seed0"] == 4e-3
    assert row["by_lr"][4e-3]["se"] is None and row["by_lr"][2e-3]["seed0"] == pytest.approx(2.30)


def test_local_k_inverts_the_law_on_the_ladders_slope(analyze):
    """Made-up endpoints that follow L = a + slope · ln(N (1 + k ln P)) exactly give k back on every seed;
    a ladder that turns up gives no k."""
    n = {h: analyze.non_embedding_params(h) for h in analyze.LADDER}
    slope, k = -0.08, 0.4
    endpoints = {arm: [2.0 + slope * math.log(n[h]) + 0.01 * s for s in range(3)] for h, arm in analyze.LADDER.items()}
    endpoints["p4-aggwarm"] = [endpoints["p1"][s] + slope * math.log(1 + k * math.log(4)) for s in range(3)]
    results = _results(endpoints)
    lad = analyze.ladder(results)
    got = analyze.local_k(results, lad, "p4-aggwarm", "p1", 4)
    assert got["per_seed"] == pytest.approx([k] * 3) and got["ci95"] == pytest.approx([k, k])
    endpoints[analyze.LADDER[384]] = [v + 0.2 for v in endpoints[analyze.LADDER[256]]]
    results = _results(endpoints)
    assert analyze.local_k(results, analyze.ladder(results), "p4-aggwarm", "p1", 4) is None


def test_every_committed_config_is_accepted_by_the_trainer_and_builds_its_model():
    """A config the trainer would refuse (or a model it cannot build) would only show on the GPU machine,
    after the data was built: check each one here, with the runs' own data settings (an 8,192-entry BPE)."""
    from parscale.training.train import TrainConfig, _initial_model, check_config, load_config_file

    runner, runs = _experiment_modules()
    planned = runs.runs()
    configs = sorted((EXPERIMENT / "configs").glob("*.toml"))
    assert {c.stem for c in configs} == set(planned)  # the committed files are what runs.py writes
    built = set()
    stage1 = None
    for path in configs:
        cfg = TrainConfig(**load_config_file(path), data="unused", out="unused")
        check_config(cfg)
        if cfg.model == "STAGE1":  # stage 2 of a two-stage run: it continues its stage-1 run's checkpoint
            after = planned[path.stem]["after"]
            assert after in planned and planned[after]["train"]["streams"] == 1, after
            if stage1 is None:
                import dataclasses
                import tempfile

                import parscale

                stage1 = Path(tempfile.mkdtemp()) / "stage1"
                first = TrainConfig(**load_config_file(EXPERIMENT / "configs" / f"{after}.toml"), data="u", out="u")
                parscale.save(_initial_model(first, vocab_size=8192, eos_id=0), stage1)
            cfg = dataclasses.replace(cfg, model=str(stage1))
            model = _initial_model(cfg, vocab_size=8192, eos_id=0)
            assert model.config.parscale_n == cfg.streams and model.config.parscale_p1_prefix == cfg.p1_prefix
            continue
        shape = planned[path.stem]["train"]["model_overrides"]
        kind = (tuple(sorted(shape.items())), cfg.streams, cfg.p1_prefix, cfg.n_tokens)
        if kind in built:  # one model per distinct shape: the rest differ in seed or training settings only
            continue
        built.add(kind)
        model = _initial_model(cfg, vocab_size=8192, eos_id=0)
        assert model.config.hidden_size == shape["hidden_size"]
        assert model.config.num_hidden_layers == shape["num_hidden_layers"]
        assert model.config.parscale_n == cfg.streams
        assert model.config.parscale_n_tokens == cfg.n_tokens


def test_every_arm_the_analysis_reads_is_a_configured_run(analyze):
    """The analysis finds results by arm name; a name that no run carries would leave its table silently
    empty. Every arm it names (ladders, learning-rate checks, levers, the ~100M-token chain) is one runs.py
    configures."""
    import runs  # on the path through the analyze fixture

    configured = {run["arm"] for run in runs.runs().values()}
    named = set(analyze.LADDER.values()) | set(analyze.LONG_LADDER.values()) | set(analyze.LEVERS)
    for table in (analyze.LR_CANDIDATES, analyze.LR_CANDIDATES_ARMS):
        named |= {arm for by_lr in table.values() for arm in by_lr.values()}
    named |= {f"long-{arm}" for arm in ("p1", "p1prefix", "p2-aggwarm", "p4-aggwarm", "p8-aggwarm")}
    assert named - configured == set()


def test_heldout_rows_are_labelled_by_package_with_twins_apart(tmp_path):
    """write_heldout: every held-out row's domain is its package, " [twin]" where the same file is a training file
    under the project's other name; heldout_summary pools them token-weighted, with and without the twins."""


    runner, runs = _experiment_modules()
    site = "/env/site-packages"
    rows = [("train", "pytorch_lightning", f"{site}/pytorch_lightning/trainer.py"),
            ("val", "lightning", f"{site}/lightning/pytorch/trainer.py"),   # a twin
            ("val", "lightning", f"{site}/lightning/pytorch/other.py"),     # no copy in training
            ("val", "lightning", f"{site}/lightning/fabric/x.py"),          # its copy is not in training
            ("val", "torchmetrics", f"{site}/torchmetrics/a.py"),
            ("train", "numpy", f"{site}/numpy/core.py")]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"text of {p}", "path": p, "package": pkg, "split": split}) + "\n"
                              for split, pkg, p in rows))
    counts = runner.write_heldout(corpus, tmp_path / "heldout.jsonl")
    assert counts == {"lightning [twin]": 1, "lightning": 2, "torchmetrics": 1}
    written = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert [r["domain"] for r in written] == ["lightning [twin]", "lightning", "lightning", "torchmetrics"]
    domains = {"lightning [twin]": {"tokens": 100, "loss": 1.0}, "lightning": {"tokens": 300, "loss": 2.0},
               "torchmetrics": {"tokens": 100, "loss": 3.0}}
    summary = runner.heldout_summary(domains)
    assert summary["packages"]["lightning"] == {"tokens": 400, "loss": pytest.approx(1.75)}
    assert summary["all"]["loss"] == pytest.approx((100 + 600 + 300) / 500)
    assert summary["without_twins"] == {"tokens": 400, "loss": pytest.approx(2.25)}
    # bits per byte pooled over bytes: 300 nats of "lightning [twin]" over 100 tokens at 1 bit per byte, etc.
    for name, bpb in (("lightning [twin]", 1.0), ("lightning", 0.5), ("torchmetrics", 2.0)):
        domains[name]["bits_per_byte"] = bpb
    n_bytes = {k: d["loss"] * d["tokens"] / math.log(2) / d["bits_per_byte"] for k, d in domains.items()}
    summary = runner.heldout_summary(domains)
    assert summary["all"]["bits_per_byte"] == pytest.approx(1000 / math.log(2) / sum(n_bytes.values()))
    assert summary["without_twins"]["bits_per_byte"] == pytest.approx(
        900 / math.log(2) / (n_bytes["lightning"] + n_bytes["torchmetrics"]))


def test_heldout_comparisons_pair_the_per_package_scores_by_seed(analyze):
    """Runs without per-package scores are left out; with them, the matched comparison is made on the held-out
    set without twins and on each package, paired by seed (the gain is base minus arm, as for endpoints)."""
    def run(arm, seed, without_twins, torchmetrics):
        return {"endpoint": 2.0, "environment": {"gpu": None}, "heldout_by_package": {
            "without_twins": {"tokens": 10, "loss": without_twins},
            "packages": {"torchmetrics": {"tokens": 5, "loss": torchmetrics}}}}

    results = {("long-p8-aggwarm", s): run("long-p8-aggwarm", s, 2.0 + 0.01 * s, 1.5) for s in range(3)}
    results |= {("long-p1prefix-aggwarm", s): run("long-p1prefix-aggwarm", s, 2.05 + 0.01 * s, 1.6) for s in range(3)}
    results[("long-p1prefix-aggwarm", 3)] = {"endpoint": 2.1, "environment": {"gpu": None}}  # no per-package scores
    out = analyze.heldout_comparisons(results)
    (row,) = [r for r in out["without_twins"] if r["arm"] == "long-p8-aggwarm" and r["base"] == "long-p1prefix-aggwarm"]
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.05)
    (pkg,) = [r for r in out["packages"]["torchmetrics"] if r["arm"] == "long-p8-aggwarm"
              and r["base"] == "long-p1prefix-aggwarm"]
    assert pkg["mean"] == pytest.approx(0.1)
    # post-training arms pair only runs that continued the same stage-1 checkpoint of their seed
    for s in range(3):
        results[("fz-p8-plus5", s)] = {**run("fz-p8-plus5", s, 2.0, 1.5), "stage1": {"val_loss_full": 2.0 + s}}
        start = 2.0 + s if s < 2 else 9.0  # seed 2's control continued another training of stage 1
        control = run("fz-p1prefix-plus5", s, 2.02, 1.5)
        results[("fz-p1prefix-plus5", s)] = {**control, "stage1": {"val_loss_full": start}}
    out = analyze.heldout_comparisons(results)
    (row,) = [r for r in out["without_twins"] if r["arm"] == "fz-p8-plus5" and r["base"] == "fz-p1prefix-plus5"]
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.02)
    # seed 2's control trained again from the arm's own checkpoint (results/again/) completes the pair
    again = {("fz-p1prefix-plus5", 2): [{**run("fz-p1prefix-plus5", 2, 2.05, 1.5), "stage1": {"val_loss_full": 4.0}}]}
    out = analyze.heldout_comparisons(results, again)
    (row,) = [r for r in out["without_twins"] if r["arm"] == "fz-p8-plus5" and r["base"] == "fz-p1prefix-plus5"]
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.03)


def test_post_training_curves_pair_each_evaluation_step_of_the_same_checkpoint(analyze):
    """Along stage 2 the gain at every evaluation step is base minus arm over seeds that continued the same
    stage-1 checkpoint (a seed whose control continued another training of stage 1 is left out), and the
    streams' KL is the seed mean at each step."""
    def run(losses, kl, stage1):
        return {"settings": {"batch_size": 2, "seq_len": 8}, "stage1": {"val_loss_full": stage1},
                "eval_curve": [{"step": 10 * (i + 1), "val_loss": v, "streams": {"kl_mean": kl}}
                               for i, v in enumerate(losses)]}

    results = {}
    for s in range(3):
        results[("fz-p8-plus5", s)] = run([2.0, 1.9], 0.05 + 0.01 * s, stage1=3.0 + s)
        results[("fz-p1prefix-plus5", s)] = run([2.02 + 0.01 * s, 1.95], None, stage1=3.0 + s if s < 2 else 9.0)
    (gain,) = [g for g in analyze.post_training_curves(results)[5]["gains"] if g["arm"] == "fz-p8-plus5"]
    assert gain["n"] == 2 and gain["steps"] == [10, 20] and gain["tokens"] == [160, 320]
    assert gain["mean"] == pytest.approx([0.025, 0.05])
    kl = analyze.post_training_curves(results)[5]["kl"]
    assert kl["fz-p8-plus5"]["kl"] == pytest.approx([0.06, 0.06]) and "fz-p1prefix-plus5" not in kl


def test_post_training_curves_pair_an_arm_with_a_control_trained_again_from_its_checkpoint(analyze):
    """The gain curves read results/again/ as the endpoints do: an arm whose committed control continued another
    training of stage 1 is paired, step by step, with the control trained again from its own checkpoint."""
    def run(losses, stage1):
        return {"settings": {"batch_size": 2, "seq_len": 8}, "stage1": {"val_loss_full": stage1},
                "eval_curve": [{"step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(losses)]}

    results = {(arm, s): run(losses, stage1=3.0 + s) for s in (0, 1)
               for arm, losses in (("ts-p4-plus5", [2.0, 1.9]), ("ts-p1-plus5", [2.5, 2.5]))}
    results |= {("ts-p1-plus5", s): run([2.5, 2.5], stage1=8.0 + s) for s in (0, 1)}   # another stage 1
    assert not [g for g in analyze.post_training_curves(results).get(5, {"gains": []})["gains"]
                if g["arm"] == "ts-p4-plus5" and g["base"] == "ts-p1-plus5"]
    again = {("ts-p1-plus5", s): [run([2.03, 1.94 + s / 100], stage1=3.0 + s)] for s in (0, 1)}
    (gain,) = [g for g in analyze.post_training_curves(results, again)[5]["gains"]
               if g["arm"] == "ts-p4-plus5" and g["base"] == "ts-p1-plus5"]
    assert gain["n"] == 2 and gain["steps"] == [10, 20]
    assert gain["mean"] == pytest.approx([0.03, 0.045])


def test_a_stage_two_run_brings_its_stage_one_when_the_checkpoint_is_not_here(tmp_path):
    """select_runs: stage 2 continues a checkpoint that exists only where stage 1 trained, so a committed stage 1
    is trained again (marked "again", its committed result kept), unless its folder is already in --work."""
    runner, runs = _experiment_modules()
    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    (results / "long-p1-s0.json").write_text("{}")
    all_runs = runs.runs()
    todo = runner.select_runs(all_runs, ["ts-p4-plus5-s0", "fz-p2-plus5-s0"], results, work)
    assert set(todo) == {"ts-p4-plus5-s0", "fz-p2-plus5-s0", "long-p1-s0"}
    assert todo["long-p1-s0"]["again"] and todo["long-p1-s0"]["train"] == all_runs["long-p1-s0"]["train"]
    (work / "long-p1-s0").mkdir(parents=True)
    (work / "long-p1-s0" / "result.json").write_text("{}")
    assert set(runner.select_runs(all_runs, ["ts-p4-plus5-s0"], results, work)) == {"ts-p4-plus5-s0"}
    # a stage 1 without a committed result is an ordinary run (its result goes to results/)
    todo = runner.select_runs(all_runs, ["ts-p4-plus5-s1"], results, work)
    assert todo["long-p1-s1"]["again"] is False


def test_runs_named_again_are_trained_beside_their_committed_result(tmp_path):
    """select_runs with `again`: a stage-2 control with a committed result (an earlier stage 1's) is trained again
    with the new stage 1, marked for results/again/; a committed run not named by `again` is still skipped."""
    runner, runs = _experiment_modules()
    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    for name in ("long-p1-s0", "ts-p1-plus5-s0", "ts-p4-plus5-s0"):
        (results / f"{name}.json").write_text("{}")
    all_runs = runs.runs()
    only = ["ts-p1-plus5-s0", "ts-p4-plus5-s0", "ts-p2-plus5-s0"]
    todo = runner.select_runs(all_runs, only, results, work)
    assert set(todo) == {"ts-p2-plus5-s0", "long-p1-s0"}   # without `again` the committed control is skipped
    todo = runner.select_runs(all_runs, only, results, work, again=["ts-p1-*"])
    assert set(todo) == {"ts-p1-plus5-s0", "ts-p2-plus5-s0", "long-p1-s0"}
    assert todo["ts-p1-plus5-s0"]["again"] == runner.RUNS_AGAIN and not todo["ts-p2-plus5-s0"].get("again")
    assert todo["long-p1-s0"]["again"] == runner.AGAIN
    assert todo["ts-p1-plus5-s0"]["train"] == all_runs["ts-p1-plus5-s0"]["train"]


def test_a_stage_one_trained_again_twice_keeps_both_results(tmp_path):
    """Each re-training of a stage 1 is the start of the stage-2 runs that recorded it: a later one is published
    beside the earlier, never over it."""
    runner, _ = _experiment_modules()
    first = runner.again_path(tmp_path, "long-p1-s0")
    assert first == tmp_path / "long-p1-s0.json"
    first.write_text("{}")
    second = runner.again_path(tmp_path, "long-p1-s0")
    assert second == tmp_path / "long-p1-s0.again-2.json"
    second.write_text("{}")
    assert runner.again_path(tmp_path, "long-p1-s0") == tmp_path / "long-p1-s0.again-3.json"


def test_post_training_pairs_each_stage_two_arm_with_its_controls_by_seed(analyze):
    """Two-stage and frozen arms are read at their last whole-split loss against P = 1 and the prefix control
    continued from the same checkpoint, paired by seed; the arm table gives each arm's drop below its stage-1
    model's own last loss."""
    finals = {"ts-p1-plus5": [2.05, 2.06, 2.04], "ts-p4-plus5": [2.02, 2.04, 2.00],
              "fz-p1prefix-plus5": [2.04, 2.05], "fz-p4-plus5": [2.03, 2.03]}
    results = _results({arm: [9.0] * len(v) for arm, v in finals.items()})   # the 90/95/100% mean is not read
    for arm, values in finals.items():
        for s, v in enumerate(values):
            results[(arm, s)]["val_loss_full"] = {"270": 9.0, "300": v}
    out = analyze.post_training(results)
    (row,) = [r for r in out["comparisons"] if r["arm"] == "ts-p4-plus5" and r["base"] == "ts-p1-plus5"]
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.03) and row["ci95"][0] < 0.03 < row["ci95"][1]
    (row,) = [r for r in out["comparisons"] if r["arm"] == "fz-p4-plus5"]
    assert row["base"] == "fz-p1prefix-plus5" and row["mean"] == pytest.approx(0.015)
    assert not [r for r in out["comparisons"] if r["arm"] == "ts-p8-plus5"]   # no results: no row
    start = out["stage1_final"]
    assert out["arms"]["ts-p4-plus5"]["mean"] == pytest.approx(2.02)
    assert out["arms"]["ts-p4-plus5"]["below_stage1"] == pytest.approx(
        sum(start[s] - v for s, v in enumerate([2.02, 2.04, 2.00])) / 3)
    # runs that record their stage-1 checkpoint are paired only with a base that continued the same one
    for arm in ("ts-p1-plus5", "ts-p4-plus5"):
        for s in range(3):
            results[(arm, s)]["stage1"] = {"val_loss_full": 2.1 + s, "weights_sha256": None}
    results[("ts-p4-plus5", 2)]["stage1"] = {"val_loss_full": 2.5, "weights_sha256": None}   # another machine's
    out = analyze.post_training(results)
    (row,) = [r for r in out["comparisons"] if r["arm"] == "ts-p4-plus5" and r["base"] == "ts-p1-plus5"]
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.025)
    assert out["arms"]["ts-p4-plus5"]["below_stage1"] == pytest.approx((0.08 + 1.06 + 0.50) / 3)


def test_a_control_trained_again_pairs_with_the_arms_of_its_own_checkpoint(analyze):
    """results/again/ (runner --again): a control trained again with a later stage 1 is the partner of the arms
    that continued that stage 1, and the committed control stays the partner of those that continued the
    earlier one; each seed gives one pair."""
    def run(arm, seed, final, stage1):
        return {"arm": arm, "seed": seed, "endpoint": 9.0, "environment": {"gpu": None},
                "val_loss_full": {"300": final}, "stage1": {"val_loss_full": stage1, "weights_sha256": None}}

    early, later = {0: 2.10, 1: 2.11}, {0: 2.20, 1: 2.21}   # two trainings of stage 1, per seed
    results = {("ts-p1-plus5", s): run("ts-p1-plus5", s, 2.06, early[s]) for s in (0, 1)}
    results |= {("ts-p8-plus5", s): run("ts-p8-plus5", s, 2.05, early[s]) for s in (0, 1)}   # gains 0.01
    results |= {("ts-p4-plus5", s): run("ts-p4-plus5", s, 2.10 + s / 100, later[s]) for s in (0, 1)}
    again = {("ts-p1-plus5", s): [run("ts-p1-plus5", s, 2.13 + s / 100, later[s])] for s in (0, 1)}   # gains 0.03
    out = analyze.post_training(results)
    assert not [r for r in out["comparisons"] if r["arm"] == "ts-p4-plus5" and r["base"] == "ts-p1-plus5"]
    out = analyze.post_training(results, again)
    (p4,) = [r for r in out["comparisons"] if r["arm"] == "ts-p4-plus5" and r["base"] == "ts-p1-plus5"]
    (p8,) = [r for r in out["comparisons"] if r["arm"] == "ts-p8-plus5" and r["base"] == "ts-p1-plus5"]
    assert p4["n"] == 2 and p4["mean"] == pytest.approx(0.03)
    assert p8["n"] == 2 and p8["mean"] == pytest.approx(0.01)
    assert out["arms"]["ts-p1-plus5"]["mean"] == pytest.approx(2.06)   # the arm table: committed runs only
    pairs = analyze.pair_by_checkpoint(results, again, "ts-p4-plus5", "ts-p1-plus5",
                                       lambda r, s: r["stage1"]["val_loss_full"])
    assert sorted(pairs) == [("ts-p1-plus5", 0), ("ts-p1-plus5", 1), ("ts-p4-plus5", 0), ("ts-p4-plus5", 1)]


def test_the_runner_trains_stage_one_then_stage_two_and_collects_a_finished_run_without_retraining(
        data_dir, tmp_path, monkeypatch, capsys):
    """runs.run_all on CPU with two tiny runs: the stage-2 run waits for its stage 1, each run trains in its own
    worker process and its result lands in results/; a run that finished training but was never collected (its
    runner stopped) is collected again without training another step."""
    runner, runs = _experiment_modules()
    base = {"steps": 4, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "warmup": 1, "eval_every": 2, "eval_batches": 1,
            "eval_at": [1.0], "stream_batches": 1, "save_every": 0, "compile": False, "progress": False, "seed": 0}
    fake = {"tiny-p1-s0": {"arm": "tiny-p1", "seed": 0, "cost": 2,
                           "train": {**base, "model": "tiny", "streams": 1}},
            "tiny-ts-p2-s0": {"arm": "tiny-ts-p2", "seed": 0, "cost": 1, "after": "tiny-p1-s0",
                              "train": {**base, "model": "STAGE1", "streams": 2, "steps": 3, "data_start": 8}}}
    configs, results, work = tmp_path / "configs", tmp_path / "results", tmp_path / "work"
    configs.mkdir()
    for name, run in fake.items():
        (configs / f"{name}.toml").write_text(runner.toml_text(run["train"]))
    monkeypatch.setattr(runs, "runs", lambda: fake)
    monkeypatch.setattr(runs, "CONFIGS", configs)
    monkeypatch.setattr(runs, "RESULTS", results)
    runs.run_all(data_dir, work, ["tiny-ts-*"], per_gpu=2)
    out = capsys.readouterr().out
    assert "done tiny-p1-s0" in out and "done tiny-ts-p2-s0" in out, out
    # stage 2 started only once stage 1 had written its result (its last act: the log line may come later)
    assert (work / "tiny-ts-p2-s0.spec.json").stat().st_mtime >= (work / "tiny-p1-s0" / "result.json").stat().st_mtime
    stage2 = json.loads((results / "tiny-ts-p2-s0.json").read_text())
    assert stage2["settings"]["streams"] == 2 and set(stage2["val_loss_full"]) == {"3"}
    assert (results / "tiny-p1-s0.json").is_file()   # no committed stage 1: an ordinary result
    stage1 = json.loads((results / "tiny-p1-s0.json").read_text())
    assert stage2["stage1"]["val_loss_full"] == stage1["val_loss_full"]["4"]
    assert len(stage2["stage1"]["weights_sha256"]) == 64
    # the runner's record of how many runs shared the GPU (here one at a time: stage 2 waits for stage 1)
    assert stage1["gpu_sharing"]["seconds_seen"] > 0 and stage1["gpu_sharing"]["mean_runs_on_gpu"] == 1.0
    metrics = (work / "tiny-ts-p2-s0" / "metrics.jsonl").read_text()
    (work / "tiny-ts-p2-s0" / "result.json").unlink()
    (results / "tiny-ts-p2-s0.json").unlink()
    runs.run_all(data_dir, work, ["tiny-ts-*"], per_gpu=2)
    assert "done tiny-ts-p2-s0" in capsys.readouterr().out
    assert (work / "tiny-ts-p2-s0" / "metrics.jsonl").read_text() == metrics   # not one step trained again
    assert json.loads((results / "tiny-ts-p2-s0.json").read_text())["endpoint"] == stage2["endpoint"]
    # named by `again`, a run with a committed result runs again (here: collected from its folder) and its new
    # result goes to results/again/, the committed one untouched
    committed = (results / "tiny-ts-p2-s0.json").read_text()
    runs.run_all(data_dir, work, ["tiny-ts-*"], per_gpu=2, again=["tiny-ts-*"])
    assert "collected from its run folder tiny-ts-p2-s0" in capsys.readouterr().out
    assert (results / "tiny-ts-p2-s0.json").read_text() == committed
    assert json.loads((results / "again" / "tiny-ts-p2-s0.json").read_text())["endpoint"] == stage2["endpoint"]
    runs.run_all(data_dir, work, ["tiny-ts-*"], per_gpu=2, again=["tiny-ts-*"])   # a later call: published once
    assert [f.name for f in (results / "again").iterdir()] == ["tiny-ts-p2-s0.json"]


def test_collect_keeps_the_trainers_peak_memory(tmp_path):
    """result.json carries the largest peak memory the trainer logged (None where it logged none, as on CPU)."""
    runner, _ = _experiment_modules()
    rows = [{"step": s, "loss": 3.0, "tokens_per_s": 100.0, **({"peak_memory_gib": g} if g else {})}
            for s, g in ((1, None), (2, 7.5), (3, 9.25), (4, 8.0))]
    rows[-1]["val_loss_full"] = 2.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = {"arm": "p1", "seed": 0, "train": {}}
    assert runner.collect("r", run, tmp_path, 1.0)["peak_memory_gib"] == 9.25
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "peak_memory_gib"})
                                                    + "\n" for r in rows))
    assert runner.collect("r", run, tmp_path, 1.0)["peak_memory_gib"] is None


def test_a_run_on_another_corpus_reads_that_corpus_data_and_is_skipped_without_it(data_dir, tmp_path, monkeypatch,
                                                                                   capsys):
    """A run that names its corpus trains on the folder given for that name (the default --data here does not
    even exist), is skipped with a message naming the flag when no folder is given, and is not scored on the
    default corpus's held-out packages."""
    runner, runs = _experiment_modules()
    train = {"steps": 2, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "warmup": 1, "eval_every": 2, "eval_batches": 1,
             "eval_at": [1.0], "stream_batches": 1, "save_every": 0, "compile": False, "progress": False, "seed": 0,
             "model": "tiny", "streams": 1}
    fake = {"other-p1-s0": {"arm": "other-p1", "seed": 0, "cost": 1, "corpus": "other", "train": train}}
    configs, results, work = tmp_path / "configs", tmp_path / "results", tmp_path / "work"
    configs.mkdir()
    (configs / "other-p1-s0.toml").write_text(runner.toml_text(train))
    monkeypatch.setattr(runs, "runs", lambda: fake)
    monkeypatch.setattr(runs, "CONFIGS", configs)
    monkeypatch.setattr(runs, "RESULTS", results)
    missing = tmp_path / "no-such-data"
    runs.run_all(missing, work, ["other-*"], per_gpu=1)
    assert "skip other-p1-s0: it trains on the other corpus; give its data folder with --corpus-data other=DIR" \
        in capsys.readouterr().out
    assert not (results / "other-p1-s0.json").exists()
    (work / "heldout.jsonl").write_text(json.dumps({"text": "x = 1\n", "domain": "pkg"}) + "\n")
    runs.run_all(missing, work, ["other-*"], per_gpu=1, corpus_data={"other": data_dir})
    assert "done other-p1-s0" in capsys.readouterr().out
    result = json.loads((results / "other-p1-s0.json").read_text())
    assert result["heldout_by_package"] is None and not (work / "other-p1-s0" / "heldout.json").exists()


def test_english_arms_are_paired_by_seed_and_reported_in_bits_per_byte(analyze):
    """The English comparisons: paired by seed in nats, and the same difference in bits per byte of the validation
    text (nats / ln 2 / bytes per token, from the committed manifest)."""
    results = {("en-p1", s): {"endpoint": 3.0 + 0.01 * s} for s in range(3)}
    results.update({("en-p1prefix-aggwarm", s): {"endpoint": 2.98 + 0.01 * s} for s in range(3)})
    results.update({("en-p8-aggwarm", s): {"endpoint": v} for s, v in enumerate([2.93, 2.95, 2.94])})
    out = analyze.english(results)
    manifest = json.loads((Path(analyze.HERE) / "data" / "english-data-manifest.json").read_text())
    assert out["bytes_per_token"] == pytest.approx(manifest["val_bytes"] / manifest["val_tokens"])
    (row,) = [r for r in out["comparisons"] if r["arm"] == "en-p8-aggwarm" and r["base"] == "en-p1prefix-aggwarm"]
    assert row["n"] == 3 and row["mean"] == pytest.approx((0.05 + 0.04 + 0.06) / 3)
    assert row["mean_bits_per_byte"] == pytest.approx(row["mean"] / math.log(2) / out["bytes_per_token"])
    assert out["arms"]["en-p1"]["bits_per_byte"] == pytest.approx(3.01 / math.log(2) / out["bytes_per_token"])
    assert analyze.english({})["comparisons"] == []
