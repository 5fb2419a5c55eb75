#!/usr/bin/env bash
# pare against HF transformers on the GPU machine, same shapes, same token ids, same run. Prints
# one row per case: prefill and decode tok/s of both, the ratios, and decode's share of the HBM
# bandwidth (weights + KV cache read per step over the measured device copy rate).
#
# Models: a Llama-3-8B-shaped model with random bf16 weights (made here by `pare init-random`,
# never committed), and SmolLM2-135M and Qwen2.5-0.5B: their GGUFs from assets/ when present, else
# random weights of their shapes. Cases: batch 1 and 8 × prompt 512 and 4096, 256 new tokens; with
# LONG=1 also 32k context without and with a press at 8× compression (needs attention that does
# not materialize the 32k×32k scores).
#
# Presses (the issue's "compression pays" targets): on the 8B shape, PRESS_CASES (batch:prompt:new,
# default 1:4096:128 and 8:4096:128) run without a press and with each of PRESSES (name:ratio);
# a second table gives each press's cost as a share of the prefill without it, its decode speed
# against no press, and the KV bytes it keeps. PRESSES= skips them.
#
# Usage: scripts/gpu-bench.sh   env: MODELS="llama3-8b smollm2-135m qwen2.5-0.5b", CASES, LONG=1,
#        PRESSES, PRESS_CASES, HF=0 (no HF baseline),
#        WORK (scratch for the random models, default /tmp/pare-bench), RESULTS (JSON lines file).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
MODELS=${MODELS:-"llama3-8b smollm2-135m qwen2.5-0.5b"}
CASES=${CASES:-"1:512:256 8:512:256 1:4096:256 8:4096:256"}
PRESSES=${PRESSES-"knorm:0.5 streaming:0.5 snapkv:0.5 expected-attention:0.5 adakv+snapkv:0.5"}
PRESS_CASES=${PRESS_CASES:-"1:4096:128 8:4096:128"}
WORK=${WORK:-/tmp/pare-bench}
RESULTS=${RESULTS:-$WORK/results.jsonl}
mkdir -p "$WORK"
: >"$RESULTS"
echo "# gpu-bench on $GPU_NAME, $(date -u +%F), $($PARE --version)" | tee -a "$WORK/log"
python3 bench/hf_baseline.py --bandwidth >>"$RESULTS"

model_path() {
  case $1 in
    smollm2-135m) gguf=assets/SmolLM2-135M-Instruct.Q4_1.gguf ;;
    qwen2.5-0.5b) gguf=assets/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf ;;
    *) gguf= ;;
  esac
  if [[ -n $gguf && -f $gguf ]]; then echo "$gguf"; return; fi
  dir=$WORK/$1-random
  [[ -f $dir/model.safetensors ]] || "$PARE" init-random --like "$1" --out "$dir" >&2
  echo "$dir"
}

tag() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(json.loads(sys.argv[2])); print(json.dumps(d))' "$1" "$2"; }

