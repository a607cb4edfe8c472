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

The kernel also takes what sits on either side of a decoder layer's products, so that a layer is 4 of
these calls and its attention rather than ~14 kernels (`use_skinny_matmul(model, fuse_layers=True)` on a
model with fused projections, inference/fuse.py; `SkinnyDecoderLayer`):

    skinny_linear(x, w_qkv, norm_weight=g, eps=eps)     # rmsnorm(x) @ W^T: the RMSNorm before the product
    skinny_linear(x, w_gate_up, swiglu=True)            # silu(x @ Wg^T) * (x @ Wu^T), W = [Wg; Wu] stacked
    skinny_linear(x, w_o, residual=r)                   # r + x @ W^T: the residual add after it

The RMSNorm is folded in as g ⊙ x times each row's 1/rms, which the same pass over x sums up (no second
read of x): exact, but rounded once where the plain RMSNorm rounds x/rms to the dtype before the weight.
The SwiGLU gate is an epilogue: each program reads the gate rows and the matching up rows and writes
silu(gate)·up, rounded as the plain path rounds it (the product's outputs, silu, the product), and so is the
residual add. Epilogues cost a program nothing it does not already hold; a prologue is repeated by every
program over all of x (an H100 measured it: benchmarks/README.md), which is why the gate is not folded into
the down product's input.

Where it cannot run (no CUDA, no Triton, a GPU before compute capability 8.0, more rows, other dtypes)
`skinny_linear` is the plain path (`F.linear` and the RMSNorm, SiLU and add of the model); the kernel's
arithmetic is checked against that under Triton's CPU interpreter (tests/test_skinny_matmul.py) and on a GPU
by `pytest -m gpu`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parscale.inference.class_swap import swap_class
from parscale.inference.triton_support import kernels_can_run, pdl_for
from parscale.model.transformer import DecoderLayer

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


def default_config(rows: int, n: int, k: int, *, dtype: torch.dtype) -> SkinnyConfig:
    """The measured block sizes of this product if there are any, else the family an H100 measured fastest
    at 8 rows (benchmarks/README.md): the tl.dot form, 16 weight rows per program, or 64 for the widest
    matrices. Float32 keeps the broadcast form (the tl.dot family was measured in 16-bit only; in fp32 its dot
    runs in IEEE fp32, not TF32), with enough programs to cover every multiprocessor several times. `dtype` is
    required: the measured blocks are for 16-bit weights."""
    if dtype != torch.float32:
        if (rows, n, k) in _TUNED:
            return _TUNED[(rows, n, k)]
        if n >= 16384:
            return SkinnyConfig(block_n=64, block_k=128 if n < 65536 else 256, use_dot=True)
        return SkinnyConfig(block_n=16, block_k=256, use_dot=True)
    block_k = 256 if k >= 256 else _next_pow2(k)
    # Weight rows per program: small enough for >= ~4 programs per multiprocessor on a 132-SM card.
    block_n = 8
    while block_n > 1 and n // block_n < 512:
        block_n //= 2
    if rows > 8:
        block_k = min(block_k, 128)
    return SkinnyConfig(block_n=block_n, block_k=block_k)


def kernel_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can take this product (else skinny_linear is the plain path)."""
    return (kernels_can_run(x.device) and weight.device == x.device and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.dim() == 2 and weight.stride(1) == 1 and x.shape[-1] == weight.shape[-1]
            and 0 < x.numel() // max(1, x.shape[-1]) <= MAX_ROWS)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, as the plain model computes it (model/transformer.py's RMSNorm, SwiGLU and
    residual add around F.linear): the fallback and the tests' oracle."""
    if norm_weight is not None:
        x32 = x.float()
        x = norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, weight, bias)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None, *, norm_weight: torch.Tensor | None = None,
                  eps: float = 0.0, swiglu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), with the optional RMSNorm before, SwiGLU gate and residual add after (module
    docstring), through the kernel where it can run, else the plain path (`reference`)."""
    if not kernel_available(x, weight):
        return reference(x, weight, bias, norm_weight, eps, swiglu, residual)
    c = config or default_config(x.numel() // x.shape[-1], weight.shape[0], weight.shape[1], dtype=x.dtype)
    return _call_kernel(x, weight, bias, c, norm_weight=norm_weight, eps=float(eps), swiglu=swiglu,
                        residual=residual)


def _call_kernel(x, weight, bias, c: SkinnyConfig, *, norm_weight, eps, swiglu, residual):
    # A torch operator, so that torch.compile and CUDA graphs take the kernel as one opaque call. (The tests
    # put `launch` here to run a model's layers through the kernel under Triton's CPU interpreter.)
    return torch.ops.parscale.skinny_linear(x, weight, bias, norm_weight, residual, eps, swiglu,
                                            c.block_n, c.block_k, c.num_warps, c.num_stages, c.use_dot)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: SkinnyConfig | None = None, _kernel=None, *, norm_weight: torch.Tensor | None = None,
           eps: float = 0.0, swiglu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel (any device Triton runs on, the CPU interpreter included); no fallback."""
    if triton is None:
        raise RuntimeError("the skinny matmul needs Triton (pip install triton)")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {k}")
    if swiglu and n % 2:
        raise ValueError(f"swiglu takes a weight of stacked gate and up rows (an even count), got {n}")
    n_out = n // 2 if swiglu else n
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if not 0 < rows <= MAX_ROWS:
        raise ValueError(f"the skinny matmul takes 1 to {MAX_ROWS} rows, got {rows}")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    r2 = None
    if residual is not None:
        if residual.numel() != rows * n_out:
            raise ValueError(f"residual has {residual.numel()} elements, the output {rows * n_out}")
        r2 = residual.reshape(rows, n_out)
        if r2.stride(1) != 1:
            r2 = r2.contiguous()
    config = config or default_config(rows, n, k, dtype=x.dtype)
    if config.use_dot and config.block_n < 16:
        raise ValueError(f"the tl.dot form needs block_n >= 16, got {config.block_n}")
    y = torch.empty(rows, n_out, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n_out, config.block_n),)
    pdl = pdl_for(x.device)
    unused = weight  # a pointer the kernel never reads where an optional tensor is absent
    (_kernel or _skinny_kernel)[grid](
        x2, weight, bias if bias is not None else unused, norm_weight if norm_weight is not None else unused,
        r2 if r2 is not None else unused, y, rows, n_out, k,
        x2.stride(0), weight.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), eps,
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=r2 is not None,
        BLOCK_M=config.block_m(rows), BLOCK_N=config.block_n, BLOCK_K=config.block_k, USE_DOT=config.use_dot,
        PDL=pdl, num_warps=config.num_warps, num_stages=config.num_stages, **({"launch_pdl": True} if pdl else {}),
    )
    return y.reshape(*x.shape[:-1], n_out)


