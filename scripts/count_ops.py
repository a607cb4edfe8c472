"""Count the aten operations of one prefill and one decode step of the engine (CPU, no GPU needed).

    PYTHONPATH=src python scripts/count_ops.py [--shape paper-1.6b] [--prompt 64]

Eager kernels each cost a launch, so this count is what a CUDA graph saves. The width is shrunk (the
count depends on the layers, P and the code path, not on the width) so that it runs in seconds.
"""

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parscale.inference.engine import DecodeEngine
from parscale.model.config import ModelConfig
from parscale.model.transformer import build_model


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
        model = build_model(cfg).eval()
        engine = DecodeEngine(model, 1, 2 * args.prompt)
        ids = torch.randint(0, cfg.vocab_size, (1, args.prompt))
        with torch.no_grad():
            engine.prefill(ids)
            with CountOps() as prefill:
                logits = engine.prefill(ids)
            with CountOps() as decode:
                engine.decode(logits.argmax(-1))
        print(f"{args.shape} ({cfg.num_hidden_layers} layers) P={p}: prefill of {args.prompt} tokens "
              f"{sum(prefill.counts.values())} aten ops, decode step {sum(decode.counts.values())}")


if __name__ == "__main__":
    main()
