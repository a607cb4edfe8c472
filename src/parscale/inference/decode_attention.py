"""One Triton kernel for a decode step's attention: every stream's query against its prefix + cache.

A decode step's attention in the plain path (model/transformer.py, `_grouped_decode_attention`) is two
matmuls, a masked softmax and the copies around them, for every layer. This kernel does the whole of it in
one launch: one program per (row, KV head) holds that KV head's query heads (grouped-query attention: the
query heads h with h // (heads / kv_heads) equal to it) and streams the row's keys and values once, in
`block_s` slots at a time, with an online softmax in fp32. With `slot_splits` > 1 (flash-decoding) each
(row, KV head) is also split over the slots: every program streams one contiguous share of them into a partial
softmax (its max, sum and weighted values, fp32), and a second small kernel combines the shares per query head.
At batch 1 a step has few (row, KV head) pairs (P = 8 at 2 KV heads: 16), too few programs to keep a GPU busy
on their own; the split multiplies them at the price of one more launch. With `use_dot` a tile's two products
(q·kᵀ and p·v) are `tl.dot`s on the tensor cores, the query group padded to 16 rows (IEEE fp32 for fp32
inputs), instead of element-wise products summed in registers (a [group, block_s, head_dim] fp32 product for
the whole group at once).

    out = decode_attention(q, k, v, blocked)   # q [n, heads, 1, d], k/v [n, kv, S, d], blocked [n|1, 1, 1, S]
    use_decode_attention(model)                # every layer's decode attention through it, from outside
    use_decode_attention(model, fold_rope=True)   # and RoPE + the cache write folded in too

With `fold_rope` the kernel starts from the q/k/v projections' output of the step: it rotates q and the new
key (RoPE, rounded as the plain path rounds it), writes the new key and value into the cache slot, and
attends over the cache with the new key taken from registers (its slot is skipped in the streamed part, so
the write and the read never race). It returns the o_proj input [n, 1, heads·d] directly. That is the whole
of a decode step's attention as one kernel (the plain path is RoPE, two cache writes, two matmuls, a masked
softmax and the copies between them).

`blocked` is True where a slot is hidden (padding, unwritten slots), as the plain path's. Scores and softmax
are fp32 throughout (the plain path rounds the scores to the dtype before its fp32 softmax), so in bf16 the
two agree to rounding, and in fp32 to summation order. Where the kernel cannot run (CPU, no Triton, a GPU
before compute capability 8.0, head_dim over 256) `decode_attention` is the plain path; the arithmetic is
checked under Triton's CPU interpreter and on a GPU (tests/test_decode_attention.py).
"""

from __future__ import annotations

import os

import torch

from parscale.inference.class_swap import swap_class
from parscale.inference.triton_support import kernels_can_run, pdl_for
from parscale.model.transformer import Attention, _attend, _grouped_decode_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: decode_attention is the plain path
    triton = None

BLOCK_S = int(os.environ.get("PARSCALE_DECODE_ATTENTION_BLOCK_S", "16"))
# Query heads per program (0: the whole group of a KV head). Fewer give more programs, each streaming the same
# keys and values again (from L2 after the first): which is faster at a shape is for a benchmark to say.
HEADS_PER_PROGRAM = int(os.environ.get("PARSCALE_DECODE_ATTENTION_HEADS", "0"))
# The defaults below are the fastest of the 49 variants timed on an H100 (1.6B shape, 304 slots, 1 and 8 rows;
# benchmarks/README.md, "The attention kernel in shares of the slots"): the whole query group per program, 8
# shares of the slots, tl.dot tiles: 5.5 / 7.1 µs a layer against the plain path's 17.1 / 19.6 and the
# unsplit element-wise kernel's 92 / 98.
# The tiles' products as tl.dot (1) or element-wise (0); read at each launch.
USE_DOT = os.environ.get("PARSCALE_DECODE_ATTENTION_DOT", "1") == "1"
# Shares of the slots per (row, KV head) (1: no split, one kernel). Read at each launch: a captured graph or
# compiled step keeps the split it was made with.
SLOT_SPLITS = int(os.environ.get("PARSCALE_DECODE_ATTENTION_SPLITS", "8"))


