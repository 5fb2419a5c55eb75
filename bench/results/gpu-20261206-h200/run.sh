#!/usr/bin/env bash
# Session 25 run A (issue 16) on an H200: kernel tests, then the 8B shape against HF transformers
# (b1/b8/b32 at 512, b1 at 4096) and the press cases, with the binary of the session's head commit.
set -uo pipefail
source scripts/gpu-env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
dist/pare-kernels-gpu-tests --test-threads=1 2>&1 | grep -E "test result|FAILED|panicked"
t0=$(date +%s)
MODELS=llama3-8b CASES="1:512:128 8:512:128 32:512:128 1:4096:128" PRESS_CASES="1:4096:64 8:4096:64" WORK=/tmp/pare-bench \
  timeout 500 scripts/gpu-bench.sh 2>&1 | tee $OUT/bench.txt
cp /tmp/pare-bench/results.jsonl $OUT/ 2>/dev/null
echo "took $(( $(date +%s) - t0 )) s"
