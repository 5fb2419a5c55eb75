#!/usr/bin/env bash
# `pare serve` on the GPU machine under ShareGPT load: for each model shape (random bf16 weights
# made here, with a real tokenizer copied in), concurrency 1/4/16/64, NUM_REQUESTS requests of
# MAX_TOKENS tokens each (`pare bench serve`, ignore_eos); prints output tok/s, TTFT and ITL
# percentiles and the peak KV bytes (tokens/s per GB of KV follows). The machine has no assets:
# send the prompts and the tokenizer along.
#
# Prepare here: target/release/pare convert -m assets/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/s
#   && mkdir -p .xfer/tok && cp /tmp/s/tokenizer*.json /tmp/s/generation_config.json .xfer/tok/
#   && python3 -c 'import json; d=json.load(open("assets/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json")); json.dump(d[:400], open(".xfer/sharegpt-400.json", "w"))'
# then run with carry [.xfer/bin, .xfer/tok, .xfer/sharegpt-400.json].
# First, per shape, the model's decode step alone (`pare bench`, prompt 512, 64 new tokens): the
# batch in one cache, and one cache per row as the server steps its requests, at each concurrency;
# then the server; then its preemption and prefill counters.
# Env: SHAPES ("smollm2-135m llama3-8b"), TOKENIZER (.xfer/tok), PROMPTS (.xfer/sharegpt-400.json),
#      CONCURRENCY (1,4,16,64), NUM_REQUESTS (64), MAX_TOKENS (128), WORK (/tmp/pare-bench).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh || exit 1
WORK=${WORK:-/tmp/pare-bench}; OUT=${OUT:-$WORK}
TOKENIZER=${TOKENIZER:-.xfer/tok}; PROMPTS=${PROMPTS:-.xfer/sharegpt-400.json}
mkdir -p "$WORK" "$OUT"
echo "# gpu-serve-bench on $GPU_NAME, $(date -u +%F), $($PARE --version)"
for shape in ${SHAPES:-smollm2-135m llama3-8b}; do
  M=$WORK/$shape-random
  [[ -f $M/config.json ]] || "$PARE" init-random --like "$shape" --out "$M" >/dev/null 2>&1
  cp "$TOKENIZER"/* "$M/"
  for b in $(tr , ' ' <<<"${CONCURRENCY:-1,4,16,64}"); do
    for caches in shared per-row; do
      "$PARE" bench --model "$M" --device cuda --batch "$b" --prompt-len 512 --gen-len 64 --repeat 1 --caches $caches --json \
        | python3 -c "import json,sys; d=json.load(sys.stdin); print(f\"$shape b$b $caches: decode {d['decode_tok_s']:.1f} tok/s, step {1e3 * d['decode_s'] / 64:.2f} ms\")"
    done
  done
  PORT=8800
  "$PARE" serve --model "$M" --device cuda --port $PORT --max-concurrent 64 >"$OUT/serve-$shape.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
  timeout 300 "$PARE" bench serve --url "http://127.0.0.1:$PORT" --prompts "$PROMPTS" \
    --concurrency "${CONCURRENCY:-1,4,16,64}" --num-requests "${NUM_REQUESTS:-64}" --max-tokens "${MAX_TOKENS:-128}" \
    --max-prompt-chars 2048 --peak-metric pare_kv_cache_bytes --json >"$OUT/load-$shape.json" 2>"$OUT/load-$shape.err" \
    || tail -3 "$OUT/load-$shape.err"
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^pare_((preemptions|prefill_steps|prefill_chunks|prefill_tokens)_total|(engine_step|model_forward)_seconds_(sum|count)) " | tr '\n' ' '; echo
  kill -TERM $server; wait $server
  python3 - "$OUT/load-$shape.json" "$shape" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["runs"]:
    kv = (r["peak_metric"] or 0) / 1e9
    per_gb = f"{r['output_tok_s'] / kv:8.0f} tok/s per GB of KV" if kv else ""
    print(f"{sys.argv[2]:<14} c{r['concurrency']:<3} {r['output_tok_s']:8.1f} tok/s  TTFT p50/p99 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms"
          f"  ITL p50/p99 {r['itl_ms']['p50']:.1f}/{r['itl_ms']['p99']:.1f} ms  peak KV {kv:.3f} GB {per_gb}  errors {r['errors']}")
PY
done
