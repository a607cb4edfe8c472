"""The recycling experiment's configs (experiments/recycle_smollm2): every committed file is what runs.py writes,
the trainer accepts it, and it builds the model it names from a P = 1 folder (a tiny stand-in for SmolLM2)."""

import dataclasses
import sys
from pathlib import Path

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "recycle_smollm2"


def _runs_module():
    paths = [str(EXPERIMENT), str(EXPERIMENT.parent)]
    sys.path[:0] = paths
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("recycle_runs", EXPERIMENT / "runs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for p in paths:
            sys.path.remove(p)
    return module


def test_every_recycling_config_is_accepted_and_builds_its_model(tmp_path):
    import parscale
    from parscale.model.config import ModelConfig
    from parscale.training.train import TrainConfig, _initial_model, check_config, load_config_file

    runs = _runs_module()
    planned = runs.runs()
    configs = sorted((EXPERIMENT / "configs").glob("*.toml"))
    assert {c.stem for c in configs} == set(planned)
    base = tmp_path / "p1"
    parscale.save(parscale.build_model(ModelConfig.preset("tiny"), seed=0), base)
    vocab = ModelConfig.preset("tiny").vocab_size
    built = set()
    for path in configs:
        cfg = TrainConfig(**load_config_file(path), data="unused", out="unused")
        check_config(cfg)
        assert cfg.model == runs.MODEL and cfg.steps * cfg.batch_size * cfg.seq_len in (4_915_200, 8_192)
        assert cfg.loss_chunk_rows == 4096 and cfg.activation_checkpointing
        kind = (cfg.streams, cfg.p1_prefix, cfg.trainable, cfg.prefix_init)
        if kind in built:
            continue
        built.add(kind)
        model = _initial_model(dataclasses.replace(cfg, model=str(base)), vocab_size=vocab, eos_id=0)
        assert model.config.parscale_n == cfg.streams and model.config.parscale_p1_prefix == cfg.p1_prefix
        if cfg.streams > 1 or cfg.p1_prefix:
            assert model.config.parscale_n_tokens == 48
    # every arm of the design is there, for each seed
    arms = {r["arm"] for r in planned.values()}
    levers = {"agglr0.01": 0.01, "agglr0.001": 0.001}
    levered = {f"{kind}-p{p}-{lever}" for kind in ("frozen", "full") for p in (2, 4, 8) for lever in levers}
    assert arms == {"frozen-p1prefix", "frozen-p2", "frozen-p4", "frozen-p8", "full-p1", "full-p1prefix", "full-p2",
                    "full-p4", "full-p8", "start-p1", "start-p4"} | levered
    # a levered arm is its plain arm with the aggregator slowed, nothing else
    for name, r in planned.items():
        if r["arm"] in levered:
            lever = r["arm"].rsplit("-", 1)[1]
            plain = planned[name.replace(f"-{lever}", "")]["train"]
            assert r["train"] == {**plain, "aggregator_lr_mult": levers[lever]}
    assert {r["seed"] for r in planned.values() if r["arm"] == "full-p8"} == {0, 1, 2}


def _analyze_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recycle_analyze", EXPERIMENT / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(arm, seed, endpoint, curve, bpb=None, weight=None):
    return {"arm": arm, "seed": seed, "endpoint": endpoint, "settings": {"batch_size": 2, "seq_len": 8},
            "eval_curve": [{"step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(curve)],
            "heldout_by_package": {"all": {"bits_per_byte": bpb}, "without_twins": {"bits_per_byte": bpb}}
            if bpb else None,
            "streams_final": {"weight_mean": [weight, 1 - weight], "verdict": "collapsed" if weight > 0.9 else "used"}
            if weight else None, "wall_seconds": 100.0, "gpu_sharing": {"seconds_seen": 90.0, "mean_runs_on_gpu": 4.0}}


def test_recycling_analysis_pairs_each_arm_with_its_controls_by_seed():
    """Each frozen arm against the frozen prefix control, each lever arm also against the plain arm of its P,
    seed by seed (gain = control − arm), in nats and bits per byte; gain curves at the common evaluation steps;
    the arm table against the starting model, with collapsed runs counted."""
    import pytest

    analyze = _analyze_module()
    results = {}
    for s in range(3):
        results[("frozen-p1prefix", s)] = _result("frozen-p1prefix", s, 1.70 + s / 100, [1.80, 1.72], bpb=0.60)
        results[("frozen-p4", s)] = _result("frozen-p4", s, 1.69 + s / 100, [1.79, 1.71], bpb=0.59, weight=0.925)
        results[("frozen-p4-agglr0.01", s)] = _result("frozen-p4-agglr0.01", s, 1.68 + s / 100 - s / 1000,
                                                     [1.79, 1.70 - s / 100], bpb=0.58, weight=0.7)
    results[("start-p1", 0)] = _result("start-p1", 0, 1.80, [])
    rows = {(r["arm"], r["base"]): r for r in analyze.comparisons(results)}
    assert set(rows) == {("frozen-p4", "frozen-p1prefix"), ("frozen-p4-agglr0.01", "frozen-p1prefix"),
                         ("frozen-p4-agglr0.01", "frozen-p4")}
    lever = rows[("frozen-p4-agglr0.01", "frozen-p1prefix")]["nats"]
    assert lever["n"] == 3 and lever["mean"] == pytest.approx(0.021) and lever["ci95"][0] < 0.021 < lever["ci95"][1]
    assert rows[("frozen-p4-agglr0.01", "frozen-p4")]["bits_per_byte"]["mean"] == pytest.approx(0.01)
    (curve,) = [c for c in analyze.gain_curves(results)
                if c["arm"] == "frozen-p4-agglr0.01" and c["base"] == "frozen-p1prefix"]
    assert curve["steps"] == [10, 20] and curve["tokens"] == [160, 320]
    assert curve["mean"] == pytest.approx([0.01, 0.03]) and curve["n"] == 3
    table = analyze.arm_table(results)
    assert table["frozen-p4"]["collapsed"] == 3 and table["frozen-p4-agglr0.01"]["collapsed"] == 0
    assert table["frozen-p1prefix"]["below_start"] == pytest.approx(0.09)
    assert table["frozen-p4"]["largest_weight"] == pytest.approx(0.925)
    assert table["frozen-p4"]["gpu_seconds"] == pytest.approx(25.0)   # 100 s of wall time, four runs on the card
