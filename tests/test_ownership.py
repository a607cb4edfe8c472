"""The ownership rule (io/ownership.py): parscale removes or replaces only what it can prove it wrote.

Each case here lost a user's files (or kept a stale copy) before the rule was applied by every writer.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model

import parscale
from parscale.cli import main
from parscale.io.ownership import MARKER, foreign_entries, is_owned, record, sweep_stale
from parscale.training.data import DataError, TokenLoader, check_data_folder


@pytest.fixture
def data_copy(data_dir, tmp_path):
    import shutil

    return Path(shutil.copytree(data_dir, tmp_path / "data"))


def train_args(data_dir, out, steps=2, *extra):
    return ["train", "--data", str(data_dir), "--out", str(out), "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "0", "--no-progress", *extra]


def a_dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------
# The marker
def test_a_file_changed_under_the_same_name_is_no_longer_parscales(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    record(tmp_path, ["a.json"])
    assert is_owned(tmp_path, "a.json")
    (tmp_path / "a.json").write_text("[]")  # same size, other bytes
    assert not is_owned(tmp_path, "a.json")
    assert foreign_entries(tmp_path) == ["a.json"]


# ------------------------------------------------------------------------------------------------
# train
def test_a_fresh_run_never_deletes_a_users_folders_of_a_runs_names(data_dir, tmp_path, capsys):
    out = tmp_path / "project"
    for name in ("checkpoints", "tensorboard", "adapter"):
        (out / name).mkdir(parents=True)
        (out / name / "mine.txt").write_text("keep me")
    assert main(train_args(data_dir, out)) == 2
    err = capsys.readouterr().err
    assert "which parscale did not write" in err and "checkpoints, adapter, tensorboard" in err
    assert main(train_args(data_dir, out, 2, "--overwrite")) == 2  # --overwrite never removes them either
    for name in ("checkpoints", "tensorboard", "adapter"):
        assert (out / name / "mine.txt").read_text() == "keep me"


def test_a_fresh_run_beside_a_users_files_keeps_them_and_its_own_rerun_needs_overwrite(data_dir, tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert main(train_args(data_dir, out)) == 0
    assert main(train_args(data_dir, out)) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(train_args(data_dir, out, 2, "--overwrite")) == 0
    assert (out / "notes.md").read_text() == "mine"


def test_a_run_killed_before_its_first_checkpoint_starts_over_without_overwrite(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(data_dir, out)) == 0
    # what a kill -9 before the first save leaves: metrics lines, no checkpoint
    import shutil

    shutil.rmtree(out / "checkpoints")
    from parscale.io.ownership import forget

    forget(out, ["checkpoints"])
    assert (out / "metrics.jsonl").stat().st_size > 0
    assert main(train_args(data_dir, out, 2, "--resume")) == 2
    assert "starts over without --resume" in capsys.readouterr().err
    assert main(train_args(data_dir, out)) == 0
    assert "stopped before its first checkpoint; starting it over" in capsys.readouterr().err


def test_a_symlinked_run_folder_is_written_through(data_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(train_args(data_dir, link)) == 0
    assert link.is_symlink() and (real / "checkpoints" / "latest").is_symlink()


# ------------------------------------------------------------------------------------------------
# new / convert / save
@pytest.mark.parametrize("name", ["chat_template.jinja", "generation_config.json"])
def test_new_never_deletes_a_users_file_of_a_model_folders_name(tmp_path, capsys, name):
    out = tmp_path / "m"
    out.mkdir()
    (out / name).write_text("mine")
    assert main(["new", "--preset", "tiny", "--out", str(out)]) == 2
    assert f"holds files parscale did not write ({name})" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [name]
    assert (out / name).read_text() == "mine"


def test_new_with_overwrite_refuses_to_replace_a_users_file_it_would_write(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["new", "--preset", "tiny", "--out", str(out)]) == 0
    (out / "generation_config.json").write_text('{"mine": true}')  # the user's own edit
    assert main(["new", "--preset", "tiny", "--out", str(out), "--overwrite"]) == 2
    assert "generation_config.json, which parscale did not write (or which changed since)" in capsys.readouterr().err
    assert json.loads((out / "generation_config.json").read_text()) == {"mine": True}


def test_new_does_not_replace_a_trained_model_without_overwrite(tmp_path, capsys):
    out = tmp_path / "trained"
    parscale.save(tiny_model(streams=2, seed=3), out)
    before = (out / "model.safetensors").read_bytes()
    assert main(["new", "--preset", "tiny", "--out", str(out)]) == 2
    assert "already holds parscale's output" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


def test_a_symlinked_model_folder_is_written_through_not_replaced(tmp_path):
    real = tmp_path / "models" / "v1"
    parscale.save(tiny_model(streams=2), real)
    link = tmp_path / "current"
    link.symlink_to(real)
    parscale.save(tiny_model(streams=4), link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert parscale.load(real).config.parscale_n == 4  # the folder the user looks in has the new model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "models"]  # no .current.old-* left
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["v1"]


def test_a_folder_written_before_the_marker_counts_as_the_users(tmp_path, capsys):
    out = tmp_path / "old"
    parscale.save(tiny_model(streams=2), out)
    (out / MARKER).unlink()
    with pytest.raises(ValueError, match="did not write"):
        parscale.save(tiny_model(streams=2), out, overwrite=True)


# ------------------------------------------------------------------------------------------------
# Stale temporary folders of a killed process
def test_a_rerun_sweeps_the_temporary_folders_a_killed_process_left(tmp_path, capsys):
    target = tmp_path / "m"
    dead = a_dead_pid()
    stale = tmp_path / f".m.tmp-{dead}-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    (stale / MARKER).write_text(json.dumps({"written_by": "parscale", "entries": {},
                                            "temporary": {"pid": dead, "host": os.uname().nodename}}))
    old = tmp_path / f".m.old-{dead}-efgh"
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"written_by": "parscale", "entries": {}}))
    live = tmp_path / f".m.tmp-{os.getpid()}-live"  # a write under way in a running process
    live.mkdir()
    (live / MARKER).write_text(json.dumps({"written_by": "parscale", "entries": {}}))
    users = tmp_path / f".m.tmp-{dead}-mine"  # the user's own folder of that shape: no marker
    users.mkdir()
    assert main(["new", "--preset", "tiny", "--out", str(target)]) == 0
    assert "removed" in capsys.readouterr().err
    assert not stale.exists() and not old.exists()
    assert live.exists() and users.exists()
    assert sweep_stale(target) == []


def test_a_killed_data_build_leaves_nothing_a_rerun_does_not_sweep(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}.txt").write_text(f"text {i} " * 200)
    code = ("import os, sys, parscale.training.data as d\n"
            "real = d.atomic_write\n"
            "def die(path, data):\n"
            "    if str(path).endswith('manifest.json'): os._exit(9)\n"
            "    return real(path, data)\n"
            "d.atomic_write = die\n"
            "from parscale.cli import main\n"
            f"main(['data', {str(src)!r}, '--vocab-size', '300', '--out', {str(tmp_path / 'd')!r}])\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 9
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".d.tmp-")]  # the kill left one behind
    assert main(["data", str(src), "--vocab-size", "300", "--out", str(tmp_path / "d")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "src"]


# ------------------------------------------------------------------------------------------------
# data: shards hashed
def test_a_shard_rewritten_at_the_same_size_is_refused(data_copy, capsys):
    tokens = np.memmap(data_copy / "train.bin", dtype=np.uint16, mode="r+")
    tokens[:8] = tokens[8:16].copy()  # other ids, all inside the vocabulary, same size
    tokens.flush()
    with pytest.raises(DataError, match="not the shard the manifest describes"):
        TokenLoader(data_copy, "train", 1, 8)
    assert main(["verify-data", str(data_copy)]) == 2
    assert "its sha256 differs" in capsys.readouterr().err


def test_verify_data_checks_the_whole_shard(data_copy, capsys):
    tokens = np.memmap(data_copy / "train.bin", dtype=np.uint16, mode="r+")
    if tokens.nbytes <= 2 * 2**20:  # a small shard: the quick check covers it all, so no middle to change
        check_data_folder(data_copy)
    assert main(["verify-data", str(data_copy)]) == 0
    assert "shards (sha256)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# corpus
def test_corpus_refuses_a_folder_and_a_users_file_before_the_work(tmp_path, capsys):
    stdlib = tmp_path / "lib"
    stdlib.mkdir()
    (stdlib / "m.py").write_text("def f(x):\n    return x + 1\n" * 5)
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["corpus", "--stdlib", str(stdlib), "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    users = tmp_path / "notes.jsonl"
    users.write_text('{"text": "mine"}\n')
    assert main(["corpus", "--stdlib", str(stdlib), "--out", str(users)]) == 2
    assert "not a corpus parscale wrote" in capsys.readouterr().err
    assert users.read_text() == '{"text": "mine"}\n'
    ours = tmp_path / "c.jsonl"
    assert main(["corpus", "--stdlib", str(stdlib), "--out", str(ours)]) == 0
    assert main(["corpus", "--stdlib", str(stdlib), "--out", str(ours)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["corpus", "--stdlib", str(stdlib), "--out", str(ours), "--overwrite"]) == 0
    Path(ours).write_text(Path(ours).read_text() + "\n")  # edited by the user: no longer the manifest's
    assert main(["corpus", "--stdlib", str(stdlib), "--out", str(ours), "--overwrite"]) == 2
