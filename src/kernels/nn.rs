//! Layers both model families share, each a fused CPU (f32) op with a hand-written backward and
//! a composed fallback for other devices and dtypes: `x Wᵀ` over flattened leading dims, trailing
//! adds (biases, positional tables), LayerNorm, row sums, and the deterministic trainable affine
//! map (the projector's layers).

use super::fused;
use super::gemm::{mm, mm_new};
use super::simd::{column_sums, dot, sum};
use super::slice::{cpu_tensor, f32_slice, host_vec, with_all};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Rows of `table` for the ids in `ids` (any shape): `[.., hidden]`.
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    let flat = ids.flatten_all()?;
    let rows = table.index_select(&flat, 0)?;
    dims.push(table.dim(1)?);
    rows.reshape(dims)
}

/// `x [.., in] @ w^T` for `w [out, in]`, as one 2-D matmul over the flattened leading dims (a
/// broadcast batched matmul would materialise a per-row copy of `w`'s gradient).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.t()?;
    if x.rank() == 2 {
        return x.matmul(&w);
    }
    let mut dims = x.dims().to_vec();
    let inp = dims.pop().expect("rank >= 1");
    let y = x.reshape(((), inp))?.matmul(&w)?;
    dims.push(w.dim(1)?);
    y.reshape(dims)
}

/// `x + b` where `b`'s shape is a suffix of `x`'s (a bias, a positional table).
struct AddTrailing;

impl CustomOp2 for AddTrailing {
    fn name(&self) -> &'static str {
        "add-trailing"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "add-trailing")?;
        let b = f32_slice(s2, l2, "add-trailing")?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(b.len()) {
            out.extend(row.iter().zip(b).map(|(a, c)| a + c));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sums = column_sums(&host_vec(grad)?, b.elem_count());
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(sums, b.shape(), b.device())?),
        ))
    }
}

/// `x + b`, `b`'s shape a suffix of `x`'s.
pub fn add_trailing(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (xd, bd) = (x.dims(), b.dims());
    let suffix = bd.len() <= xd.len() && xd[xd.len() - bd.len()..] == *bd;
    if suffix && fused(&[x, b]) {
        x.contiguous()?.apply_op2(&b.contiguous()?, AddTrailing)
    } else {
        x.broadcast_add(b)
    }
}

/// LayerNorm over the last dimension (biased variance, as PyTorch), fused forward and backward.
struct LayerNormOp {
    eps: f32,
}

/// Per-row normalised values and reciprocal standard deviations.
fn normalise(x: &[f32], h: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut xhat = Vec::with_capacity(x.len());
    let mut rstd = Vec::with_capacity(x.len() / h);
    let mut centred = vec![0f32; h];
    for row in x.chunks_exact(h) {
        let mean = sum(row) / h as f32;
        for (c, v) in centred.iter_mut().zip(row) {
            *c = v - mean;
        }
        let var = dot(&centred, &centred) / h as f32;
        let r = 1.0 / (var + eps).sqrt();
        rstd.push(r);
        xhat.extend(centred.iter().map(|c| c * r));
    }
    (xhat, rstd)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer-norm")?;
        let w = f32_slice(s2, l2, "layer-norm")?;
        let b = f32_slice(s3, l3, "layer-norm")?;
        let h = w.len();
        let (mut y, _) = normalise(x, h, self.eps);
        for row in y.chunks_exact_mut(h) {
            for ((v, wi), bi) in row.iter_mut().zip(w).zip(b) {
                *v = *v * wi + bi;
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let xs = host_vec(x)?;
        let ws = host_vec(w)?;
        let g = host_vec(grad)?;
        let (xhat, rstd) = normalise(&xs, h, self.eps);
        let mut gx = vec![0f32; xs.len()];
        let mut gw = vec![0f32; h];
        let gb = column_sums(&g, h);
        for (r, ((gr, xr), out)) in g
            .chunks_exact(h)
            .zip(xhat.chunks_exact(h))
            .zip(gx.chunks_exact_mut(h))
            .enumerate()
        {
            let mut mean_gxhat = 0f32;
            let mut mean_gxhat_x = 0f32;
            for i in 0..h {
                let gxh = gr[i] * ws[i];
                gw[i] += gr[i] * xr[i];
                mean_gxhat += gxh;
                mean_gxhat_x += gxh * xr[i];
            }
            mean_gxhat /= h as f32;
            mean_gxhat_x /= h as f32;
            for i in 0..h {
                out[i] = rstd[r] * (gr[i] * ws[i] - mean_gxhat - xr[i] * mean_gxhat_x);
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), dev)?),
            Some(Tensor::from_vec(gw, w.shape(), dev)?),
            Some(Tensor::from_vec(gb, b.shape(), dev)?),
        ))
    }
}

