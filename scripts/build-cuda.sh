#!/usr/bin/env bash
# Build a stripped `pare` with the CUDA backend for Hopper (sm_90) on a host with no GPU.
#
# Installs the pinned CUDA 13.0 toolkit from PyPI into .cuda/venv (git-ignored), makes a link dir
# with unversioned library names and a libcuda stub (the real driver is loaded at run time on the
# GPU machine), builds into target-cuda/ (so the CPU build in target/ stays valid), and copies the
# stripped binary to dist/pare-cuda. Recipe and reasons: docs/performance.md, "GPU".
# Usage: scripts/build-cuda.sh            (CUDA_COMPUTE_CAP=90 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CUDA_DIR=$ROOT/.cuda
VENV=$CUDA_DIR/venv
LINK=$CUDA_DIR/lib
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-cuda}

# nvcc 13.0 emits PTX ISA 9.0, which the GPU machines' R580 driver (CUDA 13.0) can JIT; a newer
# nvcc may emit PTX it rejects. Every wheel is pinned, nvvm too (pip would pair cicc 13.5 with it).
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
        nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)

if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
fi
CU=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13
if [[ ! -x $CU/bin/nvcc ]]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${WHEELS[@]}"
fi
"$CU/bin/nvcc" --version | grep -q "release 13.0" || { echo "error: $CU/bin/nvcc is not CUDA 13.0" >&2; exit 1; }

# The wheels ship only versioned libraries; the linker wants the plain names.
mkdir -p "$LINK"
for lib in cudart cublas cublasLt curand nvrtc; do
  so=$(ls "$CU/lib/lib$lib.so."* | sort | head -1)
  ln -sf "$so" "$LINK/lib$lib.so"
done

# A stub library for the linker: every `pub unsafe fn PREFIX*` cudarc declares under SYS, each
# returning CODE, with the real library's SONAME. Only the linker sees it.
# Usage: stub NAME SONAME PREFIX SYS CODE
stub() {
  local name=$1 soname=$2 prefix=$3 sys=$4 code=$5
  [[ -f $LINK/lib$name.so ]] && return
  cargo fetch --locked --manifest-path "$ROOT/Cargo.toml" >/dev/null
  local cudarc
  cudarc=$(cargo metadata --format-version 1 --locked --features pare-cli/cuda --manifest-path "$ROOT/Cargo.toml" \
    | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
  grep -ohE "\\bpub unsafe fn $prefix[A-Za-z0-9_]+" "$cudarc/src/$sys/"*.rs | awk '{print $4}' | sort -u \
    | awk -v code="$code" '{print "int " $1 "(void) { return " code "; }"}' >"$CUDA_DIR/${name}_stub.c"
  cc -shared -fPIC -Wl,-soname,"$soname" -o "$LINK/lib$name.so" "$CUDA_DIR/${name}_stub.c"
  echo "lib$name stub: $(wc -l <"$CUDA_DIR/${name}_stub.c") symbols" >&2
}

# No wheel ships libcuda.so (the driver). candle forces cudarc's dynamic linking, so link against a
# stub whose functions fail with CUDA_ERROR_STUB_LIBRARY (34); the GPU machine's driver is used at
# run time.
stub cuda libcuda.so.1 cu driver/sys 34
# NCCL=1 also builds dist/pare-cuda-nccl (`--tp N` over GPUs), linked against a stub of
# libnccl.so.2; at run time the GPU host's NCCL is loaded (e.g. from a torch install:
# LD_LIBRARY_PATH=.../site-packages/nvidia/nccl/lib, which scripts/gpu-env.sh sets).
if [[ ${NCCL:-0} == 1 ]]; then
  stub nccl libnccl.so.2 nccl nccl/sys 1
fi

export PATH=$CU/bin:$PATH NVCC=$CU/bin/nvcc
export CUDA_HOME=$CU CUDA_PATH=$CU CUDA_ROOT=$CU
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # no GPU here to ask; 90 = H100/H200
export CUDARC_CUDA_VERSION=13000                  # cudarc's bindings for CUDA 13.0
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}  # parallel nvcc jobs in candle-kernels
# Keep .cargo/config.toml's target-cpu flags: RUSTFLAGS would replace them.
export RUSTFLAGS="-C target-cpu=x86-64-v3 -L native=$LINK"

cargo build --release --locked -p pare-cli --features cuda
# The kernels' GPU tests, as a binary: the GPU machine has no Rust (scripts/gpu-check.sh runs it).
# Same package selection as the build above, so dependencies keep their features (no rebuild).
TESTS=$(cargo test --release --locked -p pare-cli -p pare-kernels --features pare-cli/cuda --test gpu --no-run --message-format=json \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
# The kernels' benchmark (scripts/gpu-kernel-bench.sh runs it), same package selection again.
cargo build --release --locked -p pare-cli -p pare-kernels --features pare-cli/cuda --example kernel_bench
mkdir -p dist
cp "$CARGO_TARGET_DIR/release/pare" dist/pare-cuda
if [[ ${NCCL:-0} == 1 ]]; then
  cargo build --release --locked -p pare-cli --features nccl
  cp "$CARGO_TARGET_DIR/release/pare" dist/pare-cuda-nccl
  strip dist/pare-cuda-nccl
  mkdir -p .xfer/bin && xz -T2 -6 -c dist/pare-cuda-nccl >.xfer/bin/pare-cuda-nccl.xz
fi
cp "$TESTS" dist/pare-kernels-gpu-tests
cp "$CARGO_TARGET_DIR/release/examples/kernel_bench" dist/pare-kernels-bench
strip dist/pare-cuda dist/pare-kernels-gpu-tests dist/pare-kernels-bench
# Compressed copies to send to the GPU machine (64 MiB per call, so `carry` .xfer/bin, not dist);
# scripts/gpu-env.sh unpacks them into dist/ there.
mkdir -p .xfer/bin
for f in pare-cuda pare-kernels-gpu-tests pare-kernels-bench; do xz -T2 -6 -c "dist/$f" >".xfer/bin/$f.xz"; done
ls -l dist/ .xfer/bin/
