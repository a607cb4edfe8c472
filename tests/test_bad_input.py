"""Silently wrong results and tracebacks found by a fault probe: each is now right, or one `error:` line.

Every case here failed before its fix (a wrong number with exit 0, or a traceback where the README
promises one error line naming the setting or file).
"""

import io
import json
import shutil
import sys

import pytest
import torch
from conftest import tiny_model

import parscale
from parscale.cli import main


def train_args(data_dir, out, steps=4, *extra):
    return ["train", "--data", str(data_dir), "--out", str(out), "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "0", "--no-progress", *extra]


def one_error_line(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


# ------------------------------------------------------------------------------------------------
# Silently wrong
@pytest.mark.parametrize("streams", [1, 2])
def test_last_logits_of_a_right_padded_batch_are_each_rows_own(streams):
    model = tiny_model(streams=streams)
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 7, 8, 9]])
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # right padding: the tokenizers' default side
    got = model.last_logits(ids, attention_mask=mask)
    torch.testing.assert_close(got[0], model.last_logits(short)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], model.last_logits(long)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no real token"):
        model.last_logits(ids, attention_mask=torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))


def test_resume_with_steps_not_beyond_the_checkpoint_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(data_dir, out, 6)) == 0
    capsys.readouterr()
    for steps in (3, 6):
        assert main(train_args(data_dir, out, steps, "--resume")) == 2
        one_error_line(capsys, "is at step 6", f"--steps {steps} is not beyond it")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("flags", [["--params", "nan"], ["--params", "inf"], ["--params", "1e9", "--target", "nan"]])
def test_predict_refuses_non_finite_numbers(capsys, flags):
    assert main(["predict", "--paper", "stack", *flags, "--streams", "2"]) == 2
    one_error_line(capsys, "finite")


# ------------------------------------------------------------------------------------------------
# One error line, not a traceback
@pytest.mark.parametrize("device", ["tpu", "mps"])
def test_train_on_a_device_it_cannot_use(data_dir, tmp_path, capsys, device):
    assert main(train_args(data_dir, tmp_path / "r", 2, "--device", device)) == 2
    one_error_line(capsys, device)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting", [{"temperature": 1e-300}, {"repetition_penalty": 1e-300},
                                     {"temperature": 1e-300, "repetition_penalty": 1e300}])
def test_sampling_settings_that_underflow_still_sample(setting):
    model = tiny_model(streams=2)
    ids = torch.tensor([[3, 4, 5]])
    out = parscale.generate(model, ids, max_new_tokens=6, do_sample=True, seed=1, **setting)
    assert out.shape == (1, 6)
    if "repetition_penalty" not in setting:  # a vanishing temperature samples the largest logit: greedy
        assert torch.equal(out, parscale.generate(model, ids, max_new_tokens=6))


def test_a_truncated_trainer_state_is_named_on_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(data_dir, out, 4)) == 0
    state = out / "checkpoints" / "latest" / "trainer.pt"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    assert main(train_args(data_dir, out, 8, "--resume")) == 2
    one_error_line(capsys, "trainer.pt cannot be read", "damaged")


def test_a_damaged_train_config_is_named_on_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(data_dir, out, 4)) == 0
    (out / "checkpoints" / "latest" / "train_config.json").write_text("{not json")
    capsys.readouterr()
    assert main(train_args(data_dir, out, 8, "--resume")) == 2
    one_error_line(capsys, "train_config.json cannot be read")


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_a_damaged_adapter_is_named(tmp_path, damage):
    from parscale.model.checkpoint import CheckpointError
    from parscale.model.convert import add_streams
    from parscale.training.adapter import load_adapter, save_adapter

    base = tiny_model(streams=1)
    save_adapter(add_streams(base, 2, n_tokens=4), tmp_path / "a", backbone="base")
    if damage == "weights":
        f = tmp_path / "a" / "adapter.safetensors"
        f.write_bytes(f.read_bytes()[:50])
        match = "adapter.safetensors cannot be read"
    else:
        (tmp_path / "a" / "adapter_config.json").write_text('{"parscale_n": 2')
        match = "adapter_config.json is damaged"
    with pytest.raises(CheckpointError, match=match):
        load_adapter(base, tmp_path / "a")


