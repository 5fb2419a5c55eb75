#!/usr/bin/env bash
# What a press costs on the GPU (issue 16): the kernel tests, then `pare bench` without a press and
# with each of PRESSES at ratio 0.5 on the 8B shape (random bf16), prompt 4096 (3 timed prefills)
# and 32768 (2), on this build and, where OLD names an older build (binary or .xz), on that one
# at 4096 in the same call. Prints a table: prefill tok/s, ms, cost over no press of the same build.
# Usage (GPU machine, repo root): scripts/gpu-press-cost.sh   env: PRESSES, LONG_PRESSES, OLD,
#        OLD_PRESSES, OUT (results and logs; default /tmp/press-cost)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh || exit 1
OUT=${OUT:-/tmp/press-cost}; mkdir -p "$OUT"
PRESSES=${PRESSES:-"knorm streaming snapkv expected-attention adakv+snapkv"}
LONG_PRESSES=${LONG_PRESSES:-"knorm snapkv expected-attention adakv+snapkv"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
t0=$(date +%s)
timeout 150 dist/pare-kernels-gpu-tests --test-threads=1 2>&1 | tee "$OUT/gpu-tests.txt" \
  | grep -E "^test |test result|panicked" | grep -v " ok$"
if [[ -n ${OLD:-} ]]; then
  if [[ $OLD == *.xz ]]; then xz -dc "$OLD" >dist/pare-old; else cp "$OLD" dist/pare-old; fi
  chmod +x dist/pare-old
fi
M=/tmp/pare-bench/llama3-8b-random
[[ -f $M/model.safetensors ]] || "$PARE" init-random --like llama3-8b --out $M >/dev/null 2>&1
R=$OUT/results.jsonl; : >"$R"
bench() {  # binary label prompt press
  local args=(); [[ $4 == none ]] || args=(--press "$4" --ratio 0.5)
  local s=$EPOCHREALTIME r
  if r=$(timeout 120 "$1" bench --model $M --device cuda --prompt-len "$3" --gen-len "${GEN:-16}" --repeat "${REP:-3}" \
      "${args[@]}" --json 2>"$OUT/err.txt"); then
    echo "$r" | python3 -c 'import json,sys; d=json.load(sys.stdin); d.update(bin=sys.argv[1], case=sys.argv[2], wall=float(sys.argv[4]) - float(sys.argv[3])); print(json.dumps(d))' \
      "$2" "$4" "$s" "$EPOCHREALTIME" >>"$R"
  else echo "$2 p$3 $4: $(tail -c 200 "$OUT/err.txt")"; fi
}
for p in none $PRESSES; do bench "$PARE" new 4096 "$p"; done
if [[ -n ${OLD:-} ]]; then for p in none ${OLD_PRESSES:-knorm snapkv adakv+snapkv}; do bench dist/pare-old old 4096 "$p"; done; fi
REP=2 GEN=8; for p in none $LONG_PRESSES; do bench "$PARE" new 32768 "$p"; done
echo "took $(( $(date +%s) - t0 )) s"
python3 - "$R" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'bin':<5}{'prompt':>7} {'press':<20}{'prefill tok/s':>14}{'ms':>8}{'cost':>8}{'decode tok/s':>13}")
for r in rows:
    none = next((x for x in rows if x["bin"] == r["bin"] and x["case"] == "none" and x["prompt_len"] == r["prompt_len"]), None)
    cost = (none["prefill_tok_s"] / r["prefill_tok_s"] - 1) * 100 if none else float("nan")
    print(f"{r['bin']:<5}{r['prompt_len']:>7} {r['case']:<20}{r['prefill_tok_s']:14.0f}{r['prompt_len']/r['prefill_tok_s']*1e3:8.1f}"
          f"{cost:7.1f}%{r['decode_tok_s']:13.1f}")
PY
