"""The `parscale` command end to end on tiny models."""

import json
from pathlib import Path

import pytest
from conftest import FIXTURES

from parscale.cli import main


def test_new_info_generate_convert(tmp_path, capsys):
    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["info", "--model", str(tmp_path / "m"), "--json", "--batch", "2", "--length", "10"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["parscale_n"] == 1 and info["params_parscale"] == 0
    # the stored dtype and size apart from the runtime dtype the sizes below are computed in
    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "m32"), "--dtype", "float32"]) == 0
    assert main(["info", "--model", str(tmp_path / "m32"), "--json"]) == 0
    info32 = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert (info32["stored_dtype"], info32["runtime_dtype"]) == ("float32", "bfloat16")
    assert info32["stored_bytes"] > 2 * info32["weights_bytes"] - 4096  # fp32 on disk, bf16 at runtime
    assert main(["convert", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "c"), "--streams", "4",
                 "--n-tokens", "8"]) == 0
    assert main(["info", "--model", str(tmp_path / "c"), "--json", "--batch", "2", "--length", "10"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["parscale_n"] == 4 and info["params_parscale"] > 0
    # 2 (K,V) * 2 layers * 4 streams * 2 batch * 2 kv heads * (8 + 10) slots * 16 dims * 2 bytes
    assert info["kv_cache_bytes"] == 2 * 2 * 4 * 2 * 2 * 18 * 16 * 2
    assert (tmp_path / "c" / "tokenizer.json").is_file()
    # the default length is the model's 512 positions (fewer than 2048); a cache it cannot use is refused
    assert main(["info", "--model", str(tmp_path / "c"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["length"] == 512
    for flags, message in ((["--length", "513"], "between 1 and the model's 512 positions"),
                           (["--length", "-5"], "between 1 and"), (["--batch", "0"], "--batch must be at least 1")):
        assert main(["info", "--model", str(tmp_path / "c"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "c"), "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("abc")
    # the engine's padded prefill (on CPU too, when asked for) writes the same text
    assert main(["generate", "--model", str(tmp_path / "c"), "--prompt", "abc", "--max-new-tokens", "5",
                 "--padded-prefill"]) == 0
    assert capsys.readouterr().out == text


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err
    assert main(["convert", "--model", str(FIXTURES / "official_p2"), "--out", str(tmp_path / "x"),
                 "--streams", "2"]) == 2
    assert "already has parscale_n=2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # converting into the source folder would replace the user's P = 1 model: only with --overwrite
    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "p1")]) == 0
    before = (tmp_path / "p1" / "model.safetensors").read_bytes()
    assert main(["convert", "--model", str(tmp_path / "p1"), "--out", str(tmp_path / "p1"), "--streams", "2"]) == 2
    assert "is the source model's folder" in capsys.readouterr().err
    assert (tmp_path / "p1" / "model.safetensors").read_bytes() == before
    # a request generate refuses prints its error alone, not the prompt first
    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "abc", "--max-new-tokens", "600"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error:") and "exceeds the model's 512 positions" in err
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "abc", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "abc"  # nothing new: the prompt alone


def test_demo_data_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--corpus-mb", "1", "--vocab-size", "400"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"P=1", "P=4"}
    assert all(r["val_loss"] > 0 and r["tokens"] == 3 * 16 * 128 for r in report["runs"].values())
    assert (out / "loss.png").stat().st_size > 5_000
    # the README's examples that use the demo's outputs name folders the demo writes
    import re

    root = Path(__file__).parent.parent  # the README and the docs it links to (the results log is history)
    readme = "\n".join(f.read_text() for f in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
                        if f.name != "LOG.md")
    paths = set(re.findall(r"runs/demo(/[\w/.]*\w)?", readme))
    models = set(re.findall(r"(?:pretrained=|--model )runs/demo(/[\w/.]*\w)?", readme))
    assert paths and models, "the README no longer uses the demo's outputs: drop this check"
    assert all((out / sub.lstrip("/")).exists() for sub in paths), paths
    from parscale.model.checkpoint import read_config

    for sub in models:  # each names a model (or a run folder holding one), as --model and pretrained= take it
        read_config(out / sub.lstrip("/"))
    # the CLI pieces on their own: data from the demo corpus with its tokenizer, then a resumed run
    assert main(["data", str(out / "corpus"), "--glob", "*.py", "--out", str(tmp_path / "d"),
                 "--tokenizer", str(out / "data")]) == 0
    args = ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "t"), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--streams", "2", "--n-tokens", "4"]
    assert main(args) == 0
    assert main(args[:-6] + ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--resume"]) == 0
    assert len((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()) == 3


def test_demo_checks_its_arguments_before_writing(tmp_path, capsys):
    for flags, message in ((["--steps", "0"], "--steps and --corpus-mb must be at least 1"),
                           (["--corpus-mb", "0"], "--steps and --corpus-mb must be at least 1"),
                           (["--vocab-size", "100"], "at least 257")):
        assert main(["demo", "--out", str(tmp_path / "d"), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert not (tmp_path / "d").exists(), flags


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "corpus").mkdir()
    (tmp_path / "mine" / "corpus" / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--steps", "1"]) == 2
    assert "holds files parscale did not write (corpus)" in capsys.readouterr().err
    assert (tmp_path / "mine" / "corpus" / "precious.txt").read_text() == "keep me"


def test_every_command_has_help(capsys):
    from parscale.cli import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--no-compile" in text and "Peak learning rate of AdamW" in text and "--keep-checkpoints" in text


def test_every_option_of_every_command_has_help_and_shows_its_default_once():
    import argparse

    from parscale.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare, twice = [], []
    for name, parser in sub.choices.items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                bare.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        # a default printed twice ("(default: x). (default: None)") reads as a contradiction
        twice += [f"{name}: {line.strip()}" for line in text.split("\n  -") if line.lower().count("default") > 1]
    assert not bare, f"options without help: {bare}"
    assert not twice, twice


def test_convert_writes_a_backbone_with_its_adapter_as_one_model(tmp_path, capsys):
    """`convert --adapter`: the P-stream model the adapter makes, whole (weights, tokenizer, generation config),
    scoring as the adapter on its backbone does; flags that would make other streams are refused by name."""
    import torch
    from conftest import tiny_model

    import parscale
    from parscale.model.convert import add_streams
    from parscale.training.adapter import load_adapter, save_adapter
    from parscale.training.tokenizer import byte_tokenizer

    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    base = tiny_model(streams=1)
    parscale.save(base, tmp_path / "base", tokenizer_from=tmp_path)
    (tmp_path / "base" / "generation_config.json").write_text('{"eos_token_id": [1, 2], "temperature": 0.6}')
    save_adapter(add_streams(base, 3, n_tokens=4), tmp_path / "adapter")
    assert main(["convert", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "whole")]) == 0
    whole = parscale.load(tmp_path / "whole")
    through = load_adapter(parscale.load(tmp_path / "base"), tmp_path / "adapter")
    ids = torch.randint(0, whole.config.vocab_size, (2, 9))
    assert whole.config.parscale_n == 3
    assert torch.equal(whole(ids), through(ids))
    assert whole.generation_config["eos_token_id"] == [1, 2]
    assert (tmp_path / "whole" / "tokenizer.json").is_file()
    # A flag given at its default value is refused too: the adapter's own value would silently replace it.
    for extra, named in ((["--streams", "2"], "--streams"), (["--prefix-init", "backbone"], "--prefix-init"),
                         (["--n-tokens", "8"], "--n-tokens"), (["--n-tokens", "48"], "--n-tokens"),
                         (["--seed", "0"], "--seed"), (["--smooth", "0.1"], "--smooth"),
                         (["--prefix-init", "random"], "--prefix-init")):
        assert main(["convert", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "other"), *extra]) == 2
        assert f"drop {named}" in capsys.readouterr().err
    assert main(["convert", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "base")]) == 2
    assert "the backbone's folder" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
