#!/usr/bin/env bash
# LoRA training speed on this CPU (issue 18): `pare finetune` against HF peft + torch on the same
# run — SmolLM2-135M pruned at the seed setting (taylor, ratio 0.25, layers 3..30, exported by
# pare as an HF directory), the same pieces of c4.utf8 (MAXLEN tokens each, tokenized once by HF's
# tokenizer), LoRA r 8 / alpha 16 / dropout 0.05 on the seven projections, float32, AdamW lr 1e-3,
# STEPS updates of BATCH pieces in micro-batches of MICRO. Run it on a quiet machine.
# Usage: bench/lora_speed.sh   env: STEPS (4), BATCH (8), MICRO (4), MAXLEN (256), OUT, PARE
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
STEPS=${STEPS:-4}
BATCH=${BATCH:-8}
MICRO=${MICRO:-4}
MAXLEN=${MAXLEN:-256}
OUT=${OUT:-bench/results/lora-speed-$(date -u +%Y%m%dT%H%M)}
PY=tools/reference/.venv/bin/python
[[ -x $PY ]] || tools/reference/setup.sh
mkdir -p "$OUT"
pare_binary
{ machine_line; echo "commit: $(git rev-parse --short HEAD)"; echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "steps $STEPS batch $BATCH micro $MICRO max-len $MAXLEN"; } > "$OUT/env.txt"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PARE" prune --model smollm2-135m --importance taylor --ratio 0.25 --out "$WORK/pruned" --json > "$OUT/prune.json"
"$PY" bench/lora_speed_hf.py --model "$WORK/pruned" --text assets/texts/c4.utf8 --pieces "$WORK/pieces.jsonl" \
  --max-len "$MAXLEN" --prepare
"$PARE" finetune --model "$WORK/pruned" --data "$WORK/pieces.jsonl" --steps "$STEPS" --batch-size "$BATCH" \
  --micro-batch "$MICRO" --max-len "$MAXLEN" --lr 1e-3 --warmup-steps 0 --eval-examples 1 --eval-every 0 \
  --checkpoint-every 0 --out "$WORK/lora" --json > "$OUT/pare.json"
"$PY" bench/lora_speed_hf.py --model "$WORK/pruned" --pieces "$WORK/pieces.jsonl" --steps "$STEPS" \
  --batch "$BATCH" --micro "$MICRO" --max-len "$MAXLEN" > "$OUT/hf.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
pare, hf = json.load(open(f"{out}/pare.json")), json.load(open(f"{out}/hf.json"))
print(f"pare finetune: {pare['tokens_per_second']:.1f} tok/s ({pare['seconds']:.1f} s)")
print(f"HF peft + torch {hf['torch']} ({hf['threads']} threads): {hf['tokens_per_second']:.1f} tok/s ({hf['seconds']:.1f} s)")
print(f"pare / HF: {pare['tokens_per_second'] / hf['tokens_per_second']:.2f}x")
PY
