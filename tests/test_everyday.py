"""Everyday use: Hub ids (offline, against a Hub cache built here), chat templates, chat, generation defaults."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import parscale
from parscale.cli import main
from parscale.inference.chat import ChatTemplateError, apply_chat_template
from parscale.io.files import FolderInUseError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
MESSAGES = [{"role": "user", "content": "Hello there  "}, {"role": "assistant", "content": "Hi! {\"a\": 1}"},
            {"role": "user", "content": "What is 2 + 2?"}]


def chat_folder(folder: Path, style: str, streams: int = 1) -> Path:
    """A tiny model folder with a byte-level tokenizer, the style's special tokens and its chat template."""
    from parscale.training.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens(SPECIALS[style])
    model = tiny_model(streams=streams)
    tmp = folder.parent / (folder.name + "-tok")
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    config = {"chat_template": CHATML if style == "chatml" else LLAMA3,
              "eos_token": "<|im_end|>" if style == "chatml" else "<|eot_id|>",
              "bos_token": None if style == "chatml" else "<|begin_of_text|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    parscale.save(model, folder, tokenizer_from=tmp)
    return folder


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers_does(tmp_path, style, add_generation_prompt):
    import transformers

    folder = chat_folder(tmp_path / "m", style)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = apply_chat_template(folder, MESSAGES, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\nYou are a helpful" if style == "chatml" else "<|begin_of_text|>")


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@pytest.mark.parametrize("prefill", ["The answer is", "The answer is  ", "  "])
def test_continuing_the_final_message_renders_as_transformers_does(tmp_path, style, prefill):
    """An assistant prefill: the text stops inside the last message (ChatML keeps its spacing, the Llama 3
    template trims it), as transformers' continue_final_message does."""
    import transformers

    folder = chat_folder(tmp_path / "m", style)
    messages = [*MESSAGES, {"role": "assistant", "content": prefill}]
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    ours = apply_chat_template(folder, messages, add_generation_prompt=False, continue_final_message=True)
    assert ours == theirs and not ours.endswith(("<|im_end|>\n", "<|eot_id|>"))
    assert messages[-1]["content"] == prefill  # the caller's messages are left as they were
    with pytest.raises(ChatTemplateError, match="nothing to continue"):
        apply_chat_template(folder, messages, template="{{ 'fixed' }}", continue_final_message=True)


def test_chat_template_errors(tmp_path):
    folder = chat_folder(tmp_path / "m", "chatml")
    with pytest.raises(ChatTemplateError, match="refused the conversation: no system turns"):
        apply_chat_template(folder, MESSAGES, template="{{ raise_exception('no system turns') }}")
    with pytest.raises(ChatTemplateError, match="messages must be a list"):
        apply_chat_template(folder, ["hi"])
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        apply_chat_template(folder, MESSAGES)


def test_chat_keeps_the_conversation_and_stops_at_the_end_of_turn(tmp_path, monkeypatch, capsys):
    folder = chat_folder(tmp_path / "m", "chatml", streams=2)
    model = parscale.load(folder)
    tok = parscale.load_tokenizer(folder)
    im_end = tok.token_to_id("<|im_end|>")
    prompts, real = [], parscale.generate

    def replies_then_ends_turn(model, ids, eos_token_id=None, on_token=None, **kw):
        prompts.append(tok.decode(ids[0].tolist(), skip_special_tokens=False))
        assert im_end in eos_token_id
        out = real(model, ids, max_new_tokens=3, eos_token_id=None, on_token=on_token)
        on_token(torch.tensor([im_end]))  # the model ends its turn
        return torch.cat([out, torch.tensor([[im_end]])], 1)

    monkeypatch.setattr(parscale, "generate", replies_then_ends_turn)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n/exit\n"))
    assert main(["chat", "--model", str(folder), "--system", "Be brief."]) == 0
    first_reply = tok.decode(real(model, torch.tensor([tok.encode(prompts[0], add_special_tokens=False).ids]),
                                  max_new_tokens=3)[0].tolist())
    expected = apply_chat_template(folder, [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "first question"},
                                            {"role": "assistant", "content": first_reply},
                                            {"role": "user", "content": "second question"}])
    assert len(prompts) == 2 and prompts[1] == expected  # the whole conversation, in the model's own template
    assert "<|im_end|>" not in capsys.readouterr().out  # the end-of-turn token is not printed


def test_chat_refuses_a_model_without_a_template(tmp_path, capsys):
    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["chat", "--model", str(tmp_path / "m")]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_generation_defaults_are_used_when_the_caller_gives_none(tmp_path, capsys):
    model = tiny_model(streams=2)
    parscale.save(model, tmp_path / "m")
    settings = {"max_new_tokens": 5, "do_sample": True, "temperature": 0.8, "top_k": 7, "top_p": 0.9}
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**settings, "unknown_key": 1}))
    loaded = parscale.load(tmp_path / "m")
    assert loaded.generation_config == settings
    ids = torch.randint(0, 512, (1, 6))
    from_file = parscale.generate(loaded, ids, seed=3)
    assert from_file.shape == (1, 5)
    assert torch.equal(from_file, parscale.generate(model, ids, seed=3, **settings))
    assert parscale.generate(loaded, ids, max_new_tokens=2, seed=3).shape == (1, 2)  # the caller wins
    greedy = parscale.generate(model, ids, max_new_tokens=5)
    assert torch.equal(parscale.generate(loaded, ids, generation_config={}, max_new_tokens=5), greedy)
    # A default length longer than the positions left stops at the last position instead of failing.
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"max_new_tokens": 4096}))
    assert parscale.generate(parscale.load(tmp_path / "m"), ids).shape == (1, 512 - 6)
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    assert "generation_defaults      {'max_new_tokens': 4096}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Hub ids, against a Hub cache laid out here (models--org--name/{refs,snapshots}), never the network
def hub_cache(root: Path, repo: str, folder: Path, commit: str, ref: str = "main") -> None:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    shutil.copytree(folder, repo_dir / "snapshots" / commit)


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for p in (1, 2):
        assert main(["new", "--preset", "tiny", "--streams", str(p), "--seed", str(p), "--out",
                     str(tmp_path / f"p{p}")]) == 0
    hub_cache(cache, "org/tiny", tmp_path / "p2", "a" * 40)
    hub_cache(cache, "org/tiny", tmp_path / "p1", "b" * 40, ref="v1")
    return tmp_path


