//! The bottom layer: everything generic about tensors on the CPU that both model families (the
//! recommenders in [`crate::sr`], the LLM engine in [`crate::llm`]) and LLaRA build on. It imports
//! nothing else of the crate.
//!
//! - [`slice`]: borrowing the f32 contents of CPU tensors, making CPU tensors, fixed-block
//!   parallel element-wise loops.
//! - [`simd`]: vectorized `dot`, `sum`, `axpy`, the run-time dispatched `exp`, a masked softmax row.
//! - [`gemm`]: the one GEMM wrapper and its threading policy.
//! - [`bf16`]: the GEMM of frozen bf16 weights (f32 activations rounded on the fly, f32
//!   accumulation) and its run-time kernel dispatch (AVX512-BF16, or f32 on widened weights).
//! - [`dropout`]: seeded inverted dropout.
//! - [`nn`]: fused layers both families use (`matmul_t`, trailing add, LayerNorm, row sums, the
//!   trainable affine map).
//! - [`frozen`]: ops on frozen weights whose backward returns only the input's gradient, for the
//!   composed path (candle's own matmul and multiply backward also compute the weight's).
//! - [`fused`]: the one check that decides between a fused CPU kernel and the composed
//!   (differentiable, any device and dtype) version of an op; [`set_fused`] / [`with_fused`]
//!   turn the fused kernels off.

pub mod alloc;
pub mod bf16;
pub mod dropout;
pub mod gemm;
pub mod nn;
pub mod simd;
pub mod slice;

pub mod frozen;
pub mod weight;

use candle_core::{DType, Tensor};
use std::cell::Cell;

/// What the bits of a CPU computation depend on beyond its inputs: the thread count (the GEMMs'
/// blocks follow it) and the kernels chosen at run time for this CPU. Two processes with the same
/// signature and binary compute the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signature {
    pub threads: usize,
    /// The run-time dispatched kernels (`exp`, the bf16 GEMM).
    pub kernels: String,
}

impl Signature {
    /// This process's.
    pub fn current() -> Self {
        Self {
            threads: gemm::pool_threads(),
            kernels: format!(
                "exp {}, bf16 GEMM {}",
                simd::exp_path(),
                bf16::kernel().name()
            ),
        }
    }
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} threads, {}", self.threads, self.kernels)
    }
}
use std::sync::atomic::{AtomicBool, Ordering};

/// `--fused off`: every op takes its composed path, process-wide.
static FUSED_OFF: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// A scoped override of [`FUSED_OFF`] for the calling thread ([`with_fused`]).
    static FUSED_HERE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether the fused CPU kernels apply to every tensor in `ts` (f32 on the CPU, and not turned
/// off). Every op that has both a fused kernel and a composed version asks this, and only this
/// (a frozen projection also takes a CPU bf16 weight that it has packed for [`bf16`]; with no
/// tensors it says whether the fused kernels are on).
pub fn fused(ts: &[&Tensor]) -> bool {
    let on = FUSED_HERE
        .with(Cell::get)
        .unwrap_or(!FUSED_OFF.load(Ordering::Relaxed));
    on && ts
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Turns the fused CPU kernels on or off for the whole process (`--fused off`): with them off,
/// every op runs its composed version, the path a GPU takes, so its results,
/// gradients and memory can be checked on the CPU.
pub fn set_fused(on: bool) {
    FUSED_OFF.store(!on, Ordering::Relaxed);
}

/// Runs `f` with the fused kernels on or off on the calling thread only (ops are dispatched,
/// and backward passes run, on the thread that calls them); for tests that compare both paths.
pub fn with_fused<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = FUSED_HERE.with(|c| c.replace(Some(on)));
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FUSED_HERE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}
