# Sourced by the GPU scripts (run on the GPU machine): finds the pare binary and the CUDA
# libraries it links against, which the machine's PyTorch wheels carry (nvidia/*/lib); the driver
# provides libcuda.so.1.
PARE=${PARE:-dist/pare-cuda}
# Binaries travel xz-compressed in .xfer/bin (a call takes 64 MiB): unpack them into dist/.
mkdir -p dist
for f in pare-cuda pare-cuda-nccl pare-kernels-gpu-tests pare-kernels-bench; do
  if [[ -f .xfer/bin/$f.xz && ! dist/$f -nt .xfer/bin/$f.xz ]]; then xz -dc ".xfer/bin/$f.xz" >"dist/$f" && chmod +x "dist/$f"; fi
done
[[ -x $PARE ]] || { echo "error: no pare binary at $PARE (build it with scripts/build-cuda.sh)" >&2; exit 1; }
NV_LIBS=$(python3 - <<'PY'
import glob, os
import nvidia
print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})))
PY
)
export LD_LIBRARY_PATH=$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ldd "$PARE" | grep -q "not found"; then
  echo "error: $PARE is missing libraries:" >&2; ldd "$PARE" | grep "not found" >&2; exit 1
fi
# One-line errors: candle would otherwise append a backtrace to them.
export RUST_BACKTRACE=0
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
