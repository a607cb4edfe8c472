"""Checkpoint folders: bit-exact round trips, sharding, dtypes, strictness, atomic saves, convert."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, tiny_model
from safetensors.torch import load_file, save_file

import parscale
from parscale.model.checkpoint import CheckpointError, mmap_safetensors
from parscale.model.convert import add_streams


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.mark.parametrize("family,streams", [("qwen2", 1), ("qwen2", 4), ("llama", 2), ("qwen3", 3)])
def test_round_trip_is_bit_exact(tmp_path, family, streams):
    model = tiny_model(streams=streams, family=family)
    parscale.save(model, tmp_path / "m")
    again = parscale.load(tmp_path / "m")
    assert _same_state(model, again)
    ids = torch.randint(0, 512, (2, 7))
    assert torch.equal(model(ids), again(ids))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == model.config.model_type


def test_official_checkpoint_resaves_identically(tmp_path):
    src = FIXTURES / "official_p2"
    parscale.save(parscale.load(src), tmp_path / "m")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "m"))
    for key in ("model_type", "parscale_n", "parscale_n_tokens", "parscale_attn_smooth", "hidden_size",
                "num_key_value_heads", "tie_word_embeddings", "rope_theta", "vocab_size"):
        assert ca[key] == cb[key], key


def test_sharded_save_and_load(tmp_path):
    model = tiny_model(streams=2)
    parscale.save(model, tmp_path / "m", max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert _same_state(model, parscale.load(tmp_path / "m"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtypes(tmp_path, dtype):
    model = tiny_model(streams=2)
    parscale.save(model, tmp_path / "m", dtype=dtype)
    loaded = parscale.load(tmp_path / "m")
    assert loaded.model.embed_tokens.weight.dtype == dtype
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == str(dtype).split(".")[1]
    up = parscale.load(tmp_path / "m", dtype="float32")
    assert up.lm_head.weight.dtype == torch.float32
    assert torch.isfinite(loaded(torch.randint(0, 512, (1, 5)))).all()


def test_loading_is_memory_mapped():
    tensors = mmap_safetensors(FIXTURES / "official_p2" / "model.safetensors")
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(storages) == 1  # every tensor is a view of the one mapping


def test_tied_model_stays_tied(tmp_path):
    model = parscale.load(FIXTURES / "official_p2")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _corrupt(tmp_path, edit):
    folder = tmp_path / "bad"
    shutil.copytree(FIXTURES / "official_p2", folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_missing_tensor_is_named(tmp_path):
    folder = _corrupt(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): model.layers.1.mlp.up_proj.weight"):
        parscale.load(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = _corrupt(tmp_path, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): model.extra.weight"):
        parscale.load(folder)


def test_misshaped_tensor_is_named(tmp_path):
    folder = _corrupt(tmp_path, lambda t: t.update({"model.norm.weight": torch.zeros(47)}))
    with pytest.raises(CheckpointError, match="mis-shaped: model.norm.weight"):
        parscale.load(folder)


def test_config_p_disagreeing_with_tensors(tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(FIXTURES / "official_p2", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["parscale_n"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config says parscale_n=4"):
        parscale.load(folder)
    cfg["parscale_n"], cfg["parscale_n_tokens"] = 2, 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="parscale_n_tokens=8"):
        parscale.load(folder)


def test_bad_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        parscale.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        parscale.load(tmp_path / "empty")
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt2'"):
        parscale.load(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8, "num_attention_heads": 2,
                                                    "num_key_value_heads": 1}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        parscale.load(folder)


def test_a_device_this_machine_lacks_is_one_error(tmp_path, capsys):
    from parscale.cli import main

    parscale.save(tiny_model(), tmp_path / "m")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        parscale.load(tmp_path / "m", device="gpu0")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or any GPU on a CPU machine
    with pytest.raises(ValueError, match=f"device '{missing}': this machine has"):
        parscale.load(tmp_path / "m", device=missing)
    if not torch.cuda.is_available():  # every command that loads a model says so in one line
        assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "m" / "config.json"),
                     "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("error: device 'cuda': this machine has no CUDA GPU")


def test_failed_save_leaves_nothing_and_keeps_old(tmp_path, monkeypatch):
    model = tiny_model(streams=2)
    parscale.save(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("parscale.model.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        parscale.save(tiny_model(streams=2, seed=9), tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def test_convert_keeps_backbone_and_adds_streams(tmp_path):
    base = tiny_model(streams=1)
    new = add_streams(base, 4, n_tokens=6)
    assert new.config.parscale_n == 4 and new.config.parscale_n_tokens == 6
    for k, v in base.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k
    _, w = new.forward_hidden(torch.randint(0, 512, (1, 5)))
    torch.testing.assert_close(w, torch.full_like(w, 0.25))  # zero last layer: uniform start
    parscale.save(new, tmp_path / "c")
    assert _same_state(new, parscale.load(tmp_path / "c"))
    with pytest.raises(ValueError, match="already has parscale_n=4"):
        add_streams(new, 2)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_backbone_prefix_init_holds_the_backbones_own_first_token_keys_and_values(family):
    """prefix_init='backbone': every slot holds the P = 1 model's key (x BACKBONE_KEY_SCALE) and value of some
    vocabulary token at position 0 — the oracle is the model's own decode cache after every token alone —
    and the slots of the two streams differ."""
    from parscale.inference.cache import KVCache
    from parscale.model.convert import BACKBONE_KEY_SCALE

    base = tiny_model(streams=1, family=family)
    new = add_streams(base, 2, n_tokens=3, prefix_init="backbone", seed=5)
    vocab = base.config.vocab_size
    cache = KVCache.for_model(base, batch_size=vocab, max_len=1)
    with torch.no_grad():
        base(torch.arange(vocab)[:, None], cache=cache)
    for i, layer in enumerate(new.model.layers):
        keys, values = cache.k[i][:, :, 0].flatten(1), cache.v[i][:, :, 0].flatten(1)  # [vocab, kv_heads * d]
        slots_k = layer.self_attn.prefix_k.transpose(1, 2).flatten(2).flatten(0, 1)  # [P * n, kv_heads * d]
        slots_v = layer.self_attn.prefix_v.transpose(1, 2).flatten(2).flatten(0, 1)
        token = torch.cdist(slots_v, values).argmin(dim=1)  # the token each slot was taken from
        torch.testing.assert_close(slots_v, values[token], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(slots_k, keys[token] * BACKBONE_KEY_SCALE, rtol=1e-5, atol=1e-6)
    assert not torch.equal(new.model.layers[0].self_attn.prefix_v[0], new.model.layers[0].self_attn.prefix_v[1])
    with pytest.raises(ValueError, match="prefix_init must be one of random, backbone"):
        add_streams(base, 2, prefix_init="zeros")


@pytest.mark.parametrize("variant", ["qwen2", "llama", "qwen3"])
def test_missing_tie_key_means_untied(tmp_path, variant):
    """transformers' families default to untied: a config.json without the key keeps its lm_head.weight."""
    from hf_oracle import make_hf_model

    hf = make_hf_model("llama" if variant == "llama" else variant, tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("tie_word_embeddings", True):  # make the checkpoint untied, with a head unlike the embedding
        hf.config.tie_word_embeddings = False
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.1)
        hf.save_pretrained(tmp_path / "hf")
        cfg = json.loads(cfg_file.read_text())
    cfg.pop("tie_word_embeddings", None)
    cfg_file.write_text(json.dumps(cfg))
    assert "lm_head.weight" in load_file(tmp_path / "hf" / "model.safetensors")
    model = parscale.load(tmp_path / "hf")
    assert not model.config.tie_word_embeddings
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_saved_config_names_one_dtype(tmp_path):
    src = tmp_path / "src"
    parscale.save(tiny_model(streams=2), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "float32"  # as transformers 5 writes it
    (src / "config.json").write_text(json.dumps(cfg))
    parscale.save(parscale.load(src), tmp_path / "out", dtype="bfloat16")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("damage", ["truncate", "offsets", "short_header"])
def test_corrupt_safetensors_is_named(tmp_path, damage):
    parscale.save(tiny_model(streams=2), tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) - 1000])
        match = "model.safetensors is truncated: tensor"
    elif damage == "offsets":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] -= 4
        raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        file.write_bytes(data[:8] + raw[:n] + data[8 + n :])
        match = f"tensor {name} of shape"
    else:
        file.write_bytes(data[:5])
        match = "not a safetensors file"
    with pytest.raises(CheckpointError, match=match):
        parscale.load(tmp_path / "m")


