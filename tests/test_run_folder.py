"""Run folders: versioned checkpoints that survive a kill at any point, honest resume, no lost or foreign files."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import _cfg, _losses

import parscale
from parscale.io.files import FolderInUseError, RunLock
from parscale.training.run_folder import latest_checkpoint
from parscale.training.train import lr_factor, train


def _steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_crash_logs_every_step_once(data_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data_dir, out, save_every=4), stop_after=6)  # checkpoint at 4, metrics up to 6, then "crash"
    assert latest_checkpoint(out).name == "step-00000006"
    # Simulate the crash between the step-4 checkpoint and the end: metrics ran ahead of the checkpoint.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000006")
    (out / "checkpoints" / "latest").unlink()
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    train(_cfg(data_dir, out, save_every=4), resume=True)
    assert _steps(out) == list(range(1, 13))
    train(_cfg(data_dir, tmp_path / "full"))
    assert _losses(out) == _losses(tmp_path / "full")


def test_checkpoints_are_versioned_and_pruned(data_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data_dir, out, save_every=2, keep_checkpoints=2))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step-00000010", "step-00000012"]
    assert os.readlink(out / "checkpoints" / "latest") == "step-00000012"


def test_resume_refuses_a_changed_setup(data_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data_dir, out, streams=2), stop_after=3)
    with pytest.raises(ValueError, match="streams: checkpoint 2, now 4"):
        train(_cfg(data_dir, out, streams=4), resume=True)
    with pytest.raises(ValueError, match="lr: checkpoint 0.003, now 0.1"):
        train(_cfg(data_dir, out, lr=0.1), resume=True)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(_cfg(data_dir, tmp_path / "typo"), resume=True)
    assert not (tmp_path / "typo").exists() or not any((tmp_path / "typo").glob("checkpoints/*"))
    assert _steps(out) == [1, 2, 3]  # nothing was emptied by the refused attempts


def test_cli_resume_takes_the_saved_settings(data_dir, tmp_path, capsys):
    from parscale.cli import main

    out = tmp_path / "run"
    base = ["train", "--model", "tiny", "--streams", "2", "--n-tokens", "4", "--data", str(data_dir), "--batch-size",
            "4", "--seq-len", "32", "--eval-every", "0", "--save-every", "2", "--steps", "4", "--out", str(out)]
    assert main(base) == 0
    assert main(["train", "--out", str(out), "--resume", "--streams", "4"]) == 2
    assert "streams: checkpoint 2, now 4" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--steps", "6"]) == 0  # only --steps given
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    assert main(base) == 2  # a fresh run into a folder holding one is refused ...
    assert "already holds a training run" in capsys.readouterr().err
    assert main([*base, "--overwrite"]) == 0  # ... unless asked
    assert _steps(out) == [1, 2, 3, 4]


def test_a_second_writer_is_locked_out(data_dir, tmp_path):
    out = tmp_path / "run"
    with RunLock(out), pytest.raises(FolderInUseError, match="being written by process"):
        train(_cfg(data_dir, out, steps=2))


def test_logged_lr_is_the_rate_the_step_used(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path / "run", steps=6, warmup=3)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([cfg.lr * lr_factor(cfg, s) for s in range(6)])


FAULT_SCRIPT = textwrap.dedent("""
    import os, shutil, sys, tempfile, pathlib
    import torch, safetensors.torch
    import parscale.model.checkpoint, parscale.io.files, parscale.training.run_folder, parscale.training.train as T
    kill_at, counter, inside = int(sys.argv[1]), [0], [False]

    def faulty(fn):
        def wrapped(*a, **k):
            if inside[0]:
                if counter[0] == kill_at:
                    os._exit(9)  # like kill -9: no cleanup, no finally
                counter[0] += 1
            return fn(*a, **k)
        return wrapped

    os.replace = faulty(os.replace); os.symlink = faulty(os.symlink); os.rmdir = faulty(os.rmdir)
    shutil.rmtree = faulty(shutil.rmtree); shutil.copy2 = faulty(shutil.copy2)
    torch.save = faulty(torch.save); tempfile.mkdtemp = faulty(tempfile.mkdtemp)
    parscale.model.checkpoint.save_file = faulty(parscale.model.checkpoint.save_file)
    pathlib.Path.write_text = faulty(pathlib.Path.write_text); pathlib.Path.unlink = faulty(pathlib.Path.unlink)
    real_save = T.save_checkpoint

    def save_checkpoint(out, *a, **k):
        inside[0] = a[4] == 4  # inject into the second save only (step 4); the first one (step 2) completes
        try:
            return real_save(out, *a, **k)
        finally:
            inside[0] = False

    T.save_checkpoint = save_checkpoint
    cfg = T.TrainConfig(model="tiny", streams=2, n_tokens=4, data=sys.argv[2], out=sys.argv[3], steps=6,
                        batch_size=4, seq_len=32, warmup=3, eval_every=0, save_every=2, keep_checkpoints=1,
                        progress=False)
    T.train(cfg)
    print("calls", counter[0])