def test_a_hub_id_loads_from_the_cache(offline_hub):
    by_id, by_path = parscale.load("org/tiny"), parscale.load(offline_hub / "p2")
    assert by_id.config == by_path.config
    ids = torch.randint(0, 512, (1, 5))
    assert torch.equal(by_id(ids), by_path(ids))
    assert parscale.load("org/tiny", revision="v1").config.parscale_n == 1
    assert parscale.load("org/tiny", revision="b" * 40).config.parscale_n == 1
    assert parscale.load_tokenizer("org/tiny").get_vocab_size() == parscale.load_tokenizer(
        offline_hub / "p2").get_vocab_size()


def test_hub_id_errors_offline(offline_hub):
    from parscale.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="'org/absent' is not a local folder and not in the local Hub cache, "
                                              "and HF_HUB_OFFLINE is set"):
        parscale.load("org/absent")
    with pytest.raises(CheckpointError, match="at revision 'v9'"):
        parscale.load("org/tiny", revision="v9")
    with pytest.raises(CheckpointError, match="is not a Hub id"):
        parscale.load(offline_hub / "p2", revision="v1")


def test_every_model_command_takes_a_hub_id(offline_hub):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline_hub / "hub")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "parscale.cli", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    (offline_hub / "t.txt").write_text("text to score " * 40)
    info = cli("info", "--model", "org/tiny", "--revision", "v1", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["parscale_n"] == 1
    for args in (["generate", "--model", "org/tiny", "--prompt", "hi", "--max-new-tokens", "3"],
                 ["eval", "--model", "org/tiny", "--data", str(offline_hub / "t.txt")],
                 ["convert", "--model", "org/tiny", "--revision", "v1", "--streams", "2", "--out",
                  str(offline_hub / "conv")]):
        proc = cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
    assert (offline_hub / "conv" / "tokenizer.json").is_file()
    missing = cli("info", "--model", "org/absent")
    assert missing.returncode == 2 and missing.stderr.startswith("error: 'org/absent' is not a local folder")


# ------------------------------------------------------------------------------------------------
# Model cards
def test_save_writes_a_model_card_the_hub_can_read(tmp_path, capsys):
    from huggingface_hub import ModelCard

    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "p1")]) == 0
    assert main(["convert", "--model", str(tmp_path / "p1"), "--streams", "4", "--n-tokens", "8", "--out",
                 str(tmp_path / "p4")]) == 0
    card = ModelCard.load(tmp_path / "p4" / "README.md")
    meta = card.data.to_dict()
    counts = parscale.load(tmp_path / "p4").config.param_counts()
    assert meta["library_name"] == "parscale" and "parscale" in meta["tags"]
    assert meta["base_model"] == str(tmp_path / "p1")
    block = meta["parscale"]
    assert (block["streams"], block["prefix_tokens"], block["smoothing"]) == (4, 8, 0.1)
    assert meta["parscale"]["parameters"] == counts
    # Saving again replaces parscale's own card...
    parscale.save(parscale.load(tmp_path / "p4"), tmp_path / "p4", base_model="other", overwrite=True)
    assert ModelCard.load(tmp_path / "p4" / "README.md").data.to_dict()["base_model"] == "other"
    # ... but never a card the user wrote: refused without overwrite, kept with it.
    (tmp_path / "p4" / "README.md").write_text("# my notes\n")
    with pytest.raises(FolderInUseError, match="README.md"):
        parscale.save(parscale.load(tmp_path / "p4"), tmp_path / "p4")
    parscale.save(parscale.load(tmp_path / "p4"), tmp_path / "p4", overwrite=True)
    assert (tmp_path / "p4" / "README.md").read_text() == "# my notes\n"
    assert "was not written by parscale and is kept" in capsys.readouterr().err