for m in $MODELS; do
  path=$(model_path "$m")
  shapes=$(echo $CASES | tr ' ' ',')
  for c in $CASES; do
    IFS=: read -r b p g <<<"$c"
    if r=$("$PARE" bench --model "$path" --device cuda --batch "$b" --prompt-len "$p" --gen-len "$g" --json 2>"$WORK/err"); then
      tag "$r" "{\"engine\": \"pare\", \"name\": \"$m\"}" >>"$RESULTS"
    else
      echo "{\"engine\": \"pare\", \"name\": \"$m\", \"batch\": $b, \"prompt_len\": $p, \"error\": $(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read().strip()[:300]))' "$WORK/err")}" >>"$RESULTS"
    fi
  done
  # HF reads GGUF only with the gguf package, which the GPU machine lacks: give it the same
  # weights as an HF directory. Eager attention decodes faster than sdpa in HF at batch 1; both
  # are baselines.
  hf_path=$path
  if [[ $path == *.gguf ]]; then
    hf_path=$WORK/$m-hf
    [[ -f $hf_path/config.json ]] || "$PARE" convert -m "$path" --out "$hf_path" >&2
  fi
  if [[ ${HF:-1} == 1 ]]; then
    python3 bench/hf_baseline.py --model "$hf_path" --shapes "$shapes" --attn sdpa,eager 2>"$WORK/hf_err" \
      | while read -r line; do tag "$line" "{\"name\": \"$m\"}"; done >>"$RESULTS" || tail -3 "$WORK/hf_err"
  fi
  if [[ -n $PRESSES && $m == llama3-8b ]]; then
    for c in $PRESS_CASES; do
      IFS=: read -r b p g <<<"$c"
      for pr in none $PRESSES; do
        args=(); [[ $pr == none ]] || args=(--press "${pr%%:*}" --ratio "${pr##*:}")
        if r=$("$PARE" bench --model "$path" --device cuda --batch "$b" --prompt-len "$p" --gen-len "$g" --repeat 1 \
            "${args[@]}" --json 2>"$WORK/err"); then
          tag "$r" "{\"engine\": \"pare-press\", \"name\": \"$m\", \"case\": \"$pr\"}" >>"$RESULTS"
        else
          echo "press $pr b$b p$p: $(tail -c 300 "$WORK/err")"
        fi
      done
    done
  fi
  if [[ ${LONG:-0} == 1 && $m == llama3-8b ]]; then
    for press in "" "--press knorm --ratio 0.875"; do
      if r=$("$PARE" bench --model "$path" --device cuda --batch 1 --prompt-len 32768 --gen-len 256 --repeat 1 $press --json 2>"$WORK/err"); then
        tag "$r" "{\"engine\": \"pare\", \"name\": \"$m\", \"long\": true}" >>"$RESULTS"
      else
        echo "32k $press: $(tail -c 300 "$WORK/err")"
      fi
    done
  fi
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bw = next((r["copy_bytes_per_s"] for r in rows if r.get("engine") == "torch"), None)
print(f"HBM copy bandwidth {bw/1e12:.2f} TB/s" if bw else "HBM copy bandwidth not measured")
hdr = f"{'model':<14}{'case':<14}{'pare pre':>10}{'hf sdpa':>10}{'×':>6}{'pare dec':>10}{'hf sdpa':>9}{'hf eager':>9}{'×best':>7}{'% HBM':>7}{'GPU GiB':>8}"
print(hdr)
for r in rows:
    if r.get("engine") != "pare":
        continue
    case = f"b{r['batch']} p{r['prompt_len']}" + (f" {r['press']}" if r.get("press") else "")
    if "error" in r:
        print(f"{r['name']:<14}{case:<14} error: {r['error'][-80:]}")
        continue
    hf = {x["attn"]: x for x in rows if x.get("engine") == "hf" and x.get("name") == r["name"]
          and (x["batch"], x["prompt_len"]) == (r["batch"], r["prompt_len"])}
    sdpa, eager = hf.get("sdpa"), hf.get("eager")
    pre_ratio = r["prefill_tok_s"] / sdpa["prefill_tok_s"] if sdpa else float("nan")
    best = max([x["decode_tok_s"] for x in hf.values()], default=float("nan"))
    # Bytes a decode step reads: the weights once, and the KV cache (its mean size over the run).
    kv = (r["kv_cache_bytes_prefill"] + r["kv_cache_bytes"]) / 2
    steps_s = r["decode_tok_s"] / r["batch"]
    hbm = (r["decode_weight_bytes"] + kv) * steps_s / bw * 100 if bw else float("nan")
    fmt = lambda x: f"{x['decode_tok_s']:9.1f}" if x else f"{'-':>9}"
    print(f"{r['name']:<14}{case:<14}{r['prefill_tok_s']:10.0f}{(sdpa or {}).get('prefill_tok_s', float('nan')):10.0f}"
          f"{pre_ratio:6.2f}{r['decode_tok_s']:10.1f}{fmt(sdpa)}{fmt(eager)}{r['decode_tok_s']/best:7.2f}{hbm:7.1f}"
          f"{(r.get('gpu_mem_peak_bytes') or 0)/2**30:8.1f}")
presses = [r for r in rows if r.get("engine") == "pare-press"]
if presses:
    print(f"\n{'press':<24}{'case':<12}{'prefill tok/s':>14}{'press cost':>11}{'decode tok/s':>13}{'× none':>8}{'KV MiB':>9}")
    for r in presses:
        none = next(x for x in presses if x["case"] == "none" and (x["batch"], x["prompt_len"]) == (r["batch"], r["prompt_len"]))
        cost = none["prefill_tok_s"] / r["prefill_tok_s"] - 1
        print(f"{r['case']:<24}{'b%d p%d' % (r['batch'], r['prompt_len']):<12}{r['prefill_tok_s']:14.0f}{cost*100:10.1f}%"
              f"{r['decode_tok_s']:13.1f}{r['decode_tok_s']/none['decode_tok_s']:8.2f}{r['kv_cache_bytes_prefill']/2**20:9.0f}")
PY
