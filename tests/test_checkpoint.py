"""Checkpoint folders: bit-exact round trips, sharding, dtypes, strictness, atomic saves, convert."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, tiny_model
from safetensors.torch import load_file, save_file

import parscale
from parscale.checkpoint import CheckpointError, mmap_safetensors
from parscale.convert import add_streams


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


def test_failed_save_leaves_nothing_and_keeps_old(tmp_path, monkeypatch):
    model = tiny_model(streams=2)
    parscale.save(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("parscale.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        parscale.save(tiny_model(streams=2, seed=9), tmp_path / "m")
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
