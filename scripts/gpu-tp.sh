#!/usr/bin/env bash
# Tensor parallelism over the GPUs of one host (`--tp N`, NCCL) against the whole model on GPU 0,
# same binary, same run: greedy tokens and top-10 log-probs alike, a press's caches adding up to
# the whole model's, then decode and prefill speed at batch 1 and 8. Needs a multi-GPU kind
# (nvidia-h100-x2 or larger) and dist/pare-cuda-nccl (NCCL=1 scripts/build-cuda.sh; carry
# .xfer/bin). Usage on the GPU machine:
#   TP=2 SHAPES="llama3-8b" bash scripts/gpu-tp.sh
# Env: TP (2), SHAPES (llama3-8b: random bf16 weights of that shape), WORK (/tmp/pare-tp), OUT.
set -uo pipefail
PARE=dist/pare-cuda-nccl
source scripts/gpu-env.sh || exit 1
export NCCL_NVLS_ENABLE=0
TP=${TP:-2}
WORK=${WORK:-/tmp/pare-tp}; OUT=${OUT:-$WORK}
mkdir -p "$WORK" "$OUT"
echo "gpus: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
for shape in ${SHAPES:-llama3-8b}; do
  M=$WORK/$shape-random
  [[ -f $M/config.json ]] || "$PARE" init-random --like "$shape" --out "$M" >/dev/null 2>&1 || { echo "init-random $shape failed"; continue; }
  echo "== $shape: correctness, --tp 1 against --tp $TP"
  for tp in 1 "$TP"; do
    "$PARE" generate -m "$M" --device cuda --tp "$tp" -p "The quick brown fox" --max-new-tokens 32 --json >"$OUT/$shape-gen-tp$tp.json"
    "$PARE" generate -m "$M" --device cuda --tp "$tp" -p "The quick brown fox" --max-new-tokens 32 \
      --press adakv+snapkv --ratio 0.5 --json >"$OUT/$shape-press-tp$tp.json"
    "$PARE" score -m "$M" --device cuda --tp "$tp" -p "The quick brown fox jumps over the lazy" --json >"$OUT/$shape-score-tp$tp.json"
  done
  python3 - "$OUT" "$shape" "$TP" <<'PY'
import json, sys
out, shape, tp = sys.argv[1:]
load = lambda kind, t: json.load(open(f"{out}/{shape}-{kind}-tp{t}.json"))
for kind in ("gen", "press"):
    a, b = load(kind, 1), load(kind, tp)
    print(f"{kind:5s} tokens equal: {a['tokens'] == b['tokens']}; cache equal: {a['cache'] == b['cache']}")
a, b = load("score", 1), load("score", tp)
top = {e["id"]: e["logprob"] for e in a["top"]}
diff = max(abs(top[e["id"]] - e["logprob"]) for e in b["top"] if e["id"] in top)
print(f"score top-10 ids equal: {[e['id'] for e in a['top']] == [e['id'] for e in b['top']]}; max |Δ logprob| {diff:.4f}")
PY
  echo "== $shape: speed (prompt 512, 128 new tokens)"
  printf "%-6s %-4s %14s %14s\n" batch tp "prefill tok/s" "decode tok/s"
  for batch in 1 8; do
    for tp in 1 "$TP"; do
      "$PARE" bench -m "$M" --device cuda --tp "$tp" --batch "$batch" --prompt-len 512 --gen-len 128 --json >"$OUT/$shape-bench-b$batch-tp$tp.json" \
        && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:<6} {sys.argv[3]:<4} {d['prefill_tok_s']:14.0f} {d['decode_tok_s']:14.1f}\")" \
             "$OUT/$shape-bench-b$batch-tp$tp.json" "$batch" "$tp"
    done
  done
done
