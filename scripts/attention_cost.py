"""What the P-stream attention over prefix + causal keys costs against plain causal attention of the same rows.

    python scripts/attention_cost.py --out benchmarks/results/attention_cost.json [--model paper-1.6b]
        [--streams 4] [--batch-size 4] [--seq-len 2048] [--repeats 20] [--routes zero_queries,lower_right,flex]

One layer's attention in training, forward + backward, bf16 on CUDA (float32 on CPU, where it only checks that
the script runs): each stream's prefix keys and values are repeated over the batch and put in front of the keys
(as transformer.Attention does), then one of three routes attends:
- zero_queries: what the model runs (transformer._attend): prefix-length zero queries in front, the square
  causal call, their rows dropped;
- lower_right: SDPA with `causal_lower_right` (query i sees keys up to n + i), which flash attention runs as its
  own non-square causal case, no padded queries;
- flex: FlexAttention with a block mask (compiled on CUDA).
The plain route is `scaled_dot_product_attention(is_causal=True)` on the same P·B rows without a prefix. Every
route gets the same q, k, v; its ratio is its time over the plain one's, and its output is checked against a
masked reference (a route is exact, not only fast). `ratio` and `parscale_ms` at the top of a run are the
model's route (zero_queries).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from parscale.io.files import write_json_atomic
from parscale.model.config import ModelConfig
from parscale.model.transformer import AttentionPlan, _attend


def with_prefix(k, v, prefix_k, prefix_v, batch: int):
    """Each stream's prefix keys and values repeated over the batch and put in front (as transformer.Attention)."""
    return (torch.cat([prefix_k.repeat_interleave(batch, dim=0), k], dim=2),
            torch.cat([prefix_v.repeat_interleave(batch, dim=0), v], dim=2))


def parscale_attention(q, k, v, prefix_k, prefix_v, batch: int):
    """The model's route: prefix-length zero queries in front, the square causal call, their rows dropped."""
    k, v = with_prefix(k, v, prefix_k, prefix_v, batch)
    return _attend(q, k, v, AttentionPlan(None, prefix_k.shape[2], is_causal=False))


def lower_right_attention(q, k, v, prefix_k, prefix_v, batch: int):
    """T queries over n + T keys with the causal diagonal aligned to the bottom right (query i sees keys up to
    n + i): SDPA's CausalBias, which flash attention runs as its own non-square causal case, no padded queries."""
    from torch.nn.attention.bias import causal_lower_right

    k, v = with_prefix(k, v, prefix_k, prefix_v, batch)
    bias = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=q.shape[1] != k.shape[1])


_FLEX = {}


