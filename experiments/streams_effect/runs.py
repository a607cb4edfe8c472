"""Where does the ParScale gain come from? Paired-seed runs of P = 1, the P = 1 prefix control and P = 2, 4, 8.

    python experiments/streams_effect/runs.py configs                  # (re)write configs/*.toml
    python experiments/streams_effect/runs.py run --data DIR --work DIR --only 'd8-*-s0' --per-gpu 5
    python experiments/streams_effect/runs.py list

The recipe is the one under which streams were seen to specialise (depth 8, 48 prefix tokens): the
code corpus of `parscale corpus --this-python`, an 8,192-entry BPE, hidden 256, 8 layers, 4 heads of 64,
2 KV heads, SwiGLU 1024, tied embedding, ε = 0.1; batch 32 × 512, 2,400 steps (39.3M tokens), AdamW
lr 2e-3, 100 warm-up steps, cosine to 0.1×, weight decay 0.1, clip 1, bf16 autocast, compiled.

Arms, each with seeds 0, 1, 2 (a seed fixes the backbone initialisation and the data order for every
arm: parscale's paired seeds), named d8-{arm}-s{seed}:
- p1         the plain model;
- p1prefix   P = 1 with a learned 48-token prefix in every layer and no aggregator (the control: how
             much of the gain is the prefix itself, as learned memory or attention sink);
- p2, p4, p8 ParScale with P streams;
- p2-*, p4-*, p8-* the same with one lever against collapse (LEVER_ARMS: aggregator z-loss, stream
             dropout, a longer warm-up of prefixes and aggregator, prefix reparameterisation); p4-zloss,
             p4-sdrop, p4-reparam and p{2,4,8}-aggwarm have run, the rest is configured;
- map-*      the collapse map: P = 4 over depth {4, 8, 12} x prefix {8, 48}, plain and with the warm-up
             lever, seeds 0 and 1 (seed 0 has run);
- ladder-*   P = 1 at hidden 192 and 384, for the slope of loss in ln N (have run);
- lr-*       P = 1 at hidden 256 and 384 with lr 1e-3 and 5e-4 (have run: the ladder's learning-rate
             check); 192 at 1e-3 and 4e-3, 256 at 4e-3, and the prefix control and P = 4 + warm-up at 1e-3
             and 4e-3 (seed 0 has run), P = 4 + warm-up at 8e-3 (configured);
- long-*     P = 1, the prefix control, P = 2, 4 and 8 with the warm-up lever and the width ladder (192 and
             384, each at its best lr at 39M) at ~100M tokens (have run);
- repeat-*   the prefix control again, on the GPU model of the later arms (have run);
- ts-*       two-stage: stage 2 from long-p1-s{seed}'s checkpoint at P = 2/4/8 and the two P = 1 controls,
             +2/5/20% of stage 1's steps, and at +5% P = 4 and the prefix control with prefixes started from
             the backbone (`-bbinit`, prefix_init = "backbone") (TWO_STAGE; P = 8 and both controls at +5% have
             run, 3 seeds; the rest is configured);
- fz-*       frozen backbone, dynamic P: from the same checkpoint only prefixes and aggregator train, P = 2/4/8
             and the P = 1 prefix control, +5/20% of stage 1's steps (+5% has run, 3 seeds), and at +5% P = 8
             and the control with prefixes started from the backbone (`-bbinit`; configured);
- en-*       the headline arms (P = 1, the prefix control with the lever, P = 8 with the lever) on English
             documentation and prose with its own BPE from a 5% sample, one epoch (ENGLISH; configured);
- long-p1prefix-aggwarm, long-p1prefix384-aggwarm, long-p8: the matched controls at ~100M tokens (the
             prefix control with the P > 1 arms' warm-up lever; the same with P = 8's 384 prefix tokens,
             matching its prefix parameters; plain P = 8 without the lever), seeds 0-5 (long-p8: 0-2); the
             long arms gain seeds 3-5.
Every run evaluates the whole held-out split at 90, 95 and 100% of training (`eval_at`); the endpoint
is their mean. Stage-2 runs (ts-, fz-) evaluate it at 100% only (at +5% three evaluations of the 2.6M-token
split are about half the training's FLOPs) and are compared at that last loss (analyze.post_training; the first
ts-p8/ts-p4/fz-p2 runs also have 90 and 95%, which is all that differs in their settings).
After training, `parscale streams` measures the final model's streams on 16 held-out
batches, and with `--heldout-corpus` (gpu_run.sh passes it) `parscale eval` scores every held-out package
apart, the files with a training twin apart (write_heldout; result["heldout_by_package"]). `run` starts
each run as its own worker process (`experiments/runner.py one`: `parscale train`, then the measurements above, then
its result.json), `per_gpu` at a time on every visible GPU (largest P first),
skips runs whose result exists, and writes results/{run}.json; a stage-2 run brings its stage 1 along when
that run's folder is not in --work (select_runs). A runner stopped by SIGTERM (a time limit)
stops its trainers the same way, each writing a checkpoint; started again over the same --work folder it
continues them with `--resume` (bit-exact), and `wall_seconds` is then the last segment's.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from runner import experiment_main  # noqa: E402
from runner import run_all as _run_all  # noqa: E402  (experiments/runner.py, shared by the experiments)

CONFIGS, RESULTS = HERE / "configs", HERE / "results"
STEPS, BATCH, SEQ = 2400, 32, 512
SHAPE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": True}
TRAIN = {"model": "small", "steps": STEPS, "batch_size": BATCH, "seq_len": SEQ, "lr": 2e-3, "min_lr_ratio": 0.1,
         "warmup": 100, "schedule": "cosine", "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 300,
         "eval_batches": 16, "eval_at": [0.9, 0.95, 1.0], "stream_batches": 2, "save_every": 0, "compile": True,
         "progress": False, "n_tokens": 48, "smooth": 0.1}
ARMS = {"p1": {"streams": 1}, "p1prefix": {"streams": 1, "p1_prefix": True}, "p2": {"streams": 2},
        "p4": {"streams": 4}, "p8": {"streams": 8}}
SEEDS = (0, 1, 2)
# The levers against collapse (parscale/training/levers.py); P = 2 separates the 2 -> 4 step from the lever.
LEVER_ARMS = {f"p{p}-{lever}": {"streams": p, **fields} for p in (2, 4, 8) for lever, fields in {
    "zloss": {"aggregator_z_loss": 1e-3},        # the router z-loss coefficient of ST-MoE
    "sdrop": {"stream_dropout": 0.1},
    "aggwarm": {"parscale_warmup": 600},         # prefixes and aggregator warm up 6× longer
    "reparam": {"prefix_reparam": True},
}.items()}


# Where collapse happens: P = 4 over depth x prefix length, plain and with the warm-up lever, seeds 0 and 1
# (depth 8 with 48 tokens is the d8-p4 arms above). Named map-d{depth}-n{tokens}-p4[-aggwarm]-s{seed}.
MAP_SEEDS = (0, 1)
COLLAPSE_MAP = {f"map-d{depth}-n{n}-p4{suffix}": {"streams": 4, "n_tokens": n, **lever, "depth": depth}
                for depth in (4, 8, 12) for n in (8, 48) if (depth, n) != (8, 48)
                for suffix, lever in (("", {}), ("-aggwarm", {"parscale_warmup": 600}))}
# P = 1 one width below and one above the recipe (4 heads, 2 KV heads, SwiGLU 4x): the slope of loss
# in ln N, for a local k. Named ladder-h{hidden}-p1-s{seed}.
LADDER = {f"ladder-h{h}-p1": {"streams": 1, "width": h} for h in (192, 384)}
# The ladder turned up at 384 (worse than 256 from the first evaluation on): the learning rate of P = 1 at
# 256 and 384, halved and quartered, before any slope in ln N is read. Named lr-h{hidden}-p1-lr{lr}-s{seed}.
LR_CHECK = {f"lr-h{h}-p1-lr{lr:g}": {"streams": 1, "width": h, "lr": lr} for h in (256, 384) for lr in (1e-3, 5e-4)}
# 256's best lr was the largest tried (2e-3) and 192's was not checked: the check above and below them.
LR_CHECK.update({f"lr-h{h}-p1-lr{lr:g}": {"streams": 1, "width": h, "lr": lr}
                 for h, lrs in ((192, (1e-3, 4e-3)), (256, (4e-3,))) for lr in lrs})
# The parallel part is read against the prefix control, so both its arms need their lr checked too.
LR_CHECK_P = {f"lr-{arm}-lr{lr:g}": {**fields, "lr": lr} for arm, fields in
              (("p1prefix", {"streams": 1, "p1_prefix": True}), ("p4-aggwarm", {"streams": 4, "parscale_warmup": 600}))
              for lr in (1e-3, 4e-3)}
# P = 4 was as good at 4e-3 as at 2e-3 (seed 0), where every P = 1 arm was worse: one lr higher brackets it.
LR_CHECK_P["lr-p4-aggwarm-lr0.008"] = {"streams": 4, "parscale_warmup": 600, "lr": 8e-3}
# ~100M tokens (6,000 steps of 32 x 512, 12.5 tokens per P = 1 parameter) for the arms that carry the
# result: P = 1, the prefix control and P = 2 / 4 / 8 with the warm-up lever. Named long-{arm}-s{seed}.
LONG_STEPS = 6000
LONG = {f"long-{arm}": {**fields, "steps": LONG_STEPS, "eval_every": 750} for arm, fields in
        (("p1", {"streams": 1}), ("p1prefix", {"streams": 1, "p1_prefix": True}),
         ("p2-aggwarm", {"streams": 2, "parscale_warmup": 600}),
         ("p4-aggwarm", {"streams": 4, "parscale_warmup": 600}),
         ("p8-aggwarm", {"streams": 8, "parscale_warmup": 600}),
         # the width ladder at this length, each width at its best lr at 39M tokens: a local k at ~100M
         ("ladder-h192-p1", {"streams": 1, "width": 192}),
         ("ladder-h384-p1", {"streams": 1, "width": 384, "lr": 1e-3}))}
# The base arms ran on an H100, everything since on an H200: the prefix control again, on the other GPU,
# bounds that confound (same settings as d8-p1prefix). Named repeat-p1prefix-s{seed}.
REPEAT = {"repeat-p1prefix": {"streams": 1, "p1_prefix": True}}
# Matched controls at ~100M tokens, seeds 0-5 (the long arms above gain seeds 3-5): the prefix control with
# the same warm-up lever as the P > 1 arms; a parameter-matched one with P = 8's prefix size (8 x 48 = 384
# prefix tokens per layer, the lever too); plain P = 8 without the lever (does collapse recover with
# longer training?). Named long-{arm}-s{seed}.
MATCHED = {f"long-{arm}": {**fields, "steps": LONG_STEPS, "eval_every": 750} for arm, fields in
           (("p1prefix-aggwarm", {"streams": 1, "p1_prefix": True, "parscale_warmup": 600}),
            ("p1prefix384-aggwarm", {"streams": 1, "p1_prefix": True, "n_tokens": 384, "parscale_warmup": 600}),
            ("p8", {"streams": 8}))}
MORE_SEEDS = (3, 4, 5)   # for the arms that enter a claim: the long arms and the matched controls
# Generality: the headline arms (P = 1, the matched prefix control, P = 8 with the lever) on a second corpus, the
# English documentation and prose of experiments/scaling_small (build_english.py), with a second BPE trained
# as a user would: 8,192 entries on a 5% sample of its training documents (data/english-tokenizer-8k.json).
# One epoch: 2,300 steps of 32 x 512 = 37.7M of its 38.3M training tokens (the d8 recipe is 39.3M), seeds 0-2.
# Named en-{arm}-s{seed}; they read the English data folder (runner: --corpus-data english=DIR).
ENGLISH_STEPS = 2300
ENGLISH = {f"en-{arm}": {**fields, "steps": ENGLISH_STEPS} for arm, fields in
           (("p1", {"streams": 1}), ("p1prefix-aggwarm", {"streams": 1, "p1_prefix": True, "parscale_warmup": 600}),
            ("p8-aggwarm", {"streams": 8, "parscale_warmup": 600}))}
# Two-stage training (the paper's Sec. 4.1 at this scale): stage 1 is long-p1-s{seed} (its final checkpoint,
# on the same machine, so both stages run in one sitting); stage 2 continues it for +2 / 5 / 20% of its steps
# at P = 2 / 4 / 8 (fresh prefixes and aggregator), against P = 1 and the P = 1 + prefix control continued
# alike, on the data that follows stage 1's. The backbone keeps stage 1's final lr (2e-4, constant); the new
# parameters warm up over the first 10% of stage 2 to 10x that (stage 1's peak): they start from random,
# the backbone does not (the paper gives no stage-2 schedule; this one is a choice, to be checked).
# Named ts-{arm}-plus{pct}-s{seed}.
TWO_STAGE = {}
for pct in (2, 5, 20):
    steps = LONG_STEPS * pct // 100
    stage2 = {"steps": steps, "lr": 2e-4, "warmup": 0, "min_lr_ratio": 1.0, "eval_every": max(30, steps // 4),
              "eval_at": [1.0], "data_start": LONG_STEPS * BATCH, "after": "long-p1"}
    new_parameters = {"parscale_warmup": max(1, steps // 10), "parscale_lr_mult": 10.0}
    TWO_STAGE[f"ts-p1-plus{pct}"] = {**stage2, "streams": 1}
    TWO_STAGE[f"ts-p1prefix-plus{pct}"] = {**stage2, "streams": 1, "p1_prefix": True, **new_parameters}
    for p in (2, 4, 8):
        TWO_STAGE[f"ts-p{p}-plus{pct}"] = {**stage2, "streams": p, **new_parameters}
# The prefixes started from the backbone's own keys and values (model/convert.py: a trained model starts near
# its P = 1 loss) against the random start, at +5% for P = 4 and the prefix control.
for arm, fields in (("p4", {"streams": 4}), ("p1prefix", {"streams": 1, "p1_prefix": True})):
    random_start = TWO_STAGE[f"ts-{arm}-plus5"]
    TWO_STAGE[f"ts-{arm}-bbinit-plus5"] = {**random_start, **fields, "prefix_init": "backbone"}
# Frozen backbone, dynamic P (the paper's Sec. 4.2 and Fig. 6c at this scale): from the same stage-1 checkpoint,
# only the new parameters train (trainable = "parscale": each P is an adapter on one shared backbone), for +5%
# and +20% of stage 1's steps at stage 1's peak lr, 10% warm-up, cosine to 0.1x (a choice: the backbone does
# not move, so the new parameters get the whole schedule); the control is the P = 1 prefix trained alike.
# Named fz-{arm}-plus{pct}-s{seed}.
for pct in (5, 20):
    steps = LONG_STEPS * pct // 100
    frozen = {"steps": steps, "lr": 2e-3, "warmup": max(1, steps // 10), "min_lr_ratio": 0.1, "trainable": "parscale",
              "eval_every": max(30, steps // 4), "eval_at": [1.0], "data_start": LONG_STEPS * BATCH,
              "after": "long-p1"}
    TWO_STAGE[f"fz-p1prefix-plus{pct}"] = {**frozen, "streams": 1, "p1_prefix": True}
    for p in (2, 4, 8):
        TWO_STAGE[f"fz-p{p}-plus{pct}"] = {**frozen, "streams": p}
# At +5% every frozen arm ended above the backbone's own loss (the prefix control by 0.013): the frozen arms again
# with prefixes started from the backbone's own keys and values, which start near its loss (model/convert.py),
# for P = 8 and the prefix control.
# At +5% the backbone-started P = 8 gained nothing over its control and its streams stayed alike (KL 0.008): the
# same at +20% asks whether the streams part with a longer stage 2.
for pct in (5, 20):
    for arm in ("p8", "p1prefix"):
        TWO_STAGE[f"fz-{arm}-bbinit-plus{pct}"] = {**TWO_STAGE[f"fz-{arm}-plus{pct}"], "prefix_init": "backbone"}


def _shape(fields: dict) -> dict:
    shape = dict(SHAPE)
    if "depth" in fields:
        shape["num_hidden_layers"] = fields["depth"]
    if "width" in fields:
        h = fields["width"]
        shape.update(hidden_size=h, intermediate_size=4 * h)  # 4 heads of h / 4 and 2 KV heads, as at 256
    return shape


def runs() -> dict[str, dict]:
    out = {}
    for seed in SEEDS + MORE_SEEDS:
        for arm, fields in {**ARMS, **LEVER_ARMS}.items():
            if seed in MORE_SEEDS:
                continue
            out[f"d8-{arm}-s{seed}"] = {"arm": arm, "seed": seed, "cost": fields["streams"],
                                        "train": {**TRAIN, **fields, "seed": seed, "model_overrides": SHAPE}}
        for arm, fields in {**COLLAPSE_MAP, **LADDER, **LR_CHECK, **LR_CHECK_P, **LONG, **REPEAT, **MATCHED}.items():
            if arm.startswith("map-") and seed not in MAP_SEEDS:
                continue
            if seed in MORE_SEEDS and not arm.startswith("long-") or arm == "long-p8" and seed in MORE_SEEDS:
                continue
            shape = _shape(fields)
            train = {**TRAIN, **{k: v for k, v in fields.items() if k not in ("depth", "width")}, "seed": seed,
                     "model_overrides": shape}
            cost = (fields["streams"] * shape["num_hidden_layers"] / 8 * (shape["hidden_size"] / 256) ** 2
                    * fields.get("steps", STEPS) / STEPS)
            out[f"{arm}-s{seed}"] = {"arm": arm, "seed": seed, "cost": cost, "train": train}
        for arm, fields in ENGLISH.items():
            if seed in MORE_SEEDS:
                continue
            out[f"{arm}-s{seed}"] = {"arm": arm, "seed": seed, "corpus": "english",
                                     "cost": fields["streams"] * ENGLISH_STEPS / STEPS,
                                     "train": {**TRAIN, **fields, "seed": seed, "model_overrides": SHAPE}}
        for arm, fields in TWO_STAGE.items():
            train = {**TRAIN, **{k: v for k, v in fields.items() if k != "after"}, "seed": seed}
            train.pop("model_overrides", None)  # the model is stage 1's checkpoint (--model, given at launch)
            train["model"] = "STAGE1"
            out[f"{arm}-s{seed}"] = {"arm": arm, "seed": seed, "cost": fields["streams"] * fields["steps"] / STEPS,
                                     "train": train, "after": f"{fields['after']}-s{seed}"}
    return out


def run_all(data: Path, work: Path, only: list[str], per_gpu: int, heldout_corpus: Path | None = None,
            corpus_data: dict[str, Path] | None = None, again: list[str] = ()) -> None:
    """runner.run_all over this experiment's runs, configs/ and results/."""
    _run_all(runs(), CONFIGS, RESULTS, data, work, only, per_gpu, heldout_corpus, corpus_data, again)


def main(argv=None) -> None:
    experiment_main(argv, __doc__.splitlines()[0], runs, CONFIGS, RESULTS, run_all,
                    data_help="a `parscale data` folder of the code corpus", per_gpu=5)


if __name__ == "__main__":
    main()
