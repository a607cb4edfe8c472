"""A Triton matmul for the few-row products of a decode step: y = x @ W^T (+ b) with x of at most 16 rows.

At batch 1 a decode step multiplies P·B rows (1 to 16) by every weight matrix of the model: the step is a
stream of weight reads, and the library GEMMs that torch picks for such skinny shapes read at well under
half of the memory bandwidth (benchmarks/README.md: 1.5–2.1 TB/s of an H200's 4.8 on the 1.6B shape's
projections). This kernel is written for exactly that case: each program reads `block_n` whole weight rows
once, streaming along K (the weight's contiguous dimension) in `block_k` slices, multiplies them by all the
x rows held in registers and accumulates in fp32 — the weight bytes are read once, whatever the row count.

    y = skinny_linear(x, weight, bias)      # x [..., K] with at most MAX_ROWS rows; CUDA + Triton only
    use_skinny_matmul(model)                # every projection and the LM head, from outside (parscale bench --skinny)

Two forms of the product per slice: a broadcast multiply and sum (any row count, `block_n` as small as 1,
so that narrow matrices still spread over every multiprocessor) and `tl.dot` with the rows padded to 16
(tensor cores; `block_n` ≥ 16). Which block sizes are fastest for each (rows, N, K) is measured, not
guessed: scripts/skinny_matmul_bench.py times every candidate against torch's own matmul.

Where it cannot run (no CUDA, no Triton, more rows, other dtypes) `skinny_linear` is `F.linear`; the
kernel's arithmetic is checked against `F.linear` under Triton's CPU interpreter (tests/test_skinny_matmul.py)
and on a GPU by `pytest -m gpu`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: skinny_linear is F.linear
    triton = None


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False

    def block_m(self, rows: int) -> int:
        return max(16, _next_pow2(rows)) if self.use_dot else _next_pow2(rows)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Measured best block sizes, {(rows, n, k): SkinnyConfig}: scripts/skinny_matmul_bench.py writes them
# (--tuned-out) and PARSCALE_SKINNY_CONFIGS=that file, or set_tuned_configs, makes them the defaults.
_TUNED: dict[tuple[int, int, int], SkinnyConfig] = {}


def set_tuned_configs(path_or_table) -> None:
    """Use measured block sizes: a JSON file (list of {rows, n, k, config}) or such a list."""
    table = path_or_table
    if isinstance(path_or_table, (str, os.PathLike)):
        with open(path_or_table) as f:
            table = json.load(f)
    _TUNED.clear()
    for row in table:
        _TUNED[(int(row["rows"]), int(row["n"]), int(row["k"]))] = SkinnyConfig(**row["config"])


def default_config(rows: int, n: int, k: int) -> SkinnyConfig:
    """The measured block sizes of this product if there are any, else enough programs to cover every
    multiprocessor several times."""
    if (rows, n, k) in _TUNED:
        return _TUNED[(rows, n, k)]
    block_k = 256 if k >= 256 else _next_pow2(k)
    # Weight rows per program: small enough for >= ~4 programs per multiprocessor on a 132-SM card.
    block_n = 8
    while block_n > 1 and n // block_n < 512:
        block_n //= 2
    if rows > 8:
        block_k = min(block_k, 128)
    return SkinnyConfig(block_n=block_n, block_k=block_k)


def kernel_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can take this product (else skinny_linear is F.linear)."""
    return (triton is not None and x.is_cuda and weight.is_cuda and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.dim() == 2 and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1]
            and 0 < x.numel() // max(1, x.shape[-1]) <= MAX_ROWS)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through the kernel where it can run, else F.linear."""
    if not kernel_available(x, weight):
        return F.linear(x, weight, bias)
    c = config or default_config(x.numel() // x.shape[-1], *weight.shape)
    # A torch operator, so that torch.compile and CUDA graphs take the kernel as one opaque call.
    return torch.ops.parscale.skinny_linear(x, weight, bias, c.block_n, c.block_k, c.num_warps, c.num_stages,
                                            c.use_dot)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: SkinnyConfig | None = None, _kernel=None) -> torch.Tensor:
    """Run the kernel (any device Triton runs on, the CPU interpreter included); no fallback."""
    if triton is None:
        raise RuntimeError("the skinny matmul needs Triton (pip install triton)")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if not 0 < rows <= MAX_ROWS:
        raise ValueError(f"the skinny matmul takes 1 to {MAX_ROWS} rows, got {rows}")
    config = config or default_config(rows, n, k)
    if config.use_dot and config.block_n < 16:
        raise ValueError(f"the tl.dot form needs block_n >= 16, got {config.block_n}")
    y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n),)
    (_kernel or _skinny_kernel)[grid](
        x2, weight, bias if bias is not None else weight, y, rows, n, k,
        x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m(rows), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, USE_DOT=config.use_dot,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y.reshape(*x.shape[:-1], n)


class SkinnyLinear(nn.Linear):
    """nn.Linear whose few-row products go through the kernel (any other call is F.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)


def use_skinny_matmul(model, enable: bool = True):
    """Route the decoder layers' projections and the LM head through the kernel (in place; returns the model).
    The parameters and the state dict are untouched (only the modules' class changes); `enable=False` undoes it."""
    cls = SkinnyLinear if enable else nn.Linear
    for module in [*model.model.layers.modules(), model.lm_head]:
        if type(module) in (nn.Linear, SkinnyLinear):
            module.__class__ = cls
    return model


def uses_skinny_matmul(model) -> bool:
    return isinstance(model.lm_head, SkinnyLinear)


if os.environ.get("PARSCALE_SKINNY_CONFIGS"):
    set_tuned_configs(os.environ["PARSCALE_SKINNY_CONFIGS"])

if triton is not None:

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        m_ok = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            # The weight is read once and never again: keep it from pushing x out of the cache.
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if USE_DOT:
                acc += tl.dot(x, tl.trans(w))
            else:
                acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @torch.library.triton_op("parscale::skinny_linear", mutates_args=())
    def _skinny_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int,
                   num_warps: int, num_stages: int, use_dot: bool) -> torch.Tensor:
        config = SkinnyConfig(block_n, block_k, num_warps, num_stages, use_dot)
        return launch(x, weight, bias, config, _kernel=torch.library.wrap_triton(_skinny_kernel))
