//! A frozen weight held as a candle tensor: any device and dtype (CUDA, the composed path), and on
//! the CPU in f32 as its transpose `Wᵀ [in, out]`, which the f32 GEMM packs with vector loads (a
//! `[out, in]` right-hand side is packed element by element: a fifth of a prefill's time). The
//! input gradient `g · W` then transposes it back per call into a buffer that lives for that call.

use super::Format;
use crate::kernels::gemm::mm_new;
use crate::kernels::slice::with;
use candle_core::{DType, Device, Result, Tensor};

pub struct Dense {
    /// `W [out, in]`, or with `transposed` a contiguous CPU f32 `Wᵀ [in, out]`.
    t: Tensor,
    /// `W [out, in]`: `t` itself, or its transposed view (the same storage, one tensor id for every
    /// [`Format::tensor`] call).
    view: Tensor,
    transposed: bool,
}

impl Dense {
    /// `w [out, in]` as it is.
    pub fn plain(w: Tensor) -> Result<Self> {
        w.dims2()?;
        Ok(Dense {
            view: w.clone(),
            t: w,
            transposed: false,
        })
    }

    /// A CPU f32 `w [out, in]` kept as its contiguous transpose (the only copy once `w` is
    /// dropped).
    pub fn transposed(w: &Tensor) -> Result<Self> {
        let (o, i) = w.dims2()?;
        if !w.device().is_cpu() || w.dtype() != DType::F32 {
            candle_core::bail!("Dense::transposed: a CPU f32 weight expected");
        }
        let wt = with(w, |v| transpose(v, o, i))?;
        let t = Tensor::from_vec(wt, (i, o), &Device::Cpu)?;
        Ok(Dense {
            view: t.t()?,
            t,
            transposed: true,
        })
    }
}

/// The row-major transpose `[cols, rows]` of a row-major `[rows, cols]`, in 64 × 64 tiles,
/// in parallel over blocks of output rows.
pub fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const T: usize = 64;
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    out.par_chunks_mut(T * rows)
        .enumerate()
        .for_each(|(cb, dst)| {
            let c0 = cb * T;
            let cn = dst.len() / rows;
            for r0 in (0..rows).step_by(T) {
                let rn = (rows - r0).min(T);
                for c in 0..cn {
                    let d = &mut dst[c * rows + r0..][..rn];
                    for (r, x) in d.iter_mut().enumerate() {
                        *x = v[(r0 + r) * cols + c0 + c];
                    }
                }
            }
        });
    out
}

impl Format for Dense {
    fn dims(&self) -> (usize, usize) {
        let d = self.view.dims();
        (d[0], d[1])
    }

    fn dtype(&self) -> DType {
        self.t.dtype()
    }

    fn device(&self) -> Device {
        self.t.device().clone()
    }

    fn bytes(&self) -> usize {
        self.t.elem_count() * self.t.dtype().size_in_bytes()
    }

    fn describe(&self) -> String {
        let dt = format!("{:?}", self.t.dtype()).to_lowercase();
        if self.transposed {
            format!("{dt}, transposed for the f32 GEMM")
        } else {
            dt
        }
    }

    fn cpu_kernels(&self) -> bool {
        self.t.device().is_cpu() && self.t.dtype() == DType::F32
    }

    fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (o, i) = self.dims();
        with(&self.t, |w| {
            mm_new(x, w, m, o, i, false, !self.transposed, 1.0)
        })
    }

    fn input_grad(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
        let (o, i) = self.dims();
        with(&self.t, |w| {
            if self.transposed {
                let w = transpose(w, i, o);
                mm_new(g, &w, m, i, o, false, false, 1.0)
            } else {
                mm_new(g, w, m, i, o, false, false, 1.0)
            }
        })
    }

    fn tensor(&self) -> Result<Tensor> {
        Ok(self.view.clone())
    }

    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(ids, ids.len(), self.t.device())?;
        if self.transposed {
            // Columns of the stored `Wᵀ`.
            self.t.index_select(&idx, 1)?.t()?.contiguous()
        } else {
            self.t.index_select(&idx, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_in_tiles_is_a_transpose() {
        for (r, c) in [(1, 1), (3, 130), (130, 3), (65, 64), (200, 129)] {
            let v: Vec<f32> = (0..r * c).map(|x| x as f32).collect();
            let t = super::transpose(&v, r, c);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], v[i * c + j], "{r}x{c} at {i},{j}");
                }
            }
        }
    }
}
