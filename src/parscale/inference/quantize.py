"""Weight-only int8 quantization of the backbone's projections, applied from outside the model.

    model = quantize_int8(parscale.load(folder, dtype="bfloat16"))   # in place; returns the model

Every decoder layer's q/k/v/o and gate/up/down projection becomes an `Int8Linear`: its weight is stored
as int8 with one scale per output row (symmetric: w ≈ q · s, q in [−127, 127], s = max|w_row| / 127),
and its output is computed as linear(x, q) · s in the activations' dtype. It halves the memory of those
weights in bf16; it does not make a step faster by itself: without a compiler the int8 → bf16 cast is
its own kernel, so a decode step reads the int8 weight and then a bf16 copy (measured 1.97× slower than
bf16 on the graph engine, benchmarks/README.md), and torch.compile does not rescue it: the compiled
step took 26.7 ms against 3.2 ms in bf16 (1.6B shape, P = 1, one H200). The embedding, the LM head, the
norms, the prefixes and the aggregator keep their dtype (they hold the ParScale parameters, and the
LM head's errors reach every logit). The model stays the same function otherwise: generate, the decode
engine, CUDA graphs and `.to(dtype)` work on it (the int8 tensors keep their dtype; the scales follow
the model's). A quantized model is for inference: saving it is refused, save the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with a per-output-row scale (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer computes with, [out, in], in the scale's dtype."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eagerly the cast is a kernel of its own; compiled, the batch-1 step was 8x slower than bf16 (measured).
        out = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def quantize_int8(model):
    """Replace every decoder layer's projections by Int8Linear, in place; returns the model."""
    if is_quantized(model):
        raise ValueError("the model is quantized already")
    from parscale.inference.fuse import is_fused

    if is_fused(model):
        raise ValueError("the model's projections are fused (inference/fuse.py); quantize the unfused model "
                         "(fuse, or quantize, not both)")
    for layer in model.model.layers:
        for path in PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, name, Int8Linear(getattr(parent, name)))
    model.eval()
    return model


def is_quantized(model) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
