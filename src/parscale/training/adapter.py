"""Frozen-backbone ParScale adapters: only prefixes and aggregator, P chosen by picking the adapter.

    mark_only_parscale_trainable(model)          # freeze the backbone (training applies this)
    save_adapter(model, "runs/p4/adapter", backbone="runs/base")
    p4 = load_adapter(backbone_model, "runs/p4/adapter")   # shares the backbone's tensors
    p8 = load_adapter(backbone_model, "runs/p8/adapter")   # same backbone, another P

An adapter folder holds `adapter.safetensors` (the released key names of the ParScale tensors:
`model.layers.{i}.self_attn.prefix_k|prefix_v`, `model.aggregate_layer.{0,2}.weight|bias`) and
`adapter_config.json` (P, n_tokens, ε, whether it is the P = 1 prefix control, the backbone folder it was
trained on and its identity: a sha256 over the backbone's tensors rounded to bfloat16, so it holds in any
dtype). Loading checks the identity, so an adapter is never silently put on another backbone. Several
adapters on one backbone object share its tensors: switching P costs only the adapter's memory (dynamic
parallel scaling).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from parscale.io.files import check_writable, publish_folder, temporary_folder
from parscale.model.checkpoint import CheckpointError, check_tensor_set, load, write_safetensors
from parscale.model.convert import add_streams

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)


def is_parscale_parameter(name: str) -> bool:
    return "prefix_k" in name or "prefix_v" in name or "aggregate_layer" in name


def mark_only_parscale_trainable(model) -> list[str]:
    """requires_grad only on prefixes and aggregator; returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_parscale_parameter(name) and not name.endswith(".original"))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError("the model has no ParScale parameters to train (P = 1)")
    return names


def backbone_checksum(model) -> str:
    """sha256 over every backbone tensor's name, shape and values rounded to bfloat16, in name order.

    The identity does not depend on the dtype the backbone is held in: a released bf16 checkpoint,
    the same weights upcast to fp32 for training, or cast to fp16 for inference hash alike, while any
    change of a weight larger than bfloat16 rounding changes it. Magnitudes below 2^-14 (fp16's
    smallest normal number, under which fp16 keeps fewer bits than bf16) count as zero.
    """
    h = hashlib.sha256(b"parscale-backbone-v2")
    state = model.state_dict()
    for name in sorted(k for k in state if not is_parscale_parameter(k)):
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = state[name].detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.bfloat16)
            t = torch.where(t.abs() < 2**-14, torch.zeros_like(t), t) + 0.0  # + 0.0 turns -0 into 0
        t = t.contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(model, path, backbone: str | None = None, overwrite: bool = False) -> Path:
    """The model's ParScale tensors as an adapter folder: P > 1 streams, or the P = 1 prefix control (its prefix
    alone, no aggregator), each loadable on the same backbone by load_adapter."""
    cfg = model.config
    if cfg.parscale_n == 1 and not cfg.parscale_p1_prefix:
        raise ValueError("a P = 1 model without a prefix has no adapter")
    target = Path(path)
    check_writable(target, ADAPTER_FILES, overwrite)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
               if is_parscale_parameter(k)}
    meta = {"parscale_n": cfg.parscale_n, "parscale_n_tokens": cfg.parscale_n_tokens,
            "parscale_attn_smooth": cfg.parscale_attn_smooth, "parscale_p1_prefix": bool(cfg.parscale_p1_prefix),
            "backbone": str(backbone) if backbone else None,
            "backbone_id": backbone_checksum(model), "backbone_id_version": 2}
    tmp = temporary_folder(target)
    try:
        write_safetensors(tensors, tmp / ADAPTER_WEIGHTS, {"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, target, ADAPTER_FILES, overwrite)


def load_adapter(backbone, path):
    """A P-stream model on `backbone` (a P = 1 model or its folder) with the adapter's tensors."""
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{str(folder)!r} is not an adapter: it has no {ADAPTER_CONFIG}")
    try:
        meta = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("expected a JSON object")
        for key in ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth"):
            if key not in meta:
                raise ValueError(f"it has no {key}")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is damaged ({e})") from None
    if not isinstance(backbone, torch.nn.Module):
        backbone = load(backbone)
    if backbone.config.parscale_n != 1:
        raise CheckpointError(f"adapters go on a P = 1 backbone; this one has P = {backbone.config.parscale_n}")
    if "backbone_id" not in meta:
        raise CheckpointError(f"adapter {str(folder)!r} has no backbone_id in {ADAPTER_CONFIG} (written by an "
                              f"older parscale, whose identity depended on the dtype): save it again")
    checksum = backbone_checksum(backbone)
    if meta["backbone_id"] != checksum:
        raise CheckpointError(f"adapter {str(folder)!r} was trained on another backbone ({meta.get('backbone')}, "
                              f"id {meta['backbone_id'][:12]}…; this one {checksum[:12]}…)")
    model = add_streams(backbone, meta["parscale_n"], n_tokens=meta["parscale_n_tokens"],
                        smooth=meta["parscale_attn_smooth"], p1_prefix=bool(meta.get("parscale_p1_prefix", False)))
    ref = backbone.model.embed_tokens.weight
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} cannot be read ({type(e).__name__}: {e}); it is damaged "
                              f"or missing") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if is_parscale_parameter(k)}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    check_tensor_set(expected, found, f"adapter {str(folder)!r} does not fit its {ADAPTER_CONFIG}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in tensors.items():
            params[k].copy_(v.to(device=ref.device, dtype=ref.dtype))
    return model.eval()
