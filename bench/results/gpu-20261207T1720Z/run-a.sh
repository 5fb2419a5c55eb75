#!/usr/bin/env bash
# Session A (2026-12-07 evening): real weights vs HF, EA on the GPU diagnosed, the server's decode step alone.
set -uo pipefail
source scripts/gpu-env.sh || exit 1
R=/tmp/a; mkdir -p $R
echo "== 1. real weights (scripts/gpu-real-weights.sh)"
MODELS="q05 q15" OUT=$R bash scripts/gpu-real-weights.sh 2>&1 | tee $R/real-weights.txt
echo "== 2. RULER-4k on Qwen2.5-Coder-1.5B, 3 tasks x 2 items: the CPU gave none 100, expected-attention 0.25 96.7"
M=/tmp/q15.gguf
for v in "none:" "ea-b8:--press expected-attention --ratio 0.25" "ea-b1:--press expected-attention --ratio 0.25 --batch 1" \
         "ea-f32:--press expected-attention --ratio 0.25 --dtype f32" "adakv-ea:--press adakv+expected-attention --ratio 0.25" \
         "knorm:--press knorm --ratio 0.25" "kvzip:--press kvzip --ratio 0.25"; do
  name=${v%%:*}; a=${v#*:}; t0=$(date +%s)
  timeout 150 $PARE eval ruler -m $M --device cuda --ctx 4096 --samples 2 --tasks niah_single_1,niah_multikey_2,vt \
    --haystack .xfer/rdata/pg $a --json > $R/ruler-$name.json 2> $R/ruler-$name.err
  echo "$name rc=$? $(( $(date +%s) - t0 ))s: $(python3 -c "
import json,sys; d=json.load(open('$R/ruler-$name.json')); print(d['averages'][0]['average'], [(t['task'], t['score'], [i['pred'][:24] for i in t['items']]) for t in d['tasks']])" 2>&1 | tail -1)"
done
echo "== 3. the decode step alone: one cache vs a cache per row (prompt 512, 64 new tokens)"
for shape in llama3-8b smollm2-135m; do
  S=/tmp/$shape-random
  [[ -f $S/config.json ]] || $PARE init-random --like $shape --out $S > /dev/null 2>&1
  for b in 1 16 64; do
    for caches in shared per-row; do
      timeout 120 $PARE bench --model $S --device cuda --batch $b --prompt-len 512 --gen-len 64 --repeat 1 --caches $caches --json > $R/bench-$shape-$b-$caches.json 2>&1
      python3 -c "import json,sys; d=json.load(open('$R/bench-$shape-$b-$caches.json')); print(f\"$shape b$b $caches: decode {d['decode_tok_s']:.1f} tok/s, step {1e3 * d['decode_s'] / 64:.2f} ms, prefill {d['prefill_tok_s']:.0f} tok/s\")" 2>&1 | tail -1
    done
  done
done
tar czf $OUT/a.tgz -C /tmp a
