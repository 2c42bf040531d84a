//! A frozen CPU bf16 weight packed for the bf16 GEMM ([`crate::kernels::bf16`]): `Wᵀ` in the
//! kernel's panels, the only copy of the weight. The input gradient's orientation `W` is packed
//! from those panels per call and dropped after it; `W` as a tensor (the composed path, merging an
//! adapter) is unpacked on the fly.

use super::{Format, FrozenWeight};
use crate::kernels::bf16::{self, Packed};
use crate::kernels::slice::with_bf16;
use candle_core::{DType, Device, Result, Tensor};

pub struct PackedBf16 {
    /// `B = Wᵀ [in, out]`.
    fwd: Packed,
}

impl PackedBf16 {
    /// Packs a CPU bf16 `w [out, in]`.
    pub fn new(w: &Tensor) -> Result<Self> {
        let (o, i) = w.dims2()?;
        let fwd = with_bf16(w, |v| Packed::transposed_of(v, o, i))?;
        Ok(Self { fwd })
    }

    /// Packs `W [out, in]` given by its bf16 bits (`w(o, i)`), for builders that make the values
    /// on the fly.
    pub fn from_fn(out: usize, inp: usize, w: impl Fn(usize, usize) -> u16 + Sync) -> Self {
        Self {
            fwd: Packed::new(inp, out, |kk, j| w(j, kk)),
        }
    }
}

impl Format for PackedBf16 {
    fn dims(&self) -> (usize, usize) {
        let (k, n) = self.fwd.dims();
        (n, k)
    }

    fn dtype(&self) -> DType {
        DType::BF16
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn bytes(&self) -> usize {
        self.fwd.bytes()
    }

    fn describe(&self) -> String {
        format!("bf16, packed for the {} GEMM", self.fwd.kernel().name())
    }

    fn cpu_kernels(&self) -> bool {
        true
    }

    fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        Ok(bf16::mm_new(x, m, &self.fwd, 1.0))
    }

    fn input_grad(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
        Ok(bf16::mm_new(g, m, &self.fwd.transposed(), 1.0))
    }

    /// Packs `W + scale · b · a` straight from these panels: no unpacked copy of `W` (merging
    /// every adapter of a 7B model stays within one weight's packing of extra memory).
    fn merged(&self, b: &Tensor, a: &Tensor, scale: f64) -> Result<Option<FrozenWeight>> {
        let (o, i) = self.dims();
        let (bo, r) = b.dims2()?;
        let (ra, ai) = a.dims2()?;
        if bo != o || ai != i || ra != r {
            candle_core::bail!("merging an adapter {bo}×{r} · {ra}×{ai} into a {o}×{i} weight");
        }
        let f32s = |t: &Tensor| -> Result<Vec<f32>> {
            t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()
        };
        // `bᵀ [r, out]`, `a [r, in]`.
        let bt = f32s(&b.t()?.contiguous()?)?;
        let av = f32s(a)?;
        let scale = scale as f32;
        let fwd = Packed::with_kernel(self.fwd.kernel(), i, o, |kk, j| {
            let mut d = 0f32;
            for q in 0..r {
                d += bt[q * o + j] * av[q * i + kk];
            }
            bf16::to_bf16(bf16::from_bf16(self.fwd.get(kk, j)) + d * scale)
        });
        Ok(Some(FrozenWeight::from(PackedBf16 { fwd })))
    }

    /// Read from the panels row by row (a packed table is never unpacked whole).
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        use rayon::prelude::*;
        let (o, i) = self.dims();
        if let Some(&bad) = ids.iter().find(|&&r| r as usize >= o) {
            candle_core::bail!("row {bad} of a {o}-row weight");
        }
        let mut v = vec![half::bf16::ZERO; ids.len() * i];
        v.par_chunks_mut(i.max(1))
            .zip(ids.par_iter())
            .for_each(|(row, &r)| {
                for (c, x) in row.iter_mut().enumerate() {
                    *x = half::bf16::from_bits(self.fwd.get(c, r as usize));
                }
            });
        Tensor::from_vec(v, (ids.len(), i), &Device::Cpu)
    }

    fn tensor(&self) -> Result<Tensor> {
        use rayon::prelude::*;
        let (o, i) = self.dims();
        let mut v = vec![half::bf16::ZERO; o * i];
        v.par_chunks_mut(i.max(1)).enumerate().for_each(|(r, row)| {
            for (c, x) in row.iter_mut().enumerate() {
                *x = half::bf16::from_bits(self.fwd.get(c, r));
            }
        });
        Tensor::from_vec(v, (o, i), &Device::Cpu)
    }
}
