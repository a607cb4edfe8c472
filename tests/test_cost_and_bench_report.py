"""The analytic cost model and the benchmark report (on the committed measurements)."""

import json
from pathlib import Path

import pytest

from parscale.analysis.bench_report import aggregate, headline
from parscale.analysis.cost import predict, validate
from parscale.analysis.memory import kv_cache_bytes
from parscale.model.config import ModelConfig

RAW = Path(__file__).parent.parent / "benchmarks" / "raw"
GRID = [RAW / "h200_grid_graph_small.json", RAW / "h200_grid_graph_large.json"]
MEMORY = RAW / "h200_memory_fresh.json"


def test_cost_grows_with_size_streams_and_batch():
    small = predict(ModelConfig.preset("paper-1.6b"), 1, 64, 64)
    assert predict(ModelConfig.preset("paper-4.4b"), 1, 64, 64)["memory_gib"] > small["memory_gib"]
    p8 = predict(ModelConfig.preset("paper-1.6b", parscale_n=8), 1, 64, 64)
    assert small["latency_s"] < p8["latency_s"] and small["memory_gib"] < p8["memory_gib"]
    assert predict(ModelConfig.preset("paper-1.6b"), 8, 64, 64, gpu="a100")["decode_ms_per_token"] > \
        predict(ModelConfig.preset("paper-1.6b"), 8, 64, 64, gpu="h100")["decode_ms_per_token"]


def test_a_workload_the_model_cannot_run_is_one_error(capsys):
    from parscale.cli import main

    cfg = ModelConfig.preset("paper-1.6b")
    for args, message in (((0, 64, 64), "--batch"), ((1, 0, 64), "--input-len"), ((1, 64, -1), "--output-len"),
                          ((1, 2000, 49), "exceed the model's 2048 positions")):
        with pytest.raises(ValueError, match=message):
            predict(cfg, *args)
    assert main(["cost", "--batch", "0"]) == 2 and "--batch" in capsys.readouterr().err
    assert main(["plan", "--paper", "stack", "--memory-gib", "-1", "--latency-ms", "7"]) == 2
    assert "--memory-gib and --latency-ms must be > 0" in capsys.readouterr().err


