"""Count the aten operations of one prefill and one decode step of the engine (CPU, no GPU needed).

    PYTHONPATH=src python scripts/count_ops.py [--shape paper-1.6b] [--prompt 64]

Eager kernels each cost a launch, so this count is what a CUDA graph saves; inside a graph every op that
is not a view is still one kernel, so the decode step's non-view ops per layer are what the graph
engine's per-layer floor is made of (the compiled engine fuses the element-wise ones). The width is
shrunk (the count depends on the layers, P and the code path, not on the width) so that it runs in seconds.
"""

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parscale.inference.engine import DecodeEngine
from parscale.model.config import ModelConfig
from parscale.model.transformer import build_model

# Ops that return a view or alias: no kernel runs for them.
VIEWS = {"aten.view", "aten.t", "aten.select", "aten.slice", "aten._unsafe_view", "aten.transpose", "aten.expand",
         "aten.unsqueeze", "aten.reshape", "aten.permute", "aten.alias", "aten.squeeze", "aten.as_strided",
         "aten.detach", "aten.split", "aten.split_with_sizes", "aten.unbind"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="paper-1.6b")
    ap.add_argument("--prompt", type=int, default=64)
    args = ap.parse_args()
    for p in (1, 8):
        cfg = ModelConfig.preset(args.shape, parscale_n=p, hidden_size=128, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
        model = build_model(cfg, dtype=torch.bfloat16).eval()  # bf16, as the engine runs: its casts count
        engine = DecodeEngine(model, 1, 2 * args.prompt)
        ids = torch.randint(0, cfg.vocab_size, (1, args.prompt))
        with torch.no_grad():
            engine.prefill(ids)
            with CountOps() as prefill:
                logits = engine.prefill(ids)
            with CountOps() as decode:
                engine.decode(logits.argmax(-1))
        kernels = {op: n for op, n in decode.counts.items() if op not in VIEWS}
        layers = cfg.num_hidden_layers
        print(f"{args.shape} ({layers} layers) P={p}: prefill of {args.prompt} tokens "
              f"{sum(prefill.counts.values())} aten ops, decode step {sum(decode.counts.values())} "
              f"({sum(kernels.values())} not views, {sum(kernels.values()) / layers:.1f} per layer)")
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:16]
        print("  decode, non-view ops per layer: " + ", ".join(f"{op[5:]} {n / layers:.1f}" for op, n in top))


if __name__ == "__main__":
    main()
