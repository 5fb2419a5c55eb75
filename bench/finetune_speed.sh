#!/usr/bin/env bash
# LoRA training speed: `pare finetune` against HF peft + torch (bench/hf_finetune.py) on the same
# model (SmolLM2-135M, dequantized to an f32 HF directory for both), the same text pieces and
# settings (r 8, alpha 16, dropout 0.05, all seven projections, batch 8 in micro-batches of 4,
# 256 tokens), in the same run. Prints a markdown row; the JSON of each goes under $OUT.
# Usage: bench/finetune_speed.sh   env: STEPS (default 5), THREADS (default 2), OUT, PARE
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
STEPS=${STEPS:-5}
THREADS=${THREADS:-2}
OUT=${OUT:-bench/results/finetune-speed-$(date -u +%Y%m%dT%H%M)}
mkdir -p "$OUT"
pare_binary
tools/reference/setup.sh >&2
{ machine_line; echo "commit: $(git rev-parse --short HEAD)"; echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"; } > "$OUT/env.txt"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PARE" convert --model smollm2-135m --out "$WORK/smollm2" >&2
SETTINGS=(--steps "$STEPS" --batch-size 8 --micro-batch 4 --max-len 256)
"$PARE" --threads "$THREADS" finetune --model "$WORK/smollm2" --data assets/texts/c4.utf8 "${SETTINGS[@]}" \
  --eval-examples 1 --eval-every 0 --checkpoint-every 0 --warmup-steps 0 --out "$WORK/adapter" --json > "$OUT/pare.json"
tools/reference/.venv/bin/python bench/hf_finetune.py "$WORK/smollm2" assets/texts/c4.utf8 "${SETTINGS[@]}" \
  --threads "$THREADS" > "$OUT/hf.json"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
pare, hf = json.load(open(f"{out}/pare.json")), json.load(open(f"{out}/hf.json"))
print(f"| pare finetune | {pare['tokens_per_second']:.0f} tok/s | HF peft + torch {hf['torch']} | "
      f"{hf['tokens_per_second']:.0f} tok/s | {pare['tokens_per_second'] / hf['tokens_per_second']:.2f}× |")
PY
