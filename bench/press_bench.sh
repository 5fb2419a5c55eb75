#!/usr/bin/env bash
# Decode speed and KV memory at long context: uncompressed against 4× and 8× compressed caches,
# same model, same run. Prints one row per case with the ratio to the uncompressed run.
# Usage: bench/press_bench.sh [MODEL] ; env PROMPT (default 4096), GEN (default 64), PRESSES.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
PROMPT=${PROMPT:-4096}
GEN=${GEN:-64}
DEVICE=${DEVICE:-cpu}
PARE=${PARE:-target/release/pare}
[[ -x $PARE ]] || cargo build --release --locked
PRESSES=${PRESSES:-"knorm:0.75 knorm:0.875 snapkv:0.875 adakv+snapkv:0.875 streaming:0.875"}
run() { "$PARE" bench --model "$MODEL" --device "$DEVICE" --prompt-len "$PROMPT" --gen-len "$GEN" --repeat 1 --json "$@"; }
base=$(run)
printf '%-22s %6s %12s %14s %10s %10s\n' press ratio decode_tok/s kv_after_prefill speedup kv_shrink
for case in none $PRESSES; do
  if [[ $case == none ]]; then out=$base; name=none; ratio=0; else
    name=${case%%:*}; ratio=${case##*:}; out=$(run --press "$name" --ratio "$ratio"); fi
  python3 - "$name" "$ratio" "$base" "$out" <<'PY'
import json, sys
name, ratio, base, out = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"{name:<22} {ratio:6.3f} {out['decode_tok_s']:12.2f} {out['kv_cache_bytes_prefill']/2**20:11.1f} MiB "
      f"{out['decode_tok_s']/base['decode_tok_s']:9.2f}x {base['kv_cache_bytes_prefill']/out['kv_cache_bytes_prefill']:9.2f}x")
PY
done
