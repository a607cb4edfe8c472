"""Data shards and the training loop: determinism, resume = uninterrupted, divergence, loss trace."""

import json
import math
from pathlib import Path

import pytest
import torch

import parscale
from parscale.training.data import DataError, TokenLoader, iter_texts
from parscale.training.train import TrainConfig, TrainingDiverged, train

TRACE = Path(__file__).parent / "fixtures" / "loss_trace_tiny.txt"


def test_shards_and_manifest(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["train_tokens"] > 0 and manifest["val_tokens"] > 0
    assert all(len(f["sha256"]) == 64 and f["split"] in ("train", "val") for f in manifest["files"])
    assert sum(f["tokens"] for f in manifest["files"]) == manifest["train_tokens"] + manifest["val_tokens"]


def test_loader_is_deterministic_and_resumable(data_dir):
    a = TokenLoader(data_dir, "train", 4, 32, seed=1)
    batches = [a.next_batch()[0] for _ in range(30)]
    b = TokenLoader(data_dir, "train", 4, 32, seed=1)
    for _ in range(11):
        b.next_batch()
    c = TokenLoader(data_dir, "train", 4, 32, seed=1)
    c.load_state_dict(b.state_dict())
    for i in range(11, 30):
        assert torch.equal(c.next_batch()[0], batches[i])
    x, y = a.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_texts([tmp_path / "nope"]))
    with pytest.raises(DataError, match="no manifest.json"):
        TokenLoader(tmp_path, "train", 2, 8)


def _cfg(data_dir, out, **kw):
    base = dict(model="tiny", streams=2, n_tokens=4, data=str(data_dir), out=str(out), steps=12, batch_size=4,
                seq_len=32, lr=3e-3, warmup=3, eval_every=4, eval_batches=2, save_every=0, progress=False)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "full"))
    train(_cfg(data_dir, tmp_path / "part"), stop_after=5)
    assert len(_losses(tmp_path / "part")) == 5
    train(_cfg(data_dir, tmp_path / "part"), resume=True)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    model = parscale.load(tmp_path / "part" / "checkpoints" / "latest" / "model")
    assert model.config.parscale_n == 2
    rec = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(rec["stream_weight_mean"]) == 2 and "val_loss" in rec and rec["loss"] < _losses(tmp_path / "full")[0]


def test_metrics_read_in_windows_equal_per_step_reads(data_dir, tmp_path, monkeypatch):
    """Reading the device-side metrics every 5 steps writes the lines a per-step read writes (same loss,
    grad norm and stream weights to the bit), one per step, and reads only at window ends, evaluations
    and the last step."""
    from parscale.training.step_metrics import StepMetrics

    reads, real = [], StepMetrics.read

    def counted(self, *args):
        reads.append([r["step"] for r in self.rows])
        return real(self, *args)

    monkeypatch.setattr(StepMetrics, "read", counted)
    train(_cfg(data_dir, tmp_path / "window", steps=13, eval_every=7, log_every=5, grad_accum=2))
    assert reads == [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]  # window, eval at 7, window, last
    reads.clear()
    train(_cfg(data_dir, tmp_path / "step", steps=13, eval_every=7, log_every=1, grad_accum=2))
    assert len(reads) == 13

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    keys = ("step", "loss", "grad_norm", "lr", "tokens", "stream_weight_mean", "stream_weight_entropy")
    assert [[r[k] for k in keys] for r in rows("window")] == [[r[k] for k in keys] for r in rows("step")]
    assert [r.get("val_loss") for r in rows("window")] == [r.get("val_loss") for r in rows("step")]


def test_metrics_say_where_the_time_went(data_dir, tmp_path):
    """Every metrics line has the wall time since training began (never decreasing); evaluation lines also
    have the seconds the evaluation took."""
    train(_cfg(data_dir, tmp_path / "r", steps=6, eval_every=3))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    assert len(rows) == 6 and elapsed == sorted(elapsed) and elapsed[0] > 0
    assert [r["step"] for r in rows if "eval_seconds" in r] == [3, 6]
    assert all(r["eval_seconds"] > 0 for r in rows if "eval_seconds" in r)


