"""Frozen-backbone ParScale adapters: only prefixes and aggregator, P chosen by picking the adapter.

    mark_only_parscale_trainable(model)          # freeze the backbone (training applies this)
    save_adapter(model, "runs/p4/adapter", backbone="runs/base")
    p4 = load_adapter(backbone_model, "runs/p4/adapter")   # shares the backbone's tensors
    p8 = load_adapter(backbone_model, "runs/p8/adapter")   # same backbone, another P

An adapter folder holds `adapter.safetensors` (the released key names of the ParScale tensors:
`model.layers.{i}.self_attn.prefix_k|prefix_v`, `model.aggregate_layer.{0,2}.weight|bias`) and
`adapter_config.json` (P, n_tokens, ε, the backbone folder it was trained on and a sha256 over the
backbone's tensors). Loading checks the checksum, so an adapter is never silently put on another
backbone. Several adapters on one backbone object share its tensors: switching P costs only the
adapter's memory (dynamic parallel scaling).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError, load, replace_dir
from .convert import add_streams

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


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
    """sha256 over every backbone tensor (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(k for k in state if not is_parscale_parameter(k)):
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(model, path, backbone: str | None = None) -> Path:
    cfg = model.config
    if cfg.parscale_n == 1:
        raise ValueError("a P = 1 model has no adapter")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
               if is_parscale_parameter(k)}
    meta = {"parscale_n": cfg.parscale_n, "parscale_n_tokens": cfg.parscale_n_tokens,
            "parscale_attn_smooth": cfg.parscale_attn_smooth, "backbone": str(backbone) if backbone else None,
            "backbone_sha256": backbone_checksum(model)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_adapter(backbone, path):
    """A P-stream model on `backbone` (a P = 1 model or its folder) with the adapter's tensors."""
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{str(folder)!r} is not an adapter: it has no {ADAPTER_CONFIG}")
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    if not isinstance(backbone, torch.nn.Module):
        backbone = load(backbone)
    if backbone.config.parscale_n != 1:
        raise CheckpointError(f"adapters go on a P = 1 backbone; this one has P = {backbone.config.parscale_n}")
    checksum = backbone_checksum(backbone)
    if meta.get("backbone_sha256") not in (None, checksum):
        raise CheckpointError(f"adapter {str(folder)!r} was trained on another backbone ({meta.get('backbone')}, "
                              f"sha256 {meta['backbone_sha256'][:12]}…; this one {checksum[:12]}…)")
    model = add_streams(backbone, meta["parscale_n"], n_tokens=meta["parscale_n_tokens"],
                        smooth=meta["parscale_attn_smooth"])
    ref = backbone.model.embed_tokens.weight
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if is_parscale_parameter(k)}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise CheckpointError(f"adapter {str(folder)!r} does not fit: missing {missing}, unexpected {extra}, "
                              f"mis-shaped {shaped}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in tensors.items():
            params[k].copy_(v.to(device=ref.device, dtype=ref.dtype))
    return model.eval()
