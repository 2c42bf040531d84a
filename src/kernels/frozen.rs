//! Ops on frozen weights for the composed path (any device, any dtype). candle's matmul backward
//! also computes the gradient of its right operand, and its multiply backward that of both: for a
//! frozen weight that is GEMM work and memory nobody reads (a 7B backbone's projections: ~13 GB of
//! gradients and half again the GEMMs of a step). Here the result is computed outside the autograd
//! graph with the device's own ops, and one op joins it back to the input; that op's backward
//! returns the input's gradient only, written as tensor ops, so it runs on every device.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Joins `y` (computed from `x` outside the graph) back to `x`: the forward is `y`; the backward
/// maps `dy` to `dx` with `input_grad`; nothing flows to `y`.
struct InputGradOnly<F> {
    name: &'static str,
    input_grad: F,
}

impl<F: Fn(&Tensor) -> Result<Tensor> + Send + Sync> CustomOp2 for InputGradOnly<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            super::slice::copy_cpu(s2, l2, "frozen op")?,
            l2.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        // `y` is a fresh contiguous result (see `join`), so its whole buffer is the tensor.
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.input_grad)(grad)?), None))
    }
}

/// `y` with `x`'s gradient `input_grad(dy)`; `y` as is when `x` is not part of a graph.
pub(crate) fn join(
    x: &Tensor,
    y: Tensor,
    name: &'static str,
    input_grad: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    // `y` is the fresh result of the caller's ops (its storage is exactly the tensor, which the
    // CUDA forward copies whole).
    x.apply_op2(&y.contiguous()?, InputGradOnly { name, input_grad })
}

/// `x Wᵀ` over `x [M, in]` for a frozen `W [out, in]`: the forward is the device's own matmul
/// (candle's backend, on the storages), the backward `dy · W` for `x` only. Unlike [`join`] it
/// keeps no second copy of the output alive for the backward pass.
struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    /// `(M, out, in)` and `Wᵀ`'s layout.
    fn dims(&self, l: &Layout, wl: &Layout) -> Result<(usize, usize, usize, Layout)> {
        let (m, k) = l.shape().dims2()?;
        let (n, kw) = self.w.dims2()?;
        if k != kw {
            candle_core::bail!("frozen-matmul: input width {k}, weight [{n}, {kw}]");
        }
        Ok((m, n, k, wl.transpose(0, 1)?))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen-matmul: the weight is not on the input's device");
        };
        let (m, n, k, wt) = self.dims(l, wl)?;
        Ok((s.matmul(ws, (1, m, n, k), l, &wt)?, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen-matmul: the weight is not on the input's device");
        };
        let (m, n, k, wt) = self.dims(l, wl)?;
        Ok((s.matmul(ws, (1, m, n, k), l, &wt)?, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x Wᵀ (+ b)` for a frozen `W [out, in]` and `b [out]` over `x [.., in]`: the device's matmul
/// forward; the backward gives `x` its gradient `dy · W` and nothing else.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !x.track_op() {
        let y = super::nn::matmul_t(x, w)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let mut dims = x.dims().to_vec();
    let inp = dims.pop().unwrap_or(0);
    let y = x
        .reshape(((), inp))?
        .contiguous()?
        .apply_op1(FrozenMatmul { w: w.clone() })?;
    dims.push(w.dim(0)?);
    add_bias(y.reshape(dims)?, b)
}

/// `y + b` for a frozen bias `b [out]` (Qwen2's q/k/v): added outside the graph and joined back,
/// so that it gets no gradient.
pub fn add_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) => {
            let z = y.detach().broadcast_add(b)?;
            join(&y, z, "frozen-bias", |g| Ok(g.clone()))
        }
        None => Ok(y),
    }
}

/// `x · w` with `w` broadcast over the leading dimensions (a norm's frozen weight); the backward
/// gives `x` its gradient `dy · w` and nothing else.
pub fn scale(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_mul(w)?;
    let w = w.clone();
    join(x, y, "frozen-scale", move |g| g.broadcast_mul(&w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn ramp(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * k).collect()
    }

    #[test]
    fn frozen_ops_give_the_input_its_gradient_and_the_weight_none() {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(
                &Tensor::from_vec(ramp(2 * 3 * 5, 0.1), (2, 3, 5), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let w = Tensor::from_vec(ramp(4 * 5, 0.05), (4, 5), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let b = Tensor::from_vec(ramp(4, 0.3), 4, &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let s = Tensor::from_vec(ramp(4, 0.2), 4, &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let c = Tensor::from_vec(ramp(2 * 3 * 4, 0.17), (2, 3, 4), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            // The same function through candle's own ops: the reference.
            let plain = x
                .as_tensor()
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .broadcast_mul(&s)
                .unwrap();
            let ours = scale(&linear(x.as_tensor(), &w, Some(&b)).unwrap(), &s).unwrap();
            let f32v = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let tol = if dt == DType::F32 { 1e-5 } else { 3e-2 };
            let close = |a: &[f32], b: &[f32]| {
                assert_eq!(a.len(), b.len());
                for (p, q) in a.iter().zip(b) {
                    assert!((p - q).abs() <= tol * (1.0 + q.abs()), "{dt:?}: {p} vs {q}");
                }
            };
            close(&f32v(&ours), &f32v(&plain));
            let g_plain = (plain * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ours = (ours * &c).unwrap().sum_all().unwrap().backward().unwrap();
            close(
                &f32v(g_ours.get(x.as_tensor()).unwrap()),
                &f32v(g_plain.get(x.as_tensor()).unwrap()),
            );
            // candle's own backward computes a gradient for W (stored under its transposed
            // view); ours has no weight-shaped gradient at all.
            let shapes = |g: &candle_core::backprop::GradStore| {
                g.get_ids()
                    .map(|id| g.get_id(*id).unwrap().dims().to_vec())
                    .collect::<Vec<_>>()
            };
            assert!(shapes(&g_plain).iter().any(|d| d == &[5, 4]));
            for d in shapes(&g_ours) {
                assert!(
                    d != [5, 4] && d != [4, 5] && d != [4],
                    "{dt:?}: a gradient {d:?}"
                );
            }
            for t in [&w, &b, &s] {
                assert!(
                    g_ours.get(t).is_none(),
                    "{dt:?}: a frozen tensor got a gradient"
                );
            }
        }
        // Without a graph the ops are plain products.
        let x = Tensor::ones((2, 5), DType::F32, &dev).unwrap();
        let w = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
        let y = linear(&x, &w, None).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![5f32; 3]; 2]);
    }
}