/// LayerNorm of `x` over its last dimension with weight `w` and bias `b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, w, b]) && x.dim(D::Minus1)? == w.elem_count() {
        return x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNormOp { eps: eps as f32 },
        );
    }
    layer_norm_composed(x, w, b, eps)
}

/// The same LayerNorm from differentiable primitives (any device).
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(w)?.broadcast_add(b)
}

/// The sum of each last-dimension row of `t` (`[.., H]` → flat `[..]`), on the host.
pub fn row_sums(t: &Tensor) -> Result<Vec<f32>> {
    if fused(&[t]) {
        let h = t.dim(D::Minus1)?;
        let (s, l) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*s {
            if let Ok(x) = f32_slice(cpu, l, "row-sums") {
                return Ok(x.chunks_exact(h).map(sum).collect());
            }
        }
    }
    t.sum(D::Minus1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// `x Wᵀ + b` for a trainable `W [out, in]` and `b [out]` over `x [M, in]`: the deterministic
/// [`Affine`] kernel for f32 on the CPU, candle's ops elsewhere.
pub fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused(&[x, w, b]) && x.rank() == 2 {
        return x.contiguous()?.apply_op3(w, b, Affine);
    }
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// A trainable `y = x Wᵀ + b` over `x [M, in]`, `W [out, in]`, `b [out]` with the deterministic
/// row-blocked matmuls above (candle's own matmul is multi-threaded by gemm, whose bits vary from
/// run to run).
pub struct Affine;

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            f32_slice(s1, l1, "affine")?,
            f32_slice(s2, l2, "affine")?,
            f32_slice(s3, l3, "affine")?,
        );
        let (m, i) = l1.shape().dims2()?;
        let o = b.len();
        let mut y = vec![0f32; m * o];
        for row in y.chunks_exact_mut(o) {
            row.copy_from_slice(b);
        }
        mm(&mut y, x, w, m, o, i, false, true, true, 1.0);
        Ok((CpuStorage::F32(y), Shape::from((m, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, i) = x.dims2()?;
        let o = b.elem_count();
        let (dx, dw, db) = with_all(&[x, w, grad], |s| {
            let (xv, wv, gv) = (s[0], s[1], s[2]);
            let dx = mm_new(gv, wv, m, i, o, false, false, 1.0);
            let dw = mm_new(gv, xv, o, i, m, true, false, 1.0);
            (dx, dw, column_sums(gv, o))
        })?;
        Ok((
            Some(cpu_tensor(dx, x.shape())?),
            Some(cpu_tensor(dw, w.shape())?),
            Some(cpu_tensor(db, b.shape())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn grads_of(f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>) -> Vec<Vec<f32>> {
        let dev = Device::Cpu;
        let x = Var::from_vec(
            (0..60)
                .map(|i| ((i * 7 % 13) as f32 * 0.3).sin())
                .collect::<Vec<_>>(),
            (3, 4, 5),
            &dev,
        )
        .unwrap();
        let w = Var::from_vec(vec![0.5f32, -1.0, 2.0, 0.3, 1.1], 5, &dev).unwrap();
        let b = Var::from_vec(vec![0.1f32, 0.2, -0.3, 0.0, 0.7], 5, &dev).unwrap();
        let coef = Tensor::from_vec(
            (0..60).map(|i| (i as f32 * 0.1).cos()).collect::<Vec<_>>(),
            (3, 4, 5),
            &dev,
        )
        .unwrap();
        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let loss = (y * coef).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let mut out = vec![vec![loss.to_scalar::<f32>().unwrap()]];
        for v in [&x, &w, &b] {
            out.push(
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
        }
        out
    }

    fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>]) {
        for (x, y) in a.iter().zip(b) {
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
    }

    #[test]
    fn fused_layer_norm_matches_composed() {
        assert_close(
            &grads_of(|x, w, b| layer_norm(x, w, b, 1e-5)),
            &grads_of(|x, w, b| layer_norm_composed(x, w, b, 1e-5)),
        );
    }

    #[test]
    fn row_sums_match_candle() {
        let x = Tensor::from_vec(
            (0..24).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
            (2, 3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let want: Vec<f32> = x
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = row_sums(&x).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(got.len(), 6);
    }

    #[test]
    fn add_trailing_matches_broadcast_add() {
        assert_close(
            &grads_of(|x, w, b| add_trailing(&add_trailing(x, w)?, b)),
            &grads_of(|x, w, b| x.broadcast_add(w)?.broadcast_add(b)),
        );
    }
}
