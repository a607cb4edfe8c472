"""Training-only levers against stream collapse, applied from outside the model.

Collapse, as measured in experiments/streams_effect: during warm-up the aggregator's softmax saturates
with one stream at the ε cap; its gradient then vanishes and the streams never come back. Four levers,
each a TrainConfig switch (off by default):

- a separate learning rate and warm-up for prefixes and aggregator (`parscale_lr_mult`,
  `parscale_warmup`): a slower or later aggregator cannot saturate while the backbone is still random;
- a learning rate of the aggregator's own (`aggregator_lr_mult`, a multiple of the prefixes' rate): Adam
  moves each weight by about its rate per step however small the gradient, and the aggregator's last layer
  sums hundreds to thousands of activations per token, so its logits move that many times the rate. On a
  pretrained backbone (experiments/recycle_smollm2: SmolLM2-135M, frozen, lr 2e-3) one stream reached the
  ε cap by step ~20 from a 0.01-nat head start; a slower aggregator lets the prefixes learn first (at 0.01×
  there it only delayed the collapse: the favoured stream's prefix also gets the most gradient);
- stream dropout (`stream_dropout = q`): in training, each stream's aggregation logit is masked with
  probability q per token (never all of a token's streams), so no stream can carry every token alone
  and every stream keeps receiving gradient; evaluation and inference are unchanged;
- an aggregator z-loss (`aggregator_z_loss = c`): c · mean(logsumexp(aggregator logits)²) is added to
  the loss — the router z-loss of mixture-of-experts models (ST-MoE), which keeps the logits small and
  so away from saturation.

The hooks sit on `model.model.aggregate_layer` (the module that produces the P logits); nothing in the
model's code or its checkpoints changes.
"""

from __future__ import annotations

import torch


class AggregatorHooks:
    """Stream dropout and the z-loss, attached to the aggregator of one model."""

    def __init__(self, model, stream_dropout: float = 0.0, z_loss: float = 0.0):
        if model.config.parscale_n == 1:
            raise ValueError("stream dropout and the aggregator z-loss need P > 1")
        if not 0.0 <= stream_dropout < 1.0:
            raise ValueError(f"stream_dropout must be in [0, 1), got {stream_dropout}")
        if z_loss < 0:
            raise ValueError(f"aggregator_z_loss must be >= 0, got {z_loss}")
        self.stream_dropout, self.z_loss = stream_dropout, z_loss
        self.penalty: torch.Tensor | None = None  # the z-loss term of the last training forward
        self._handle = model.model.aggregate_layer.register_forward_hook(self._hook)

    def _hook(self, module, _inputs, logits):
        if not module.training:
            return None
        if self.z_loss:
            self.penalty = self.z_loss * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        if self.stream_dropout:
            drop = torch.rand(logits.shape, device=logits.device) < self.stream_dropout
            drop = drop & ~drop.all(dim=-1, keepdim=True)  # a token always keeps at least one stream
            return logits.masked_fill(drop, torch.finfo(logits.dtype).min)
        return None

    def take_penalty(self) -> torch.Tensor | None:
        penalty, self.penalty = self.penalty, None
        return penalty

    def remove(self) -> None:
        self._handle.remove()


def is_parscale_name(name: str) -> bool:
    return "prefix_k" in name or "prefix_v" in name or "aggregate_layer" in name