""")


def test_a_kill_at_any_point_of_a_save_leaves_a_loadable_latest_checkpoint(data_dir, tmp_path):
    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(kill_at, out):
        return subprocess.run([sys.executable, str(script), str(kill_at), str(data_dir), str(out)], env=env,
                              capture_output=True, text=True, timeout=300)

    clean = run(10**6, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    n_calls = int(clean.stdout.split("calls")[-1])
    assert n_calls >= 8  # every mutating call of one save is an injection point
    for k in range(n_calls):
        out = tmp_path / f"kill{k}"
        killed = run(k, out)
        assert killed.returncode == 9, (k, killed.stderr[-2000:])
        ckpt = latest_checkpoint(out)
        assert ckpt is not None and ckpt.name in ("step-00000002", "step-00000004"), k
        parscale.load(out)  # loadable
        train(_cfg(data_dir, out, steps=6, warmup=3, eval_every=0, save_every=2, keep_checkpoints=1,
                   lr=3e-3), resume=True)
        assert _steps(out) == [1, 2, 3, 4, 5, 6], k
        assert _losses(out) == pytest.approx(_losses(tmp_path / "clean"), abs=0), k
        assert not list((out / "checkpoints").glob(".*")), k  # leftovers of the killed save were cleaned
    assert torch.equal(parscale.load(tmp_path / "clean").lm_head.weight, parscale.load(out).lm_head.weight)


def test_bad_settings_fail_before_any_work(data_dir, tmp_path, capsys):
    from parscale.cli import main

    base = ["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--batch-size", "2", "--seq-len", "16"]
    for flags, message in ((["--steps", "0"], "steps must be > 0"), (["--grad-accum", "0"], "grad_accum must be > 0"),
                           (["--batch-size", "0"], "batch_size must be > 0"),
                           (["--eval-every", "-1"], "eval_every must be >= 0"),
                           (["--grad-clip", "-1"], "grad_clip must be >= 0"), (["--grad-clip", "nan"], "grad_clip"),
                           (["--lr", "inf"], "lr must be > 0 and finite"), (["--seed", "-1"], "seed must be >= 0"),
                           (["--streams", "2", "--parscale-lr-mult", "nan"], "parscale_lr_mult"),
                           (["--streams", "2", "--prefix-reparam", "--reparam-latent", "0"], "reparam_latent must be"),
                           (["--schedule", "linear"], "schedule must be 'cosine' or 'wsd'"),
                           (["--seq-len", "600", "--batch-size", "1"], "exceeds the model's 512 positions")):
        assert main(base + flags) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "r" / "checkpoints").exists()
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda", "--steps", "1"]) == 2
        assert "has no CUDA GPU" in capsys.readouterr().err


def test_tensorboard_missing_is_refused_before_the_run_folder_is_made(data_dir, tmp_path, monkeypatch, capsys):
    import importlib.util

    from parscale.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--steps", "1", "--batch-size", "2",
                 "--seq-len", "16", "--tensorboard"]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
