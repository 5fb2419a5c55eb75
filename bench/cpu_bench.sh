#!/usr/bin/env bash
# pare vs HF transformers on this CPU, same model and shapes, in one run. Prints a table of ratios.
# Usage: bench/cpu_bench.sh [MODEL] (default: the SmolLM2-135M GGUF)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
PY=tools/reference/.venv/bin/python
[[ -x $PY ]] || tools/reference/setup.sh
[[ -x target/release/pare ]] || cargo build --release --locked
SHAPES=${SHAPES:-"128:64 512:128"}
printf '%-10s %-8s %12s %12s %12s\n' shape engine prefill_tok/s decode_tok/s note
for shape in $SHAPES; do
  P=${shape%%:*}; G=${shape##*:}
  hf=$($PY bench/hf_bench.py --model "$MODEL" --prompt-len "$P" --gen-len "$G" 2>/dev/null | tail -1)
  for dtype in f32 q; do
    pare=$(target/release/pare bench --model "$MODEL" --prompt-len "$P" --gen-len "$G" --dtype $dtype --json)
    python3 - "$shape" "$dtype" "$hf" "$pare" <<'PY'
import json, sys
shape, dtype, hf, pare = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
if dtype == "f32":
    print(f"{shape:<10} {'hf':<8} {hf['prefill_tok_s']:12.1f} {hf['decode_tok_s']:12.1f} transformers {hf['transformers']}, torch {hf['torch']}, {hf['threads']} threads")
print(f"{shape:<10} {'pare-'+dtype:<8} {pare['prefill_tok_s']:12.1f} {pare['decode_tok_s']:12.1f} "
      f"prefill x{pare['prefill_tok_s']/hf['prefill_tok_s']:.2f}, decode x{pare['decode_tok_s']/hf['decode_tok_s']:.2f} vs hf")
PY
  done
done
