#!/usr/bin/env bash
# Builds llara with CUDA on this CPU-only machine and packs what a GPU machine needs into dist/gpu/:
# the stripped binary, scripts/gpu-check.sh, and the small inputs of the check (LastFM prepared, LLaRA's
# SASRec). Debian here has no CUDA toolkit: PyPI's nvidia-* wheels supply nvcc, cicc, headers and the
# libraries (CUDA 13, the GPU machines' driver version). candle loads libcuda/cublas/curand at run time.
#
#   scripts/gpu-build.sh                 # CUDA_COMPUTE_CAP=90 (H100/H200) by default
#   CUDA_COMPUTE_CAP=80 scripts/gpu-build.sh
#
# Then, on the GPU machine (from the repository root): bash dist/gpu/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
CUDA_PIP="${CUDA_PIP:-runs/cuda-pip}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
if [ ! -x "$CUDA_PIP/nvidia/cu13/nvvm/bin/cicc" ]; then
  rm -rf "$CUDA_PIP"
  # One pip call: --target does not merge packages that share the nvidia/ folder across calls.
  pip install --quiet --no-deps --target "$CUDA_PIP" "nvidia-cuda-nvcc==13.2.86" "nvidia-cuda-runtime==13.2.86" \
    "nvidia-cublas==13.4.1.3" "nvidia-curand" "nvidia-cuda-cccl==13.3.5.0.6" "nvidia-nvvm==13.2.86"
fi
ROOT="$(cd "$CUDA_PIP/nvidia/cu13" && pwd)"
# The layout nvcc and the build scripts expect of a toolkit: lib64, and the libraries' unversioned names.
[ -e "$ROOT/lib64" ] || ln -s lib "$ROOT/lib64"
for l in "$ROOT"/lib/*.so.*; do
  base="${l%%.so.*}.so"
  [ -e "$base" ] || ln -s "$(basename "$l")" "$base"
done
export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_HOME="$ROOT" CUDA_TOOLKIT_ROOT_DIR="$ROOT"
export PATH="$ROOT/bin:$PATH" LIBRARY_PATH="$ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$ROOT/include/cccl"
nvcc --version | tail -2
cargo build --release --features cuda --target-dir target/cuda
OUT=dist/gpu
rm -rf "$OUT" && mkdir -p "$OUT"
cp target/cuda/release/llara "$OUT/llara"
strip "$OUT/llara"
cp scripts/gpu-check.sh "$OUT/"
target/cuda/release/llara -q data prepare --from llara-jsonl "$SHARED/datasets/lastfm" --out "$OUT/data-lastfm" --force
cp "$SHARED/recmodels/lastfm-sasrec.safetensors" "$SHARED/recmodels/lastfm-sasrec.json" "$OUT/" 2>/dev/null || true
du -sh "$OUT" "$OUT/llara"
echo "built $OUT (CUDA compute capability $CUDA_COMPUTE_CAP); on the GPU machine: bash $OUT/gpu-check.sh"
