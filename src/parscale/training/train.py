"""The training loop: AdamW, warm-up + cosine / WSD schedules, evaluation, atomic resumable checkpoints.

    cfg = TrainConfig(model="tiny", streams=4, data="runs/data", out="runs/p4", steps=200)
    train(cfg)                        # or: parscale train --model tiny --streams 4 --data runs/data ...

- The model is a preset (built from scratch with the data's vocabulary) or a checkpoint folder; a
  P = 1 folder with --streams P > 1 gets fresh prefixes and aggregator (convert.add_streams): the
  second stage of the two-stage recipe, all parameters training under the run's own warm-up.
- trainable='parscale' freezes the backbone (adapter.mark_only_parscale_trainable): only prefixes and
  aggregator train, and {out}/adapter holds just those tensors plus the backbone's checksum.
- AdamW (fused on CUDA) with weight decay on matrices only (not on norms, biases or prefixes),
  linear warm-up then cosine to min_lr_ratio·lr, or warm-up-stable-decay (last 20% linear decay);
  gradient clipping; gradient accumulation; bf16 autocast on CUDA, fp32 on CPU.
- Every step gets one JSON line in {out}/metrics.jsonl, written every log_every steps (step_metrics.py: the
  values stay on the device in between, so the host never waits for a step): loss, lr, grad norm, tokens,
  tokens/s (the window's mean), and
  for P > 1 the mean aggregation weight per stream and its entropy (load balance); evaluations add the
  held-out loss and, for P > 1, stream diagnostics ("streams": each stream's loss alone, the ensemble's,
  KL between streams, hidden cosine, weights at the ε floor / cap; streams.py).
- {out}/checkpoints/step-N holds the model (Hugging Face format) and trainer.pt (optimizer, scheduler,
  RNG, data position, step, config); {out}/checkpoints/latest points at the newest (run_folder.py: a
  process killed at any moment leaves a loadable latest checkpoint). `resume=True` continues from it,
  reproduces the loss trace of an uninterrupted run, cuts metrics.jsonl back to the checkpoint's step,
  and refuses a changed setup (model, P, trainable, data, batch, lr, ...: RESUME_MAY_CHANGE lists what
  may change). A fresh run refuses a folder that holds a run unless overwrite=True; a lock keeps a
  second process out of a folder being trained into.
- prefix_reparam=True trains the prefixes through a small MLP (reparam.py); checkpoints hold the
  merged prefixes (released format) and trainer.pt the MLP, so resuming continues the reparameterisation.
- Under torchrun the same entry point trains with DDP, or FSDP2 with fsdp=True (distributed.py);
  --batch-size is global and checkpoints (full model, optimizer state keyed by parameter name) do
  not depend on the number of processes.
- A NaN or inf loss stops training with TrainingDiverged, naming the last good checkpoint if there is one.
- SIGTERM (a cluster's preemption notice) or SIGINT (Ctrl-C) lets the step under way finish, writes a
  checkpoint and raises TrainingInterrupted (the command exits 128 + the signal's number, 143 / 130, saying
  how to resume); under torchrun every rank stops after the same step (the end of the metrics window,
  where the ranks' one all-reduce tells each whether any was signalled). A second signal acts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from parscale.io.files import RunLock
from parscale.io.ownership import record as record_owned
from parscale.io.progress import progress_bar
from parscale.model.checkpoint import load, save
from parscale.model.config import PRESETS, ModelConfig
from parscale.model.convert import add_streams
from parscale.model.transformer import build_model
from parscale.training.adapter import mark_only_parscale_trainable, save_adapter
from parscale.training.data import TokenLoader, changed_sources
from parscale.training.distributed import (
    LossModule,
    barrier,
    full_model_state,
    gradient_sync,
    load_optimizer_state,
    optimizer_state,
    setup,
    shard_fsdp,
)
from parscale.training.levers import AggregatorHooks, is_parscale_name
from parscale.training.reparam import (
    enable_prefix_reparam,
    has_prefix_reparam,
    load_reparam_state,
    merged_copy,
    reparam_state,
)
from parscale.training.run_folder import (
    clean_interrupted,
    cut_metrics,
    latest_checkpoint,
    start_fresh,
    write_checkpoint,
)
from parscale.training.step_metrics import StepMetrics, TrainingDiverged  # noqa: F401 (raised from here)
from parscale.training.train_config import DEFAULT_SMOOTH, TrainConfig, load_config_file  # noqa: F401 (re-exported)


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: the step under way was finished and a checkpoint written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, out: str):
        self.signum, self.step, self.checkpoint, self.out = signum, step, checkpoint, out
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint {checkpoint}; continue with "
                         f"`parscale train --out {out} --resume`")


class StopRequest:
    """Catches SIGTERM (preemption on clusters) and SIGINT (Ctrl-C) while training, so the loop can finish
    its step and checkpoint; a second signal of the same kind acts at once, as it would without this."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # the next one is not caught

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × (P × backbone matmul parameters + LM head + aggregator) + attention,
    i.e. the P-fold backbone work counted, as MFU for ParScale should."""
    counts = cfg.param_counts()
    backbone = counts["non_embedding"] - counts["parscale"]
    lm_head = cfg.vocab_size * cfg.hidden_size
    aggregator = cfg.parscale_n * cfg.hidden_size * cfg.hidden_size if cfg.parscale_n > 1 else 0
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (seq_len + cfg.prefix_len)
    return 6 * (cfg.parscale_n * backbone + lm_head + aggregator) + cfg.parscale_n * attention


def apply_activation_checkpointing(model) -> None:
    """Wrap every decoder layer's forward in torch.utils.checkpoint (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        inner = layer.forward
        layer.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "wsd":
        decay_start = int(cfg.steps * 0.8)
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(1, cfg.steps - decay_start)
        return 1.0 - (1.0 - cfg.min_lr_ratio) * frac
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _group_kinds(cfg: TrainConfig) -> int:
    """How many kinds of parameters get groups of their own: the backbone (1), prefixes and aggregator apart
    from it (2), and the aggregator apart from the prefixes (3)."""
    if cfg.aggregator_lr_mult != 1.0:
        return 3
    return 2 if cfg.parscale_lr_mult != 1.0 or cfg.parscale_warmup is not None else 1


