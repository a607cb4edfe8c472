"""What drives a P-stream checkpoint's aggregator: its logits' spread, the size of its hidden activations, and
each stream's loss alone beside the mix's, on the first held-out windows of a `parscale data` folder.

    python experiments/recycle_smollm2/aggregator_probe.py RUN/checkpoints/step-00000021/model DATA [--rows 4]

|SiLU(h1)|_1 per token is what a step of Adam on the aggregator's last layer is multiplied by: each of its
weights moves by about the rate whatever the gradient's size, so a logit moves by up to rate x |SiLU(h1)|_1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import parscale


def probe(model_dir: str, data: str, rows: int = 4, seq_len: int = 256) -> dict:
    model = parscale.load(model_dir, dtype="float32").eval()
    if model.config.parscale_n < 2:
        raise SystemExit(f"{model_dir} is a P = 1 model: it has no aggregator")
    dtype = json.loads((Path(data) / "manifest.json").read_text())["dtype"]
    val = np.fromfile(Path(data) / "val.bin", dtype=dtype)[: rows * (seq_len + 1)]
    ids = torch.from_numpy(val.astype(np.int64)).view(rows, seq_len + 1)
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        streams = model.forward_streams(x)                               # [P, B, T, H]
        p, b, t, h = streams.shape
        agg = model.model.aggregate_layer
        hidden = F.silu(agg[0](streams.permute(1, 2, 3, 0).reshape(b, t, h * p)))
        logits = agg[2](hidden)
        mixed, weights = model.aggregate(streams)

        def loss(states):
            return F.cross_entropy(model.lm_head(states).flatten(0, 1), y.flatten()).item()

        return {"model": model_dir, "tokens": rows * seq_len,
                "hidden_l1_per_token": hidden.abs().sum(-1).mean().item(),
                "logit_spread_mean": (logits.max(-1).values - logits.min(-1).values).mean().item(),
                "weight_mean": weights.mean((0, 1)).tolist(), "loss_mix": loss(mixed),
                "loss_uniform": loss(streams.mean(0)), "loss_stream": [loss(streams[i]) for i in range(p)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a P > 1 model folder (a checkpoint's model/)")
    ap.add_argument("data", help="a `parscale data` folder; its first held-out windows are used")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    print(json.dumps(probe(args.model, args.data, args.rows, args.seq_len), indent=1))


if __name__ == "__main__":
    main()
