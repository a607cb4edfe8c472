"""Where parscale's Triton kernels (skinny_matmul.py, decode_attention.py) can run, and whether they chain by
programmatic dependent launch.

The kernels run with Triton installed on a CUDA GPU of compute capability 8.0 or newer (Ampere, Hopper and
later: bf16 and the loads the kernels use); everywhere else the callers take the plain path.

Programmatic dependent launch (PDL, Hopper and later, compute capability 9.0): a kernel launched with it may
start while the kernel before it is still finishing, and waits (`griddepcontrol.wait`) only where it first
reads what that kernel wrote. Each parscale kernel, with PDL on, lets its successor launch as soon as all its
programs have started, reads its first weight slice (weights are never written by a decode step), then waits,
then reads its inputs. Between two such kernels the launch gap and the first weight load overlap the
predecessor's tail; after any other kernel it behaves as a plain launch. It is off unless asked for
(`set_pdl(True)` or PARSCALE_PDL=1), and only ever used for eager launches (the graph engine's captured step):
a step compiled by torch.compile launches the kernels without it.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # CPU installs
    triton = None

HAS_GDC = False
if triton is not None:
    try:  # grid dependency control, the in-kernel half of PDL (Triton >= 3.3)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_GDC = True
    except ImportError:

        @triton.jit
        def gdc_wait():
            pass

        @triton.jit
        def gdc_launch_dependents():
            pass

MIN_CAPABILITY = (8, 0)
PDL_CAPABILITY = (9, 0)
_CAPABILITY: dict[int, tuple[int, int]] = {}  # device index -> capability; a plain dict a compiled step looks up
_PDL = {"enabled": os.environ.get("PARSCALE_PDL") == "1"}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITY[index]


def kernels_can_run(device: torch.device) -> bool:
    """Whether the kernels can run on this device."""
    if triton is None or device.type != "cuda":
        return False
    return _capability(device) >= MIN_CAPABILITY


def set_pdl(enabled: bool) -> None:
    """Launch the kernels with programmatic dependent launch where the GPU has it (module docstring)."""
    _PDL["enabled"] = bool(enabled)


def pdl_requested() -> bool:
    return _PDL["enabled"]


def pdl_for(device: torch.device) -> bool:
    """Whether this launch uses PDL: asked for, an eager launch, a GPU of compute capability 9.0 or newer."""
    return (_PDL["enabled"] and HAS_GDC and device.type == "cuda" and not torch.compiler.is_compiling()
            and _capability(device) >= PDL_CAPABILITY)
