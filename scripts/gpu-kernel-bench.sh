#!/usr/bin/env bash
# The decode matrix products alone, on the GPU machine: every GEMV/GEMM kernel variant against
# cuBLAS on the Llama-3-8B decode shapes for 1 to 32 rows, each checked against cuBLAS, with the
# per-step totals of the 8B model last (dist/pare-kernels-bench, built by scripts/build-cuda.sh).
# Usage: scripts/gpu-kernel-bench.sh [--reps N] [--csv FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
echo "# kernel bench on $GPU_NAME, $(date -u +%F), $($PARE --version)"
dist/pare-kernels-bench "$@"
