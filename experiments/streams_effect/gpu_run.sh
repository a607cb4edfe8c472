#!/usr/bin/env bash
# Build the code corpus and its token shards on a GPU machine (if not built yet), train the runs whose names
# match the patterns until BUDGET seconds have passed, and pack the results into $OUT.
#
#   BUDGET=580 PER_GPU=5 bash experiments/streams_effect/gpu_run.sh 'd8-*-s0' 'd8-p8-s1'
#   AGAIN='ts-p1-plus5-s[012]' bash experiments/streams_effect/gpu_run.sh 'ts-p1-plus5-s[012]' 'ts-p2-plus5-s[012]'
#
# AGAIN (patterns, space-separated): of the runs named, train these again even where a result is committed,
# into results/again/ (runs.py run --again): the controls a new training of stage 1 needs.
#
# The BPE is trained on the first machine (8,192 entries, a quarter of the training documents) and then
# committed as data/code-tokenizer-8k.json; later machines use the committed file, so every run of the
# experiment sees the same tokens. The corpus's sha256 is printed next to the one of the committed
# scaling_small manifest (the same `--this-python` corpus when the machine image is the same).
set -uo pipefail
X=experiments/streams_effect
W=${STREAMS_WORK:-/tmp/streams_effect}
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-540}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
mkdir -p "$W" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
if [ ! -f "$W/data/manifest.json" ]; then
    python3 -m parscale.cli corpus --this-python --out "$W/corpus.jsonl" --val-fraction 0.02 --overwrite > "$W/corpus.txt" || exit 1
    if [ -f $X/data/code-tokenizer-8k.json ]; then tok=(--tokenizer $X/data/code-tokenizer-8k.json)
    else tok=(--vocab-size 8192 --bpe-sample 0.25); fi
    python3 -m parscale.cli data "$W/corpus.jsonl" --split-field split "${tok[@]}" --out "$W/data" --overwrite || exit 1
fi
python3 - "$W/corpus.jsonl.manifest.json" experiments/scaling_small/data/code-corpus-manifest.json.xz <<'PY'
import json, lzma, sys
new, old = json.load(open(sys.argv[1])), json.load(lzma.open(sys.argv[2]))
print("corpus sha256", new["corpus_sha256"], "(scaling_small:", old["corpus_sha256"] + ")")
PY
# The English runs (en-*) read runs/english/english.jsonl.xz (experiments/scaling_small/build_english.py, copied
# to this machine), tokenised with the committed data/english-tokenizer-8k.json.
corpus_data=()
if [ -f runs/english/english.jsonl.xz ]; then
    if [ ! -f "$W/english/manifest.json" ]; then
        python3 -m parscale.cli data runs/english/english.jsonl.xz --tokenizer $X/data/english-tokenizer-8k.json \
            --val-fraction 0.03 --out "$W/english" --overwrite || exit 1
    fi
    python3 - "$W/english/manifest.json" $X/data/english-data-manifest.json <<'PY'
import json, sys
new, old = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
same = all(new[k] == old[k] for k in ("train_sha256", "val_sha256", "tokenizer_sha256"))
print("english data", "identical to the committed manifest" if same else "DIFFERS from the committed manifest")
PY
    corpus_data=(--corpus-data english="$W/english")
fi
echo "data ready after $(( $(date +%s) - t0 )) s"
# Trainers stopped by the last call's time limit finish their step and write a checkpoint first (a step still
# compiling can take minutes): a run folder stays locked until its trainer exits, so wait for them.
for _ in $(seq 150); do pgrep -f "parscale.cli train" > /dev/null || break; sleep 2; done
pgrep -fa "parscale.cli train" && echo "trainers of an earlier call still run: their runs will fail to start"
cp "$W/data/tokenizer.json" "$OUT/code-tokenizer-8k.json"
cp "$W/data/manifest.json" "$OUT/code-data-manifest.json"
# BUDGET is the whole script's time: the runner stops 75 s before it, which leaves its trainers time to finish
# their step and write a checkpoint (the wait below) and the results time to be packed. Give the call that
# runs this script a limit of BUDGET + 20 s or more.
left=$(( BUDGET - 75 - ($(date +%s) - t0) ))
[ "$left" -lt 30 ] && { echo "BUDGET=$BUDGET leaves no time to train after the set-up: give it more"; exit 4; }
# Every minute the results so far go to $OUT too (written whole, then renamed): a command stopped from outside
# before the end below still returns the runs that had finished.
# The trainers' own logs and metrics go there too, so a run cut short still shows its progress (tokens/s,
# held-out loss so far).
( while sleep 60; do tar czf "$OUT/.results.tgz.part" -C $X results && mv "$OUT/.results.tgz.part" "$OUT/results.tgz"
    ( cd "$W/runs" && tar czf "$OUT/.progress.tgz.part" *.log */metrics.jsonl ) && mv "$OUT/.progress.tgz.part" "$OUT/progress.tgz"
  done ) > /dev/null 2>&1 &
packer=$!
# On time-out `timeout` sends SIGTERM to the runner's whole process group: each trainer finishes its step,
# writes a checkpoint and exits; running this script again on the same machine continues them.
read -ra again <<< "${AGAIN:-}"   # read, not expanded: the patterns' * and [...] reach the runner as written
timeout "$left" python3 $X/runs.py run --data "$W/data" --work "$W/runs" --only "$@" --per-gpu "${PER_GPU:-5}" \
    --heldout-corpus "$W/corpus.jsonl" "${corpus_data[@]}" ${again[@]:+--again "${again[@]}"} \
    2>&1 | tee "$OUT/runner.log"
for _ in $(seq 60); do pgrep -f "parscale.cli train" > /dev/null || break; sleep 1; done
for f in "$W"/runs/*.log; do grep -q "Traceback" "$f" && { echo "== $f"; tail -20 "$f"; }; done
kill $packer 2>/dev/null; wait $packer 2>/dev/null; rm -f "$OUT/.results.tgz.part" "$OUT/.progress.tgz.part"
( cd "$W/runs" && tar czf "$OUT/progress.tgz" *.log */metrics.jsonl ) 2>/dev/null
tar czf "$OUT/results.tgz" -C $X results
ls -la "$OUT"
