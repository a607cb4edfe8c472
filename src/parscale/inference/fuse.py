"""Fused projections for inference, applied from outside the model: fewer, larger matmuls per layer.

    model = fuse_projections(parscale.load(folder, dtype="bfloat16"))   # in place; returns the model

In every decoder layer the q, k and v projections become one Linear `qkv_proj` (their weights, and
biases, stacked in that order) and gate and up become one `gate_up_proj`; the forward splits the
output (a view, no copy). At batch 1 a decode step is a chain of small kernels, so 7 matmuls per layer
become 4 and each reads the same bytes as before.

The fused weight is the only copy (no extra memory), so everything that changes it changes the one
tensor the forward reads: an in-place update, `.to(dtype)`, moving devices. The state dict keeps the
released names: `state_dict()` splits the stacked weights back into q_proj/k_proj/v_proj/gate_proj/
up_proj entries and `load_state_dict` stacks them again (module state-dict hooks), so `parscale.save`
writes the released format and a released state dict loads into a fused model, with or without
`assign=True`. A fused model is for inference: the library's training and conversion code address the
projections by name and are not given fused models; int8 quantization and fusion exclude each other.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj")
MLP_PARTS = ("gate_proj", "up_proj")


def fuse_wanted(fuse: bool | None, quantize: str | None) -> bool:
    """--fuse / --no-fuse, or by default: fused float projections, unless the weights are quantized."""
    if fuse and quantize:
        raise ValueError("--fuse and --quantize exclude each other (fuse, or quantize, not both)")
    return (quantize is None) if fuse is None else fuse


def fuse_projections(model):
    """Fuse every decoder layer's q/k/v and gate/up projections, in place; returns the model."""
    from parscale.inference.quantize import is_quantized

    if is_fused(model):
        raise ValueError("the model's projections are fused already")
    if is_quantized(model):
        raise ValueError("the model is int8-quantized; fusing applies to float projections (fuse, or quantize, "
                         "not both)")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_sizes = tuple(getattr(attn, name).out_features for name in ATTENTION_PARTS)
        attn.qkv_proj = _stacked(attn, ATTENTION_PARTS)
        attn.register_state_dict_post_hook(_split_qkv)
        attn.register_load_state_dict_pre_hook(_stack_qkv)
        mlp.gate_up_proj = _stacked(mlp, MLP_PARTS)
        mlp.register_state_dict_post_hook(_split_gate_up)
        mlp.register_load_state_dict_pre_hook(_stack_gate_up)
    model.eval()
    return model


def is_fused(model) -> bool:
    return any(hasattr(layer.self_attn, "qkv_proj") for layer in model.model.layers)


def _stacked(module: nn.Module, parts: tuple[str, ...]) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side; the parts are removed from `module`."""
    linears = [getattr(module, name) for name in parts]
    first = linears[0]
    with torch.device("meta"):  # the weights come from the parts below: nothing to initialise
        fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None)
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]),
                                requires_grad=first.weight.requires_grad)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=first.bias.requires_grad)
    for name in parts:
        delattr(module, name)
    return fused


def _split(state_dict: dict, prefix: str, fused: str, parts: tuple[str, ...], sizes) -> None:
    for kind in ("weight", "bias"):
        key = f"{prefix}{fused}.{kind}"
        if key in state_dict:
            for name, piece in zip(parts, state_dict.pop(key).split(list(sizes)), strict=True):
                state_dict[f"{prefix}{name}.{kind}"] = piece


def _stack(state_dict: dict, prefix: str, fused: str, parts: tuple[str, ...], error_msgs: list) -> None:
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in parts]
        present = [k for k in keys if k in state_dict]
        if len(present) == len(keys):
            state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
        elif present:  # load_state_dict raises with every message collected here
            missing = ", ".join(k for k in keys if k not in state_dict)
            error_msgs.append(f"{missing} missing: the fused {prefix}{fused}.{kind} needs all of {', '.join(keys)}")


def _split_qkv(module, state_dict, prefix, local_metadata):
    _split(state_dict, prefix, "qkv_proj", ATTENTION_PARTS, module.qkv_sizes)


def _split_gate_up(module, state_dict, prefix, local_metadata):
    half = module.gate_up_proj.out_features // 2
    _split(state_dict, prefix, "gate_up_proj", MLP_PARTS, (half, half))


def _stack_qkv(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _stack(state_dict, prefix, "qkv_proj", ATTENTION_PARTS, error_msgs)


def _stack_gate_up(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _stack(state_dict, prefix, "gate_up_proj", MLP_PARTS, error_msgs)