def test_divergence_stops_and_keeps_checkpoint(data_dir, tmp_path, monkeypatch):
    from parscale.training.distributed import LossModule

    real, calls = LossModule.forward, []

    def poisoned(self, x, y):
        loss, weights = real(self, x, y)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 7 else loss), weights

    monkeypatch.setattr(LossModule, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 7;"):  # found at the read of step 8
        train(_cfg(data_dir, tmp_path / "run", save_every=2, eval_every=0))
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest" / "trainer.pt", weights_only=False)
    assert state["step"] == 6  # the last checkpoint before the bad step, intact and loadable
    model = parscale.load(tmp_path / "run")  # a run folder loads as its latest checkpoint
    assert torch.isfinite(model(torch.ones(1, 4).long())).all()


def test_grad_clip_zero_means_no_clipping(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "off", grad_clip=0.0, steps=3))
    train(_cfg(data_dir, tmp_path / "huge", grad_clip=1e30, steps=3))
    train(_cfg(data_dir, tmp_path / "tight", grad_clip=1e-3, steps=3))
    assert _losses(tmp_path / "off") == _losses(tmp_path / "huge") != _losses(tmp_path / "tight")


def test_loss_trace_is_reproduced(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "trace", streams=1, steps=10))
    losses = _losses(tmp_path / "trace")
    assert TRACE.exists(), f"missing {TRACE}: write it from a trusted run ('step loss' per line)"
    expected = [float(line.split()[1]) for line in TRACE.read_text().splitlines()]
    assert losses == pytest.approx(expected, abs=2e-4)


def test_frozen_backbone_adapters_switch_p(data_dir, tmp_path):
    from parscale.training.adapter import backbone_checksum, load_adapter

    train(_cfg(data_dir, tmp_path / "base", streams=1, steps=6))
    base_dir = tmp_path / "base" / "checkpoints" / "latest" / "model"
    for p in (2, 4):
        train(_cfg(data_dir, tmp_path / f"a{p}", model=str(base_dir), streams=p, trainable="parscale", steps=6))
        files = sorted(f.name for f in (tmp_path / f"a{p}" / "adapter").iterdir() if f.name != ".parscale-owned.json")
        assert files == ["adapter.safetensors", "adapter_config.json"]
    backbone = parscale.load(base_dir)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    ids = torch.randint(0, backbone.config.vocab_size, (2, 9))
    plain = backbone(ids)
    models = {p: load_adapter(backbone, tmp_path / f"a{p}" / "adapter") for p in (2, 4)}
    for p, m in models.items():
        assert m.config.parscale_n == p
        assert m.model.embed_tokens.weight.data_ptr() == backbone.model.embed_tokens.weight.data_ptr()  # shared
        full = parscale.load(tmp_path / f"a{p}" / "checkpoints" / "latest" / "model")
        torch.testing.assert_close(m(ids), full(ids))
        assert backbone_checksum(full) == backbone_checksum(backbone)  # training left the backbone untouched
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert torch.equal(backbone(ids), plain)  # P = 1 is the plain backbone under every adapter
    assert not torch.allclose(models[2](ids), models[4](ids))


def test_the_frozen_prefix_control_saves_an_adapter_that_loads_back(data_dir, tmp_path):
    """The frozen-backbone control (P = 1 with a learned prefix, trainable = parscale) trains, writes its adapter
    (prefix only) and that adapter on the backbone equals the run's model; the backbone is untouched."""
    from parscale.training.adapter import backbone_checksum, load_adapter

    train(_cfg(data_dir, tmp_path / "base", streams=1, steps=4))
    base_dir = tmp_path / "base" / "checkpoints" / "latest" / "model"
    train(_cfg(data_dir, tmp_path / "ctl", model=str(base_dir), streams=1, p1_prefix=True, trainable="parscale",
               steps=4))
    backbone = parscale.load(base_dir)
    model = load_adapter(backbone, tmp_path / "ctl" / "adapter")
    assert model.config.parscale_n == 1 and model.config.parscale_p1_prefix
    full = parscale.load(tmp_path / "ctl" / "checkpoints" / "latest" / "model")
    ids = torch.randint(0, backbone.config.vocab_size, (2, 9))
    torch.testing.assert_close(model(ids), full(ids))
    assert backbone_checksum(full) == backbone_checksum(backbone)
    assert not torch.allclose(model(ids), backbone(ids))  # the prefix changes the output


def test_adapter_refuses_another_backbone(data_dir, tmp_path):
    from parscale.model.checkpoint import CheckpointError
    from parscale.training.adapter import load_adapter

    train(_cfg(data_dir, tmp_path / "base", streams=1, steps=3))
    base_dir = tmp_path / "base" / "checkpoints" / "latest" / "model"
    train(_cfg(data_dir, tmp_path / "a2", model=str(base_dir), streams=2, trainable="parscale", steps=3))
    other = parscale.load(base_dir)
    with torch.no_grad():
        other.model.norm.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="another backbone"):
        load_adapter(other, tmp_path / "a2" / "adapter")