def _head_split(group: int, heads_per_program: int | None) -> tuple[int, int, int]:
    """(heads per program, programs per KV head, BLOCK_G) for a GQA group (None: HEADS_PER_PROGRAM)."""
    wanted = HEADS_PER_PROGRAM if heads_per_program is None else heads_per_program
    per = group if wanted <= 0 else min(wanted, group)
    return per, -(-group // per), max(1, triton.next_power_of_2(per))


def _slot_shares(slots: int, splits: int | None, block_s: int) -> tuple[int, int]:
    """(shares, slots per share, a multiple of block_s) for `slots` split `splits` ways (None: SLOT_SPLITS)."""
    wanted = max(1, SLOT_SPLITS if splits is None else splits)
    per = -(-slots // wanted)
    per = max(block_s, -(-per // block_s) * block_s)
    return -(-slots // per), per


def _partials(n: int, heads: int, shares: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scratch for a split's partial softmax: max and sum [n, heads, shares], weighted values [.., d] (fp32)."""
    m = torch.empty(n, heads, shares, device=device, dtype=torch.float32)
    return m, torch.empty_like(m), torch.empty(n, heads, shares, d, device=device, dtype=torch.float32)


def kernel_available(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (kernels_can_run(q.device) and q.dtype == k.dtype
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


def launch(q, k, v, blocked, block_s: int = BLOCK_S, _kernel=None, heads_per_program: int | None = None,
           slot_splits: int | None = None, _combine=None, use_dot: bool | None = None) -> torch.Tensor:
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
    per, splits, block_g = _head_split(group, heads_per_program)
    shares, share_len = _slot_shares(s, slot_splits, block_s)
    m_part, l_part, acc_part = _partials(n, heads, shares, d, q.device)
    (_kernel or _decode_attention_kernel)[(n, kv, splits * shares)](
        q, k, v, mask, out, m_part, l_part, acc_part, s, d, group, per, share_len, d**-0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0) if mask.shape[0] > 1 else 0, out.stride(0), out.stride(1),
        SHARES=shares, **_tile_sizes(block_g, d, block_s, use_dot),
        **_pdl_options(q.device),
    )
    if shares > 1:
        _combine_shares(out.view(n, heads, d), m_part, l_part, acc_part, _combine)
    return out


def _combine_shares(out, m_part, l_part, acc_part, _combine=None):
    """out [n, heads, d] (any strides in n, heads) = the partial softmaxes of every share put together."""
    n, heads, shares, d = acc_part.shape
    (_combine or _combine_shares_kernel)[(n, heads)](
        m_part, l_part, acc_part, out, shares, d, out.stride(0), out.stride(1),
        BLOCK_P=triton.next_power_of_2(shares), BLOCK_D=triton.next_power_of_2(d), **_pdl_options(out.device),
    )


def rope_kernel_available(attn: Attention, q: torch.Tensor, cache) -> bool:
    """Whether a decode step's attention can start from the projections (fold_rope): a decoding static cache,
    no q/k norm, one token per row, the kernel's dtypes."""
    return (kernels_can_run(q.device) and getattr(cache, "decoding", False) and q.shape[1] == 1
            and not hasattr(attn, "q_norm") and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and attn.head_dim <= 256 and attn.head_dim % 2 == 0 and q.stride(-1) == 1)


def decode_attention_from_projections(q, k, v, cos, sin, k_cache, v_cache, pos, prefix_len: int, read_end: int,
                                      blocked, n_heads: int) -> torch.Tensor:
    """RoPE, the cache write and the attention of one decode step (module docstring, fold_rope): q, k, v [n, 1,
    width] (the projections' output), cos/sin [n, 1, 1, d], the layer's cache buffers [n, kv, slots, d] (written
    at slot prefix_len + pos), `read_end` slots read, blocked [n|1, 1, 1, read_end]. Returns [n, 1, heads·d]."""
    return _call_rope_kernel(q, k, v, cos, sin, k_cache, v_cache, pos, prefix_len, read_end, blocked, n_heads)


def _call_rope_kernel(q, k, v, cos, sin, k_cache, v_cache, pos, prefix_len, read_end, blocked, n_heads):
    return torch.ops.parscale.decode_attention_rope(q, k, v, cos, sin, k_cache, v_cache, pos, prefix_len, read_end,
                                                    blocked, n_heads)


def launch_rope(q, k, v, cos, sin, k_cache, v_cache, pos, prefix_len: int, read_end: int, blocked, n_heads: int,
                block_s: int = BLOCK_S, _kernel=None, heads_per_program: int | None = None,
                slot_splits: int | None = None, _combine=None, use_dot: bool | None = None) -> torch.Tensor:
    """Run the fold_rope kernel (any device Triton runs on, the interpreter included); no fallback."""
    if triton is None:
        raise RuntimeError("the decode attention kernel needs Triton (pip install triton)")
    n, kv, slots, d = k_cache.shape
    if q.shape != (n, 1, n_heads * d) or k.shape != (n, 1, kv * d) or v.shape != k.shape or n_heads % kv:
        raise ValueError(f"q, k, v must be [n, 1, heads·d] / [n, 1, kv·d] for a cache {tuple(k_cache.shape)}; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if v_cache.shape != k_cache.shape or read_end > slots or blocked.shape[-1] != read_end:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, read_end {read_end}, blocked "
                         f"{tuple(blocked.shape)} do not agree")
    if any(x.stride(-1) != 1 for x in (q, k, v, cos, sin, k_cache, v_cache)):
        raise ValueError("every input must be contiguous in its last dimension")
    mask = blocked.reshape(blocked.shape[0], read_end)
    out = torch.empty(n, 1, n_heads * d, device=q.device, dtype=q.dtype)
    group = n_heads // kv
    per, splits, block_g = _head_split(group, heads_per_program)
    shares, share_len = _slot_shares(read_end, slot_splits, block_s)
    m_part, l_part, acc_part = _partials(n, n_heads, shares, d, q.device)
    (_kernel or _decode_attention_rope_kernel)[(n, kv, splits * shares)](
        q, k, v, cos, sin, k_cache, v_cache, pos, mask, out, m_part, l_part, acc_part, prefix_len, read_end, d,
        group, per, share_len, d**-0.5,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), mask.stride(0) if mask.shape[0] > 1 else 0, out.stride(0),
        SHARES=shares, **_tile_sizes(block_g, d, block_s, use_dot),
        **_pdl_options(q.device),
    )
    if shares > 1:
        _combine_shares(out.view(n, n_heads, d), m_part, l_part, acc_part, _combine)
    return out


def _tile_sizes(block_g: int, d: int, block_s: int, use_dot: bool | None) -> dict:
    """The kernels' tile constants; tl.dot needs every side of a product at least 16."""
    dot = USE_DOT if use_dot is None else use_dot
    least = 16 if dot else 1
    return {"BLOCK_G": max(least, block_g), "BLOCK_D": max(least, triton.next_power_of_2(d)),
            "BLOCK_S": max(least, block_s), "DOT": dot}


def _pdl_options(device) -> dict:
    pdl = pdl_for(device)
    return {"PDL": pdl, **({"launch_pdl": True} if pdl else {})}


class KernelAttention(Attention):
    """Attention whose decode steps go through the kernel (every other call is the plain path)."""

    def core_attention(self, q, k, v, plan):
        if plan.grouped_decode:
            return decode_attention(q, k, v, plan.blocked)
        return _attend(q, k, v, plan)


class KernelAttentionFromProjections(KernelAttention):
    """KernelAttention whose decode steps also fold RoPE and the cache write into the kernel (fold_rope)."""

    def attend(self, q, k, v, cos, sin, plan, cache=None, layer_idx=0):
        if not (plan.grouped_decode and rope_kernel_available(self, q, cache)):
            return super().attend(q, k, v, cos, sin, plan, cache, layer_idx)
        read_end = cache.prefix_len + cache.read_len
        return decode_attention_from_projections(q, k, v, cos, sin, cache.k[layer_idx], cache.v[layer_idx],
                                                 cache.pos, cache.prefix_len, read_end, plan.blocked, self.n_heads)


def use_decode_attention(model, enable: bool = True, fold_rope: bool = False):
    """Every layer's decode attention through the kernel (in place, class swap; returns the model); `fold_rope`:
    RoPE and the cache write in the same kernel (module docstring)."""
    kernels_can_run(model.lm_head.weight.device)  # looked up once here, not inside a compiled step
    cls = (KernelAttentionFromProjections if fold_rope else KernelAttention) if enable else Attention
    for layer in model.model.layers:
        swap_class(layer.self_attn, cls)
    return model


def uses_decode_attention(model) -> bool:
    return isinstance(model.model.layers[0].self_attn, KernelAttention)


if triton is not None:
    from parscale.inference.triton_support import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _dot(a, b):
        """a @ b accumulated in fp32 on the tensor cores; IEEE for fp32 inputs (Triton's fp32 default is TF32)."""
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _softmax_tile(q, k, v, visible, best, total, acc, scale, DOT: tl.constexpr):
        """One tile of slots into the online softmax: scores q·k (fp32), hidden slots at -inf, the running max
        `best`, the running sum `total` and the weighted values `acc` rescaled to the new max."""
        # .to(fp32): inductor may pass the Python float `scale` as fp64, which would widen the loop's carried state
        if DOT:  # q holds values of k's dtype (loaded from it, or rounded to it), so the cast is exact
            scores = (_dot(q.to(k.dtype), tl.trans(k)) * scale).to(tl.float32)  # [G, S]
        else:
            scores = (tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale).to(tl.float32)
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        # While every slot so far is hidden best stays -inf: keep exp() away from -inf - -inf.
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        rescale = tl.exp(best - safe)
        p = tl.exp(scores - safe[:, None])
        if DOT:  # p in v's dtype, as the plain path multiplies its probabilities by v
            weighted = _dot(p.to(v.dtype), v)
        else:
            weighted = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * rescale[:, None] + weighted
        return new_best, total * rescale + tl.sum(p, axis=1), acc

    @triton.jit
    def _program_heads(GROUP, PER, D, SHARES: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                       PDL: tl.constexpr):
        """This program's row, KV head, query heads (with their masks) and share of the slots. With PDL it first
        lets the next kernel launch and waits for the previous one: everything these kernels read was written by
        kernels before."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        first = (tl.program_id(2) // SHARES) * PER  # this program's first query head within the group
        share = tl.program_id(2) % SHARES
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = (offs_g < PER) & (first + offs_g < GROUP)
        return row, kv_head, first, kv_head * GROUP + first + offs_g, g_ok, offs_d, offs_d < D, share

    @triton.jit
    def _finish(out_ptrs, m_ptr, l_ptr, acc_ptr, row, heads, share, best, total, acc, n_heads, D, offs_d, g_ok,
                d_ok, SHARES: tl.constexpr):
        """Unsplit: the output. Split: this share's partial softmax (max, sum, weighted values) for the combine."""
        mask = g_ok[:, None] & d_ok[None, :]
        if SHARES == 1:
            tl.store(out_ptrs, (acc / total[:, None]).to(out_ptrs.dtype.element_ty), mask=mask)
        else:
            at = (row * n_heads + heads) * SHARES + share  # [G]
            tl.store(m_ptr + at, best, mask=g_ok)
            tl.store(l_ptr + at, total, mask=g_ok)
            tl.store(acc_ptr + at[:, None] * D + offs_d[None, :], acc, mask=mask)

    @triton.jit
    def _combine_shares_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, SHARES, D, stride_on, stride_oh,
                               BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """One query head of one row: its shares' partial softmaxes rescaled to their common max and summed."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0)
        head = tl.program_id(1)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        p_ok = offs_p < SHARES
        at = (row * tl.num_programs(1) + head) * SHARES + offs_p
        best = tl.load(m_ptr + at, mask=p_ok, other=float("-inf"))
        total = tl.load(l_ptr + at, mask=p_ok, other=0.0)
        acc = tl.load(acc_ptr + at[:, None] * D + offs_d[None, :], mask=p_ok[:, None] & (offs_d < D)[None, :],
                      other=0.0)
        top = tl.max(best, axis=0)
        weight = tl.exp(best - tl.where(top == float("-inf"), 0.0, top))  # a share that saw nothing weighs 0
        out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * total, axis=0)
        tl.store(o_ptr + row * stride_on + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
                 mask=offs_d < D)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, mp_ptr, lp_ptr, accp_ptr, S, D, GROUP, PER,
                                 SHARE_LEN, scale, stride_qn, stride_qh, stride_kn, stride_kh, stride_ks,
                                 stride_vn, stride_vh, stride_vs, stride_mn, stride_on, stride_oh,
                                 BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                                 SHARES: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
        row, kv_head, first, heads, g_ok, offs_d, d_ok, share = _program_heads(GROUP, PER, D, SHARES, BLOCK_G,
                                                                               BLOCK_D, PDL)
        q = tl.load(q_ptr + row * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        best = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        k_base = k_ptr + row * stride_kn + kv_head * stride_kh
        v_base = v_ptr + row * stride_vn + kv_head * stride_vh
        start = share * SHARE_LEN
        end = tl.minimum(S, start + SHARE_LEN)
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < end
            kv_mask = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            hidden = tl.load(m_ptr + row * stride_mn + offs_s, mask=s_ok, other=0) != 0
            best, total, acc = _softmax_tile(q, k, v, s_ok & ~hidden, best, total, acc, scale, DOT)
        _finish(o_ptr + row * stride_on + heads[:, None] * stride_oh + offs_d[None, :], mp_ptr, lp_ptr, accp_ptr,
                row, heads, share, best, total, acc, GROUP * tl.num_programs(1), D, offs_d,
                g_ok, d_ok, SHARES)

    @torch.library.triton_op("parscale::decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             blocked: torch.Tensor) -> torch.Tensor:
        return launch(q, k, v, blocked, _kernel=torch.library.wrap_triton(_decode_attention_kernel),
                      _combine=torch.library.wrap_triton(_combine_shares_kernel))

    @triton.jit
    def _round(x, dtype: tl.constexpr):
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _rope(ptr, offs_rows, offs_d, swap_d, mask, cos, sin, dtype: tl.constexpr):
        """x·cos + swap_halves(x)·sin (sin sign-folded, model/transformer.py), each product and the sum rounded to
        the dtype as the plain path's eager ops round them."""
        x = tl.load(ptr + offs_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        xs = tl.load(ptr + offs_rows[:, None] + swap_d[None, :], mask=mask, other=0.0).to(tl.float32)
        return _round(_round(x * cos[None, :], dtype) + _round(xs * sin[None, :], dtype), dtype)

    @triton.jit
    def _decode_attention_rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, o_ptr,
                                      mp_ptr, lp_ptr, accp_ptr, PREFIX, S, D, GROUP, PER, SHARE_LEN, scale,
                                      stride_qn, stride_kn, stride_vn, stride_cn, stride_sn, stride_kcn,
                                      stride_kch, stride_kcs, stride_vcn, stride_vch, stride_vcs, stride_mn,
                                      stride_on, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                                      BLOCK_S: tl.constexpr, SHARES: tl.constexpr, DOT: tl.constexpr,
                                      PDL: tl.constexpr):
        row, kv_head, first, heads, g_ok, offs_d, d_ok, share = _program_heads(GROUP, PER, D, SHARES, BLOCK_G,
                                                                               BLOCK_D, PDL)
        dtype = q_ptr.dtype.element_ty
        half = D // 2
        swap_d = tl.where(offs_d < half, offs_d + half, offs_d - half)
        cos = tl.load(cos_ptr + row * stride_cn + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + row * stride_sn + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        q = _rope(q_ptr + row * stride_qn, heads * D, offs_d, swap_d, g_ok[:, None] & d_ok[None, :], cos, sin, dtype)
        k_ptrs = k_ptr + row * stride_kn + kv_head * D
        k_raw = tl.load(k_ptrs + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        k_swapped = tl.load(k_ptrs + swap_d, mask=d_ok, other=0.0).to(tl.float32)
        k_new = _round(_round(k_raw * cos, dtype) + _round(k_swapped * sin, dtype), dtype)
        v_new = tl.load(v_ptr + row * stride_vn + kv_head * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        slot = PREFIX + tl.load(pos_ptr)
        # one program of a KV head writes its new key and value (no other reads that slot from the cache)
        writes = d_ok & (offs_d * 0 + first == 0) & (offs_d * 0 + share == 0)
        tl.store(kc_ptr + row * stride_kcn + kv_head * stride_kch + slot * stride_kcs + offs_d, k_new.to(dtype),
                 mask=writes)
        tl.store(vc_ptr + row * stride_vcn + kv_head * stride_vch + slot * stride_vcs + offs_d, v_new.to(dtype),
                 mask=writes)
        # The new key from registers first (always seen; by the first share only), then every other slot from
        # the cache.
        first_share = share == 0
        best = tl.where(first_share, (tl.sum(q * k_new[None, :], axis=1) * scale).to(tl.float32), float("-inf"))
        total = tl.full((BLOCK_G,), 1.0, dtype=tl.float32) * first_share.to(tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32) + v_new[None, :] * first_share.to(tl.float32)
        kc_base = kc_ptr + row * stride_kcn + kv_head * stride_kch
        vc_base = vc_ptr + row * stride_vcn + kv_head * stride_vch
        start = share * SHARE_LEN
        end = tl.minimum(S, start + SHARE_LEN)
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = (offs_s < end) & (offs_s != slot)
            kv_mask = s_ok[:, None] & d_ok[None, :]
            k = tl.load(kc_base + offs_s[:, None] * stride_kcs + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_base + offs_s[:, None] * stride_vcs + offs_d[None, :], mask=kv_mask, other=0.0)
            hidden = tl.load(m_ptr + row * stride_mn + offs_s, mask=offs_s < end, other=0) != 0
            best, total, acc = _softmax_tile(q, k, v, s_ok & ~hidden, best, total, acc, scale, DOT)
        _finish(o_ptr + row * stride_on + heads[:, None] * D + offs_d[None, :], mp_ptr, lp_ptr, accp_ptr, row,
                heads, share, best, total, acc, GROUP * tl.num_programs(1), D, offs_d,
                g_ok, d_ok, SHARES)

    @torch.library.triton_op("parscale::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
    def _decode_attention_rope_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                                  prefix_len: int, read_end: int, blocked: torch.Tensor,
                                  n_heads: int) -> torch.Tensor:
        return launch_rope(q, k, v, cos, sin, k_cache, v_cache, pos, prefix_len, read_end, blocked, n_heads,
                           _kernel=torch.library.wrap_triton(_decode_attention_rope_kernel),
                           _combine=torch.library.wrap_triton(_combine_shares_kernel))