def test_a_file_that_is_not_a_benchmark_is_one_error_naming_it(tmp_path, capsys):
    from parscale.cli import main

    not_json, no_points, memory_only = tmp_path / "a.csv", tmp_path / "b.json", tmp_path / "c.json"
    not_json.write_text("params,P,loss\n")
    no_points.write_text('{"eq5": {}}')
    memory_only.write_text(json.dumps({"points": [{"shape": "paper-1.6b", "P": 1, "batch": 1, "length": 64,
                                                   "peak_memory_gib": 3.1}]}))
    for args, message in (
            (["bench-report", "--latency", str(not_json), "--memory", str(MEMORY)], f"{not_json} is not a benchmark"),
            (["bench-report", "--latency", str(no_points), "--memory", str(MEMORY)], "no 'points' list"),
            (["bench-report", "--latency", str(memory_only), "--memory", str(MEMORY)], "point 0 has no decode_ms"),
            (["bench-report", "--latency", str(tmp_path / "none.json"), "--memory", str(MEMORY)], "no such benchmark"),
            (["cost", "--validate-latency", str(memory_only)], "point 0 has no decode_ms_per_token"),
            (["cost", "--validate-latency"], "nothing to validate against"),
            (["bench-report", "--latency", str(GRID[0]), "--memory", str(MEMORY), "--out", str(tmp_path / "r")],
             "the headline needs the latency_s of paper-4.4b at P = 1, batch 1: no such point in the latency"),
            (["plan", "--paper", "stack", "--memory-gib", "8", "--latency-ms", "7", "--law", str(no_points)],
             "is not a fit written by `parscale fit --out`")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and err.count("\n") == 1, err


@pytest.mark.skipif(not MEMORY.exists(), reason="no committed measurements")
def test_validation_against_one_kind_of_measurement_reports_that_kind(tmp_path, capsys):
    from parscale.cli import main

    assert main(["cost", "--validate-memory", str(MEMORY), "--out", str(tmp_path / "v.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary) == ["memory_gib"] and summary["memory_gib"]["points"] > 0
    assert json.loads((tmp_path / "v.json").read_text())["summary"] == summary


def test_kv_cache_bytes_of_paper_shape():
    # measurements.md: 27.6 KB per token per stream for the 1.6B shape in bf16
    cfg = ModelConfig.preset("paper-1.6b", parscale_n=8)
    assert kv_cache_bytes(cfg, 1, 1) - kv_cache_bytes(cfg, 1, 0) == 8 * 27_648


@pytest.mark.skipif(not MEMORY.exists(), reason="no committed measurements")
def test_cost_model_against_measurements():
    v = validate(GRID, [MEMORY])
    assert v["summary"]["memory_gib"]["points"] == 190  # 192 measured, less the two calibration points
    assert not any(r["shape"] == "paper-1.6b" and (r["P"], r["batch"]) in ((1, 1), (8, 8)) and r["length"] == 64
                   for r in v["points"])
    assert v["summary"]["memory_gib"]["mean_abs_error"] < 0.10
    assert v["summary"]["decode_ms_per_token"]["mean_abs_error"] < 0.03
    assert v["summary"]["latency_s"]["mean_abs_error"] < 0.05


@pytest.mark.skipif(not MEMORY.exists(), reason="no committed measurements")
@pytest.mark.parametrize("engine", ["graph", "compile"])
def test_engine_constants_are_the_ones_calibrated_on_the_committed_measurements(engine):
    """ENGINES is not typed in by hand: calibrate() on CALIBRATION_FILES gives it back (to the digits written),
    and the calibrated model reproduces its calibration points."""
    from parscale.analysis.cost import (
        CALIBRATION_FILES,
        ENGINES,
        MANY_ROWS_POINT,
        calibrate,
        calibration_point,
        predict,
    )

    latency, memory = (RAW / name for name in CALIBRATION_FILES[engine])
    many = calibration_point(latency, MANY_ROWS_POINT) if engine == "graph" else None
    derived = calibrate(calibration_point(latency), calibration_point(memory), "h200", engine, many)
    for field in ("decode_layer_floor_s", "prefill_layer_floor_s", "runtime_overhead_bytes",
                  "decode_floor_per_doubling_s"):
        assert getattr(derived, field) == pytest.approx(getattr(ENGINES[engine], field), rel=1e-4, abs=1e-12)
    point = calibration_point(latency)
    cfg = ModelConfig.preset(point["shape"], parscale_n=point["P"])
    predicted = predict(cfg, 1, 64, 64, "h200", derived)
    assert predicted["decode_ms_per_token"] == pytest.approx(point["decode_ms_per_token"], rel=1e-9)
    assert predicted["memory_gib"] == pytest.approx(calibration_point(memory)["peak_memory_gib"], rel=1e-9)


@pytest.mark.skipif(not MEMORY.exists(), reason="no committed measurements")
def test_headline_follows_the_paper_method():
    costs = aggregate(GRID, [MEMORY])
    h = headline(costs)
    for row in h.values():
        for v in row.values():
            assert v["P1"] < v["P8"]
            assert v["ratio"] == pytest.approx(v["parameter_increase"] / v["parscale_increase"])
    assert h["batch_1"]["memory_gib"]["P8"] < h["batch_1"]["memory_gib"]["equal_loss_P1"]
    committed = json.loads((RAW.parent / "summary.json").read_text())["headline"]
    assert committed["batch_1"]["memory_gib"]["ratio"] == pytest.approx(h["batch_1"]["memory_gib"]["ratio"])
    assert committed["batch_avg"]["latency_s"]["ratio"] == pytest.approx(h["batch_avg"]["latency_s"]["ratio"])


def _bench_file(path, gpu, engine, points):
    path.write_text(json.dumps({"engine": engine, "environment": {"gpu": gpu}, "points": points}))
    return path


def test_the_report_says_what_was_measured_and_keeps_only_the_lengths_asked(tmp_path):
    """The Figure 4 title and the summary come from the files (it once said "H100" whatever they held), and
    --lengths drops the other lengths from latency and memory alike."""
    from parscale.analysis.bench_report import describe, report, title

    def point(shape, p, batch, length, latency, memory):
        return {"shape": shape, "P": p, "batch": batch, "length": length, "latency_s": latency,
                "decode_ms_per_token": latency, "peak_memory_gib": memory}

    points = [point(shape, p, 1, length, lat * (1 + 0.01 * p) * length / 64, mem + 0.01 * p)
              for shape, lat, mem in (("paper-1.6b", 0.2, 3.5), ("paper-2.8b", 0.3, 6.0), ("paper-4.4b", 0.4, 9.0))
              for p in (1, 8) for length in (64, 512)]
    lat = _bench_file(tmp_path / "lat.json", "NVIDIA H200", "compile", points)
    mem = _bench_file(tmp_path / "mem.json", "NVIDIA H200", "graph", points)
    measured = describe([lat], {64})
    assert measured == {"gpu": ["NVIDIA H200"], "engine": ["compile"], "lengths": [64]}
    assert "H200" in title(measured) and "compile" in title(measured) and "H100" not in title(measured)
    only_64 = aggregate([lat], [mem], {64})
    assert only_64[("paper-1.6b", 1, 1)]["latency_s"] == pytest.approx(0.2 * 1.01)
    assert aggregate([lat], [mem])[("paper-1.6b", 1, 1)]["latency_s"] == pytest.approx(0.2 * 1.01 * 4.5)
    summary = report([lat], [mem], tmp_path / "out", {64})
    assert summary["measured"]["lengths"] == [64] and (tmp_path / "out" / "figure4_measured.png").exists()
    with pytest.raises(ValueError, match="no benchmark points of length"):
        aggregate([lat], [mem], {128})


@pytest.mark.parametrize("shape", ["tiny", "tiny-llama", "tiny-qwen3"])
def test_anchor_is_the_plain_model_of_the_same_shape(shape):
    """The transformers anchor of `bench --anchors` computes what parscale's P = 1 model of the shape computes
    (same weights give the same logits), and its timing comes from generations of the asked lengths."""
    import torch

    from parscale.analysis.anchors import hf_plain_model, hf_static_cache_anchor
    from parscale.model.transformer import build_model

    hf = hf_plain_model(shape, device="cpu", dtype=torch.float32)
    ours = build_model(ModelConfig.preset(shape, parscale_n=1, max_position_embeddings=4096))
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    torch.testing.assert_close(ours.eval()(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    row = hf_static_cache_anchor(shape, length=8, short=4, long=12, repeats=1, device="cpu", dtype=torch.float32)
    assert row["tokens"] == [4, 12] and row["generate_long_s"] > 0 and row["decode_ms_per_token"] == pytest.approx(
        (row["generate_long_s"] - row["generate_short_s"]) / 8 * 1000)
    assert row["parameters"] == sum(p.numel() for p in ours.parameters())


def test_anchor_ratios_pair_a_point_with_the_anchors_of_its_shape_batch_and_length():
    from parscale.analysis.bench import anchor_ratios

    anchors = [{"anchor": "gpt-fast", "shape": "paper-1.6b", "batch": 1, "length": 64, "decode_ms_per_token": 2.0},
               {"anchor": "transformers static cache", "shape": "paper-1.6b", "batch": 1, "length": 64,
                "decode_ms_per_token": 4.0},
               {"anchor": "gpt-fast", "shape": "paper-2.8b", "batch": 1, "length": 64, "decode_ms_per_token": 3.0}]
    point = {"shape": "paper-1.6b", "batch": 1, "length": 64, "decode_ms_per_token": 1.5}
    assert anchor_ratios(point, anchors) == {"gpt-fast": 0.75, "transformers static cache": 0.375}
    assert anchor_ratios({**point, "length": 128}, anchors) == {}  # another prompt length: no like anchor
    assert anchor_ratios({**point, "batch": 2}, anchors) == {}


def test_cost_prints_a_table_with_its_assumptions_and_json_on_request(capsys, tmp_path):
    from parscale.cli import main

    assert main(["cost", "--shape", "paper-1.6b", "--streams", "8", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("paper-1.6b P = 8 on h200 (graph engine, bf16), batch 2, 64 prompt + 128 generated")
    assert "ms/token" in text and "GiB" in text
    assert main(["cost", "--streams", "8", "--json", "--out", str(tmp_path / "c.json")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["assumed"]["P"] == 8 and shown == json.loads((tmp_path / "c.json").read_text())