def test_a_p_streams_checkpoint_refuses_prefix_settings_it_would_not_use(data_dir, tmp_path):
    """Training on from a P > 1 checkpoint keeps its prefixes and aggregator: an --n-tokens or --smooth that
    differs from theirs would be recorded in train_config.json but not used, so it is refused."""
    train(_cfg(data_dir, tmp_path / "p2", steps=2, smooth=0.05))
    ckpt = str(tmp_path / "p2" / "checkpoints" / "latest" / "model")
    for setting, message in ((dict(n_tokens=8), "has n-tokens 4; --n-tokens 8 cannot be applied"),
                             (dict(n_tokens=None, smooth=0.1), "has smooth 0.05; --smooth 0.1 cannot be applied")):
        with pytest.raises(ValueError, match=message):
            train(_cfg(data_dir, tmp_path / "next", model=ckpt, steps=2, **setting))
    train(_cfg(data_dir, tmp_path / "same", model=ckpt, steps=2, smooth=0.05))  # its own values, or none
    # no --streams either: the checkpoint's own P (was an error: "--streams 1 cannot be applied")
    result = train(_cfg(data_dir, tmp_path / "none", model=ckpt, steps=2, n_tokens=None, streams=None))
    assert parscale.load(tmp_path / "none").config.parscale_attn_smooth == 0.05 and result["parscale_n"] == 2
    with pytest.raises(ValueError, match="has P=2; --streams 4 cannot be applied"):
        train(_cfg(data_dir, tmp_path / "four", model=ckpt, steps=2, n_tokens=None, streams=4))
    assert train(_cfg(data_dir, tmp_path / "preset", steps=1, streams=None))["parscale_n"] == 1  # a preset: 1


def test_a_checkpoint_refuses_data_of_another_tokenizer(data_dir, tmp_path):
    """Data made with another tokenizer of no larger a vocabulary passes the vocabulary check, but its ids
    mean other tokens to the model: refused, before any step."""
    from conftest import synthetic_corpus

    from parscale.training.data import build_shards
    from parscale.training.tokenizer import byte_tokenizer

    train(_cfg(data_dir, tmp_path / "s1", streams=1, steps=2))
    ckpt = str(tmp_path / "s1" / "checkpoints" / "latest" / "model")
    (tmp_path / "src").mkdir()
    synthetic_corpus(tmp_path / "src")  # the same text, in byte ids: 257 <= the model's 512, other meanings
    build_shards([tmp_path / "src"], tmp_path / "other", byte_tokenizer(), glob="*.py", val_fraction=0.2,
                 progress=False)
    with pytest.raises(ValueError, match="was tokenized with another tokenizer than"):
        train(_cfg(tmp_path / "other", tmp_path / "s2", model=ckpt, streams=2, steps=2))
    assert not (tmp_path / "s2" / "checkpoints").exists()


def test_two_stage_from_p1_checkpoint(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "s1", streams=1, steps=6))
    result = train(_cfg(data_dir, tmp_path / "s2", model=str(tmp_path / "s1" / "checkpoints" / "latest" / "model"),
                        streams=4, steps=4))
    assert result["parscale_n"] == 4
    rec = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec[-1]["stream_weight_mean"]) == 4 and all(math.isfinite(r["loss"]) for r in rec)


def test_prefix_reparam_trains_merges_and_resumes(data_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = dict(streams=2, prefix_reparam=True, reparam_latent=8, reparam_hidden=16)
    train(_cfg(data_dir, tmp_path / "full", **cfg))
    train(_cfg(data_dir, tmp_path / "part", **cfg), stop_after=5)
    train(_cfg(data_dir, tmp_path / "part", **cfg), resume=True)
    assert _losses(tmp_path / "part") == pytest.approx(_losses(tmp_path / "full"), abs=1e-6)
    keys = load_file(str(tmp_path / "full" / "checkpoints" / "latest" / "model" / "model.safetensors")).keys()
    assert not any("parametrizations" in k for k in keys) and "model.layers.0.self_attn.prefix_k" in keys
    model = parscale.load(tmp_path / "full" / "checkpoints" / "latest" / "model")
    assert torch.isfinite(model(torch.ones(1, 5, dtype=torch.long))).all()


def _checkpoint_weights(out):
    from safetensors.torch import load_file

    return load_file(Path(out) / "checkpoints" / "latest" / "model" / "model.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-frozen", "fsdp-untied-ac"])