@pytest.mark.parametrize("seed", ["x", 2**70, -1, 1.5])
def test_build_model_names_a_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        parscale.build_model(parscale.ModelConfig.preset("tiny"), seed=seed)


@pytest.mark.parametrize(("flag", "value", "fragment"), [("--weight-decay", "nan", "weight_decay"),
                                                         ("--seed", str(2**70), "seed must be below 2**63"),
                                                         ("--seq-len", "100000", "exceeds the model's")])
def test_train_settings_are_named(data_dir, tmp_path, capsys, flag, value, fragment):
    args = train_args(data_dir, tmp_path / "r", 2)
    if flag == "--seq-len":
        args[args.index("--seq-len") + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    one_error_line(capsys, fragment)


def test_warmup_zero_is_a_normal_setting(data_dir, tmp_path):
    assert main(train_args(data_dir, tmp_path / "r", 2, "--warmup", "0")) == 0


def test_a_string_end_id_in_generation_config_is_named(tmp_path, capsys):
    folder = tmp_path / "m"
    parscale.save(tiny_model(), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "256"}))
    from parscale.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id must be a token id"):
        parscale.load(folder)


def test_a_non_utf8_csv_is_named(tmp_path, capsys):
    csv = tmp_path / "points.csv"
    csv.write_bytes(b"params,P,loss\n1e6,1,3.0\n" + b"\xff\xfe\n")
    assert main(["fit", str(csv)]) == 2
    one_error_line(capsys, "points.csv is not UTF-8")


def test_bench_lists_are_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--streams", "abc"])
    assert stop.value.code == 2
    assert "argument --streams: 'abc'" in capsys.readouterr().err


def test_resume_from_another_working_folder_with_a_relative_data_path(data_dir, tmp_path, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    shutil.copytree(data_dir, work / "data")
    monkeypatch.chdir(work)
    assert main(["train", "--data", "data", "--out", "run", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
                 "--eval-every", "0", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "project/run", "--steps", "6", "--resume", "--no-progress"]) == 0


# ------------------------------------------------------------------------------------------------
# A chat longer than the model's positions
def test_a_chat_past_the_models_positions_leaves_out_old_turns_and_goes_on(tmp_path, monkeypatch, capsys):
    from test_everyday import chat_folder

    folder = chat_folder(tmp_path / "m", "chatml")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 160
    (folder / "config.json").write_text(json.dumps(config))
    lines = ["a" * 40, "b" * 40, "c" * 300, "d" * 20, "/exit"]  # the third alone cannot fit
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "the oldest turn is left out" in err
    assert "it is left out; write a shorter one" in err


# ------------------------------------------------------------------------------------------------
# Sampling as transformers does it
def test_unseeded_sampling_follows_torchs_global_seed():
    model = tiny_model(streams=2)
    ids = torch.tensor([[3, 4, 5]])
    torch.manual_seed(0)
    a = parscale.generate(model, ids, max_new_tokens=8, do_sample=True)
    torch.manual_seed(0)
    b = parscale.generate(model, ids, max_new_tokens=8, do_sample=True)
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    parscale.generate(model, ids, max_new_tokens=8, do_sample=True, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # a seeded call leaves the global RNG alone


def test_top_k_zero_means_no_top_k(tmp_path):
    model = tiny_model(streams=2)
    ids = torch.tensor([[3, 4, 5]])
    a = parscale.generate(model, ids, max_new_tokens=8, do_sample=True, seed=4, top_k=0)
    b = parscale.generate(model, ids, max_new_tokens=8, do_sample=True, seed=4, top_k=model.config.vocab_size)
    assert torch.equal(a, b)
    folder = tmp_path / "m"
    parscale.save(model, folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 0}))
    loaded = parscale.load(folder)
    assert torch.equal(parscale.generate(loaded, ids, max_new_tokens=8, seed=4), b)


def test_sampling_keeps_transformers_default_top_k_of_50():
    model = tiny_model(streams=2)
    ids = torch.tensor([[3, 4, 5]])
    a = parscale.generate(model, ids, max_new_tokens=8, do_sample=True, seed=4, temperature=5.0)
    b = parscale.generate(model, ids, max_new_tokens=8, do_sample=True, seed=4, temperature=5.0, top_k=50)
    assert torch.equal(a, b)
