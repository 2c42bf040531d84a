#!/usr/bin/env bash
# GFLOP/s of the frozen-weight GEMMs per path and shape (examples/bench_gemm.rs): the f32 GEMM (gemm
# crate, the weight's transposed copy) against the bf16 GEMM this CPU dispatches to (kernels::bf16), on
# SmolLM2-135M's projection shapes for M = 1, 8 (generation) and 1024 (a training batch), forward and
# input gradient, on 1 and 2 threads; medians of repeated calls. Output: docs/results/gemm_bf16.md.
#
#   scripts/bench_gemm.sh
#   THREADS_LIST=2 MS="1024" OUTFILE=runs/gemm.md scripts/bench_gemm.sh
#   LLARA_BF16_KERNEL=avx512-bf16 scripts/bench_gemm.sh   # the AVX512-BF16 kernel where it is not chosen (Intel)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS_LIST="${THREADS_LIST:-1 2}"
MS="${MS:-1 8 1024}"
OUTFILE="${OUTFILE:-docs/results/gemm_bf16.md}"
cargo build --release --example bench_gemm -q
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
{
  echo "# Frozen-weight GEMMs: f32 vs bf16"
  echo
  echo "$cpu; produced by \`scripts/bench_gemm.sh\` (examples/bench_gemm.rs). The f32 path multiplies the"
  echo "bf16-rounded weights too, so the relative error column is the rounding of the activations alone."
  for th in $THREADS_LIST; do
    echo
    # shellcheck disable=SC2086
    RAYON_NUM_THREADS=$th target/release/examples/bench_gemm $MS | sed 's/^# /## /'
  done
} > "$OUTFILE.partial"
mv "$OUTFILE.partial" "$OUTFILE"
cat "$OUTFILE"
