#!/usr/bin/env bash
# Training speed and multi-GPU checks (benchmarks/README.md, "Training").
#   bash scripts/gpu_train.sh speed   125M model, P=1 and P=4, with and without torch.compile, one GPU
#   bash scripts/gpu_train.sh ddp     the same P=4 run on 1 GPU and under torchrun on 2 GPUs
#   bash scripts/gpu_train.sh fsdp    P=4 on 1 GPU, then FSDP2 on every GPU (same global batch): losses, speed, and
#                                     a checkpoint of the N-GPU run resumed on 1 GPU and on N
#   bash scripts/gpu_train.sh scaling P=1 and P=4 compiled: 1 GPU at 16 sequences, then DDP and FSDP2 on every GPU at
#                                     16 per GPU: tokens/s and MFU per GPU count
#   bash scripts/gpu_train.sh accum   P=4 compiled, 4 accumulation micro-steps, DDP and FSDP2 on every GPU, gradients
#                                     reduced on the last micro-step only (the default) and on every one
#                                     (--sync-every-micro-step): what skipping the sync saves
#   bash scripts/gpu_train.sh large   SHAPE (default paper-2.8b) at P=4 with activation checkpointing, 1 GPU and FSDP2
#                                     on every GPU (8 sequences per GPU): tokens/s, MFU and peak memory per GPU
#   bash scripts/gpu_train.sh mfu     SHAPE (default paper-0.5b) at sequence 2048, P=1, 4 and 8, compiled, chunked loss
#                                     (P=8 with activation checkpointing): MFU, peak memory and kernel groups
#                                     (scripts/profile_train.py), and the P-stream attention against plain causal
#                                     attention of the same rows (scripts/attention_cost.py)
# speed also runs P=4 compiled with --log-every 1 (the host waits for every step, as before step_metrics.py)
# Data: the demo's token shards in runs/demo/data (`parscale demo` writes them).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
n=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)  # GPUs on this machine (fsdp, scaling, accum)
common="--model 125m --data runs/demo/data --seq-len 512 --eval-every 0 --save-every 0 --lr 1e-3 --warmup 5 \
  --log-every 5"
summarise() {  # $1 = label, $2 = run folder
  python3 - "$1" "$2" <<'PY' >> "$OUT/train_runs.jsonl"
import json, statistics, sys, torch
rows = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl")][5:]  # skip warm-up / compilation steps
print(json.dumps({"run": sys.argv[1], "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "steps_measured": len(rows), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                  "mfu": statistics.median(r["mfu"] for r in rows) if "mfu" in rows[0] else None,
                  "peak_memory_gib": max(r.get("peak_memory_gib", 0) for r in rows),
                  "losses": [round(r["loss"], 5) for r in rows]}))
PY
}
case "${1:-speed}" in
  speed)
    for p in 1 4; do for c in "" "--compile"; do
      name="p${p}${c:+_compile}"
      timeout 280 python3 -m parscale.cli train $common --streams $p --steps 30 --batch-size 16 $c \
          --out /tmp/$name > "$OUT/$name.log" 2>&1 && summarise "$name" /tmp/$name
    done; done
    timeout 280 python3 -m parscale.cli train $common --streams 4 --steps 30 --batch-size 16 --compile \
        --log-every 1 --out /tmp/p4_compile_sync > "$OUT/p4_compile_sync.log" 2>&1 \
        && summarise "p4_compile_log_every_1" /tmp/p4_compile_sync ;;
  ddp)
    timeout 200 python3 -m parscale.cli train $common --streams 4 --steps 20 --batch-size 16 --out /tmp/one \
        > "$OUT/ddp_one.log" 2>&1 && summarise "1gpu_p4" /tmp/one
    timeout 200 torchrun --standalone --nproc_per_node=2 -m parscale.cli train $common --streams 4 --steps 20 \
        --batch-size 16 --out /tmp/two > "$OUT/ddp_two.log" 2>&1 && summarise "2gpu_p4" /tmp/two ;;
  fsdp)
    run1() { timeout 200 python3 -m parscale.cli train $common --streams 4 --batch-size 16 "$@"; }
    runn() { timeout 200 torchrun --standalone --nproc_per_node="$n" -m parscale.cli train $common --streams 4 \
        --batch-size 16 --fsdp "$@"; }
    run1 --steps 20 --out /tmp/f1 > "$OUT/fsdp_one.log" 2>&1 && summarise "1gpu_p4" /tmp/f1
    runn --steps 20 --out /tmp/fn > "$OUT/fsdp_n.log" 2>&1 && summarise "${n}gpu_fsdp_p4" /tmp/fn
    runn --steps 10 --save-every 10 --out /tmp/fr1 > "$OUT/fsdp_part.log" 2>&1
    cp -r /tmp/fr1 /tmp/frn
    run1 --steps 20 --resume --out /tmp/fr1 >> "$OUT/fsdp_part.log" 2>&1 && summarise "fsdp_${n}gpu_resumed_on_1" /tmp/fr1
    runn --steps 20 --resume --out /tmp/frn >> "$OUT/fsdp_part.log" 2>&1 && summarise "fsdp_${n}gpu_resumed_on_${n}" /tmp/frn
    # every step's loss against the 1-GPU run's (bf16 autocast: a sum reduced in another order differs a little)
    python3 - /tmp/f1 /tmp/fn /tmp/fr1 /tmp/frn <<'PY' >> "$OUT/train_runs.jsonl"