def test_torchrun_two_processes_match_one(data_dir, tmp_path, mode):
    """DDP / FSDP2 over gloo with 2 processes and the same global batch give the single-process losses and
    weights (with gradient accumulation, whose first micro-step skips the gradient sync), their checkpoint
    resumes in one process, and a one-process checkpoint resumes in two. `tiny` ties its LM head to the
    embedding (one tensor in FSDP2's root group, updated by both uses); `fsdp-untied-ac` checks the untied form,
    with activation checkpointing (layers wrapped for recomputation, then sharded) in both runs."""
    import os
    import subprocess
    import sys

    model = "tiny-llama" if mode == "fsdp-untied-ac" else "tiny"
    common = ["train", "--model", model, "--streams", "2", "--n-tokens", "4", "--data", str(data_dir), "--grad-accum",
              "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--save-every", "0"]
    if mode == "fsdp-frozen":  # frozen-backbone (adapter) training, sharded
        common += ["--trainable", "parscale"]
    if mode == "fsdp-untied-ac":
        common += ["--activation-checkpointing"]
    flags = ["--fsdp"] if mode.startswith("fsdp") else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train_in(processes: int, out: str, steps: int, resume: bool = False) -> None:
        launcher = (["-m", "parscale.cli"] if processes == 1 else
                    ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                     "-m", "parscale.cli"])
        cmd = [sys.executable, *launcher, *common, *(flags if processes > 1 else []), "--steps", str(steps),
               "--out", str(tmp_path / out), *(["--resume"] if resume else [])]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(_losses(tmp_path / out)) == steps

    train_in(1, "one", 4)
    train_in(2, "two", 4)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    if mode == "fsdp-frozen":  # the adapter written by 2 processes is the one written by 1
        from safetensors.torch import load_file

        one_adapter, two_adapter = (load_file(tmp_path / run / "adapter" / "adapter.safetensors")
                                    for run in ("one", "two"))
        assert one_adapter.keys() == two_adapter.keys()
        for k in one_adapter:
            torch.testing.assert_close(two_adapter[k], one_adapter[k], atol=1e-5, rtol=1e-4)
        return
    # the weights written by 2 processes are the ones written by 1 (a tied model writes no separate LM head)
    one_weights, two_weights = _checkpoint_weights(tmp_path / "one"), _checkpoint_weights(tmp_path / "two")
    assert two_weights.keys() == one_weights.keys()
    assert ("lm_head.weight" in one_weights) == (mode == "fsdp-untied-ac")
    for k in one_weights:
        torch.testing.assert_close(two_weights[k], one_weights[k], atol=1e-5, rtol=1e-4, msg=k)
    if mode == "fsdp-untied-ac":
        return
    train_in(1, "two", 6, resume=True)  # written by 2 processes, resumed in 1
    train_in(2, "one", 6, resume=True)  # written by 1 process, resumed in 2
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), abs=1e-5)
    train_in(2, "one", 8, resume=True)  # written by 2 processes, resumed in 2
    train_in(1, "two", 8, resume=True)
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), abs=1e-5)


def test_toml_config_with_overrides_and_activation_checkpointing(data_dir, tmp_path, capsys):
    from parscale.cli import main

    (tmp_path / "run.toml").write_text(f'model = "tiny"\nstreams = 2\nn_tokens = 4\ndata = "{data_dir}"\n'
                                       'steps = 4\nbatch_size = 4\nseq_len = 32\neval_every = 0\nsave_every = 0\n')
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "a"), "--steps", "3"]) == 0
    saved = json.loads((tmp_path / "a" / "checkpoints" / "latest" / "train_config.json").read_text())
    assert saved["steps"] == 3 and saved["streams"] == 2
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "b"), "--steps", "3",
                 "--activation-checkpointing"]) == 0
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), abs=1e-6)
    for text, message in (("stepz = 3\n", "unknown training settings stepz"),
                          ('steps = "x"\n', "steps must be int, got 'x'"), ("streams = 2.5\n", "streams must be int"),
                          ('lr = "1e-3"\n', "lr must be float"), ("compile = 1\n", "compile must be bool"),
                          ("eval_at = 0.9\n", "eval_at must be list"), ("steps = [1\n", "is not valid TOML")):
        (tmp_path / "bad.toml").write_text(text)
        assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2, text
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'bad.toml'}") and message in err, err
    (tmp_path / "ok.toml").write_text("lr = 1\nsmooth = 0\nn_tokens = 4\n")  # ints where floats go are fine
    from parscale.training.train import load_config_file

    assert load_config_file(tmp_path / "ok.toml") == {"lr": 1, "smooth": 0, "n_tokens": 4}


