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
if [ ! -x "$CUDA_PIP/nvidia/cu13/nvvm/bin/cicc" ] || [ ! -f "$CUDA_PIP/nvidia/cu13/include/crt/host_config.h" ] ||
   [ ! -e "$CUDA_PIP/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  rm -rf "$CUDA_PIP"
  # One pip call: --target does not merge packages that share the nvidia/ folder across calls.
  pip install --quiet --no-deps --target "$CUDA_PIP" "nvidia-cuda-nvcc==13.2.86" "nvidia-cuda-runtime==13.2.86" \
    "nvidia-cublas==13.4.1.3" "nvidia-curand" "nvidia-cuda-cccl==13.3.5.0.6" "nvidia-nvvm==13.2.86" \
    "nvidia-cuda-crt==13.2.86" "nvidia-cuda-nvrtc==13.2.86"
fi
ROOT="$(cd "$CUDA_PIP/nvidia/cu13" && pwd)"
# The layout nvcc and the build scripts expect of a toolkit: lib64, and the libraries' unversioned names.
[ -e "$ROOT/lib64" ] || ln -s lib "$ROOT/lib64"
for l in "$ROOT"/lib/*.so.*; do
  base="${l%%.so.*}.so"
  [ -e "$base" ] || ln -s "$(basename "$l")" "$base"
done
# candle links the driver API (libcuda.so.1), which only a GPU machine's driver provides: link against a stub
# with the same soname (every driver function cudarc declares; the real library replaces it at run time).
CUDARC=$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
mkdir -p "$ROOT/lib/stubs"
grep -oE 'pub unsafe fn cu[A-Z][A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
  sed 's/.*/int &(void) { return 999; }/' > "$ROOT/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$ROOT/lib/stubs/libcuda_stub.c"
export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_HOME="$ROOT" CUDA_TOOLKIT_ROOT_DIR="$ROOT"
export PATH="$ROOT/bin:$PATH" LIBRARY_PATH="$ROOT/lib/stubs:$ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$ROOT/include/cccl"
nvcc --version | tail -2
cargo build --release --features cuda --target-dir target/cuda
OUT=dist/gpu
rm -rf "$OUT" && mkdir -p "$OUT"
cp target/cuda/release/llara "$OUT/llara.bin"
strip "$OUT/llara.bin"
# candle's PTX makes the stripped binary ~66 MB; compressed it ships in ~20 (unpacked on first use).
gzip -9 "$OUT/llara.bin"
# The CUDA binary links libcuda.so.1 (the driver), cuBLAS, cuRAND and NVRTC: without them the loader would
# refuse it with a bare message, so a wrapper says what is missing (and finds a CUDA 13 toolkit's libraries).
cat > "$OUT/llara" <<'WRAP'
#!/usr/bin/env bash
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -x "$here/llara.bin" ]; then
  gunzip -c "$here/llara.bin.gz" > "$here/llara.bin.partial" && chmod +x "$here/llara.bin.partial" &&
    mv "$here/llara.bin.partial" "$here/llara.bin" || { echo "error: cannot unpack $here/llara.bin.gz" >&2; exit 1; }
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
         $(python3 -c 'import site; print(*[p + "/nvidia/cu13/lib" for p in site.getsitepackages()])' 2>/dev/null); do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
missing=$(LD_LIBRARY_PATH="$LD_LIBRARY_PATH" ldd "$here/llara.bin" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
  echo "error: this is llara's CUDA build and it needs an NVIDIA driver and the CUDA 13 libraries; not found: $missing" >&2
  echo "(no GPU here? use the CPU build: cargo build --release)" >&2
  exit 1
fi
exec "$here/llara.bin" "$@"
WRAP
chmod +x "$OUT/llara"
cp scripts/gpu-check.sh configs/llama-1b.json "$OUT/"
LLARA_CPU=target/release/llara
[ -x "$LLARA_CPU" ] || cargo build --release
"$LLARA_CPU" -q data prepare --from llara-jsonl "$SHARED/datasets/lastfm" --out "$OUT/data-lastfm" --force
cp "$SHARED/recmodels/lastfm-sasrec.safetensors" "$SHARED/recmodels/lastfm-sasrec.json" "$OUT/" 2>/dev/null || true
du -sh "$OUT" "$OUT/llara.bin.gz"
echo "built $OUT (CUDA compute capability $CUDA_COMPUTE_CAP); on the GPU machine: bash $OUT/gpu-check.sh"
# Here (no GPU) the wrapper must refuse with a clear message; then drop the unpacked copy again.
"$OUT/llara" --version || true
rm -f "$OUT/llara.bin"