def build_optimizer(model, cfg: TrainConfig, device: torch.device, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (groups in pairs: decayed, not decayed). With a ParScale
    learning rate or warm-up of its own, prefixes and aggregator get groups 2 and 3; with an aggregator rate of
    its own, the aggregator gets groups 4 and 5 (see `group_schedules`). A group with nothing to train (the
    backbone's when it is frozen) is left out, since a checkpoint's optimizer state with more than one empty
    group cannot be loaded back; each group keeps its place in that layout as "schedule" (`optimizer_schedules`)."""
    kinds = _group_kinds(cfg)
    groups = [[] for _ in range(2 * kinds)]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        index = 0 if p.dim() >= 2 and "prefix" not in name else 1
        kind = 0
        if kinds > 1 and is_parscale_name(name):
            kind = 2 if kinds == 3 and "aggregate_layer" in name else 1
        groups[index + 2 * kind].append(p)
    decays = (cfg.weight_decay, 0.0) * kinds
    kept = [{"params": g, "weight_decay": d, "schedule": i}
            for i, (g, d) in enumerate(zip(groups, decays, strict=True)) if g]
    if not kept:
        raise ValueError("the model has no parameter to train (every parameter has requires_grad=False)")
    return torch.optim.AdamW(kept, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def optimizer_schedules(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> list:
    """The LambdaLR lambdas of `build_optimizer`'s groups: each group's by its place in the full layout."""
    full = group_schedules(cfg, 2 * _group_kinds(cfg))
    return [full[group["schedule"]] for group in optimizer.param_groups]


def group_schedules(cfg: TrainConfig, n_groups: int) -> list:
    """The learning-rate factor of each optimizer group per step (LambdaLR lambdas)."""
    backbone = [lambda s: lr_factor(cfg, s)] * 2
    if n_groups == 2:
        return backbone
    own = dataclasses.replace(cfg, warmup=cfg.parscale_warmup if cfg.parscale_warmup is not None else cfg.warmup)
    parscale = [lambda s: cfg.parscale_lr_mult * lr_factor(own, s)] * 2
    if n_groups == 4:
        return backbone + parscale
    return backbone + parscale + [lambda s: cfg.aggregator_lr_mult * cfg.parscale_lr_mult * lr_factor(own, s)] * 2


def _load_trainer_state(ckpt: Path) -> dict:
    """trainer.pt of a checkpoint, or one error naming the damaged file (and an earlier checkpoint, if any)."""
    file = ckpt / "trainer.pt"
    try:
        state = torch.load(file, weights_only=False)
        if not isinstance(state, dict) or not {"config", "step"} <= set(state):
            raise ValueError("not a parscale trainer state")
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        earlier = sorted(p.name for p in ckpt.parent.glob("step-*") if p != ckpt)
        hint = (f"point {ckpt.parent / 'latest'} at an earlier checkpoint ({', '.join(earlier)}) or start over "
                f"with --overwrite" if earlier else "start over with --overwrite")
        raise ValueError(f"--resume: {file} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged: "
                         f"{hint}") from None
    return state


def _model_positions(cfg: TrainConfig) -> int | None:
    """The model's max_position_embeddings, read before any data (None where it cannot be told yet)."""
    try:
        if cfg.model in PRESETS:
            known = {f.name for f in dataclasses.fields(ModelConfig)}
            shape = {k: v for k, v in (cfg.model_overrides or {}).items() if k in known}
            return ModelConfig.preset(cfg.model, **shape).max_position_embeddings
        from parscale.model.checkpoint import model_folder

        return int(json.loads((model_folder(cfg.model) / "config.json").read_text())["max_position_embeddings"])
    except Exception:  # the model's own checks, later, name what is wrong with it
        return None


def _initial_model(cfg: TrainConfig, vocab_size: int, eos_id: int):
    if cfg.model_overrides and cfg.model not in PRESETS:
        raise ValueError(f"model_overrides apply to a preset; {cfg.model!r} is not one")
    if cfg.model in PRESETS:
        shape = dict(cfg.model_overrides or {})
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(shape) - known)
        if unknown:
            raise ValueError(f"model_overrides: unknown model settings {', '.join(unknown)}")
        overrides = {**shape, "parscale_n": cfg.streams or 1, "vocab_size": vocab_size, "eos_token_id": eos_id,
                     "parscale_attn_smooth": DEFAULT_SMOOTH if cfg.smooth is None else cfg.smooth,
                     "parscale_p1_prefix": cfg.p1_prefix}
        if cfg.n_tokens is not None:
            overrides["parscale_n_tokens"] = cfg.n_tokens
        return build_model(ModelConfig.preset(cfg.model, **overrides), seed=cfg.seed)
    model = load(cfg.model, dtype=torch.float32)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"{cfg.model} has {model.config.vocab_size} token ids but the data uses {vocab_size}")
    if cfg.p1_prefix:  # the prefix control of a two-stage run: the P = 1 checkpoint gets a fresh prefix
        if (cfg.streams or 1) != 1 or model.config.parscale_n != 1 or model.config.has_prefix:
            raise ValueError(f"p1_prefix adds a learned prefix to a plain P = 1 model; {cfg.model} has "
                             f"P = {model.config.parscale_n}{' and a prefix' if model.config.has_prefix else ''}"
                             f" and --streams is {cfg.streams}")
        return add_streams(model, 1, n_tokens=cfg.n_tokens or 48, seed=cfg.seed, p1_prefix=True,
                           prefix_init=cfg.prefix_init)
    if cfg.streams is not None and cfg.streams > 1 and model.config.parscale_n == 1:
        model = add_streams(model, cfg.streams, n_tokens=cfg.n_tokens or 48,
                            smooth=DEFAULT_SMOOTH if cfg.smooth is None else cfg.smooth, seed=cfg.seed,
                            prefix_init=cfg.prefix_init)
    elif cfg.streams is not None and cfg.streams != model.config.parscale_n:
        raise ValueError(f"{cfg.model} has P={model.config.parscale_n}; --streams {cfg.streams} cannot be applied")
    elif model.config.parscale_n > 1:
        # its prefixes and aggregator exist already: a different setting would be recorded but not used
        own = {"n_tokens": model.config.parscale_n_tokens, "smooth": model.config.parscale_attn_smooth}
        for name, value in own.items():
            asked = getattr(cfg, name)
            if asked is not None and asked != value:
                raise ValueError(f"{cfg.model} has {name.replace('_', '-')} {value}; --{name.replace('_', '-')} "
                                 f"{asked} cannot be applied to its prefixes and aggregator (leave it out)")
    return model