def test_save_never_deletes_files_it_did_not_write(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "data").mkdir()
    with pytest.raises(ValueError, match="holds files parscale did not write \\(data, notes.txt\\)"):
        parscale.save(tiny_model(streams=2), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["data", "notes.txt"]
    parscale.save(tiny_model(streams=2), folder, overwrite=True)  # replaces only the model's files
    assert (folder / "notes.txt").read_text() == "my notes" and (folder / "data").is_dir()
    assert _same_state(tiny_model(streams=2), parscale.load(folder))
    parscale.save(tiny_model(streams=1), folder, overwrite=True, max_shard_bytes=50_000)  # sharded now
    assert not (folder / "model.safetensors").exists()  # the stale single file of the old model is gone
    assert (folder / "notes.txt").read_text() == "my notes"
    # A folder that holds only a model written before is replaced as a whole, and only when asked to.
    parscale.save(tiny_model(streams=2), tmp_path / "m")
    with pytest.raises(ValueError, match="already holds parscale's output .* --overwrite"):
        parscale.save(tiny_model(streams=4), tmp_path / "m")
    assert parscale.load(tmp_path / "m").config.parscale_n == 2
    parscale.save(tiny_model(streams=4), tmp_path / "m", overwrite=True)
    assert parscale.load(tmp_path / "m").config.parscale_n == 4


def test_cli_new_and_convert_refuse_a_users_folder(tmp_path, capsys):
    from parscale.cli import main

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("x")
    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "work")]) == 2
    assert "holds files parscale did not write (thesis.tex)" in capsys.readouterr().err
    assert main(["new", "--preset", "tiny", "--out", str(tmp_path / "p1")]) == 0
    assert main(["convert", "--model", str(tmp_path / "p1"), "--streams", "2", "--out", str(tmp_path / "work")]) == 2
    assert main(["convert", "--model", str(tmp_path / "p1"), "--streams", "2", "--out", str(tmp_path / "work"),
                 "--overwrite"]) == 0
    assert (tmp_path / "work" / "thesis.tex").read_text() == "x"


def test_interrupted_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    import os

    parscale.save(tiny_model(streams=2), tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # between moving the old folder away and moving the new one in
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        parscale.save(tiny_model(streams=2, seed=5), tmp_path / "m", overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_adapter_tensor_set_is_checked_like_a_checkpoint(tmp_path):
    from parscale.training.adapter import load_adapter, save_adapter

    base = tiny_model(streams=1)
    save_adapter(add_streams(base, 2, n_tokens=4), tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    tensors.pop("model.layers.1.self_attn.prefix_v")
    tensors["model.layers.0.self_attn.prefix_k"] = torch.zeros(2, 2, 5, 16)
    save_file(tensors, tmp_path / "a" / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="missing \\(1\\): model.layers.1.self_attn.prefix_v") as err:
        load_adapter(base, tmp_path / "a")
    assert "mis-shaped: model.layers.0.self_attn.prefix_k is (2, 2, 5, 16), expected (2, 2, 4, 16)" in str(err.value)
