#!/usr/bin/env bash
# On the GPU machine (issue 16): real weights in bf16 against HF transformers bf16 on the same GPU,
# in the same run. Per model (Qwen2.5-Coder GGUFs, carried in parts as scripts/gpu-ruler.sh says):
#  - the next-token top-10 log-probs of 4 prompts: pare's within 0.05 nats of HF's;
#  - the 16-token greedy continuations: identical to HF's on at least 3 of the 4 prompts;
#  - the 4 prompts as one left-padded batch: each row identical (tokens and log-probs) to the
#    prompt run alone;
#  - beside, how far each bf16 run's top 10 is from HF float32's (tests/fixtures/qwen2/
#    real_weights_f32.json): HF's own bf16 strays from it by as much as 0.11 nats here.
# HF reads the GGUF with its own reader (the `gguf` package, carried as a wheel in .whl), so the
# dequantization is checked too (reading and dequantizing in Python takes HF about two minutes per
# model: HF_FROM=DIR takes HF's side from DIR/hf-<model>.json, an earlier run's output on the same
# kind of card, when only pare changed).
# Usage: MODELS="q05 q15" [HF_FROM=bench/results/...] bash scripts/gpu-real-weights.sh
set -uo pipefail
source scripts/gpu-env.sh || exit 1
if [[ -z ${HF_FROM:-} ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
PROMPTS=/tmp/real-weights-prompts.txt
printf '%s\n' "The capital of France is" "def fibonacci(n):" \
  "Once upon a time, in a small village by the sea," "The three primary colors are" > $PROMPTS
echo "# real weights on $GPU_NAME, $(date -u +%FT%TZ), $($PARE --version)"
status=0
for D in ${MODELS:-q05 q15}; do
  M=/tmp/$D.gguf
  [[ -f $M ]] || cat .xfer/$D/p?? > $M
  echo "$(cut -d" " -f1 .xfer/$D/SHA256)  $M" | sha256sum -c --quiet || { status=1; continue; }
  t0=$(date +%s)
  if [[ -n ${HF_FROM:-} ]]; then
    cp "$HF_FROM/hf-$D.json" $OUT/hf-$D.json || { status=1; continue; }
  else
    python3 bench/hf_real_weights.py --gguf $M --prompts-file $PROMPTS --new-tokens 16 > $OUT/hf-$D.json || { status=1; continue; }
  fi
  t1=$(date +%s)
  : > $OUT/pare-$D.jsonl
  while IFS= read -r p; do
    s=$($PARE score -m $M --device cuda --dtype bf16 --top-k 20 --json -p "$p") || status=1
    g=$($PARE generate -m $M --device cuda --dtype bf16 --max-new-tokens 16 --json -p "$p") || status=1
    echo "{\"score\": $s, \"generate\": $g}" >> $OUT/pare-$D.jsonl
  done < $PROMPTS
  $PARE generate -m $M --device cuda --dtype bf16 --max-new-tokens 16 --json --prompts-file $PROMPTS > $OUT/pare-batch-$D.json || status=1
  echo "## $D ($(basename $M)): HF $((t1 - t0)) s, pare $(( $(date +%s) - t1 )) s"
  python3 - $OUT/hf-$D.json $OUT/pare-$D.jsonl $OUT/pare-batch-$D.json $D <<'PY' || status=1
import json, sys
hf = json.load(open(sys.argv[1]))
alone = [json.loads(l) for l in open(sys.argv[2])]
batch = json.load(open(sys.argv[3]))["sequences"]
# HF float32 on the CPU (tests/fixtures/qwen2/real_weights_f32.json): how far each bf16 run strays.
f32 = json.load(open("tests/fixtures/qwen2/real_weights_f32.json"))["models"][sys.argv[4]]["cases"]
def stray(top, ref):
    got = {e["id"]: e["logprob"] for e in top}
    return max(abs(e["logprob"] - got[e["id"]]) if e["id"] in got else float("inf") for e in ref["top"])
for case, mine, ref in zip(hf["cases"], alone, f32):
    print(f"  from HF f32, top 10: HF bf16 {stray(case['top'], ref):.4f}, pare bf16 {stray(mine['score']['top'], ref):.4f} nats: {case['prompt']!r}")
print(f"HF transformers {hf['meta']['transformers']}, torch {hf['meta']['torch']}, {hf['meta']['gpu']}")
same_greedy, worst, ok = 0, 0.0, True
for case, mine, row in zip(hf["cases"], alone, batch):
    got = {e["id"]: e["logprob"] for e in mine["score"]["top"]}
    # On HF's top 10; an id missing from pare's top 20 counts as infinitely far.
    diffs = [abs(e["logprob"] - got[e["id"]]) if e["id"] in got else float("inf") for e in case["top"][:10]]
    worst = max(worst, max(diffs))
    gen = mine["generate"]
    same = gen["tokens"] == case["tokens"]
    same_greedy += same
    first = next((i for i, (a, b) in enumerate(zip(gen["tokens"], case["tokens"])) if a != b), None)
    rows_equal = row["tokens"] == gen["tokens"] and all(abs(a - b) <= 1e-6 for a, b in zip(row["logprobs"], gen["logprobs"]))
    ok &= rows_equal
    print(f"  max|Δlogprob| top-10 {max(diffs):.4f}; greedy {'=' if same else '≠'} HF"
          + ("" if first is None else f" (from token {first})")
          + f"; batch row {'=' if rows_equal else '≠'} alone: {case['prompt']!r} → {gen['text']!r}"
          + ("" if same else f" (HF {case['text']!r})"))
ok &= worst <= 0.05 and same_greedy >= 3
print(f"{'ok  ' if ok else 'FAIL'} top-10 log-probs within {worst:.4f} nats (≤ 0.05), greedy equal on {same_greedy}/4 (≥ 3), batch rows equal alone")
sys.exit(0 if ok else 1)
PY
done
[[ $status == 0 ]] && echo "gpu-real-weights: all passed" || echo "gpu-real-weights: FAILED"
exit $status
