#!/usr/bin/env bash
# On a GPU machine: put the SmolLM2 GGUF file together (it travels in parts), convert it to runs/smollm2, build
# the code corpus in SmolLM2's tokenizer, train the runs whose names match the patterns until BUDGET seconds
# have passed, and pack the results into $OUT.
#
#   BUDGET=580 PER_GPU=4 bash experiments/recycle_smollm2/gpu_run.sh 'start-*' 'frozen-*-s0'
#
# The GGUF file (93.8 MiB) is larger than what one call carries, so split_gguf.sh cuts it into two parts under
# .carry/gguf/ (ignored by git), each carried by its own call: this script keeps every part it is given in
# $RECYCLE_WORK/parts/ (on the same warm machine the next call finds it there) and goes on only when the parts
# put together have the file's sha256. The `gguf` package (the ggml project's reader, which transformers'
# GGUF support needs) travels as a wheel in .whl/ (split_gguf.sh downloads it).
set -uo pipefail
X=experiments/recycle_smollm2
W=${RECYCLE_WORK:-/tmp/recycle_smollm2}
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-540}
GGUF=runs/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=$(cat $X/gguf.sha256)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
mkdir -p "$W/parts" "$OUT" runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ls .whl/gguf-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PYTHONPATH:/tmp/site
[ -d .carry/gguf ] && cp .carry/gguf/part-* "$W/parts/" 2>/dev/null
if [ ! -f runs/smollm2/config.json ]; then
    cat "$W"/parts/part-* > "$GGUF" 2>/dev/null
    if [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" != "$GGUF_SHA256" ]; then
        echo "the GGUF parts here ($(ls "$W/parts" | tr '\n' ' ')) do not make the file yet: carry the other part"
        rm -f "$GGUF"; exit 3
    fi
    python3 -m parscale.cli convert --model "$GGUF" --out runs/smollm2 || exit 1
fi
# The corpus needs no model: an earlier call on the same machine may have built it already (see Commands in the
# README); the token data is built again whenever it is missing.
if [ ! -f "$W/corpus.jsonl" ]; then
    rm -rf "$W/data"
    python3 -m parscale.cli corpus --this-python --out "$W/corpus.jsonl" --val-fraction 0.02 --overwrite > "$W/corpus.txt" || exit 1
fi
if [ ! -f "$W/data/manifest.json" ]; then
    python3 -m parscale.cli data "$W/corpus.jsonl" --split-field split --tokenizer runs/smollm2/tokenizer.json \
        --out "$W/data" --overwrite || exit 1
fi
echo "model and data ready after $(( $(date +%s) - t0 )) s"
cp "$W/data/manifest.json" "$OUT/smollm2-code-data-manifest.json"
# Trainers stopped by the last call's time limit still write their checkpoint: a run folder stays locked until
# its trainer exits.
for _ in $(seq 150); do pgrep -f "parscale.cli train" > /dev/null || break; sleep 2; done
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
timeout "$left" python3 $X/runs.py run --data "$W/data" --work "$W/runs" --only "$@" --per-gpu "${PER_GPU:-4}" \
    --heldout-corpus "$W/corpus.jsonl" 2>&1 | tee "$OUT/runner.log"
for _ in $(seq 60); do pgrep -f "parscale.cli train" > /dev/null || break; sleep 1; done
mkdir -p $X/results
kill $packer 2>/dev/null; wait $packer 2>/dev/null; rm -f "$OUT/.results.tgz.part" "$OUT/.progress.tgz.part"
( cd "$W/runs" && tar czf "$OUT/progress.tgz" *.log */metrics.jsonl ) 2>/dev/null
tar czf "$OUT/results.tgz" -C $X results
# ADAPTERS='RUN ...': the adapters of those runs, where they finished on this machine, come back too, to be scored
# where the example tasks run (lm-eval is not on the GPU machine): one tar each, cut into parts of 15 MB (no file
# that comes back from $OUT may be larger than 16 MiB, and at most 8 files come back, so 4 parts beside the other
# four files). Put together with `cat adapter-RUN.tar.part-* | tar x`.
for name in ${ADAPTERS:-}; do
    if [ ! -f "$W/runs/$name/adapter/adapter.safetensors" ]; then echo "no adapter of $name here"; continue; fi
    tar cf "$W/adapter-$name.tar" -C "$W/runs/$name" adapter
    parts=$(( ($(stat -c %s "$W/adapter-$name.tar") + 14999999) / 15000000 ))
    if [ $(( $(ls "$OUT" | wc -l) + parts )) -gt 8 ]; then
        echo "the adapter of $name ($parts parts) does not fit the files that come back: name fewer"; continue
    fi
    split -b 15000000 -a 2 "$W/adapter-$name.tar" "$OUT/adapter-$name.tar.part-"
done
ls -la "$OUT"