def check_same_tokenizer(model, data) -> None:
    """A checkpoint trains on data made with its own tokenizer: ids of another tokenizer inside its vocabulary
    would train it on the wrong tokens without any error."""
    from tokenizers import Tokenizer

    from parscale.model.checkpoint import model_folder

    ours, theirs = model_folder(model) / "tokenizer.json", Path(data) / "tokenizer.json"
    if ours.is_file() and theirs.is_file() and \
            Tokenizer.from_file(str(ours)).to_str() != Tokenizer.from_file(str(theirs)).to_str():
        raise ValueError(f"{data} was tokenized with another tokenizer than {model}'s: its ids would mean other "
                         f"tokens to the model; rebuild it with `parscale data SOURCES --tokenizer {model}`")


@torch.no_grad()
def evaluate_loss(loss_module: LossModule, loader: TokenLoader, batches: int | None, device) -> float:
    """Mean loss over `batches` batches of windows evenly spaced over the split (None: every window)."""
    loss_module.eval()
    total, n = 0.0, 0
    for x, y in loader.windows(limit=None if batches is None else batches * loader.batch_size):
        loss, _ = loss_module(x.to(device), y.to(device))
        total += float(loss) * x.numel()
        n += x.numel()
    loss_module.train()
    return total / n


def _stream_record(model, val: TokenLoader, batches: int, autocast: bool) -> dict:
    """The compact stream diagnostics logged with an evaluation (see streams.py)."""
    from parscale.analysis.streams import stream_diagnostics

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        d = stream_diagnostics(model, val.windows(limit=batches * val.batch_size), shared_prefix=not
                               has_prefix_reparam(model))
    keep = ("loss_mix", "loss_stream", "loss_ensemble", "kl_mean", "weight_mean", "weight_entropy", "floor_share",
            "cap_share", "loss_shared_prefix")
    return {k: d[k] for k in keep if k in d} | {"hidden_cosine_last": d["hidden_cosine"][-1]}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Settings that may differ between a run and its resumption; any other difference is refused.
