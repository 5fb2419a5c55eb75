#!/usr/bin/env bash
# How many ~4k-token conversations `pare serve` runs at once in one fixed KV budget, without a
# press and with presses chosen per request (the `press` body field), next to the quality each
# press keeps (`pare eval compare`: perplexity after a compressed context, needle retrieval).
# Each case: NUM_REQUESTS prompts, all sent at once; peak of pare_running_sequences from /metrics.
# Writes bench/results/serve-kv-<UTC time>/{CASE.json, compare.json, summary.md, env.txt}.
#
# Usage: [KV_MEMORY=402653184] [PROMPT_TOKENS=4000] [NUM_REQUESTS=10] [MAX_TOKENS=32]
#        [CASES="knorm:0 knorm:0.5 knorm:0.75"] [THREADS=2] [PARE=path/to/pare]
# The baseline is knorm at ratio 0: it keeps every entry, and like every press case its prompt is
# prefilled whole at admission. (A request without a press is prefilled in 256-token chunks, and
# admission then counts only the part already prefilled: it over-admits past --kv-memory.)
#        bench/serve_kv_table.sh [GGUF]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
GGUF=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
# 384 MiB: two uncompressed 4k-token SmolLM2 sequences (45 KiB of f32 K and V per token).
KV_MEMORY=${KV_MEMORY:-402653184}
PROMPT_TOKENS=${PROMPT_TOKENS:-4000}
NUM_REQUESTS=${NUM_REQUESTS:-10}
MAX_TOKENS=${MAX_TOKENS:-32}
CASES=${CASES:-knorm:0 knorm:0.5 knorm:0.75}
THREADS=${THREADS:-2}
PORT=${PORT:-8433}

scripts/assets.sh base
pare_binary
OUT=bench/results/serve-kv-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  machine_line
  echo "pare commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+dirty')"
  echo "gguf: $GGUF, --kv-memory $KV_MEMORY, $NUM_REQUESTS requests of ~$PROMPT_TOKENS prompt tokens at once, max_tokens $MAX_TOKENS, threads $THREADS"
} >"$OUT/env.txt"

start_server "$OUT/server.log" "$PARE" --threads "$THREADS" serve --model "$GGUF" --port "$PORT" --max-concurrent 256 --max-queue 4096 \
  --kv-memory "$KV_MEMORY"

# Prompts: consecutive pieces of the Paul Graham essays, each cut to PROMPT_TOKENS tokens by the
# server's own /tokenize (characters per token measured on the first piece), as a ShareGPT file.
python3 - "$OUT/prompts.json" "$PORT" "$PROMPT_TOKENS" "$NUM_REQUESTS" <<'PY'
import json, pathlib, sys, urllib.request
out, port, tokens, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = " ".join(p.read_text() for p in sorted(pathlib.Path("assets/PaulGrahamEssays").glob("*.txt")))
text = " ".join(text.split())
def count(s):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/tokenize", json.dumps({"prompt": s}).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))["count"]
chars = int(tokens * 4 * tokens / count(text[: tokens * 4]))
pieces, pos = [], 0
while len(pieces) < n:
    piece = text[pos : pos + chars]
    while count(piece) > tokens:
        piece = piece[: int(len(piece) * 0.98)]
    pieces.append(piece)
    pos = (pos + chars) % max(1, len(text) - chars)
json.dump([{"id": str(i), "conversations": [{"from": "human", "value": p}]} for i, p in enumerate(pieces)], open(out, "w"))
print(f"{len(pieces)} prompts of {min(map(len, pieces))}..{max(map(len, pieces))} characters", file=sys.stderr)
PY

for case in $CASES; do
  name=${case%%:*}
  if [[ $case == none ]]; then extra='{}'; else extra="{\"press\": {\"name\": \"$name\", \"ratio\": ${case#*:}}}"; fi
  echo "$case load before: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
  "$PARE" bench serve --url "http://127.0.0.1:$PORT" --prompts "$OUT/prompts.json" --max-prompt-chars 1000000 \
    --concurrency "$NUM_REQUESTS" --num-requests "$NUM_REQUESTS" --max-tokens "$MAX_TOKENS" --extra-body "$extra" \
    --peak-metric pare_running_sequences --json >"$OUT/${case//:/-}.json"
  echo "$case load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
done
stop_server

# Quality of the same presses and ratios (the default text windows and needle depths of
# `pare eval compare`; the model's own GGUF).
presses=$(for c in $CASES; do [[ $c == none ]] || echo "${c%%:*}"; done | sort -u | paste -sd,)
ratios=$(for c in $CASES; do [[ $c == none || ${c#*:} == 0 ]] || echo "${c#*:}"; done | sort -u | paste -sd,)
"$PARE" --threads "$THREADS" eval compare --model "$GGUF" --text assets/texts/wiki.utf8 --presses "$presses" \
  --ratios "$ratios" --plot "$OUT/compare.svg" --json >"$OUT/compare.json"

python3 - "$OUT" $CASES <<'PY'
import json, sys
out, cases = sys.argv[1], sys.argv[2:]
compare = json.load(open(f"{out}/compare.json"))
json.dump(compare, open(f"{out}/compare.json", "w"), indent=1)
def quality(press, ratio):
    for r in compare["rows"]:
        # ratio 0 keeps every entry: the quality of no press.
        if (r["press"] == press or (ratio == 0 and r["press"] == "none")) and (r["press"] == "none" or abs(r["ratio"] - ratio) < 1e-9):
            return r
    return {}
base = None
rows = ["| press | ratio | peak running sequences | × no press | output tok/s | TTFT p50 s | mean prompt tokens | PPL | needle |",
        "|---|---|---|---|---|---|---|---|---|"]
for case in cases:
    run = json.load(open(f"{out}/{case.replace(':', '-')}.json"))["runs"][0]
    peak = run["peak_metric"] or 0
    base = base or peak
    press, ratio = (case.split(":")[0], float(case.split(":")[1])) if case != "none" else ("none", 0.0)
    q = quality(press, ratio)
    ppl = q.get("ppl")
    needle = q.get("needle_accuracy")
    prompt = run["prompt_tokens"] / max(1, run["completed"])
    rows.append(f"| {press} | {ratio} | {peak:.0f} | {peak / base:.2f}× | {run['output_tok_s']:.1f} | {run['ttft_ms']['p50'] / 1e3:.1f} "
                f"| {prompt:.0f} | {'-' if ppl is None else f'{ppl:.3f}'} | {'-' if needle is None else f'{needle:.2f}'} |"
                + (f" errors {run['errors']}: {run['first_error']}" if run["errors"] else ""))
open(f"{out}/summary.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
cat "$OUT/env.txt"
echo "results: $OUT"
