#!/usr/bin/env bash
# GPU checks and a small benchmark: CUDA tests, then graph / compile / plain engines at 1.6B, batch 1.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -m pytest -q -m gpu tests/test_engine.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
python3 -m parscale.cli bench --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64,128 --engine graph \
    --kernels --out "$OUT/smoke_graph.json"
python3 -m parscale.cli bench --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 128 --engine compile \
    --out "$OUT/smoke_compile.json"
python3 -m parscale.cli bench --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64 --engine plain \
    --out "$OUT/smoke_plain.json"
