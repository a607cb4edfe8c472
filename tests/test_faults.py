"""Faults and bad input: preemption, damaged data and checkpoints, bad arguments, write failures.

Every case here failed before it was fixed (a traceback, a silent wrong result, or lost work). Commands
run as a user runs them (`python -m parscale.cli` in a subprocess) where signals, exit codes, pipes,
umask or file-size limits are what is tested.
"""

import json
import os
import random
import resource
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import parscale
from parscale.cli import main
from parscale.training.data import DataError, TokenLoader, build_shards
from parscale.training.tokenizer import byte_tokenizer

CLI = [sys.executable, "-m", "parscale.cli"]


def run_cli(args, **kw):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)


def text_folder(folder: Path, count: int, words: str, repeat: int) -> Path:
    """count small text files f0.txt ... holding f"{words} {i} " repeated."""
    folder.mkdir()
    for i in range(count):
        (folder / f"f{i}.txt").write_text(f"{words} {i} " * repeat)
    return folder


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_args(data_dir, out, steps):
    return ["train", "--data", data_dir, "--out", out, "--steps", steps, "--batch-size", 2, "--seq-len", 16,
            "--streams", 2, "--eval-every", 0, "--save-every", 10_000, "--no-progress"]


# ------------------------------------------------------------------------------------------------
# Preemption
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_resuming_equals_an_uninterrupted_run(data_dir, tmp_path, sig):
    steps = 300
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([str(a) for a in train_args(data_dir, whole, steps)]) == 0
    at = random.Random(int(sig)).randint(5, 60)  # the step after which the signal is sent
    proc = subprocess.Popen(CLI + [str(a) for a in train_args(data_dir, cut, steps)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= at):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + int(sig), err
    stopped = len(losses(cut))
    assert at <= stopped < steps
    assert f"stopped after step {stopped}" in err and "--resume" in err and "Traceback" not in err
    assert (cut / "checkpoints" / "latest" / "model" / "config.json").is_file()  # no step was lost
    assert main(["train", "--out", str(cut), "--resume", "--no-progress"]) == 0
    assert losses(cut) == losses(whole)  # bit-identical on the CPU


def test_divergence_without_a_checkpoint_is_one_error_line(data_dir, tmp_path, capsys):
    code = main([str(a) for a in train_args(data_dir, tmp_path / "r", 5)] + ["--lr", "1e30", "--grad-clip", "1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: loss became")
    assert "no checkpoint was written before it" in err[0]


# ------------------------------------------------------------------------------------------------
# Data checked against its manifest
@pytest.fixture()
def data_copy(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


def test_truncated_shard_is_named(data_copy):
    shard = data_copy / "train.bin"
    os.truncate(shard, shard.stat().st_size // 4 * 2)  # an even size: still whole uint16 ids
    with pytest.raises(DataError, match="train.bin holds .* bytes but the manifest says"):
        TokenLoader(data_copy, "train", 2, 16)


def test_ids_outside_the_vocabulary_are_found_before_training(data_copy):
    tokens = np.memmap(data_copy / "train.bin", dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = 9999
    tokens.flush()
    vocab = json.loads((data_copy / "manifest.json").read_text())["vocab_size"]
    with pytest.raises(DataError, match=f"train.bin holds token id 9999, outside the manifest's vocabulary of {vocab}"):
        TokenLoader(data_copy, "train", 2, 16)


def test_a_swapped_tokenizer_is_refused(data_copy, tmp_path):
    byte_tokenizer().save(str(data_copy / "tokenizer.json"))
    with pytest.raises(DataError, match="not the tokenizer the shards were made with"):
        TokenLoader(data_copy, "train", 2, 16)
    assert main(["train", "--data", str(data_copy), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_an_edited_source_is_noticed(tmp_path, capsys):
    src = text_folder(tmp_path / "src", 6, "document", 200)
    build_shards([src], tmp_path / "d", byte_tokenizer(), val_fraction=0.3, progress=False)
    assert main(["verify-data", str(tmp_path / "d")]) == 0
    (src / "f2.txt").write_text("edited")
    assert main(["verify-data", str(tmp_path / "d")]) == 2
    assert "1 source files changed" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--steps", "1",
                 "--batch-size", "1", "--seq-len", "16", "--no-progress"]) == 0
    assert "source files changed" in capsys.readouterr().err


def test_an_interrupted_rebuild_keeps_the_previous_data_folder(tmp_path, monkeypatch):
    import parscale.training.data as data

    src = text_folder(tmp_path / "src", 6, "document", 50)
    out = tmp_path / "d"
    before = build_shards([src], out, byte_tokenizer(), val_fraction=0.3, progress=False)
    files_before = {p.name: p.read_bytes() for p in out.iterdir()}
    (src / "f9.txt").write_text("new text " * 300)
    real = data.atomic_write

    def dies_on_manifest(path, payload):
        if Path(path).name == "manifest.json":
            raise KeyboardInterrupt  # the user's Ctrl-C between the shards and the manifest
        return real(path, payload)

    monkeypatch.setattr(data, "atomic_write", dies_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        build_shards([src], out, byte_tokenizer(), val_fraction=0.3, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files_before  # shards and manifest still agree
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written folder left
    assert TokenLoader(out, "train", 1, 8).manifest == before


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path):
    src = text_folder(tmp_path / "src", 5, "text", 100)
    (src / "blob.txt").write_bytes(bytes(range(256)) * 800)  # 200 KB of binary data named .txt
    (src / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    m = build_shards([src], tmp_path / "d", byte_tokenizer(), val_fraction=0.3, progress=False)
    assert m["skipped_files"] == 2
    assert {Path(s["path"]).name: s["reason"].split()[0] for s in m["skipped"]} == {"blob.txt": "binary",
                                                                                   "latin1.txt": "not"}
    assert m["train_tokens"] + m["val_tokens"] < 5 * 900  # the binary file did not become training text
    assert main(["data", str(src), "--out", str(tmp_path / "d2"), "--tokenizer", str(tmp_path / "d")]) == 0


def test_jsonl_errors_name_file_line_and_expectation(tmp_path, capsys):
    byte_tokenizer().save(str(tmp_path / "tok.json"))
    cases = [('{"text": "a", "split": "train"}\n\n{"text": 3, "split": "train"}\n',
              "rows.jsonl, line 3: field 'text' must be a string, got int"),
             ('{"text": "a", "split": "train"}\n{bad\n', "rows.jsonl, line 2: not valid JSON"),
             ('{"text": "' + "x" * 5000 + '", "split": "' + "y" * 5000 + '"}\n', "line 1: field 'split' is")]
    for body, message in cases:
        (tmp_path / "rows.jsonl").write_text(body)
        assert main(["data", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "d"), "--split-field", "split",
                     "--tokenizer", str(tmp_path / "tok.json")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err) < 400 and err.count("\n") == 1, err  # not the whole document


# ------------------------------------------------------------------------------------------------
# Arguments checked before any work
def test_eval_arguments_are_checked_before_evaluating(checkpoint_dir, tmp_path, capsys, monkeypatch):
    import parscale.analysis.evaluate as evaluate

    def no_scoring(*args, **kwargs):
        raise AssertionError("a window was scored before the arguments were checked")

    monkeypatch.setattr(evaluate, "score_windows", no_scoring)
    (tmp_path / "t.txt").write_text("some text to score " * 50)
    (tmp_path / "afile").write_text("")
    base = ["eval", "--model", str(checkpoint_dir), "--data", str(tmp_path / "t.txt")]
    for flags, message in ((["--batch-size", "-1"], "batch_size must be >= 1"),
                           (["--batch-size", "0"], "batch_size must be >= 1"),
                           (["--stride", "0"], "stride must be in [1, max_length - 1"),
                           (["--max-length", "0"], "max_length must be in [2, 512]"),
                           (["--max-length", "1"], "max_length must be in [2, 512]"),
                           (["--max-length", "100000"], "max_length must be in [2, 512]"),
                           (["--out", str(tmp_path)], "is a folder, not a file"),
                           (["--out", str(tmp_path / "afile" / "r.json")], "is not a folder")):
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert message in err, (flags, err)


def test_corpus_rejects_a_val_fraction_outside_0_1(tmp_path, capsys):
    assert main(["corpus", str(tmp_path), "--out", str(tmp_path / "c.jsonl"), "--val-fraction", "2"]) == 2
    assert "val_fraction" in capsys.readouterr().err
    assert not (tmp_path / "c.jsonl").exists()


def test_data_refuses_settings_it_cannot_honour_before_any_work(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello world, some text to tokenise\n")
    base = ["data", str(tmp_path / "src"), "--out", str(tmp_path / "d")]
    for flags, message in ((["--vocab-size", "0"], "at least 257 (the 256 bytes and <|endoftext|>), got 0"),
                           (["--vocab-size", "256"], "at least 257"), (["--val-fraction", "1"], "--val-fraction"),
                           (["--bpe-sample", "0"], "--bpe-sample")):
        assert main(base + flags) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert not (tmp_path / "d").exists()
    assert main(base + ["--vocab-size", "257"]) == 0  # the smallest: bytes and the end-of-text token


def test_generate_arguments(checkpoint_dir, capsys):
    base = ["generate", "--model", str(checkpoint_dir), "--max-new-tokens", "3"]
    for flags, message in ((["--prompt", ""], "the prompt is empty"),
                           (["--prompt", "ab", "--temperature", "-1"], "temperature must be"),
                           (["--prompt", "ab", "--temperature", "nan"], "temperature must be"),
                           (["--prompt", "ab", "--temperature", "1", "--top-k", "-2"], "top_k must be")):
        assert main(base + flags) == 2, flags
        assert message in capsys.readouterr().err, flags
    # Bytes that are not UTF-8 reach Python as surrogates; the tokenizer used to raise a TypeError.
    proc = subprocess.run(CLI + ["generate", "--model", str(checkpoint_dir), "--prompt"] + [b"\xff\xfe".decode(
        "utf-8", "surrogateescape")], capture_output=True, text=True, errors="replace", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: the prompt is not valid UTF-8 text"


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints and configs: one error line naming the file
@pytest.fixture()
def checkpoint_dir(tmp_path):
    out = tmp_path / "model"
    assert main(["new", "--preset", "tiny", "--streams", "2", "--out", str(out)]) == 0
    return out


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _truncate(folder, keep):
    f = folder / "model.safetensors"
    os.truncate(f, keep(f.stat().st_size))


def _bad_header(folder):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    f.write_bytes(data[:8] + b"{" * n + data[8 + n :])


def _int_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


DAMAGE = {
    "half": (lambda f: _truncate(f, lambda n: n // 2), "model.safetensors is truncated"),
    "four bytes": (lambda f: _truncate(f, lambda n: 4), "is not a safetensors file (only 4 bytes)"),
    "empty": (lambda f: _truncate(f, lambda n: 0), "is not a safetensors file (only 0 bytes)"),
    "bad header": (_bad_header, "corrupt safetensors header"),
    "integer tensor": (_int_tensor, "every weight must be a floating-point tensor; model.norm.weight"),
    "config a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    "size as string": (lambda f: _edit_config(f, hidden_size="64"), "hidden_size must be an integer, got '64'"),
    "zero kv heads": (lambda f: _edit_config(f, num_key_value_heads=0), "num_key_value_heads must be >= 1"),
    "non-UTF-8 config": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"), "config.json is not UTF-8"),
    "garbage tokenizer": (lambda f: (f / "tokenizer.json").write_text("garbage{"),
                          "tokenizer.json is not a tokenizer.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_folder_is_one_error_line_naming_the_file(checkpoint_dir, damage, capsys):
    spoil, message = DAMAGE[damage]
    spoil(checkpoint_dir)
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "ab", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert str(checkpoint_dir) in err


def _minimal(model_type, **keys):
    return {"model_type": model_type, "hidden_size": 256, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 32, "vocab_size": 256, **keys}


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "qwen3"])
def test_missing_config_keys_take_the_familys_defaults(model_type):
    """The oracle is transformers' own configuration class, given the same incomplete config.json."""
    import transformers

    hf_class = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
                "qwen3": transformers.Qwen3Config}[model_type]
    keys = _minimal(model_type)
    ours = parscale.ModelConfig.from_hf_dict(keys)
    theirs = hf_class(**{k: v for k, v in keys.items() if k != "model_type"})
    if model_type == "llama":  # LlamaConfig: one KV head per head; the Qwen classes: 32 whatever the heads
        sixteen = {k: v for k, v in _minimal(model_type, num_attention_heads=16).items() if k != "model_type"}
        assert parscale.ModelConfig.from_hf_dict(_minimal(model_type, num_attention_heads=16)).num_key_value_heads \
            == hf_class(**sixteen).num_key_value_heads == 16
    for name in ("max_position_embeddings", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                 "initializer_range"):
        assert getattr(ours, name) == getattr(theirs, name), name
    theta = getattr(theirs, "rope_theta", None) or theirs.rope_parameters["rope_theta"]
    assert ours.rope_theta == theta
    expected_head_dim = getattr(theirs, "head_dim", None) or keys["hidden_size"] // keys["num_attention_heads"]
    assert ours.head_dim == expected_head_dim  # qwen3's class defaults to 128, not hidden / heads
    if model_type != "qwen2":
        assert ours.attention_bias == theirs.attention_bias


def test_missing_parscale_keys_take_the_official_defaults():
    """The official Qwen2ParScaleConfig: parscale_n 1, n_tokens 48, smoothing 0.01, 32768 positions, untied."""
    cfg = parscale.ModelConfig.from_hf_dict(_minimal("qwen2_parscale", parscale_n=2))
    assert (cfg.parscale_n_tokens, cfg.parscale_attn_smooth, cfg.max_position_embeddings,
            cfg.tie_word_embeddings, cfg.num_key_value_heads) == (48, 0.01, 32768, False, 32)
    assert parscale.ModelConfig.from_hf_dict(_minimal("qwen2_parscale")).parscale_n == 1


# ------------------------------------------------------------------------------------------------
# Conventions: exit codes, pipes, permissions, write failures
def test_a_closed_pipe_exits_quietly(checkpoint_dir):
    proc = subprocess.Popen(CLI + ["info", "--model", str(checkpoint_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # what `| head -0` does
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_users_umask(tmp_path):
    src = text_folder(tmp_path / "src", 4, "some text", 100)

    def umask_022():
        os.umask(0o022)

    for args in (["new", "--preset", "tiny", "--out", tmp_path / "m"],
                 ["data", src, "--out", tmp_path / "d", "--vocab-size", "300"],
                 ["eval", "--model", tmp_path / "m", "--data", src, "--glob", "*.txt", "--out", tmp_path / "e.json"]):
        proc = run_cli(args, preexec_fn=umask_022)
        assert proc.returncode == 0, proc.stderr
    for folder in (tmp_path / "m", tmp_path / "d"):
        assert _mode(folder) == 0o755, folder
        for f in folder.iterdir():
            assert _mode(f) == 0o644, f
    assert _mode(tmp_path / "e.json") == 0o644


@pytest.mark.parametrize("command", ["new", "data"])
def test_a_write_failure_leaves_nothing_half_written(tmp_path, command):
    src = text_folder(tmp_path / "src", 4, "some text", 3000)
    out = tmp_path / "out"
    args = (["new", "--preset", "tiny", "--out", out] if command == "new"
            else ["data", src, "--out", out, "--vocab-size", "300"])

    def small_file_limit():  # Python ignores SIGXFSZ, so a write past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = run_cli(args, preexec_fn=small_file_limit)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
    assert "File too large" in proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
