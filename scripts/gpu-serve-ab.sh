#!/usr/bin/env bash
# Two builds of `pare serve` under the same ShareGPT load on one GPU machine in one call, so that
# a difference between them is the change's and not the machine's (hosts differ between calls).
# Usage: BEFORE=.xfer/bin-before/pare-cuda-OLD.xz scripts/gpu-serve-ab.sh
#   carry [.xfer/bin/pare-cuda.xz, $BEFORE, .xfer/tok, .xfer/sharegpt-400.json]; the env of
#   scripts/gpu-serve-bench.sh applies (SHAPES default llama3-8b here, CONCURRENCY 16,64).
set -uo pipefail
cd "$(dirname "$0")/.."
BEFORE=${BEFORE:?BEFORE=path of the earlier build (xz)}
mkdir -p dist
xz -dc "$BEFORE" > dist/pare-cuda-before && chmod +x dist/pare-cuda-before
export SHAPES=${SHAPES:-llama3-8b} CONCURRENCY=${CONCURRENCY:-16,64} NUM_REQUESTS=${NUM_REQUESTS:-64}
# The same random weights for both builds: the first run makes them.
export WORK=${WORK:-/tmp/pare-bench}
for side in after before; do
  pare=dist/pare-cuda; [[ $side == before ]] && pare=dist/pare-cuda-before
  echo "## $side: $pare"
  PARE=$pare OUT=$OUT/$side bash scripts/gpu-serve-bench.sh
done