def flex_attention_route(q, k, v, prefix_k, prefix_v, batch: int):
    """FlexAttention with a block mask (every prefix slot, then causal keys), compiled on CUDA."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    k, v = with_prefix(k, v, prefix_k, prefix_v, batch)
    t, n = q.shape[2], prefix_k.shape[2]
    key = (t, n, q.device.type)
    if key not in _FLEX:
        def visible(b, h, q_idx, kv_idx):
            return (kv_idx < n) | (kv_idx - n <= q_idx)

        mask = create_block_mask(visible, None, None, t, n + t, device=q.device.type)
        fn = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
        _FLEX[key] = (fn, mask)
    fn, mask = _FLEX[key]
    return fn(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


ROUTES = {"zero_queries": parscale_attention, "lower_right": lower_right_attention, "flex": flex_attention_route}


def plain_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def masked_reference(q, k, v, prefix_k, prefix_v, batch: int):
    """Every query sees all prefix slots and the causal keys: an explicit mask, float32."""
    k = torch.cat([prefix_k.repeat_interleave(batch, dim=0), k], dim=2).float()
    v = torch.cat([prefix_v.repeat_interleave(batch, dim=0), v], dim=2).float()
    t, n = q.shape[2], prefix_k.shape[2]
    mask = torch.cat([torch.ones(t, n, dtype=torch.bool, device=q.device),
                      torch.ones(t, t, dtype=torch.bool, device=q.device).tril()], dim=1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def time_fwd_bwd(fn, inputs, repeats: int) -> float:
    """Median seconds of forward + backward."""
    cuda = inputs[0].is_cuda
    grad = torch.randn_like(fn(*inputs))
    times = []
    for i in range(repeats + 3):
        for x in inputs:
            x.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*inputs).backward(grad)
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:  # the first calls pick kernels
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(cfg: ModelConfig, batch: int, seq_len: int, repeats: int, device: str,
            routes=tuple(ROUTES)) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    p, h, kv, d, n = cfg.parscale_n, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.prefix_len

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()

    q, k, v = rand(p * batch, h, seq_len, d), rand(p * batch, kv, seq_len, d), rand(p * batch, kv, seq_len, d)
    prefix_k, prefix_v = rand(p, kv, n, d), rand(p, kv, n, d)
    with torch.no_grad():
        want = masked_reference(q, k, v, prefix_k, prefix_v, batch)
    plain_s = time_fwd_bwd(plain_attention, (q, k, v), repeats)
    row = {"P": p, "batch": batch, "rows": p * batch, "seq_len": seq_len, "prefix_tokens": n, "heads": h,
           "kv_heads": kv, "head_dim": d, "dtype": str(dtype).removeprefix("torch."), "plain_causal_ms": plain_s * 1e3,
           "routes": {}}
    for name in routes:
        fn = ROUTES[name]
        with torch.no_grad():
            error = (fn(q, k, v, prefix_k, prefix_v, batch).float() - want).abs().max().item()
        seconds = time_fwd_bwd(lambda *x, fn=fn: fn(*x, batch), (q, k, v, prefix_k, prefix_v), repeats)
        row["routes"][name] = {"ms": seconds * 1e3, "ratio": seconds / plain_s,
                               "max_abs_error_vs_masked_reference": error}
    # the model's own route under the names the first version of this file used
    if "zero_queries" in row["routes"]:
        first = row["routes"]["zero_queries"]
        row.update(parscale_ms=first["ms"], ratio=first["ratio"],
                   max_abs_error_vs_masked_reference=first["max_abs_error_vs_masked_reference"])
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="paper-1.6b")
    ap.add_argument("--streams", default="1,4,8", help="P values, comma-separated (P = 1 has no prefix: skipped)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--routes", default=",".join(ROUTES),
                    help=f"prefix-attention routes to time, comma-separated (default: all of {', '.join(ROUTES)})")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    routes = [r for r in args.routes.split(",") if r]
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        ap.error(f"unknown route(s) {', '.join(unknown)}; known: {', '.join(ROUTES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "flex" in routes:   # FlexAttention has no backward pass on CPU
        print("flex skipped: FlexAttention has no backward pass on CPU", flush=True)
        routes.remove("flex")
    runs = []
    for p in (int(s) for s in args.streams.split(",")):
        if p < 2:
            continue
        cfg = ModelConfig.preset(args.model, parscale_n=p)
        runs.append(measure(cfg, args.batch_size, args.seq_len, args.repeats, device, routes))
        r = runs[-1]
        each = "; ".join(f"{name} {x['ms']:.3f} ms, ratio {x['ratio']:.3f}, max error "
                         f"{x['max_abs_error_vs_masked_reference']:.1e}" for name, x in r["routes"].items())
        print(f"P={p}: {r['rows']} rows x {args.seq_len} (+{r['prefix_tokens']} prefix), plain causal "
              f"{r['plain_causal_ms']:.3f} ms; {each}", flush=True)
    write_json_atomic({"model": args.model, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                       "torch": torch.__version__, "python": platform.python_version(),
                       "command": "python scripts/attention_cost.py " + " ".join(argv or []), "runs": runs}, args.out)


if __name__ == "__main__":
    main()
