"""Peak GPU memory and time of the LM-head loss step alone (forward + backward), plain against chunked.

    python scripts/loss_memory.py --out benchmarks/results/loss_memory.json

The shape is the paper's vocabulary (151,936) and hidden sizes under bf16 autocast, 16 x 2,048 tokens: the
step the trainer runs after the decoder (`LossModule`): hidden states -> LM head -> float32 cross-entropy.
The peak is measured from the hidden states and the weight already in memory (their size is reported).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from parscale.training.chunked_loss import linear_cross_entropy


def measure(tokens: int, hidden_size: int, vocab: int, chunk_rows: int, repeats: int = 3) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    times, loss = [], None
    for _ in range(repeats + 1):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if chunk_rows:
                loss = linear_cross_entropy(hidden, weight, targets, chunk_rows)
            else:
                loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() - base
    return {"tokens": tokens, "hidden_size": hidden_size, "vocab": vocab, "chunk_rows": chunk_rows,
            "peak_above_inputs_gib": peak / 2**30, "ms_median": 1e3 * sorted(times[1:])[len(times[1:]) // 2],
            "loss": loss.item(), "inputs_gib": (hidden.numel() * 2 + weight.numel() * 4) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=16 * 2048)
    args = ap.parse_args()
    rows = []
    for hidden_size in (896, 1536):  # paper-0.5b's and paper-1.6b's widths
        for chunk in (0, 8192, 4096):
            try:
                rows.append(measure(args.tokens, hidden_size, 151_936, chunk))
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"tokens": args.tokens, "hidden_size": hidden_size, "chunk_rows": chunk,
                             "out_of_memory": str(e).split(".")[0]})
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "command": "python scripts/loss_memory.py --out ..."}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
