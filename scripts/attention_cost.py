"""What the P-stream attention over prefix + causal keys costs against plain causal attention of the same rows.

    python scripts/attention_cost.py --out benchmarks/results/attention_cost.json [--model paper-1.6b]
        [--streams 4] [--batch-size 4] [--seq-len 2048] [--repeats 20]

One layer's attention in training, forward + backward, bf16 on CUDA (float32 on CPU, where it only checks that
the script runs): the ParScale route is what the model runs (transformer.Attention: each stream's prefix keys and
values repeated over the batch and put in front of the keys, then the square causal call with the prefix-length
zero queries in front, transformer._attend), the plain route is `scaled_dot_product_attention(is_causal=True)` on
the same P·B rows without a prefix. Both get the same q, k, v; the ratio is the ParScale route's time over the
plain one's. The outputs are checked against a masked reference first (the route is exact, not only fast).
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


def parscale_attention(q, k, v, prefix_k, prefix_v, batch: int):
    k = torch.cat([prefix_k.repeat_interleave(batch, dim=0), k], dim=2)
    v = torch.cat([prefix_v.repeat_interleave(batch, dim=0), v], dim=2)
    return _attend(q, k, v, AttentionPlan(None, prefix_k.shape[2], is_causal=False))


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


def measure(cfg: ModelConfig, batch: int, seq_len: int, repeats: int, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    p, h, kv, d, n = cfg.parscale_n, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.prefix_len

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()

    q, k, v = rand(p * batch, h, seq_len, d), rand(p * batch, kv, seq_len, d), rand(p * batch, kv, seq_len, d)
    prefix_k, prefix_v = rand(p, kv, n, d), rand(p, kv, n, d)
    with torch.no_grad():
        got = parscale_attention(q, k, v, prefix_k, prefix_v, batch).float()
        want = masked_reference(q, k, v, prefix_k, prefix_v, batch)
    error = (got - want).abs().max().item()
    parscale_s = time_fwd_bwd(lambda *x: parscale_attention(*x, batch), (q, k, v, prefix_k, prefix_v), repeats)
    plain_s = time_fwd_bwd(plain_attention, (q, k, v), repeats)
    return {"P": p, "batch": batch, "rows": p * batch, "seq_len": seq_len, "prefix_tokens": n, "heads": h,
            "kv_heads": kv, "head_dim": d, "dtype": str(dtype).removeprefix("torch."),
            "max_abs_error_vs_masked_reference": error, "parscale_ms": parscale_s * 1e3,
            "plain_causal_ms": plain_s * 1e3,
            "ratio": parscale_s / plain_s}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="paper-1.6b")
    ap.add_argument("--streams", default="1,4,8", help="P values, comma-separated (P = 1 has no prefix: skipped)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []
    for p in (int(s) for s in args.streams.split(",")):
        if p < 2:
            continue
        cfg = ModelConfig.preset(args.model, parscale_n=p)
        runs.append(measure(cfg, args.batch_size, args.seq_len, args.repeats, device))
        r = runs[-1]
        print(f"P={p}: {r['rows']} rows x {args.seq_len} (+{r['prefix_tokens']} prefix): ParScale "
              f"{r['parscale_ms']:.3f} ms, plain causal {r['plain_causal_ms']:.3f} ms, ratio {r['ratio']:.3f}; "
              f"max error vs masked reference {r['max_abs_error_vs_masked_reference']:.1e}", flush=True)
    write_json_atomic({"model": args.model, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                       "torch": torch.__version__, "python": platform.python_version(),
                       "command": "python scripts/attention_cost.py " + " ".join(argv or []), "runs": runs}, args.out)


if __name__ == "__main__":
    main()