def test_a_training_checkpoint_card_names_data_and_tokens(data_dir, tmp_path):
    from huggingface_hub import ModelCard

    from parscale.training.train import TrainConfig, train

    train(TrainConfig(model="tiny", streams=2, data=str(data_dir), out=str(tmp_path / "run"), steps=3,
                      batch_size=2, seq_len=16, eval_every=0, progress=False))
    meta = ModelCard.load(tmp_path / "run" / "checkpoints" / "latest" / "model" / "README.md").data.to_dict()
    assert meta["parscale"]["training"]["tokens"] == 3 * 2 * 16
    assert meta["parscale"]["training"]["data"] == str(data_dir) and "base_model" not in meta


# ------------------------------------------------------------------------------------------------
# One progress facility
def test_progress_is_one_bar_on_a_terminal_and_quiet_in_a_log(tmp_path):
    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    (tmp_path / "t.txt").write_text("text to score " * 300)
    args = [sys.executable, "-m", "parscale.cli", "eval", "--model", str(tmp_path / "m"), "--data",
            str(tmp_path / "t.txt"), "--max-length", "64"]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if k != "PARSCALE_PROGRESS"})
    assert quiet.returncode == 0 and quiet.stderr == ""  # stderr is a pipe here: no bar
    shown = subprocess.run(args, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PARSCALE_PROGRESS": "1"})
    assert shown.returncode == 0
    last = shown.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("eval: 100%") and "4.20k/4.20k" in last and "tok/s" in last  # count, rate
    assert "<00:00" in last  # elapsed<time left
