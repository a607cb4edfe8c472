#!/usr/bin/env bash
# Build both corpora's token shards on a GPU machine (if not built yet), run the experiment's grid in the
# background (it outlives this command when started with setsid), and after WAIT seconds pack what is done.
#
#   bash experiments/scaling_small/gpu_run.sh WAIT [PACK_DIR]
#
# Inputs: runs/english/english.jsonl.xz (build_english.py), the tokenizers in experiments/scaling_small/data/
# (the code tokenizer is trained here on first use). Work goes to $SCALING_WORK (default /tmp/scaling_small);
# PACK_DIR (default $SCALING_WORK/pack) receives results.tgz and the corpus manifests.
set -uo pipefail
WAIT=${1:?usage: gpu_run.sh WAIT_SECONDS [PACK_DIR]}
W=${SCALING_WORK:-/tmp/scaling_small}
PACK=${2:-$W/pack}
X=experiments/scaling_small
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
mkdir -p "$W" "$PACK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, tokenizers; print('torch', torch.__version__, 'tokenizers', tokenizers.__version__)"

CORPORA=${CORPORA:-code english}   # which corpora to build and run
build_data() {
    if [[ " $CORPORA " == *" code "* ]] && [ ! -f "$W/code/data/manifest.json" ]; then
        python3 -m parscale.cli corpus --this-python --out "$W/code/corpus.jsonl" --val-fraction 0.02 --overwrite || return 1
        if [ -f $X/data/code-tokenizer.json ]; then tok=(--tokenizer $X/data/code-tokenizer.json)
        else tok=(--vocab-size 16384 --bpe-sample 0.25); fi
        python3 -m parscale.cli data "$W/code/corpus.jsonl" --split-field split "${tok[@]}" --out "$W/code/data" --overwrite || return 1
    fi
    if [[ " $CORPORA " == *" english "* ]] && [ ! -f "$W/english/data/manifest.json" ]; then
        python3 -m parscale.cli data runs/english/english.jsonl.xz --tokenizer $X/data/english-tokenizer.json \
            --val-fraction 0.03 --out "$W/english/data" --overwrite || return 1
    fi
}

if [ -f "$W/runner.pid" ] && kill -0 "$(cat "$W/runner.pid")" 2>/dev/null; then
    echo "runner already running (pid $(cat "$W/runner.pid"))"
else
    build_data || { echo "data build failed"; exit 1; }
    # The code corpus is read from this machine's Python: it must be the one the committed results used.
    if [ -f "$W/code/corpus.jsonl.manifest.json" ] && [ -f $X/data/code-corpus-manifest.json.xz ]; then
        python3 - "$W/code/corpus.jsonl.manifest.json" $X/data/code-corpus-manifest.json.xz <<'PY' || exit 1
import json, lzma, sys
new, old = json.load(open(sys.argv[1])), json.load(lzma.open(sys.argv[2]))
if new["corpus_sha256"] != old["corpus_sha256"]:
    sys.exit(f"code corpus differs from the committed one: {new['corpus_sha256']} vs {old['corpus_sha256']}")
print("code corpus sha256 matches the committed manifest")
PY
    fi
    echo "data ready after $(( $(date +%s) - t0 )) s"
    setsid nohup python3 $X/grid.py run --corpus $CORPORA --data-root "$W" --runs-dir "$W/runs" \
        --results "$W/results" --per-gpu "${PER_GPU:-6}" > "$W/runner.log" 2>&1 < /dev/null &
    echo $! > "$W/runner.pid"
fi
while [ $(( $(date +%s) - t0 )) -lt "$WAIT" ] && kill -0 "$(cat "$W/runner.pid")" 2>/dev/null; do sleep 5; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
tail -n 40 "$W/runner.log"
for m in "$W"/runs/*/metrics.jsonl; do  # the latest step of every run (progress, tokens/s, MFU)
    [ -s "$m" ] && echo "$(basename "$(dirname "$m")"): $(tail -n 1 "$m" | cut -c1-200)"
done
cp "$W/code/data/tokenizer.json" "$PACK/code-tokenizer.json" 2>/dev/null
for c in code english; do cp "$W/$c/data/manifest.json" "$PACK/$c-data-manifest.json" 2>/dev/null; done
xz -T0 -c "$W/code/corpus.jsonl.manifest.json" > "$PACK/code-corpus-manifest.json.xz" 2>/dev/null
tar czf "$PACK/results.tgz" -C "$W" results runner.log $(cd "$W" && ls runs/*.log 2>/dev/null)
ls -la "$PACK"