RESUME_MAY_CHANGE = frozenset({"out", "data", "steps", "eval_every", "eval_batches", "eval_at", "stream_batches",
                               "save_every", "log_every", "keep_checkpoints", "device", "fsdp", "compile",
                               "activation_checkpointing", "tensorboard", "progress", "sync_every_micro_step"})


def check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    """One error listing every run-defining setting that differs from the checkpoint's."""
    current = dataclasses.asdict(cfg)
    diffs = [f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in current
             if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != current[k]]
    if diffs:
        raise ValueError("--resume continues the run as it was set up; these settings differ from its "
                         "checkpoint (start a new run with another --out to change them):\n  " + "\n  ".join(diffs))


def _data_identity(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in ("tokenizer_sha256", "train_tokens", "val_tokens", "vocab_size", "eos_id")}


def save_checkpoint(out: Path, model, optim_state: dict, scheduler, loader, step: int, cfg: TrainConfig,
                    tokenizer_dir, reparam: dict) -> Path:
    """Model (plain, released format) + trainer state as checkpoints/step-N (run_folder.write_checkpoint)."""

    def write(folder: Path) -> None:
        tokens = step * cfg.batch_size * cfg.seq_len * cfg.grad_accum
        save(model, folder / "model", tokenizer_from=tokenizer_dir, card_name=f"{Path(cfg.out).name} (step {step})",
             base_model=None if cfg.model in PRESETS else cfg.model,
             training={"data": str(cfg.data), "tokens": tokens, "steps": step, "streams": model.config.parscale_n,
                       "trainable": cfg.trainable, "seed": cfg.seed})
        # data as an absolute path: `--resume` from another working folder must find it again
        settings = {**dataclasses.asdict(cfg), "data": str(Path(cfg.data).resolve())}
        (folder / "train_config.json").write_text(json.dumps(settings, indent=1) + "\n")
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "step": step,
                    "loader": loader.state_dict(), "rng": _rng_state(), "config": dataclasses.asdict(cfg),
                    "data": _data_identity(loader.manifest), "reparam": reparam}, folder / "trainer.pt")

    return write_checkpoint(out, step, write, keep=cfg.keep_checkpoints)


