#!/usr/bin/env bash
# Which settings make the decode step faster: the paper-1.6b shape at P = 1 and 8, batch 1, 64 + 64 tokens,
# `parscale bench --engine compile` (or `graph` where named), once per setting, each in its own process with gpt-fast's
# P = 1 timed first in that process (so every ratio compares like with like, whatever the setting does to both):
#   default        torch.compile as the engine uses it
#   pdl            TORCHINDUCTOR_ENABLE_PDL=1: programmatic dependent launch between the Triton kernels (Hopper)
#   autotune       TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1: GEMMs autotuned against Triton templates
#   autotune_pdl   both (GEMMs that become Triton kernels can take part in PDL too)
#   skinny         the projections through parscale's few-row Triton matmul (bench --skinny), with the block
#                  sizes of $SKINNY_CONFIGS (scripts/skinny_matmul_bench.py --tuned-out) where that file exists
#   skinny_pdl     skinny with PDL
#   skinny_layers  skinny with each layer's norms, gate and residual adds folded in (bench --skinny-layers)
#   skinny_layers_pdl  skinny_layers with PDL
#   kernels        skinny_layers and the one-kernel decode attention (bench --skinny-layers --decode-attention)
#   kernels_pdl    kernels with PDL
#   kernels_rope   kernels with RoPE and the cache write folded into the attention kernel (--decode-attention rope)
#   graph          the graph engine (the step captured eagerly, no torch.compile): the baseline of the two below
#   graph_kernels_rope      the graph engine with kernels_rope's kernels: every layer is parscale's own kernels
#   graph_kernels_rope_pdl  the same launched with programmatic dependent launch (--pdl; Hopper)
#
#   GPTFAST_MODEL=path/to/gpt-fast/model.py bash scripts/gpu_decode_options.sh [settings...]
#
# GPTFAST_MODEL is the user's copy of gpt-fast's model.py (read and run, never part of parscale). Each setting
# writes $OUT/decode_<setting>.json (its inductor_env recorded in "environment"). PER_SETTING (default 330 s)
# bounds each setting's process: on an H100 with a cold compile cache gpt-fast's compilation alone took 90 s,
# and a compiled kernels setting did not finish in 170 s.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
anchor=()
[ -n "${GPTFAST_MODEL:-}" ] && anchor=(--gptfast-model "$GPTFAST_MODEL")
settings=("$@")
[ ${#settings[@]} -eq 0 ] && settings=(default pdl autotune autotune_pdl)
tuned=()
[ -n "${SKINNY_CONFIGS:-}" ] && [ -f "$SKINNY_CONFIGS" ] && tuned=(PARSCALE_SKINNY_CONFIGS="$SKINNY_CONFIGS")
for s in "${settings[@]}"; do
  flags=()
  engine=compile
  case $s in
    default) env=() ;;
    pdl) env=(TORCHINDUCTOR_ENABLE_PDL=1) ;;
    autotune) env=(TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1) ;;
    autotune_pdl) env=(TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 TORCHINDUCTOR_ENABLE_PDL=1) ;;
    skinny) env=("${tuned[@]}"); flags=(--skinny) ;;
    skinny_pdl) env=("${tuned[@]}" TORCHINDUCTOR_ENABLE_PDL=1); flags=(--skinny) ;;
    skinny_layers) env=("${tuned[@]}"); flags=(--skinny-layers) ;;
    skinny_layers_pdl) env=("${tuned[@]}" TORCHINDUCTOR_ENABLE_PDL=1); flags=(--skinny-layers) ;;
    kernels) env=("${tuned[@]}"); flags=(--skinny-layers --decode-attention) ;;
    kernels_pdl) env=("${tuned[@]}" TORCHINDUCTOR_ENABLE_PDL=1); flags=(--skinny-layers --decode-attention) ;;
    kernels_rope) env=("${tuned[@]}"); flags=(--skinny-layers --decode-attention rope) ;;
    graph) env=(); engine=graph ;;
    graph_kernels_rope) env=("${tuned[@]}"); engine=graph; flags=(--skinny-layers --decode-attention rope) ;;
    graph_kernels_rope_pdl) env=("${tuned[@]}"); engine=graph; flags=(--skinny-layers --decode-attention rope --pdl) ;;
    *) echo "unknown setting $s (default, pdl, autotune, autotune_pdl, skinny, skinny_pdl, skinny_layers," \
            "skinny_layers_pdl, kernels, kernels_pdl, kernels_rope, graph, graph_kernels_rope," \
            "graph_kernels_rope_pdl)"; exit 2 ;;
  esac
  echo "== $s ${env[*]} ${flags[*]}"
  env "${env[@]}" timeout "${PER_SETTING:-330}" python3 -m parscale.cli bench --shapes paper-1.6b --streams 1,8 \
      --batches 1 --lengths 64 --engine "$engine" --kernels "${anchor[@]}" "${flags[@]}" --out "$OUT/decode_$s.json" \
      2>&1 | grep -v "it/s\]$"
  python3 - "$OUT/decode_$s.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
base = {a["anchor"]: a["decode_ms_per_token"] for a in r["anchors"]}
for q in r["points"]:
    ratio = {k: round(q["decode_ms_per_token"] / v, 3) for k, v in base.items()}
    t = q.get("timeline") or {}
    print(f"  P = {q['P']}: {q['decode_ms_per_token']:.3f} ms/token, ratio to anchors {ratio}; "
          f"{t.get('kernels_per_step', 0):.0f} kernels/step, idle {t.get('idle_us_per_step', 0):.0f} us/step")
    for k in t.get("kernels_by_kind", [])[:6]:
        print(f"    {k['us_per_step']:8.1f} us/step  {k['calls_per_step']:6.1f} calls  {k['kind'][:70]}")
print("  anchors", base)
PY
done
