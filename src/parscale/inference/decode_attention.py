"""One Triton kernel for a decode step's attention: every stream's query against its prefix + cache.

A decode step's attention in the plain path (model/transformer.py, `_grouped_decode_attention`) is two
matmuls, a masked softmax and the copies around them, for every layer. This kernel does the whole of it in
one launch: one program per (row, KV head) holds that KV head's query heads (grouped-query attention: the
query heads h with h // (heads / kv_heads) equal to it) and streams the row's keys and values once, in
`block_s` slots at a time, with an online softmax in fp32 (flash-decoding without the split).

    out = decode_attention(q, k, v, blocked)   # q [n, heads, 1, d], k/v [n, kv, S, d], blocked [n|1, 1, 1, S]
    use_decode_attention(model)                # every layer's decode attention through it, from outside

`blocked` is True where a slot is hidden (padding, unwritten slots), as the plain path's. Scores and softmax
are fp32 throughout (the plain path rounds the scores to the dtype before its fp32 softmax), so in bf16 the
two agree to rounding, and in fp32 to summation order. Where the kernel cannot run (CPU, no Triton, head_dim
over 256) `decode_attention` is the plain path; the arithmetic is checked under Triton's CPU interpreter and
on a GPU (tests/test_decode_attention.py).
"""

from __future__ import annotations

import os

import torch

from parscale.model.transformer import Attention, _attend, _grouped_decode_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: decode_attention is the plain path
    triton = None

BLOCK_S = int(os.environ.get("PARSCALE_DECODE_ATTENTION_BLOCK_S", "16"))


def kernel_available(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (triton is not None and q.is_cuda and q.dtype == k.dtype
            and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and q.shape[2] == 1 and q.shape[3] <= 256 and q.shape[1] % k.shape[1] == 0)


def decode_attention(q, k, v, blocked):
    """softmax(q k^T / sqrt(d), hidden where `blocked`) v for one query per row, through the kernel where it
    can run, else the plain path."""
    if not kernel_available(q, k):
        return _grouped_decode_attention(q, k, v, blocked)
    return _call_kernel(q, k, v, blocked)


def _call_kernel(q, k, v, blocked):
    # A torch operator, so that torch.compile and CUDA graphs take the kernel as one opaque call. (The tests
    # put `launch` here to run a model through the kernel under Triton's CPU interpreter.)
    return torch.ops.parscale.decode_attention(q, k, v, blocked)


def launch(q, k, v, blocked, block_s: int = BLOCK_S, _kernel=None) -> torch.Tensor:
    """Run the kernel (any device Triton runs on, the CPU interpreter included); no fallback."""
    if triton is None:
        raise RuntimeError("the decode attention kernel needs Triton (pip install triton)")
    n, heads, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    if t != 1 or k.shape != v.shape or k.shape[0] != n or k.shape[3] != d or heads % kv:
        raise ValueError(f"decode attention takes q [n, heads, 1, d] and k, v [n, kv, S, d] with kv dividing heads;"
                         f" got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if blocked.dim() != 4 or blocked.shape[-1] != s or blocked.shape[0] not in (1, n):
        raise ValueError(f"blocked must be [n or 1, 1, 1, {s}], got {tuple(blocked.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    mask = blocked.reshape(blocked.shape[0], s)  # a view: the plan inverts the mask once per forward
    out = torch.empty(n, heads, 1, d, device=q.device, dtype=q.dtype)
    group = heads // kv
    (_kernel or _decode_attention_kernel)[(n, kv)](
        q, k, v, mask, out, s, d, group, d**-0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0) if mask.shape[0] > 1 else 0, out.stride(0), out.stride(1),
        BLOCK_G=max(1, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(d), BLOCK_S=block_s,
    )
    return out


class KernelAttention(Attention):
    """Attention whose decode steps go through the kernel (every other call is the plain path)."""

    def core_attention(self, q, k, v, plan):
        if plan.grouped_decode:
            return decode_attention(q, k, v, plan.blocked)
        return _attend(q, k, v, plan)


def use_decode_attention(model, enable: bool = True):
    """Every layer's decode attention through the kernel (in place, class swap; returns the model)."""
    cls = KernelAttention if enable else Attention
    for layer in model.model.layers:
        layer.self_attn.__class__ = cls
    return model


def uses_decode_attention(model) -> bool:
    return isinstance(model.model.layers[0].self_attn, KernelAttention)


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, S, D, GROUP, scale,
                                 stride_qn, stride_qh, stride_kn, stride_kh, stride_ks,
                                 stride_vn, stride_vh, stride_vs, stride_mn, stride_on, stride_oh,
                                 BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < GROUP
        d_ok = offs_d < D
        heads = kv_head * GROUP + offs_g
        q = tl.load(q_ptr + row * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        best = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        k_base = k_ptr + row * stride_kn + kv_head * stride_kh
        v_base = v_ptr + row * stride_vn + kv_head * stride_vh
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < S
            kv_mask = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale  # [G, S]
            hidden = tl.load(m_ptr + row * stride_mn + offs_s, mask=s_ok, other=0) != 0
            scores = tl.where((hidden | ~s_ok)[None, :], float("-inf"), scores)
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            # A tile with every slot hidden so far leaves best at -inf: keep exp() away from -inf - -inf.
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            rescale = tl.exp(best - safe)
            p = tl.exp(scores - safe[:, None])
            v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            total = total * rescale + tl.sum(p, axis=1)
            best = new_best
        out = acc / total[:, None]
        tl.store(o_ptr + row * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])

    @torch.library.triton_op("parscale::decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             blocked: torch.Tensor) -> torch.Tensor:
        return launch(q, k, v, blocked, _kernel=torch.library.wrap_triton(_decode_attention_kernel))
