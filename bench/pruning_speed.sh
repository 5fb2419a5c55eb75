#!/usr/bin/env bash
# The speed columns of LLM-Pruner's table (docs/pruning.md) for every row of one model, measured
# by one build in one run, so that the rows compare: prune with each importance (the seed's
# setting, as bench/pruning_table.sh does), then `pare bench` in f32 (512-token prompt, 128 new
# tokens) on the export; dense on the model itself. Run it on a quiet machine. Prints one
# markdown row per pruning row; each step's JSON goes under $OUT.
# Usage: bench/pruning_speed.sh [MODEL]   env: ROWS ("dense taylor wanda-sp random l2"), OUT, PARE
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
MODEL=${1:-smollm2-135m}
OUT=${OUT:-bench/results/pruning-speed-$(date -u +%Y%m%dT%H%M)}
mkdir -p "$OUT"
pare_binary
{ machine_line; echo "commit: $(git rev-parse --short HEAD), model $MODEL"; } > "$OUT/env.txt"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; stop_server' EXIT
echo "| row | params | prefill tok/s | decode tok/s |"
echo "|---|---|---|---|"
for ROW in ${ROWS:-dense taylor wanda-sp random l2}; do
  EVAL_MODEL=$MODEL
  if [[ $ROW != dense ]]; then
    EVAL_MODEL=$WORK/$ROW-model
    "$PARE" prune --model "$MODEL" --importance "$ROW" --ratio 0.25 --out "$EVAL_MODEL" --force --json \
      > "$OUT/$ROW-prune.json"
  fi
  "$PARE" inspect --model "$EVAL_MODEL" --json > "$OUT/$ROW-inspect.json"
  "$PARE" bench --model "$EVAL_MODEL" --dtype f32 --prompt-len 512 --gen-len 128 --json > "$OUT/$ROW-bench.json"
  rm -rf "$WORK/$ROW-model"  # the f32 export: hundreds of MB
  python3 - "$OUT" "$ROW" <<'PY'
import json, sys
out, row = sys.argv[1:]
bench = json.load(open(f"{out}/{row}-bench.json"))
params = json.load(open(f"{out}/{row}-inspect.json"))["parameters"]["total"]
print(f"| {row} | {params / 1e6:.1f} M | {bench['prefill_tok_s']:.0f} | {bench['decode_tok_s']:.1f} |")
PY
done
