"""Where parscale's Triton kernels (skinny_matmul.py, decode_attention.py) can run: Triton installed and a CUDA
GPU of compute capability 8.0 or newer (Ampere, Hopper and later: bf16 and the loads the kernels use).
Everywhere else the callers take the plain path."""

from __future__ import annotations

import torch

try:
    import triton
except ImportError:  # CPU installs
    triton = None

MIN_CAPABILITY = (8, 0)
_CAPABLE: dict[int, bool] = {}  # device index -> capable; a plain dict, so a compiled step only looks it up


def kernels_can_run(device: torch.device) -> bool:
    """Whether the kernels can run on this device."""
    if triton is None or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index) >= MIN_CAPABILITY
    return _CAPABLE[index]
