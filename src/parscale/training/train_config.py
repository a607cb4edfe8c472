"""The training run's settings (TrainConfig) and their TOML file, kept free of torch so that the command
line can build its parser without loading it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SMOOTH = 0.1  # ε of a model built here (a preset, or streams added to a P = 1 checkpoint)


@dataclass
class TrainConfig:
    model: str = "tiny"
    """A preset name (built from scratch) or a checkpoint folder to start from."""
    model_overrides: dict | None = None
    """ModelConfig fields replacing the preset's (a TOML table `[model_overrides]`: hidden_size = 192, ...)."""
    streams: int | None = None
    """P, the number of parallel streams (default: a checkpoint's own P, 1 for a preset; a checkpoint with
    P = 1 given P > 1 gets fresh prefixes and aggregator)."""
    trainable: str = "all"
    """'all', or 'parscale': a frozen backbone, only prefixes and aggregator train (saved as an adapter)."""
    prefix_init: str = "random"
    """How prefixes added to a P = 1 checkpoint start: 'random', or 'backbone' (the checkpoint's own keys and
    values of random tokens at position 0: near its P = 1 loss at step 0; model/convert.py)."""
    n_tokens: int | None = None
    """Prefix tokens per stream and layer (default: the preset's; 48 when adding streams to a checkpoint)."""
    p1_prefix: bool = False
    """With streams = 1: give the model a learned prefix of n_tokens (the prefix control, no aggregator)."""
    smooth: float | None = None
    """ε of the aggregation smoothing w·(1−ε) + ε/P (default: a P > 1 checkpoint's own, else 0.1)."""
    prefix_reparam: bool = False
    """Produce the prefixes by a small MLP from per-stream latents while training (reparam.py)."""
    reparam_latent: int = 64
    """Latent width of the prefix reparameterisation."""
    reparam_hidden: int = 256
    """Hidden width of the prefix reparameterisation MLP."""
    data: str = "runs/data"
    """A `parscale data` folder (reads manifest.json, train.bin, val.bin, tokenizer.json)."""
    out: str = "runs/train"
    """The run folder (writes metrics.jsonl, checkpoints/step-N, checkpoints/latest, adapter/)."""
    steps: int = 200
    """Optimizer steps of the whole run (the schedule is laid out over them)."""
    batch_size: int = 8
    """Sequences per step, global over all processes."""
    seq_len: int = 128
    """Tokens per training sequence."""
    grad_accum: int = 1
    """Micro-batches accumulated per step (gradients are synchronised on the last one only)."""
    sync_every_micro_step: bool = False
    """Under torchrun, reduce gradients after every accumulation micro-step instead of the last one only: the
    same gradients, more communication (the control that measures what skipping the sync saves)."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup: int = 20
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """'cosine' or 'wsd' (warm-up, stable, then linear decay over the last 20% of steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (never on norms, biases or prefixes)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0: no clipping; the norm is still logged)."""
    eval_every: int = 50
    """Evaluate on held-out windows every this many steps (0: only at the end)."""
    eval_batches: int = 16
    """Held-out batches per evaluation, evenly spaced over the split."""
    eval_at: list = dataclasses.field(default_factory=list)
    """Extra evaluations over the whole held-out split at these fractions of the run (e.g. [0.9, 0.95, 1.0]),
    logged as val_loss_full; an endpoint that averages them is steadier than one evaluation."""
    stream_batches: int = 2
    """Held-out batches for the stream diagnostics logged at every evaluation (streams.py; P > 1; 0: off)."""
    save_every: int = 100
    """Write a checkpoint every this many steps (0: only at the end)."""
    log_every: int = 10
    """Read the step metrics back from the device every this many steps (step_metrics.py: the host does not
    wait for every step; each step still gets its metrics line). A signal is acted on at the next read."""
    keep_checkpoints: int = 2
    """Checkpoint folders kept in {out}/checkpoints (the newest ones; 0 keeps all)."""
    parscale_lr_mult: float = 1.0
    """Learning rate of prefixes and aggregator as a multiple of lr (levers.py; 1: the same)."""
    parscale_warmup: int | None = None
    """Warm-up steps of prefixes and aggregator (levers.py; default: warmup)."""
    aggregator_lr_mult: float = 1.0
    """Learning rate of the aggregator as a multiple of the prefixes' (lr × parscale_lr_mult × this; levers.py;
    1: the same). Adam moves each weight by about the rate per step whatever its gradient, and the aggregator's
    logits sum ~500-2,000 hidden activations per token on a pretrained backbone, so at the prefixes' rate
    they saturate within tens of steps."""
    stream_dropout: float = 0.0
    """Training only: mask each stream's aggregation logit with this probability per token (levers.py)."""
    aggregator_z_loss: float = 0.0
    """Add this × mean(logsumexp(aggregator logits)²) to the loss, against saturation (levers.py)."""
    seed: int = 0
    """Seeds the backbone initialisation and the data order alike for every P (paired seeds)."""
    data_start: int = 0
    """Training windows (of seq_len + 1 tokens) of the seeded order to skip first: a second stage sets it to
    steps × batch_size × grad_accum of the first, with the same seed, so it continues on unseen data."""
    device: str | None = None
    """cpu, cuda or cuda:N (default: this process's GPU if there is one)."""
    fsdp: bool = False
    """Under torchrun, shard parameters, gradients and optimizer state with FSDP2 instead of DDP."""
    compile: bool = False
    """torch.compile the training step (applied from outside the model)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass instead of storing its activations."""
    loss_chunk_rows: int = 0
    """Take the loss through the LM head this many tokens at a time, never holding all tokens' logits
    (chunked_loss.py; 0: all at once, the plain path)."""
    tensorboard: bool = False
    """Also write the per-step scalars to {out}/tensorboard (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA) on a terminal (io/progress.py)."""


def _type_error(value, annotation: str) -> str | None:
    """Why value cannot be a TrainConfig field annotated `annotation` (None if it can)."""
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}
    allowed = [k.strip() for k in annotation.split("|")]
    if value is None:
        return None if "None" in allowed else "a value"
    for name in allowed:
        types = kinds.get(name)
        if types is not None and isinstance(value, types) and not (name != "bool" and isinstance(value, bool)):
            return None
    return " or ".join(a for a in allowed if a != "None")


def load_config_file(path) -> dict:
    """TrainConfig fields from a TOML file (command-line flags override them); a setting of the wrong type
    (`steps = "x"`) or a file that is not TOML is one error naming the file."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    fields = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown training settings {', '.join(unknown)}")
    for name, value in data.items():
        wanted = _type_error(value, fields[name])
        if wanted is not None:
            raise ValueError(f"{path}: {name} must be {wanted}, got {value!r}")
    return data