import json, sys
losses = {d: [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl")] for d in sys.argv[1:]}
ref = losses[sys.argv[1]]
print(json.dumps({"max_abs_loss_diff_vs_1gpu": {d: max(abs(a - b) for a, b in zip(ref, v)) for d, v in losses.items()
                                               if d != sys.argv[1] and len(v) == len(ref)}}))
PY
    ;;
  scaling)
    for p in 1 4; do
      timeout 150 python3 -m parscale.cli train $common --streams $p --steps 30 --batch-size 16 --compile \
          --out /tmp/s1_p$p > "$OUT/scaling_1gpu_p$p.log" 2>&1 && summarise "1gpu_p${p}_compile" /tmp/s1_p$p
      for mode in ddp fsdp; do
        flag=(); [ $mode = fsdp ] && flag=(--fsdp)
        timeout 150 torchrun --standalone --nproc_per_node="$n" -m parscale.cli train $common --streams $p --steps 30 \
            --batch-size $((16 * n)) --compile "${flag[@]}" --out /tmp/sn_${mode}_p$p > "$OUT/scaling_${mode}_p$p.log" 2>&1 \
            && summarise "${n}gpu_${mode}_p${p}_compile" /tmp/sn_${mode}_p$p
      done
    done ;;
  accum)
    for mode in ddp fsdp; do
      flag=(); [ $mode = fsdp ] && flag=(--fsdp)
      for sync in "" "--sync-every-micro-step"; do
        name="${n}gpu_${mode}_p4_accum4${sync:+_sync_each}"
        timeout 140 torchrun --standalone --nproc_per_node="$n" -m parscale.cli train $common --streams 4 --steps 20 \
            --batch-size $((16 * n)) --grad-accum 4 --compile "${flag[@]}" $sync --out /tmp/$name \
            > "$OUT/$name.log" 2>&1 && summarise "$name" /tmp/$name
      done
    done ;;
  large)
    shape=${SHAPE:-paper-2.8b}
    big="--model $shape --data runs/demo/data --seq-len 512 --eval-every 0 --save-every 0 --lr 3e-4 --warmup 5 \
      --log-every 5 --streams 4 --steps 20 --activation-checkpointing"
    timeout 280 python3 -m parscale.cli train $big --batch-size 8 --out /tmp/l1 > "$OUT/large_1gpu.log" 2>&1 \
        && summarise "1gpu_${shape}_p4_ac" /tmp/l1
    timeout 280 torchrun --standalone --nproc_per_node="$n" -m parscale.cli train $big --batch-size $((8 * n)) --fsdp \
        --out /tmp/ln > "$OUT/large_fsdp.log" 2>&1 && summarise "${n}gpu_fsdp_${shape}_p4_ac" /tmp/ln ;;
  mfu)
    shape=${SHAPE:-paper-0.5b}
    python3 scripts/attention_cost.py --model "$shape" --streams 2,4,8 --batch-size 2 --seq-len 2048 \
        --out "$OUT/attention_cost_${shape}.json"
    prof="--model $shape --seq-len 2048 --loss-chunk-rows 4096 --warmup 4 --steps 3"
    timeout 240 python3 scripts/profile_train.py $prof --streams 1,4 --batch-size ${BATCH:-4} \
        --out "$OUT/mfu_${shape}_p1_p4.json"
    timeout 200 python3 scripts/profile_train.py $prof --streams 8 --batch-size ${BATCH:-4} --activation-checkpointing \
        --out "$OUT/mfu_${shape}_p8_ac.json"
    exit 0 ;;
esac
cat "$OUT/train_runs.jsonl"
