#!/usr/bin/env bash
# Batched decode on the GPU machine: how a decode step's time grows with the batch (the issue's
# target: a step of 8 ≤ 1.25× a step of 1, a step of 32 ≤ 2×), for pare's GEMV variants in one run
# (PARE_GEMV=legacy: one warp per weight row for ≤ 8 rows, cuBLAS above; default: the current plan),
# optionally against HF transformers (HF=1: eager and sdpa, same shapes, same run).
#
# Usage: scripts/gpu-decode-sweep.sh   env: MODEL (default: a Llama-3-8B-shaped random model made
#        in $WORK), BATCHES="1 8 16 32", PROMPT=512, GEN=64, VARIANTS="default legacy", HF=0,
#        HF_GEN (new tokens for HF, default GEN), RESULTS (JSON lines, default $WORK/sweep.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
WORK=${WORK:-/tmp/pare-bench}
BATCHES=${BATCHES:-"1 8 16 32"}
PROMPT=${PROMPT:-512}
GEN=${GEN:-64}
VARIANTS=${VARIANTS:-"default legacy"}
RESULTS=${RESULTS:-$WORK/sweep.jsonl}
mkdir -p "$WORK"
: >"$RESULTS"
MODEL=${MODEL:-$WORK/llama3-8b-random}
[[ -f $MODEL/model.safetensors || -f $MODEL/model.safetensors.index.json || $MODEL == *.gguf ]] \
  || "$PARE" init-random --like llama3-8b --out "$MODEL" >&2
echo "# decode sweep on $GPU_NAME, $(date -u +%F), $($PARE --version), $MODEL"
for v in $VARIANTS; do
  for b in $BATCHES; do
    env=()
    [[ $v == default ]] || env=(PARE_GEMV=$v)
    if r=$(env "${env[@]}" "$PARE" bench --model "$MODEL" --device cuda --batch "$b" --prompt-len "$PROMPT" \
        --gen-len "$GEN" --repeat 1 --json 2>"$WORK/err"); then
      python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["variant"]=sys.argv[2]; print(json.dumps(d))' "$r" "$v" >>"$RESULTS"
    else
      echo "pare $v b$b failed: $(tail -c 300 "$WORK/err")"
    fi
  done
done
if [[ ${HF:-0} == 1 ]]; then
  shapes=$(for b in $BATCHES; do echo -n "$b:$PROMPT:${HF_GEN:-$GEN},"; done)
  python3 bench/hf_baseline.py --model "$MODEL" --shapes "${shapes%,}" --attn eager,sdpa --repeat 1 \
    2>"$WORK/hf_err" >>"$RESULTS" || tail -3 "$WORK/hf_err"
fi
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
pare = [r for r in rows if "variant" in r]
hf = {(r["attn"], r["batch"]): r for r in rows if r.get("engine") == "hf"}
print(f"{'variant':<9}{'batch':>6}{'decode tok/s':>14}{'step ms':>9}{'× step b1':>11}{'HF eager':>10}{'HF sdpa':>9}{'× best HF':>10}")
for v in dict.fromkeys(r["variant"] for r in pare):
    mine = [r for r in pare if r["variant"] == v]
    one = next((r for r in mine if r["batch"] == 1), None) or next(r for r in pare if r["batch"] == 1)
    step1 = one["batch"] / one["decode_tok_s"]
    for r in mine:
        step = r["batch"] / r["decode_tok_s"]
        e, s = hf.get(("eager", r["batch"])), hf.get(("sdpa", r["batch"]))
        best = max([x["decode_tok_s"] for x in (e, s) if x], default=float("nan"))
        f = lambda x: f"{x['decode_tok_s']:10.1f}" if x else f"{'-':>10}"
        print(f"{v:<9}{r['batch']:>6}{r['decode_tok_s']:14.1f}{step*1e3:9.2f}{step/step1:11.2f}{f(e)}{f(s)[1:]}{r['decode_tok_s']/best:10.2f}")
PY
