//! The bottom layer: everything generic about tensors on the CPU that both model families (the
//! recommenders in [`crate::sr`], the LLM engine in [`crate::llm`]) and LLaRA build on. It imports
//! nothing else of the crate.
//!
//! - [`slice`]: borrowing the f32 contents of CPU tensors, making CPU tensors, fixed-block
//!   parallel element-wise loops.
//! - [`simd`]: vectorized `dot`, `sum`, `axpy`, the run-time dispatched `exp`, a masked softmax row.
//! - [`gemm`]: the one GEMM wrapper and its threading policy.
//! - [`dropout`]: seeded inverted dropout.
//! - [`nn`]: fused layers both families use (`matmul_t`, trailing add, LayerNorm, row sums, the
//!   trainable affine map).
//! - [`fused`]: the one check that decides between a fused CPU kernel and the composed
//!   (differentiable, any device and dtype) version of an op.

pub mod dropout;
pub mod gemm;
pub mod nn;
pub mod simd;
pub mod slice;

use candle_core::{DType, Tensor};

/// Whether the fused CPU kernels apply to every tensor in `ts` (f32 on the CPU). Every op that
/// has both a fused kernel and a composed version asks this, and only this.
pub fn fused(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}
