//! The frozen weight of a projection, `W [out, in]`, held once in the layout its GEMM wants.
//!
//! A model's frozen projections are most of its memory (a 7B Llama's are 6.5 B parameters), so
//! each is kept in exactly one copy: the loaded tensor is turned into its format's layout at load
//! time and dropped, and the layout the input gradient `dy · W` needs is derived from that one
//! copy per call and dropped after it (training only; inference never makes it). One type,
//! [`FrozenWeight`], stands for every format; each format is one file behind the [`Format`] trait:
//!
//! - [`dense`]: a candle tensor, any device and dtype (CUDA, the composed path, f32 on the CPU,
//!   where it is kept as its transpose `Wᵀ [in, out]`, the layout the f32 GEMM multiplies fastest).
//! - [`packed`]: a CPU bf16 weight packed for the bf16 GEMM of [`super::bf16`] (the packing is
//!   the only copy).
//!
//! Callers never branch on the format: the fused CPU kernels ask [`FrozenWeight::cpu_kernels`]
//! and call [`FrozenWeight::forward`] / [`FrozenWeight::input_grad`] on f32 slices; the composed
//! path (other devices, `--fused off`) asks [`FrozenWeight::tensor`] for `W` as a tensor.

pub mod dense;
pub mod packed;

use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// One storage format of a frozen weight `W [out, in]`.
pub trait Format: Send + Sync {
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
    /// The dtype of `W`'s values as a tensor ([`Format::tensor`] gives this dtype).
    fn dtype(&self) -> DType;
    fn device(&self) -> Device;
    /// Bytes this format holds.
    fn bytes(&self) -> usize;
    /// A short name of the layout, for logs and `llara llm info`.
    fn describe(&self) -> String;
    /// Whether [`Format::forward`] and [`Format::input_grad`] run (CPU, f32 activations).
    fn cpu_kernels(&self) -> bool;
    /// `x · Wᵀ`: a new row-major `[m, out]` from a row-major `x [m, in]`.
    fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>>;
    /// `g · W`: a new row-major `[m, in]` from `g [m, out]` (the input's gradient).
    fn input_grad(&self, g: &[f32], m: usize) -> Result<Vec<f32>>;
    /// `W [out, in]` as a tensor of [`Format::dtype`] on [`Format::device`]: a view where the
    /// format holds one, else made on the fly (the composed path, merging an adapter).
    fn tensor(&self) -> Result<Tensor>;
}

/// A frozen weight in one of the [`Format`]s; cloning shares it.
#[derive(Clone)]
pub struct FrozenWeight(Arc<dyn Format>);

impl FrozenWeight {
    /// `w [out, in]` in the format its device and dtype call for, replacing `w` (its storage is
    /// released when the caller drops it): on the CPU an f32 weight is kept as its transpose, a
    /// bf16 weight as its bf16-GEMM packing; anything else as the tensor itself.
    pub fn new(w: Tensor) -> Result<Self> {
        w.dims2()?;
        let w = w.detach();
        Ok(match (w.device().is_cpu(), w.dtype()) {
            (true, DType::F32) => Self::from(dense::Dense::transposed(&w)?),
            (true, DType::BF16) => Self::from(packed::PackedBf16::new(&w)?),
            _ => Self::from(dense::Dense::plain(w)?),
        })
    }

    /// `w [out, in]` kept as it is (an LM head tied to the input embeddings shares their storage).
    pub fn plain(w: Tensor) -> Result<Self> {
        Ok(Self::from(dense::Dense::plain(w)?))
    }

    pub fn from<F: Format + 'static>(f: F) -> Self {
        FrozenWeight(Arc::new(f))
    }

    pub fn dims(&self) -> (usize, usize) {
        self.0.dims()
    }

    pub fn dtype(&self) -> DType {
        self.0.dtype()
    }

    pub fn device(&self) -> Device {
        self.0.device()
    }

    pub fn bytes(&self) -> usize {
        self.0.bytes()
    }

    pub fn describe(&self) -> String {
        self.0.describe()
    }

    /// Whether the fused CPU kernels can multiply it (see [`Format::cpu_kernels`]).
    pub fn cpu_kernels(&self) -> bool {
        self.0.cpu_kernels()
    }

    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.0.forward(x, m)
    }

    pub fn input_grad(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
        self.0.input_grad(g, m)
    }

    pub fn tensor(&self) -> Result<Tensor> {
        self.0.tensor()
    }
}

impl std::fmt::Debug for FrozenWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (o, i) = self.dims();
        write!(f, "FrozenWeight([{o}, {i}], {})", self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::slice::host_vec;

    fn weight(o: usize, i: usize, dt: DType) -> Tensor {
        let v: Vec<f32> = (0..o * i)
            .map(|x| ((x * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        Tensor::from_vec(v, (o, i), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// Every CPU format gives the products of the weight it was made from: `x · Wᵀ`, `g · W`, and
    /// `W` itself back as a tensor (exactly: bf16 values are kept as they are).
    #[test]
    fn each_format_multiplies_and_returns_the_weight_it_holds() {
        for (o, i) in [(5, 7), (48, 33), (70, 130)] {
            for dt in [DType::F32, DType::BF16] {
                let w = weight(o, i, dt);
                let f = FrozenWeight::new(w.clone()).unwrap();
                assert_eq!(f.dims(), (o, i));
                assert_eq!(f.dtype(), dt);
                let f32s = |t: &Tensor| host_vec(&t.to_dtype(DType::F32).unwrap()).unwrap();
                let back = f32s(&f.tensor().unwrap());
                let want = f32s(&w);
                assert_eq!(back, want, "{o}x{i} {dt:?}: W back");
                let m = 9;
                let x: Vec<f32> = (0..m * i).map(|v| ((v % 13) as f32 - 6.0) / 8.0).collect();
                let g: Vec<f32> = (0..m * o).map(|v| ((v % 11) as f32 - 5.0) / 8.0).collect();
                let y = f.forward(&x, m).unwrap();
                let dx = f.input_grad(&g, m).unwrap();
                // Inputs with few significant bits: bf16 rounding of activations is exact here.
                for r in 0..m {
                    for c in 0..o {
                        let s: f32 = (0..i).map(|k| x[r * i + k] * want[c * i + k]).sum();
                        assert!(
                            (y[r * o + c] - s).abs() <= 1e-4 * (1.0 + s.abs()),
                            "{dt:?} y"
                        );
                    }
                    for c in 0..i {
                        let s: f32 = (0..o).map(|k| g[r * o + k] * want[k * i + c]).sum();
                        assert!(
                            (dx[r * i + c] - s).abs() <= 1e-4 * (1.0 + s.abs()),
                            "{dt:?} dx"
                        );
                    }
                }
            }
        }
    }
}