def test_sync_every_micro_step_syncs_each_micro_step_and_trains_the_same(data_dir, tmp_path, monkeypatch):
    """--sync-every-micro-step (the control for measuring what skipping the sync saves) asks for a gradient
    reduction on every accumulation micro-step, where the default asks on the last one only; the losses are
    the same."""
    import parscale.training.train as train_module
    from parscale.cli import main

    seen = []
    real = train_module.gradient_sync
    monkeypatch.setattr(train_module, "gradient_sync", lambda *a, sync: seen.append(sync) or real(*a, sync=sync))
    base = ["train", "--model", "tiny", "--data", str(data_dir), "--steps", "2", "--batch-size", "2",
            "--grad-accum", "3", "--seq-len", "16", "--eval-every", "0", "--save-every", "0"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert seen == [False, False, True] * 2
    seen.clear()
    assert main(base + ["--out", str(tmp_path / "b"), "--sync-every-micro-step"]) == 0
    assert seen == [True] * 6
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), abs=1e-6)


def test_mfu_counts_the_p_fold_backbone():
    from parscale.model.config import ModelConfig
    from parscale.training.train import flops_per_token

    one = flops_per_token(ModelConfig.preset("125m", parscale_n=1), 512)
    four = flops_per_token(ModelConfig.preset("125m", parscale_n=4), 512)
    assert 3.5 < four / one < 4.0  # the LM head is shared, the backbone runs 4 times


def test_tensorboard_logging(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "tb", steps=2, tensorboard=True))
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_adapter_generates_from_the_cli(data_dir, tmp_path, capsys):
    from parscale.cli import main

    train(_cfg(data_dir, tmp_path / "base", streams=1, steps=2))
    base = tmp_path / "base" / "checkpoints" / "latest" / "model"
    train(_cfg(data_dir, tmp_path / "a", model=str(base), streams=2, trainable="parscale", steps=2))
    assert main(["generate", "--model", str(base), "--adapter", str(tmp_path / "a" / "adapter"), "--prompt", "def",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def")


def test_adapter_identity_does_not_depend_on_dtype(data_dir, tmp_path, capsys):
    """An adapter trained (in fp32) on a bf16 checkpoint loads back on it in bf16, fp16 and fp32."""
    from parscale.cli import main
    from parscale.model.checkpoint import CheckpointError
    from parscale.training.adapter import load_adapter

    train(_cfg(data_dir, tmp_path / "base", streams=1, steps=2))
    bf16 = tmp_path / "base_bf16"
    parscale.save(parscale.load(tmp_path / "base"), bf16, tokenizer_from=tmp_path / "base" / "checkpoints" / "latest"
                  / "model", dtype="bfloat16")
    train(_cfg(data_dir, tmp_path / "a", model=str(bf16), streams=2, trainable="parscale", steps=2))
    for dtype in ("bfloat16", "float16", "float32"):
        model = load_adapter(parscale.load(bf16, dtype=dtype), tmp_path / "a" / "adapter")
        assert model.config.parscale_n == 2
        assert model.model.embed_tokens.weight.dtype == parscale.model.checkpoint.parse_dtype(dtype)
    assert main(["generate", "--model", str(bf16), "--adapter", str(tmp_path / "a" / "adapter"), "--prompt", "def",
                 "--max-new-tokens", "2", "--dtype", "bfloat16"]) == 0
    changed = parscale.load(bf16)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 0.5
    with pytest.raises(CheckpointError, match="trained on another backbone"):
        load_adapter(changed, tmp_path / "a" / "adapter")


def test_merged_copy_leaves_the_reparameterised_model_intact():
    from conftest import tiny_model

    from parscale.training.reparam import enable_prefix_reparam, has_prefix_reparam, merged_copy

    model = tiny_model(streams=2)
    enable_prefix_reparam(model, 8, 16)
    ids = torch.randint(0, 512, (2, 7))
    merged = merged_copy(model)
    assert has_prefix_reparam(model) and not has_prefix_reparam(merged)
    assert torch.equal(merged(ids), model(ids))
    model(ids).sum().backward()  # the original still trains through its MLPs
    assert model.model.layers[0].self_attn.parametrizations.prefix_k[0].latent.grad is not None


def test_one_document_corpus_holds_out_its_tail(tmp_path, capsys):
    from parscale.training.data import build_shards
    from parscale.training.tokenizer import byte_tokenizer

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "only.txt").write_text("to be or not to be, that is the question. " * 50)
    m = build_shards([tmp_path / "src"], tmp_path / "d", byte_tokenizer(), val_fraction=0.1, progress=False)
    assert m["train_tokens"] > 0 and m["val_tokens"] > 0 and "only document" in m["val_held_out_from"]
    assert m["train_tokens"] + m["val_tokens"] == len("to be or not to be, that is the question. " * 50) + 1
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "t.txt").write_text("ab")
    with pytest.raises(DataError, match="too short to hold any of it out"):
        build_shards([tmp_path / "tiny"], tmp_path / "d2", byte_tokenizer(), progress=False)
    # the command says what it held out
    from parscale.cli import main

    assert main(["data", str(tmp_path / "src"), "--out", str(tmp_path / "d3"), "--vocab-size", "300"]) == 0
    assert "no document fell into validation at --val-fraction 0.05: held out the last" in capsys.readouterr().out


