#!/usr/bin/env bash
# On the GPU machine (issue 20): RULER-4k average, PPL of a continuation and KV bytes for presses ×
# ratios (`pare eval compare`) on a real model. The model cannot travel in one call (64 MiB), so it
# goes in parts that earlier calls to the same warm machine carried (each call names one part):
#   split -b 44M -d -a 2 assets/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf .xfer/q05/p   (44 MiB: the
#   limit counts the tree's disk blocks too, and 46 MiB parts were refused)
#   sha256sum assets/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf > .xfer/q05/SHA256
#   first call carries .xfer/bin/pare-cuda.xz, .xfer/rdata (the essays as pg/, wiki.utf8), the last
#   part and SHA256; then one call per part; then this script (MODEL_DIR=q05 or q15).
# Env: MODEL_DIR (q05), PRESSES, RATIOS (0.25,0.5,0.75,0.9), SAMPLES (2 items per task), PER (s per press).
set -uo pipefail
source scripts/gpu-env.sh || exit 1
M=/tmp/${MODEL_DIR:-q05}.gguf
[[ -f $M ]] || cat .xfer/${MODEL_DIR:-q05}/p?? > $M
echo "$(cut -d" " -f1 .xfer/${MODEL_DIR:-q05}/SHA256)  $M" | sha256sum -c || exit 1
echo "gpu: $GPU_NAME"
# PRESSES: space-separated runs, each one press or a comma list sharing one uncompressed row.
for P in ${PRESSES:-"knorm snapkv expected-attention adakv+expected-attention kvzip"}; do
  t0=$(date +%s)
  N=${P//[+,]/_}  # the device returns only plain file names
  timeout ${PER:-200} $PARE eval compare --model $M --device cuda --presses "$P" --ratios ${RATIOS:-0.25,0.5,0.75,0.9} \
    --text .xfer/rdata/wiki.utf8 --haystack .xfer/rdata/pg --needle-ctx --ruler-ctx 4096 --ruler-samples ${SAMPLES:-2} \
    --ctx 1024 --continuation 256 --max-tokens 8192 --json --plot "$OUT/compare-$N.svg" --force \
    > "$OUT/compare-$N.json" 2> "$OUT/compare-$N.err"
  echo "$P rc=$? $(( $(date +%s) - t0 ))s"; tail -2 "$OUT/compare-$N.err"
done
