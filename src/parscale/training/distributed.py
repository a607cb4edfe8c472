"""Data-parallel training under torchrun: process-group set-up and the module DDP wraps.

    torchrun --nproc_per_node=2 -m parscale.cli train --data DIR --out DIR --batch-size 16 ...

`--batch-size` is the global batch: every rank draws the same global batch from the seeded loader and
keeps its own slice, so the loader position stored in a checkpoint means the same thing for any number
of processes and a run can resume on a different world size. Rank 0 writes metrics and checkpoints.
The model stays a plain single-device module; DDP wraps `LossModule` (model + loss) from outside.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parscale.training.chunked_loss import linear_cross_entropy


def setup(device: str | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group when started by torchrun.

    NCCL when the training runs on CUDA GPUs, gloo otherwise (also on a CUDA machine told --device cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        backend = "nccl" if on_cuda else "gloo"
        dist.init_process_group(backend)
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class LossModule(nn.Module):
    """Model + next-token loss in one forward, so DDP sees (and synchronises) the whole step."""

    def __init__(self, model, autocast: bool, hooks=None, loss_chunk_rows: int = 0):
        super().__init__()
        self.model, self.autocast = model, autocast
        self.hooks = hooks  # levers.AggregatorHooks: its z-loss term is added to the training loss
        self.loss_chunk_rows = loss_chunk_rows  # > 0: chunked_loss.py, no [tokens, vocab] logits at once

    def forward(self, x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            hidden, weights = self.model.forward_hidden(x)
            if self.loss_chunk_rows:
                loss = linear_cross_entropy(hidden, self.model.lm_head.weight, y, self.loss_chunk_rows)
            else:
                logits = self.model.lm_head(hidden)
        if not self.loss_chunk_rows:
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        penalty = self.hooks.take_penalty() if self.hooks is not None else None
        return (loss if penalty is None else loss + penalty), weights


@contextlib.contextmanager
def gradient_sync(step_fn, loss_module, fsdp: bool, sync: bool):
    """Reduce gradients across ranks only when sync (the last micro-step of an accumulated step): DDP's
    no_sync() on the others, FSDP2's set_requires_gradient_sync(False), which keeps the micro-steps'
    unsharded gradients local and reduce-scatters their sum once."""
    if fsdp:
        loss_module.set_requires_gradient_sync(sync)
        yield
    elif not sync and hasattr(step_fn, "no_sync"):
        with step_fn.no_sync():
            yield
    else:
        yield


def shard_fsdp(loss_module: LossModule, world: int, device: torch.device) -> None:
    """FSDP2: shard every decoder layer, then the root (embedding, tied LM head, final norm and the
    aggregator stay together in the root group, so a tied embedding is one sharded tensor)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in loss_module.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(loss_module: LossModule) -> dict[str, torch.Tensor]:
    """The whole model's tensors on the CPU (gathered from every rank under FSDP; call on all ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(loss_module, options=_options())
    return {k.removeprefix("model."): v for k, v in state.items()}


def optimizer_state(loss_module: LossModule, optimizer) -> dict:
    """Optimizer state keyed by parameter names: the same for 1 process, DDP or FSDP (call on all ranks)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(loss_module, optimizer, options=_options())


def load_optimizer_state(loss_module: LossModule, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(loss_module, optimizer, state, options=StateDictOptions(full_state_dict=True))
