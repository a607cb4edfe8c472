"""`parscale bench --resume`: a grid cut short is continued, not re-measured or mixed with other settings.

The timing itself needs a GPU; here the GPU-bound pieces of analysis/bench.py (the model on the device, one
point's measurement, the environment) are replaced so that the bookkeeping around them runs on the CPU.
"""

import json

import pytest
import torch

from parscale.analysis import bench


@pytest.fixture
def fake_gpu(monkeypatch):
    measured = []

    class Config:
        def param_counts(self):
            return {"non_embedding": 1}

    class Model:
        config = Config()

    def measure_point(model, batch, length, *args, timeline=False):
        measured.append((batch, length))
        return {"batch": batch, "length": length, "decode_ms_per_token": 2.0, "prefill_ms": 1.0,
                "peak_memory_gib": 1.0, "achieved_bandwidth_tb_s": 1.0,
                **({"timeline": {"kernels_per_step": 3.0}} if timeline else {})}

    env = {"gpu": "GPU A", "torch": "2.x", "command": "parscale bench"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "random_model", lambda shape, p: Model())
    monkeypatch.setattr(bench, "measure_point", measure_point)
    monkeypatch.setattr(bench, "environment", lambda: dict(env))
    return measured, env


def grid(out, **kw):
    return bench.run(["paper-1.6b"], [1, 8], [1, 2], [64], "graph", out, fuse=False, **kw)


def test_resume_keeps_the_points_measured_and_measures_only_the_rest(tmp_path, fake_gpu):
    measured, _ = fake_gpu
    out = tmp_path / "grid.json"
    bench.run(["paper-1.6b"], [1], [1, 2], [64], "graph", out, fuse=False)  # a first process that measured P = 1 only
    assert measured == [(1, 64), (2, 64)]
    measured.clear()
    result = grid(out, resume=True)
    assert measured == [(1, 64), (2, 64)]  # P = 8's two points, not P = 1's again
    assert sorted((q["P"], q["batch"]) for q in result["points"]) == [(1, 1), (1, 2), (8, 1), (8, 2)]
    assert [q["process"] for q in result["points"]] == [0, 0, 1, 1]
    assert len(result["processes"]) == 2 and json.loads(out.read_text()) == result
    measured.clear()
    grid(out, resume=True)  # complete: nothing to measure
    assert measured == []


def test_kernels_asks_every_point_for_its_timeline(tmp_path, fake_gpu, monkeypatch):
    """`bench --kernels`: each timed point also records its kernels per step and idle time (timeline.py)."""
    monkeypatch.setattr(bench, "kernel_report", lambda model, batch, length: [])
    plain = grid(tmp_path / "plain.json")
    assert all("timeline" not in q for q in plain["points"])
    with_kernels = grid(tmp_path / "kernels.json", kernels=True)
    assert [q["timeline"]["kernels_per_step"] for q in with_kernels["points"]] == [3.0] * 4


def test_without_resume_the_file_is_measured_again(tmp_path, fake_gpu):
    measured, _ = fake_gpu
    out = tmp_path / "grid.json"
    grid(out)
    measured.clear()
    result = grid(out)
    assert len(measured) == 4 and len(result["points"]) == 4 and len(result["processes"]) == 1


@pytest.mark.parametrize("change", [{"engine": "compile"}, {"bounded_reads": False}, {"quantize": "int8"},
                                    {"cache_len": 4096}, {"fuse": True}, {"decode_attention": "rope"}])
def test_resume_refuses_a_file_measured_with_other_settings(tmp_path, fake_gpu, change):
    out = tmp_path / "grid.json"
    grid(out)
    kw = {"fuse": False, **{k: v for k, v in change.items() if k != "engine"}}
    with pytest.raises(ValueError, match="--resume: .* was measured with"):
        bench.run(["paper-1.6b"], [1], [1], [64], change.get("engine", "graph"), out, resume=True, **kw)


def test_bad_kernel_settings_are_refused_before_anything_is_measured(tmp_path, fake_gpu):
    measured, _ = fake_gpu
    with pytest.raises(ValueError, match="needs fused projections"):
        grid(tmp_path / "a.json", skinny_layers=True)  # grid() measures unfused
    with pytest.raises(ValueError, match="decode_attention is 'attention' or 'rope'"):
        grid(tmp_path / "b.json", decode_attention="flash")
    assert measured == [] and not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_resume_refuses_a_file_of_another_gpu(tmp_path, fake_gpu):
    _, env = fake_gpu
    out = tmp_path / "grid.json"
    grid(out)
    env["gpu"] = "GPU B"
    with pytest.raises(ValueError, match="gpu 'GPU A'"):
        grid(out, resume=True)


def test_resume_refuses_a_file_that_is_not_a_bench_result(tmp_path, fake_gpu):
    out = tmp_path / "grid.json"
    out.write_text("{not json")
    with pytest.raises(ValueError, match="not a bench JSON file"):
        grid(out, resume=True)


def test_a_point_is_paired_with_the_anchors_of_its_own_process():
    anchor = {"anchor": "gpt-fast", "shape": "paper-1.6b", "batch": 1, "length": 64, "decode_ms_per_token": 2.0}
    point = {"shape": "paper-1.6b", "batch": 1, "length": 64, "decode_ms_per_token": 1.0}
    anchors = [{**anchor, "process": 0}, {**anchor, "process": 1, "decode_ms_per_token": 4.0}]
    assert bench.anchor_ratios({**point, "process": 1}, anchors) == {"gpt-fast": 0.25}
    assert bench.anchor_ratios(point, anchors) == {"gpt-fast": 0.5}  # files without the index: process 0