class SkinnyLinear(nn.Linear):
    """nn.Linear whose few-row products go through the kernel (any other call is F.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)


class SkinnyDecoderLayer(DecoderLayer):
    """A decoder layer of fused projections (inference/fuse.py) as four kernel calls around its attention:
    RMSNorm + qkv, o_proj + residual, RMSNorm + gate/up + SiLU·up, down + residual. Calls of more rows than
    the kernel takes are the plain layer."""

    def forward(self, x, cos, sin, plan, cache=None, layer_idx=0):
        attn, mlp = self.self_attn, self.mlp
        if not kernel_available(x, attn.qkv_proj.weight):
            return super().forward(x, cos, sin, plan, cache, layer_idx)
        norm = self.input_layernorm
        qkv = skinny_linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias, norm_weight=norm.weight, eps=norm.eps)
        q, k, v = qkv.split(attn.qkv_sizes, dim=-1)
        x = skinny_linear(attn.attend(q, k, v, cos, sin, plan, cache, layer_idx), attn.o_proj.weight,
                          attn.o_proj.bias, residual=x)
        norm = self.post_attention_layernorm
        act = skinny_linear(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, norm_weight=norm.weight, eps=norm.eps,
                            swiglu=True)
        return skinny_linear(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=x)


def use_skinny_matmul(model, enable: bool = True, fuse_layers: bool = False):
    """Route the decoder layers' projections and the LM head through the kernel (in place; returns the model).
    `fuse_layers`: also fold the layers' RMSNorms, SiLU gate and residual adds into it (SkinnyDecoderLayer;
    needs fused projections, inference/fuse.py). The parameters and the state dict are untouched (only the
    modules' class changes); `enable=False` undoes it."""
    from parscale.inference.fuse import is_fused

    if enable and fuse_layers and not is_fused(model):
        raise ValueError("fuse_layers folds the norms into the fused q/k/v and gate/up products: fuse the model's "
                         "projections first (inference/fuse.py)")
    kernels_can_run(model.lm_head.weight.device)  # looked up once here, not inside a compiled step
    cls = SkinnyLinear if enable else nn.Linear
    for module in [*model.model.layers.modules(), model.lm_head]:
        if type(module) in (nn.Linear, SkinnyLinear):
            swap_class(module, cls)
    layer_cls = SkinnyDecoderLayer if enable and fuse_layers else DecoderLayer
    for layer in model.model.layers:
        swap_class(layer, layer_cls)
    return model


def uses_skinny_matmul(model) -> bool:
    return isinstance(model.lm_head, SkinnyLinear)


def uses_skinny_layers(model) -> bool:
    return isinstance(model.model.layers[0], SkinnyDecoderLayer)


if os.environ.get("PARSCALE_SKINNY_CONFIGS"):
    set_tuned_configs(os.environ["PARSCALE_SKINNY_CONFIGS"])

if triton is not None:
    from parscale.inference.triton_support import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _weight_slice(w_ptr, offs_n, k, w_mask, stride_wn):
        # The weight is read once and never again: keep it from pushing x out of the cache.
        return tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=w_mask, other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def _product(x, w, USE_DOT: tl.constexpr):
        if USE_DOT:
            if x.dtype == tl.float32:  # Triton's default for fp32 is TF32 (10 mantissa bits): ask for fp32
                return tl.dot(x, tl.trans(w), input_precision="ieee")
            return tl.dot(x, tl.trans(w))
        return tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)

    @triton.jit
    def _accumulate(acc, acc_up, squares, w, w_up, x_ptr, g_ptr, offs_m, m_ok, k, k_ok, stride_xm,
                    NORM: tl.constexpr, SWIGLU: tl.constexpr, USE_DOT: tl.constexpr):
        """One K slice: x's slice (g ⊙ x with NORM, its squares summed element-wise) times the weight slices."""
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # g ⊙ x now, times the row's 1/rms at the end
            x32 = x.to(tl.float32)
            squares += x32 * x32
            g = tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            x = (x32 * g[None, :]).to(x.dtype) if USE_DOT else x32 * g[None, :]
        acc += _product(x, w, USE_DOT)
        if SWIGLU:
            acc_up += _product(x, w_up, USE_DOT)
        return acc, acc_up, squares

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, b_ptr, g_ptr, r_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_rm,
                       stride_ym, eps, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                       RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PDL: tl.constexpr):
        # N is the output width; with SWIGLU the weight has 2N rows, the up rows N below the gate rows.
        if PDL:  # the next kernel may launch once every program here has started (triton_support.py)
            gdc_launch_dependents()
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        m_ok = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Squares summed element-wise and reduced once after the loop (a reduction per slice would cost a
        # cross-thread exchange every iteration).
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        # The first slice by itself: its weights are read before waiting for the kernel that wrote x.
        k = offs_k
        k_ok = k < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        w = _weight_slice(w_ptr, offs_n, k, w_mask, stride_wn)
        w_up = _weight_slice(w_ptr, offs_n + N, k, w_mask, stride_wn) if SWIGLU else w
        if PDL:
            gdc_wait()
        acc, acc_up, squares = _accumulate(acc, acc_up, squares, w, w_up, x_ptr, g_ptr, offs_m, m_ok, k, k_ok,
                                           stride_xm, NORM, SWIGLU, USE_DOT)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            w_mask = n_ok[:, None] & k_ok[None, :]
            w = _weight_slice(w_ptr, offs_n, k, w_mask, stride_wn)
            w_up = _weight_slice(w_ptr, offs_n + N, k, w_mask, stride_wn) if SWIGLU else w
            acc, acc_up, squares = _accumulate(acc, acc_up, squares, w, w_up, x_ptr, g_ptr, offs_m, m_ok, k, k_ok,
                                               stride_xm, NORM, SWIGLU, USE_DOT)
        if NORM:
            rstd = (1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps)).to(tl.float32)
            acc = acc * rstd[:, None]
            if SWIGLU:
                acc_up = acc_up * rstd[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                acc_up += tl.load(b_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out_mask = m_ok[:, None] & n_ok[None, :]
        dtype = y_ptr.dtype.element_ty
        out = acc.to(dtype)
        if SWIGLU:  # silu(gate) * up, each rounded where the plain path rounds it
            gate = out.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            out = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        if RESIDUAL:  # r + y with y rounded first, as the plain path adds the product's output
            r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask, other=0.0)
            out = (r.to(tl.float32) + out.to(tl.float32)).to(dtype)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out, mask=out_mask)

    @torch.library.triton_op("parscale::skinny_linear", mutates_args=())
    def _skinny_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                   residual: torch.Tensor | None, eps: float, swiglu: bool, block_n: int, block_k: int,
                   num_warps: int, num_stages: int, use_dot: bool) -> torch.Tensor:
        config = SkinnyConfig(block_n, block_k, num_warps, num_stages, use_dot)
        return launch(x, weight, bias, config, _kernel=torch.library.wrap_triton(_skinny_kernel),
                      norm_weight=norm_weight, eps=eps, swiglu=swiglu, residual=residual)
