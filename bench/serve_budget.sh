#!/usr/bin/env bash
# `pare serve` under the same ShareGPT load with different `--max-batched-tokens` (prompt tokens a
# step prefills at most), one server at a time: what the budget trades between TTFT and the
# inter-token latency of running sequences. Writes bench/results/serve-budget-<UTC time>/ with one
# JSON per budget, env.txt and summary.md.
#
# Usage: [BUDGETS="2048 512 256"] [CONCURRENCY=16,64] [NUM_REQUESTS=64] [MAX_TOKENS=128]
#        [THREADS=2] [PARE=path/to/pare] bench/serve_budget.sh [GGUF]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
GGUF=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
BUDGETS=${BUDGETS:-"2048 512 256"}
CONCURRENCY=${CONCURRENCY:-16,64}
NUM_REQUESTS=${NUM_REQUESTS:-64}
MAX_TOKENS=${MAX_TOKENS:-128}
THREADS=${THREADS:-2}
PORT=${PORT:-8431}
MAX_C=$(tr ',' '\n' <<<"$CONCURRENCY" | sort -n | tail -1)

scripts/assets.sh base
scripts/assets.sh serve
pare_binary
OUT=bench/results/serve-budget-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  machine_line
  echo "pare commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+dirty')"
  echo "gguf: $GGUF"
  echo "load: concurrency $CONCURRENCY, $NUM_REQUESTS requests per run, max_tokens $MAX_TOKENS, threads $THREADS"
} >"$OUT/env.txt"
for b in $BUDGETS; do
  echo "budget $b load before: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
  start_server "$OUT/server-$b.log" "$PARE" --threads "$THREADS" serve --model "$GGUF" --port "$PORT" \
    --max-concurrent "$MAX_C" --max-queue 4096 --max-batched-tokens "$b"
  "$PARE" bench serve --url "http://127.0.0.1:$PORT" --concurrency "$CONCURRENCY" \
    --num-requests "$NUM_REQUESTS" --max-tokens "$MAX_TOKENS" --json >"$OUT/budget-$b.json"
  stop_server
  echo "budget $b load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
done
python3 - "$OUT" $BUDGETS <<'PY'
import json, sys
out, budgets = sys.argv[1], sys.argv[2:]
f = lambda v: "-" if v is None else f"{v:.1f}"
rows = ["| --max-batched-tokens | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|"]
for b in budgets:
    for r in json.load(open(f"{out}/budget-{b}.json"))["runs"]:
        rows.append(f"| {b} | {r['concurrency']} | {r['output_tok_s']:.1f} | {f(r['ttft_ms']['p50'])} | {f(r['ttft_ms']['p99'])} "
                    f"| {f(r['itl_ms']['p50'])} | {f(r['itl_ms']['p99'])} | {r['errors']} |")
open(f"{out}/summary.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
cat "$OUT/env.txt"
echo "results: $OUT"
