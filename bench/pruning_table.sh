#!/usr/bin/env bash
# One row of LLM-Pruner's table for a pare model: prune (the seed's setting: ratio 0.25, layers
# 3..30, 10 × 64 calibration tokens of c4) with the given importance, then WikiText-style
# perplexity (`pare prune --eval-ppl`'s protocol: the first 8192 tokens of wiki.utf8, windows of
# 512), the seven zero-shot accuracies and their average (`pare eval tasks`), the parameter
# count, and prefill/decode speed (`pare bench`, 512-token prompt, 128 new tokens).
# Prints one markdown row; the JSON of each step goes under $OUT.
# Usage: bench/pruning_table.sh ROW [MODEL]   ROW: dense | taylor | l2 | random | wanda-sp
#        env: LIMIT (items per task; default all), BATCH (items per forward, `pare eval tasks
#        --batch`; default 1 on the CPU, 32 on a GPU), OUT, PARE (a pare binary; default: built here),
#        DEVICE (cpu | cuda: the accuracies and PPL on the GPU machine; scripts/gpu-lora.sh), SPEED=0
#        skips the speed columns (they are this CPU's), FETCH=0 skips the asset script.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
ROW=${1:?usage: bench/pruning_table.sh dense|taylor|l2|random|wanda-sp [MODEL]}
MODEL=${2:-smollm2-135m}
DEV=(--device "${DEVICE:-cpu}")
OUT=${OUT:-bench/results/pruning-table-$(date -u +%Y%m%dT%H%M)}
mkdir -p "$OUT"
pare_binary
[[ ${FETCH:-1} == 0 ]] || scripts/assets.sh tasks
machine_line > "$OUT/env.txt"
# COMMIT first: on the GPU machine the tree's git may not be the binary's commit.
echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}, device ${DEVICE:-cpu}" >> "$OUT/env.txt"

EVAL_MODEL=$MODEL
if [[ $ROW != dense ]]; then
  # The export (f32, hundreds of MB) stays out of bench/results.
  EVAL_MODEL=$(mktemp -d)/$ROW-model
  trap 'rm -rf "$(dirname "$EVAL_MODEL")"; stop_server' EXIT
  # Layers 3..30 (the default), clipped to the model: 3..24 for Qwen2.5-Coder-0.5B.
  "$PARE" prune --model "$MODEL" "${DEV[@]}" --importance "$ROW" --ratio 0.25 \
    --out "$EVAL_MODEL" --force --json > "$OUT/$ROW-prune.json"
fi
# f32: the mode that matches HF, and the dtype of a pruned export.
"$PARE" eval ppl --model "$EVAL_MODEL" "${DEV[@]}" --dtype f32 --text assets/texts/wiki.utf8 --ctx 512 --max-tokens 8192 \
  --json > "$OUT/$ROW-ppl.json"
"$PARE" eval tasks --model "$EVAL_MODEL" "${DEV[@]}" --dtype f32 ${LIMIT:+--limit "$LIMIT"} ${BATCH:+--batch "$BATCH"} \
  --json > "$OUT/$ROW-tasks.json"
"$PARE" inspect --model "$EVAL_MODEL" --json > "$OUT/$ROW-inspect.json"
if [[ ${SPEED:-1} != 0 ]]; then
  "$PARE" bench --model "$EVAL_MODEL" --dtype f32 --prompt-len 512 --gen-len 128 --json > "$OUT/$ROW-bench.json"
fi

python3 - "$OUT" "$ROW" <<'PY'
import json, os, sys
out, row = sys.argv[1:]
load = lambda step: json.load(open(f"{out}/{row}-{step}.json"))
ppl, tasks, inspect = load("ppl"), load("tasks"), load("inspect")
speed = "- | -"
if os.path.exists(f"{out}/{row}-bench.json"):
    bench = load("bench")
    speed = f"{bench['prefill_tok_s']:.0f} | {bench['decode_tok_s']:.1f}"
acc = {t["task"]: (t.get("acc_norm") or t["acc"])["value"] for t in tasks["tasks"]}
order = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
cells = [f"{100 * acc[t]:.2f}" for t in order]
avg = 100 * sum(acc[t] for t in order) / len(order)
params = inspect["parameters"]["total"]
print(f"| {row} | {params / 1e6:.1f} M | {ppl['ppl']:.2f} | " + " | ".join(cells) + f" | {avg:.2f} | {speed} |")
PY
