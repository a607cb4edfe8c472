"""Per-step training metrics kept on the device and read back in one transfer every few steps.

Reading a loss or a gradient norm with `float()` waits for the GPU to finish the step, so the host cannot
queue the next step while the current one runs; at small models that idle gap is a large share of the
step. The trainer therefore keeps each step's loss, gradient norm and stream-weight statistics as device
tensors and reads a whole window of them at once (`log_every` steps, and always before an evaluation, a
checkpoint or the end), with the one all-reduce that averages the loss over ranks and tells every rank
whether any was asked to stop. Each step still gets its own metrics line, with the same values as a
per-step read would give (the loss is accumulated in float64 as Python floats were); `tokens_per_s` is the
window's mean, the only honest per-step figure once the host runs ahead. A non-finite loss is found at
the end of its window, before any checkpoint could be written from the diverged weights.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from parscale.errors import TrainingDiverged

__all__ = ["StepMetrics", "TrainingDiverged"]


class StepMetrics:
    """The steps since the last read-back: their device-side values and the host-side fields."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.rows: list[dict] = []
        self.clock = time.perf_counter()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor,
            weights: torch.Tensor | None) -> None:
        """One step: its loss (a float64 device scalar), gradient norm and the stream weights [tokens, P]."""
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a (replicated) DTensor
            grad_norm = grad_norm.full_tensor()
        row = {"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm.detach()}
        if weights is not None:
            row["weight_mean"] = weights.mean(0)
            row["weight_entropy"] = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
        self.rows.append(row)

    def restart_clock(self) -> None:
        """Evaluations and checkpoints between windows are not training time."""
        self.clock = time.perf_counter()

    def read(self, world: int, device, stop_flag: bool, last_saved) -> tuple[list[dict], bool]:
        """The window's records (mean loss over ranks) and whether any rank must stop. Collective when
        world > 1: every rank calls it after the same steps. Raises TrainingDiverged on a non-finite loss."""
        losses = torch.stack([r["loss"] for r in self.rows]).to(device=device, dtype=torch.float64)
        stop = torch.tensor([float(stop_flag)], dtype=torch.float64, device=device)
        summed = torch.cat([losses, stop])
        if world > 1:
            dist.all_reduce(summed)
        norms = torch.stack([r["grad_norm"].float() for r in self.rows]).tolist()
        has_weights = "weight_mean" in self.rows[0]
        means = torch.stack([r["weight_mean"] for r in self.rows]).tolist() if has_weights else None
        entropies = torch.stack([r["weight_entropy"] for r in self.rows]).tolist() if has_weights else None
        values = summed.tolist()  # the one wait for the device in this window
        elapsed = time.perf_counter() - self.clock
        tokens_per_s = self.tokens_per_step * len(self.rows) / max(elapsed, 1e-9)
        records = []
        for i, row in enumerate(self.rows):
            loss = values[i] / world
            if loss != loss or loss in (float("inf"), float("-inf")):
                kept = (f"the last good checkpoint is {last_saved}" if last_saved is not None
                        else "no checkpoint was written before it")
                raise TrainingDiverged(f"loss became {loss} at step {row['step']}; {kept}")
            record = {"step": row["step"], "loss": loss, "lr": row["lr"], "grad_norm": norms[i],
                      "tokens": row["step"] * self.tokens_per_step, "tokens_per_s": tokens_per_s}
            if has_weights:
                record["stream_weight_mean"] = means[i]
                record["stream_weight_entropy"] = entropies[i]
            records.append(record)
        self.rows = []
        self.restart_clock()
        return records, values[-1] > 0
