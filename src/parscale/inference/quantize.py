"""Weight-only int8 quantization of the backbone's projections, applied from outside the model.

    model = quantize_int8(parscale.load(folder, dtype="bfloat16"))   # in place; returns the model

Every decoder layer's q/k/v/o and gate/up/down projection becomes an `Int8Linear`: its weight is stored
as int8 with one scale per output row (symmetric: w ≈ q · s, q in [−127, 127], s = max|w_row| / 127),
and its output is computed as linear(x, q) · s in the activations' dtype. It halves the memory of those
weights in bf16; it does not make a step faster: without a compiler the int8 → bf16 cast is its own
kernel, so a decode step reads the int8 weight and then a bf16 copy (measured 1.97× slower than bf16 on
the graph engine, benchmarks/README.md). Compiled, a decode step's few rows (P · batch ≤ 16) are written
as one fp32 reduction that reads the int8 weight once (forward): 2.57 ms/token against 2.20 in bf16 at
P = 1 (26.7 ms as F.linear on the cast weight) and 12.1 against 2.26 at P = 8 (1.6B shape, one H200) —
at this shape a step is bound by its kernels' count, not by the weight bytes, so halving them gains
nothing, and the reduction re-reads the weight for every row. More rows (prefill) keep F.linear on the
cast weight. The embedding, the LM head, the norms, the prefixes and the aggregator keep their dtype (they
hold the ParScale parameters, and the LM head's errors reach every logit). The model stays the same
function otherwise: generate, the decode engine, CUDA graphs and `.to(dtype)` work on it (the int8 tensors
keep their dtype; the scales follow the model's). A quantized model is for inference: saving it is
refused, save the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows (P · batch in a decode step) a compiled projection is written as a reduction (forward).
# Measured in the compiled engine (1.6B shape, one H200): at P = 8, batch 1 the reduction took 12.1 ms/token and
# F.linear on the cast weight 46.7 (a chain of bare projections timed alone, scripts/int8_matvec.py, ranked
# them the other way round at 8 rows: not explained, benchmarks/README.md).
MATVEC_ROWS = 16

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
        if torch.compiler.is_compiling() and x.numel() <= MATVEC_ROWS * x.shape[-1]:
            # A decode step's few rows, compiled: written as a product and a sum in fp32, the compiler makes one
            # reduction kernel that reads the int8 weight once, scaled in its epilogue. As F.linear, the cast
            # was a kernel and a bf16 copy of its own (and the compiled step 8x slower than bf16, measured).
            out = ((x.float().unsqueeze(-2) * self.weight_int8.float()).sum(-1) * self.scale.float()).to(x.dtype)
        else:  # eager, or many rows (prefill): a library GEMM on the cast weight
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
