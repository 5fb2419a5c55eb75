#!/usr/bin/env bash
# Create (or bring up to date) the git-ignored venv used to generate the HF
# reference fixtures: tools/reference/.venv. Idempotent: re-running only
# installs what is missing or at a different version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
# kvpress pins transformers < 5.3; its presses run fine on 5.23 (make_press_fixtures.py adapts the
# hook's inputs), so it goes in without its dependency pins.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps kvpress==0.5.5
"$venv/bin/python" -c 'import torch, transformers, gguf, safetensors; print("torch", torch.__version__, "transformers", transformers.__version__)'