def _plain_model(model, loss_module, fsdp: bool):
    """The model as one plain module with merged prefixes (gathered from the shards under FSDP)."""
    if not fsdp:
        return merged_copy(model)
    from parscale.model.transformer import ParScaleForCausalLM

    state = full_model_state(loss_module)  # filled on rank 0 only
    return ParScaleForCausalLM.from_state_dict(model.config, state, "cpu") if state else None


def check_config(cfg: TrainConfig) -> None:
    """One error naming the first setting that cannot work, before anything is read or written."""
    if cfg.streams is not None and not (isinstance(cfg.streams, int) and cfg.streams >= 1):
        raise ValueError(f"streams must be an integer >= 1, got {cfg.streams}")
    positive = ("steps", "batch_size", "seq_len", "grad_accum", "lr", "eval_batches", "log_every")
    if cfg.prefix_reparam:
        positive += ("reparam_latent", "reparam_hidden")
    for name in positive:
        if not (getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name))):
            raise ValueError(f"{name} must be > 0 and finite, got {getattr(cfg, name)}")
    for name in ("eval_every", "save_every", "keep_checkpoints", "stream_batches", "data_start", "weight_decay",
                 "seed", "warmup", "loss_chunk_rows"):
        if not (getattr(cfg, name) >= 0 and math.isfinite(getattr(cfg, name))):
            raise ValueError(f"{name} must be >= 0 and finite, got {getattr(cfg, name)}")
    if cfg.seed >= 2**63:  # torch.manual_seed takes a signed 64-bit integer
        raise ValueError(f"seed must be below 2**63, got {cfg.seed}")
    if cfg.device is not None:
        from parscale.model.checkpoint import parse_device

        if parse_device(cfg.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device {cfg.device!r}: training runs on cpu or cuda")
    if cfg.schedule not in ("cosine", "wsd"):
        raise ValueError(f"schedule must be 'cosine' or 'wsd', got {cfg.schedule!r}")
    if cfg.prefix_init not in ("random", "backbone"):
        raise ValueError(f"prefix_init must be 'random' or 'backbone', got {cfg.prefix_init!r}")
    if cfg.trainable not in ("all", "parscale"):
        raise ValueError(f"trainable must be 'all' or 'parscale', got {cfg.trainable!r}")
    if not (0 < cfg.parscale_lr_mult < math.inf) or (cfg.parscale_warmup is not None and cfg.parscale_warmup <= 0):
        raise ValueError("parscale_lr_mult and parscale_warmup must be > 0")
    if not 0 < cfg.aggregator_lr_mult < math.inf:
        raise ValueError(f"aggregator_lr_mult must be > 0 and finite, got {cfg.aggregator_lr_mult}")
    # clip_grad_norm_ scales the gradients by max_norm / norm: a negative threshold would reverse them
    if not (math.isfinite(cfg.grad_clip) and cfg.grad_clip >= 0):
        raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {cfg.grad_clip}")
    if cfg.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) training; returns a summary. stop_after ends early after that step (for tests).

    overwrite: a fresh run into a folder that already holds one removes that run's checkpoints and
    metrics (other files in the folder are kept); without it such a folder is refused.
    """
    check_config(cfg)
    rank, world, local_rank = setup(cfg.device)
    lock = RunLock(Path(cfg.out)) if rank == 0 else contextlib.nullcontext()
    with lock, StopRequest() as stop:
        return _train(cfg, resume, stop_after, overwrite, rank, world, local_rank, stop)


def _train(cfg: TrainConfig, resume: bool, stop_after: int | None, overwrite: bool, rank: int, world: int,
           local_rank: int, stop: StopRequest) -> dict:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is None:  # "cuda" means this process's GPU under torchrun
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    autocast = device.type == "cuda"
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by {world} processes")
    local = cfg.batch_size // world
    out = Path(cfg.out)
    positions = _model_positions(cfg)
    if positions is not None and cfg.seq_len > positions:  # before the loader, which would call it a data shortage
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's {positions} positions "
                         f"(max_position_embeddings)")
    torch.manual_seed(cfg.seed)
    loader = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val = TokenLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    start_step = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume: {str(out)!r} holds no checkpoint to resume from (check --out; a run "
                             f"stopped before its first checkpoint starts over without --resume)")
        state = _load_trainer_state(ckpt)
        check_resume_config(state["config"], cfg)
        if cfg.steps <= state["step"]:
            raise ValueError(f"--resume: the run in {str(out)!r} is at step {state['step']}, and --steps "
                             f"{cfg.steps} is not beyond it; give a larger --steps to train further")
        if "data" in state and state["data"] != _data_identity(loader.manifest):
            raise ValueError(f"--resume: the data in {cfg.data!r} is not the data the run was trained on "
                             f"(checkpoint {state['data']}, now {_data_identity(loader.manifest)})")
        model = load(ckpt / "model", dtype=torch.float32).to(device)
        start_step = state["step"]
        if rank == 0:
            clean_interrupted(out)
            cut_metrics(out, start_step)
        barrier(world)
    else:
        state = None
        if rank == 0:
            start_fresh(out, overwrite)
        barrier(world)
        model = _initial_model(cfg, loader.manifest["vocab_size"], loader.manifest["eos_id"]).to(device)
        if cfg.model not in PRESETS:
            check_same_tokenizer(cfg.model, cfg.data)
        loader.skip(cfg.data_start)
    if loader.manifest["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"the data's tokenizer has {loader.manifest['vocab_size']} ids but the model's vocabulary "
                         f"has {model.config.vocab_size}: the data was not made for this model")
    if rank == 0 and not resume:
        changed = changed_sources(loader.manifest)
        if changed:
            print(f"[train] note: {len(changed)} source files changed since {cfg.data} was built (first: "
                  f"{changed[0]}); the shards hold their old text", file=sys.stderr)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's {model.config.max_position_embeddings} "
                         f"positions (max_position_embeddings)")
    if cfg.prefix_reparam:
        enable_prefix_reparam(model, cfg.reparam_latent, cfg.reparam_hidden, seed=cfg.seed)
        if state is not None:
            load_reparam_state(model, state["reparam"])
    if cfg.trainable == "parscale":
        mark_only_parscale_trainable(model)
    elif cfg.trainable != "all":
        raise ValueError(f"trainable must be 'all' or 'parscale', got {cfg.trainable!r}")
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    model.train()
    hooks = None
    if cfg.stream_dropout or cfg.aggregator_z_loss:
        hooks = AggregatorHooks(model, cfg.stream_dropout, cfg.aggregator_z_loss)
    loss_module = LossModule(model, autocast, hooks, loss_chunk_rows=cfg.loss_chunk_rows)
    fsdp = cfg.fsdp and world > 1
    if fsdp:
        if cfg.prefix_reparam:
            raise ValueError("--fsdp with --prefix-reparam is not supported")
        shard_fsdp(loss_module, world, device)
    optimizer = build_optimizer(model, cfg, device, fused=device.type == "cuda" and not fsdp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optimizer_schedules(cfg, optimizer))
    if state is not None:
        load_optimizer_state(loss_module, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
    p = model.config.parscale_n
    step_fn = torch.compile(loss_module) if cfg.compile else loss_module
    if world > 1 and not fsdp:
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn, device_ids=[device] if device.type == "cuda"
                                                            else None)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    token_flops = flops_per_token(model.config, cfg.seq_len)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda"
                 and k in torch.cuda.get_device_name(device)), None)
    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None
    board = None
    if cfg.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        new_board = not (out / "tensorboard").exists()
        board = SummaryWriter(str(out / "tensorboard"))
        if new_board and (out / "tensorboard").is_dir():
            record_owned(out, ["tensorboard"])
    if not all(0 < f <= 1 for f in cfg.eval_at):
        raise ValueError(f"eval_at takes fractions of the run in (0, 1], got {cfg.eval_at}")
    full_eval_steps = {max(1, round(f * cfg.steps)) for f in cfg.eval_at}
    t0, last_eval = time.perf_counter(), None
    step = start_step
    last_saved = latest_checkpoint(out) if resume else None
    bar = progress_bar(total=cfg.steps, initial=start_step, desc=f"train P={p}", unit="step",
                       enabled=cfg.progress and rank == 0)
    window = StepMetrics(tokens_per_step)
    pin = device.type == "cuda"
    try:
        for step in range(start_step, cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            loss_sum, weights_sum = None, None
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the first group that trains)
            for micro in range(cfg.grad_accum):
                x, y = loader.next_batch()  # the global batch; this rank keeps its slice
                x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
                if pin:  # pinned host memory lets the copy overlap the step before it
                    x, y = x.pin_memory(), y.pin_memory()
                # Gradients are reduced across ranks on the last micro-step only (DDP and FSDP2 alike).
                sync = cfg.sync_every_micro_step or micro == cfg.grad_accum - 1
                with gradient_sync(step_fn, loss_module, fsdp, sync=sync):
                    loss, weights = step_fn(x.to(device, non_blocking=pin), y.to(device, non_blocking=pin))
                    (loss / cfg.grad_accum).backward()
                part = loss.detach().double() / cfg.grad_accum  # float64, as the Python sum it replaces
                loss_sum = part if loss_sum is None else loss_sum + part
                if weights is not None:
                    w = weights.detach().float().flatten(0, 1)
                    weights_sum = w if weights_sum is None else torch.cat([weights_sum, w])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            scheduler.step()
            window.add(step + 1, lr, loss_sum, grad_norm, weights_sum)
            evaluating = cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps
            saving = (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps \
                or (stop_after is not None and step + 1 == stop_after)
            # Every rank reads at the same steps (the read is collective); one process may also read at once
            # when a signal came, so that it stops after this step.
            if len(window) >= cfg.log_every or evaluating or saving or step + 1 in full_eval_steps \
                    or (world == 1 and stop.signum is not None):
                records, stopping = window.read(world, device, stop.signum is not None, last_saved)
            else:
                records, stopping = [], False
            if not records:
                bar.update(1)
                continue
            record = records[-1]
            # this process's high-water mark so far (under FSDP2: its shard of weights and optimizer state)
            peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            for r in records:
                if peak:
                    r["mfu"] = r["tokens_per_s"] * token_flops / (peak * world)
                if peak_gib is not None:
                    r["peak_memory_gib"] = peak_gib
            eval_start = time.perf_counter()
            if evaluating:
                last_eval = evaluate_loss(loss_module, val, cfg.eval_batches, device)
                record["val_loss"] = last_eval
                if p > 1 and cfg.stream_batches and not fsdp and rank == 0:
                    record["streams"] = _stream_record(model, val, cfg.stream_batches, autocast)
            if step + 1 in full_eval_steps:
                record["val_loss_full"] = evaluate_loss(loss_module, val, None, device)
            if evaluating or step + 1 in full_eval_steps:
                record["eval_seconds"] = time.perf_counter() - eval_start
            # Wall time since this process began training (a resumed run starts again from 0): with eval_seconds
            # it tells where a run's time went (training, evaluation, the rest), which tokens_per_s does not.
            elapsed = time.perf_counter() - t0
            for r in records:
                r["elapsed_s"] = elapsed
            if rank == 0:
                metrics_file.write("".join(json.dumps(r) + "\n" for r in records))
                metrics_file.flush()
            if board is not None:
                for r in records:
                    for key, value in r.items():
                        if isinstance(value, float):
                            board.add_scalar(key, value, r["step"])
            shown = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
            bar.update(1, **shown, **({"val": f"{last_eval:.4f}"} if last_eval is not None else {}))
            if saving or stopping:
                plain = _plain_model(model, loss_module, fsdp)  # gathering is collective: every rank
                optim_state = optimizer_state(loss_module, optimizer)
                if rank == 0:
                    last_saved = save_checkpoint(out, plain, optim_state, scheduler, loader, step + 1, cfg, cfg.data,
                                                 reparam_state(model))
                    if cfg.trainable == "parscale" and step + 1 == cfg.steps:
                        save_adapter(plain, out / "adapter", backbone=cfg.model, overwrite=True)
                        record_owned(out, ["adapter"])
                barrier(world)
            window.restart_clock()  # the evaluation and the checkpoint are not training time
            if stopping and step + 1 < cfg.steps:
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step + 1, last_saved, cfg.out)
            if stop_after is not None and step + 1 == stop_after:
                break
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if board is not None:
            board.close()
        bar.close()
    return {"steps": step + 1, "val_loss": last_eval, "parscale_n": p, "tokens": (step + 1) * tokens_per_step,
            "seconds": time.perf_counter() - t0, "checkpoint": str(last_saved / "model") if last_saved else None}
