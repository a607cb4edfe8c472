#!/usr/bin/env bash
# GPU checks and a small benchmark: every `gpu`-marked test, then graph / compile / plain engines at 1.6B, batch 1.
#   bash scripts/gpu_smoke.sh          tests + graph engine (a few minutes)
#   bash scripts/gpu_smoke.sh full     also the compiled engine (with the transformers anchor) and the plain one;
#                                      with GPTFAST_MODEL set to your copy of gpt-fast's model.py (run from there, never
#                                      copied here), the gpt-fast anchor too, in the compiled engine's process
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/nvidia-smi.txt"
python3 -m pytest -q -rs -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
python3 -m parscale.cli bench --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64,128 --engine graph \
    --out "$OUT/smoke_graph.json"
if [ "${1:-}" = full ]; then
  gptfast=()
  [ -n "${GPTFAST_MODEL:-}" ] && gptfast=(--gptfast-model "$GPTFAST_MODEL")
  python3 -m parscale.cli bench --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 128 --engine compile \
      --anchors "${gptfast[@]}" --out "$OUT/smoke_compile.json"
  python3 -m parscale.cli bench --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64 --engine plain \
      --out "$OUT/smoke_plain.json"
fi