def test_full_split_evaluations_at_fractions(data_dir, tmp_path):
    from parscale.training.data import TokenLoader

    train(_cfg(data_dir, tmp_path / "run", steps=8, eval_at=[0.5, 1.0]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss_full" in r] == [4, 8]
    model = parscale.load(tmp_path / "run")
    val = TokenLoader(data_dir, "val", 4, 32)
    total, n = 0.0, 0
    for x, y in val.windows():
        total += torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        n += y.numel()
    assert rows[-1]["val_loss_full"] == pytest.approx(total / n, rel=1e-5)


@pytest.mark.parametrize("skip", [True, False])
def test_fsdp_accumulation_reduces_gradients_once_per_step(tmp_path, monkeypatch, skip):
    """FSDP2 under gradient accumulation: one reduce-scatter per optimizer step, not one per micro-step,
    and the same gradients as syncing every micro-step (a one-process gloo group, so it runs anywhere)."""
    import torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
    from conftest import tiny_model

    from parscale.training.distributed import LossModule, gradient_sync, shard_fsdp

    calls = []
    real = param_group.foreach_reduce
    monkeypatch.setattr(param_group, "foreach_reduce", lambda *a, **k: calls.append(1) or real(*a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model(streams=2)
        module = LossModule(model, autocast=False)
        shard_fsdp(module, 1, torch.device("cpu"))
        x = torch.randint(0, 512, (2, 2, 16))
        for micro in range(2):
            sync = micro == 1 if skip else True
            with gradient_sync(module, module, fsdp=True, sync=sync):
                loss, _ = module(x[micro], x[micro].roll(-1, 1))
                (loss / 2).backward()
        grads = {n: p.grad.full_tensor().clone() for n, p in module.named_parameters()}
    finally:
        dist.destroy_process_group()
    assert len(calls) == (1 if skip else 2) * (len(model.model.layers) + 1)  # one per FSDP group per sync
    reference = LossModule(tiny_model(streams=2), autocast=False)
    for micro in range(2):
        loss, _ = reference(x[micro], x[micro].roll(-1, 1))
        (loss / 2).backward()
    for n, p in reference.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)


def test_the_prefix_control_of_a_two_stage_run_starts_from_a_p1_checkpoint(data_dir, tmp_path):
    """Stage 2's control: the stage-1 P = 1 checkpoint continued with a fresh learned prefix (no aggregator);
    the backbone starts exactly as the checkpoint, and the prefix trains."""
    train(_cfg(data_dir, tmp_path / "stage1", streams=1, steps=4))
    base_dir = tmp_path / "stage1" / "checkpoints" / "latest" / "model"
    base = parscale.load(base_dir)
    train(_cfg(data_dir, tmp_path / "ctrl", model=str(base_dir), streams=1, p1_prefix=True, n_tokens=4, steps=3))
    ctrl = parscale.load(tmp_path / "ctrl")
    assert ctrl.config.parscale_p1_prefix and ctrl.config.parscale_n == 1 and ctrl.config.prefix_len == 4
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, ctrl.state_dict()[k])]
    assert moved  # the backbone trained on, from the checkpoint's weights
    with pytest.raises(ValueError, match="p1_prefix adds a learned prefix to a plain P = 1 model"):
        train(_cfg(data_dir, tmp_path / "bad", model=str(tmp_path / "ctrl"), streams=1, p1_prefix=True, steps=2))
