#!/usr/bin/env bash
# The skinny decode matmul on a GPU, in one go: its GPU tests (equal to F.linear and to the plain decode path),
# then every block configuration timed against torch's matmul on the paper-1.6b projections (the best of each
# shape kept in $OUT/skinny_tuned.json), then the decode step with and without parscale's kernels, gpt-fast's
# P = 1 in each process (scripts/gpu_decode_options.sh, which lists the settings).
#
#   GPTFAST_MODEL=path/to/gpt-fast/model.py bash scripts/gpu_skinny.sh [decode settings]
#
# Default settings: default graph graph_kernels_rope graph_kernels_rope_pdl kernels_rope. QUICK=1: fewer block
# candidates; ROWS=8: the P = 8 row count only; TESTS=0: no tests; PROFILE=1: last, one decode step with parscale's
# kernels profiled kernel by kernel (scripts/profile_step.py); PER_SETTING, BENCH_TIMEOUT, TEST_TIMEOUT: seconds
# for each part (a compiled setting needs ~50-80 s to compile before it is timed).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "${TESTS:-1}" = 1 ]; then  # the whole log kept: a failure's message is above pytest's last lines
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu tests/test_skinny_matmul.py tests/test_decode_attention.py tests/test_engine.py \
        > "$OUT/skinny_tests.txt" 2>&1
    grep -E "^(E |FAILED|[0-9]+ (passed|failed))" "$OUT/skinny_tests.txt" | tail -30
fi
timeout "${BENCH_TIMEOUT:-240}" python3 scripts/skinny_matmul_bench.py --preset paper-1.6b --rows "${ROWS:-1,8}" ${QUICK:+--quick} \
    --out "$OUT/skinny.json" --tuned-out "$OUT/skinny_tuned.json" 2>&1 | tee "$OUT/skinny_bench.txt"
settings=("$@")
[ ${#settings[@]} -eq 0 ] && settings=(default graph graph_kernels_rope graph_kernels_rope_pdl kernels_rope)
SKINNY_CONFIGS="$OUT/skinny_tuned.json" bash scripts/gpu_decode_options.sh "${settings[@]}" 2>&1 | tee "$OUT/decode.txt"
if [ "${PROFILE:-0}" = 1 ]; then
    PARSCALE_SKINNY_CONFIGS="$OUT/skinny_tuned.json" timeout "${PROFILE_TIMEOUT:-240}" \
        python3 scripts/profile_step.py --skinny-layers --decode-attention rope \
        --out "$OUT/profile_kernels_rope.json" 2>&1 | tee "$OUT/profile.txt"
fi
