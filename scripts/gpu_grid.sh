#!/usr/bin/env bash
# The benchmark grid of benchmarks/README.md, in the parts that fit one 10-minute command each.
#   bash scripts/gpu_grid.sh small    1.6B and 2.8B, every P, batch, length (graph engine); GRID_FROM=DIR continues the
#                                     cut-short grid_graph_small.json in DIR (also for large)
#   bash scripts/gpu_grid.sh large    4.4B (graph engine)
#   bash scripts/gpu_grid.sh memory   peak memory of every point, one process per (shape, P)
#   bash scripts/gpu_grid.sh long     a 64 + 64-token talk in a 128- and a 4096-token cache, bounded reads off / on, graph and compiled engines
#   bash scripts/gpu_grid.sh int8     bf16 vs int8 weights, graph and compiled engines, P 1 and 8 (the compiled step can fuse the cast)
#   bash scripts/gpu_grid.sh prefill  prefill of 64-512 prompt tokens, eager vs padded (graph-captured), P 1 and 8, with the anchor
#   bash scripts/gpu_grid.sh prefill-compile  the compiled engine's prefill, eager vs padded + compiled + captured, P 1 and 8
#   bash scripts/gpu_grid.sh fuse     separate vs fused q/k/v and gate/up projections, graph and compiled engines, P 1 and 8
#   bash scripts/gpu_grid.sh headline-compile [BATCHES]  the points of the paper-style headline (1.6B P 1 and 8; 2.8B
#                                     and 4.4B P 1) with the compiled engine and its compiled padded prefill, 64 + 64
#                                     tokens, at BATCHES (default 1; each point compiles for ~80 s, so 4 points a call)
#   bash scripts/gpu_grid.sh warm-start  the compiled engine's warm-up in a fresh process, twice: the second finds
#                                     inductor's on-disk caches of the first (what a user's second start costs; run it
#                                     before any other compiled bench on the machine, or "cold" is warm too)
#   bash scripts/gpu_grid.sh tuning   the compiled engine with and without inductor's coordinate-descent tuning (what
#                                     gpt-fast turns on), bf16 and int8, P 1 and 8
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
bench() { timeout "$1" python3 -m parscale.cli bench "${@:2}"; }
case "${1:-small}" in
  small)
    # --resume: with GRID_FROM set to a folder holding an earlier, cut-short grid_graph_small.json (fetched back into
    # the checkout), that run is continued rather than started again
    [ -n "${GRID_FROM:-}" ] && cp "$GRID_FROM/grid_graph_small.json" "$OUT/"
    bench 560 --shapes paper-1.6b,paper-2.8b --engine graph --kernels --resume --out "$OUT/grid_graph_small.json" ;;
  large)
    [ -n "${GRID_FROM:-}" ] && cp "$GRID_FROM/grid_graph_large.json" "$OUT/"
    bench ${GRID_LIMIT:-560} --shapes paper-4.4b --engine graph --resume --out "$OUT/grid_graph_large.json" ;;
  memory)
    # Peak memory with a fresh process per (shape, P): nothing of an earlier model can linger. The four P of a shape
    # run at once (all twelve at once do not fit in 140 GiB): the peak is each process's own allocator's
    # (torch.cuda.max_memory_allocated), not the device's, so the processes beside it do not change it.
    mkdir -p /tmp/mem
    for shape in paper-1.6b paper-2.8b paper-4.4b; do
      for p in 1 2 4 8; do
        bench ${MEMORY_LIMIT:-200} --shapes $shape --streams $p --engine graph --memory-only \
            --out /tmp/mem/$shape-P$p.json > /tmp/mem/$shape-P$p.log 2>&1 &
      done
      wait
    done
    python3 -c "import json,glob,sys; parts=[json.load(open(f)) for f in sorted(glob.glob('/tmp/mem/*.json'))]; \
m=parts[0]; m['points']=[q for d in parts for q in d['points']]; m['environment']['command']=sys.argv[1]; \
json.dump(m, open('$OUT/memory_fresh.json','w'), indent=1)" "bash scripts/gpu_grid.sh memory"
    tail -n 2 /tmp/mem/*.log ;;
  long)
    for cache in 128 4096; do
      for engine in graph compile; do
        bench 150 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64 --engine $engine --cache-len $cache \
            --no-bounded-reads --out "$OUT/long_${engine}_cache${cache}.json"
        bench 150 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64 --engine $engine --cache-len $cache \
            --bounded-reads --out "$OUT/long_${engine}_cache${cache}_bounded.json"
      done
    done ;;
  int8)
    for engine in graph compile; do
      bench 200 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 128 --engine $engine \
          --out "$OUT/int8_${engine}_bf16.json"
      bench 200 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 128 --engine $engine --quantize int8 \
          --out "$OUT/int8_${engine}_int8.json"
    done ;;
  prefill)
    bench 240 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64,128,256,512 --engine graph --anchors \
        --no-padded-prefill --out "$OUT/prefill_eager.json"
    bench 240 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64,128,256,512 --engine graph \
        --padded-prefill --out "$OUT/prefill_graph.json" ;;
  prefill-compile)
    # the compiled engine's prefill: eager against padded, compiled and captured (one compilation per length)
    bench 280 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64,256 --engine compile \
        --no-padded-prefill --out "$OUT/prefill_compile_eager.json"
    bench 300 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64,256 --engine compile \
        --padded-prefill --out "$OUT/prefill_compile_padded.json" ;;
  fuse)
    for engine in graph compile; do
      bench 140 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64 --engine $engine --no-fuse \
          --out "$OUT/fuse_${engine}_separate.json"
      bench 140 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64 --engine $engine --fuse \
          --out "$OUT/fuse_${engine}_fused.json"
    done ;;
  headline-compile)
    b=${2:-1}
    bench ${HEADLINE_LIMIT:-270} --shapes paper-1.6b --streams 1,8 --batches "$b" --lengths 64 --engine compile \
        --padded-prefill --resume --out "$OUT/headline_compile_1.6b_b${b//,/-}.json"
    bench ${HEADLINE_LIMIT:-300} --shapes paper-2.8b,paper-4.4b --streams 1 --batches "$b" --lengths 64 --engine compile \
        --padded-prefill --resume --out "$OUT/headline_compile_p1_b${b//,/-}.json" ;;
  warm-start)
    for run in cold warm; do
      bench 200 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64 --engine compile \
          --out "$OUT/warm_start_${run}.json"
    done ;;
  tuning)
    for q in "" "--quantize int8"; do
      tag=${q:+_int8}
      bench 200 --shapes paper-1.6b --streams 1,8 --batches 1 --lengths 64 --engine compile $q \
          --out "$OUT/tuning_default${tag}.json"
      TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 bench 280 --shapes paper-1.6b --streams 1,8 --batches 1 \
          --lengths 64 --engine compile $q --out "$OUT/tuning_coordinate_descent${tag}.json"
    done ;;
esac
