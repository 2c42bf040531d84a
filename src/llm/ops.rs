//! The decoder's building blocks, each with a differentiable composed version (any device, any
//! dtype: CUDA, bf16, the f64 gradient checks) and, for f32 on the CPU, a fused op with a
//! hand-written backward. candle 0.11's own `rms_norm`, `softmax_last_dim` and `rope` have no
//! backward (they silently cut the graph), and its matmul backward also computes the gradient of
//! frozen weights; the fused ops here return only what training needs.

use super::kernels;
use crate::kernels::dropout::Dropout;
use crate::kernels::fused;
use crate::kernels::nn::matmul_t;
use crate::kernels::simd::dot;
use crate::kernels::slice::{f32_slice, host_vec};
use crate::kernels::weight::FrozenWeight;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use std::sync::{Arc, OnceLock};

// ---------------------------------------------------------------------------------------------
// Projections: frozen `W` (no gradient), optional LoRA.

/// Whether the fused kernel takes `x` and the frozen `w` (a format that multiplies f32
/// activations on the CPU).
fn fused_weight(x: &Tensor, w: &FrozenWeight) -> bool {
    fused(&[x]) && w.cpu_kernels()
}

/// `x W^T (+ b)` for a frozen `W [out, in]` in any [`FrozenWeight`] format. Off the fused path
/// `W` is taken as a tensor ([`FrozenWeight::tensor`]) and converted to `x`'s dtype.
pub fn frozen_linear(x: &Tensor, w: &FrozenWeight, b: Option<&Tensor>) -> Result<Tensor> {
    if fused_weight(x, w) && b.is_none_or(|b| fused(&[b])) {
        return x.contiguous()?.apply_op1(kernels::Linear {
            w: w.clone(),
            bias: b.cloned(),
            scale: 0.0,
            drop: None,
        });
    }
    let b = b.map(|b| b.to_dtype(x.dtype())).transpose()?;
    // Frozen: the input's gradient only (candle's matmul backward would also compute W's).
    w.linear(x, b.as_ref())
}

/// `x W^T (+ b)` for a `W` that may itself be trained (a tensor in the autograd graph): the plain
/// differentiable product, or the frozen path when `W` tracks no gradient.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !w.track_op() && b.is_none_or(|b| !b.track_op()) {
        return frozen_linear(x, &FrozenWeight::plain(w.clone())?, b);
    }
    let y = matmul_t(x, w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x W^T (+ b) + scale · (dropout(x) A^T) B^T`: a frozen projection with a LoRA adapter `A [r, in]`,
/// `B [out, r]`; `dropout` (training) draws a fresh mask.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear(
    x: &Tensor,
    w: &FrozenWeight,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    scale: f64,
    dropout: &mut Option<&mut Dropout>,
) -> Result<Tensor> {
    let active = dropout.as_deref().filter(|d| d.p > 0.0).is_some();
    if fused_weight(x, w) && fused(&[a, bm]) && b.is_none_or(|b| fused(&[b])) {
        let drop = match dropout {
            Some(d) if active => Some(kernels::DropMask {
                keep: Arc::new(d.keep_flags_for(x.dims())?),
                scale: d.scale(),
            }),
            _ => None,
        };
        let op = kernels::Linear {
            w: w.clone(),
            bias: b.cloned(),
            scale: scale as f32,
            drop,
        };
        return x.contiguous()?.apply_op3(a, bm, op);
    }
    let y = frozen_linear(x, w, b)?;
    let dt = a.dtype();
    let xin = x.to_dtype(dt)?;
    let xin = match dropout {
        Some(d) if active => d.apply_parallel(&xin)?,
        _ => xin,
    };
    let delta = matmul_t(&(matmul_t(&xin, a)? * scale)?, bm)?;
    let delta = delta.to_dtype(y.dtype())?;
    y + delta
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: `x / sqrt(mean(x²) + eps) · w`.

struct RmsNormOp {
    eps: f32,
}

impl RmsNormOp {
    fn rstd(&self, row: &[f32]) -> f32 {
        1.0 / (dot(row, row) / row.len() as f32 + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms-norm")?;
        let w = f32_slice(s2, l2, "rms-norm")?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(w.len()) {
            let r = self.rstd(row);
            out.extend(row.iter().zip(w).map(|(v, g)| v * r * g));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, gv) = (host_vec(x)?, host_vec(w)?, host_vec(grad)?);
        let h = wv.len();
        let mut dx = Vec::with_capacity(xv.len());
        let mut dw = vec![0f32; h];
        let mut gw = vec![0f32; h];
        for (row, g) in xv.chunks_exact(h).zip(gv.chunks_exact(h)) {
            let r = self.rstd(row);
            for i in 0..h {
                gw[i] = g[i] * wv[i];
                dw[i] += g[i] * row[i] * r;
            }
            // dx = r·gw − x · r³ · mean(gw · x)
            let m = dot(&gw, row) / h as f32 * r * r * r;
            dx.extend((0..h).map(|i| r * gw[i] - row[i] * m));
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            // A frozen weight gets no gradient.
            w.track_op()
                .then(|| Tensor::from_vec(dw, w.shape(), dev))
                .transpose()?,
        ))
    }
}

/// RMSNorm over the last dimension: the fused kernel for f32 on the CPU; candle's own kernel (one
/// pass on any device, f32 statistics) when nothing needs a gradient (generation, scoring, frozen
/// layers); the differentiable composition otherwise.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, w]) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 })
    } else if no_grad_half_or_f32(&[x, w]) && w.rank() == 1 {
        candle_nn::ops::rms_norm(&x.contiguous()?, &w.contiguous()?, eps as f32)
    } else {
        rms_norm_composed(x, w, eps)
    }
}

/// Whether `ts` share one dtype that candle's fused inference kernels take (f32, bf16, f16) and
/// none of them is part of an autograd graph.
fn no_grad_half_or_f32(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    matches!(dt, DType::F32 | DType::BF16 | DType::F16)
        && ts.iter().all(|t| t.dtype() == dt && !t.track_op())
}

pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    // Normalised in f32 (f64 stays f64 for the gradient checks), as transformers does.
    let xf = x.to_dtype(if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    })?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dt)?;
    if w.track_op() {
        y.broadcast_mul(w)
    } else {
        // A frozen weight: no gradient for it (candle's multiply backward would make one).
        crate::kernels::frozen::scale(&y, w)
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (Hugging Face's half-split layout) on `[B, T, heads, head_dim]`, with a
// position per (row, step).

/// Cosines and sines for each (row, step): `[B·T, head_dim/2]` each. The composed path's device
/// tensors are made once per forward pass (every layer shares the table).
#[derive(Clone)]
pub struct RopeTable {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub half: usize,
    on_device: Arc<OnceLock<(Tensor, Tensor)>>,
}

impl RopeTable {
    pub fn new(inv_freq: &[f64], positions: &[usize]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                // Angles in f32 as transformers computes them (positions·inv_freq in f32).
                let a = (p as f32) * (f as f32);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            half,
            on_device: Arc::default(),
        }
    }

    /// `[B, T, 1, half]` tensors for the composed path.
    fn tensors(
        &self,
        b: usize,
        t: usize,
        dt: DType,
        dev: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        if let Some((c, s)) = self.on_device.get() {
            if c.dtype() == dt && c.device().same_device(dev) && c.dims()[..2] == [b, t] {
                return Ok((c.clone(), s.clone()));
            }
        }
        let c = Tensor::from_slice(&self.cos, (b, t, 1, self.half), dev)?.to_dtype(dt)?;
        let s = Tensor::from_slice(&self.sin, (b, t, 1, self.half), dev)?.to_dtype(dt)?;
        let _ = self.on_device.set((c.clone(), s.clone()));
        Ok((c, s))
    }
}

/// Rotates `[B, T, H, d]` and writes it heads-first, `[B, H, T, d]` (backward: the inverse).
struct RopeOp {
    table: RopeTable,
}

impl RopeOp {
    /// `forward`: `x [B, T, H, d]` → `[B, H, T, d]` rotated by +θ; else `x [B, H, T, d]` →
    /// `[B, T, H, d]` rotated by −θ.
    fn apply(
        &self,
        x: &[f32],
        (b, t, h, d): (usize, usize, usize, usize),
        forward: bool,
    ) -> Vec<f32> {
        let half = self.table.half;
        let mut out = vec![0f32; x.len()];
        let sign = if forward { 1.0 } else { -1.0 };
        for bi in 0..b {
            for ti in 0..t {
                let bt = bi * t + ti;
                let cos = &self.table.cos[bt * half..][..half];
                let sin = &self.table.sin[bt * half..][..half];
                for hi in 0..h {
                    let tf = (bt * h + hi) * d;
                    let hf = ((bi * h + hi) * t + ti) * d;
                    let (src, dst) = if forward { (tf, hf) } else { (hf, tf) };
                    let (x1, x2) = x[src..src + d].split_at(half);
                    let (o1, o2) = out[dst..dst + d].split_at_mut(half);
                    for i in 0..half {
                        let sn = sign * sin[i];
                        o1[i] = x1[i] * cos[i] - x2[i] * sn;
                        o2[i] = x2[i] * cos[i] + x1[i] * sn;
                    }
                }
            }
        }
        out
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope")?;
        let dims = l.shape().dims4()?;
        let (b, t, h, d) = dims;
        Ok((
            CpuStorage::F32(self.apply(x, dims, true)),
            Shape::from((b, h, t, d)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = x.dims4()?;
        let g = self.apply(&host_vec(grad)?, dims, false);
        Ok(Some(Tensor::from_vec(g, x.shape(), x.device())?))
    }
}

/// Rotates `x [B, T, heads, head_dim]` by the table's angles and returns it heads-first,
/// `[B, heads, T, head_dim]` (contiguous).
pub fn rope(x: &Tensor, table: &RopeTable) -> Result<Tensor> {
    let (b, t, _, d) = x.dims4()?;
    if fused(&[x]) {
        return x.contiguous()?.apply_op1(RopeOp {
            table: table.clone(),
        });
    }
    let (cos, sin) = table.tensors(b, t, x.dtype(), x.device())?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    // The tables are constants: products whose backward gives only `x` its gradient.
    let by = crate::kernels::frozen::scale;
    let o1 = (by(&x1, &cos)? - by(&x2, &sin)?)?;
    let o2 = (by(&x2, &cos)? + by(&x1, &sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)?
        .transpose(1, 2)?
        .contiguous()
}

/// `silu(g) · u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fused(&[g, u]) && g.dims() == u.dims() {
        return g.contiguous()?.apply_op2(&u.contiguous()?, kernels::SwiGlu);
    }
    g.silu()? * u
}

/// Grouped-query attention over `q [B, heads, T, d]` and `k, v [B, kv_heads, K, d]` with the
/// mask's allowed pattern; returns `[B, T, heads·d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    if fused(&[q, k, v]) {
        let op = kernels::Attention {
            allowed: mask.allowed.clone(),
            scale: scale as f32,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    // The query heads sharing a KV head are stacked along the query axis, [B, kv, rep·T, d].
    let qg = q.reshape((b, nkv, rep * t, d))?;
    let scores = qg.matmul(&k.t()?)?;
    let probs = masked_softmax(&scores, mask, scale)?;
    probs
        .matmul(v)?
        .reshape((b, nh, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, nh * d))
}

// ---------------------------------------------------------------------------------------------
// Masked, scaled softmax over attention scores `[B, G, Q, K]` with a per-row `[B, Q, K]`
// allowed-pattern (causal + padding), shared by the G head groups.

#[derive(Clone)]
pub struct AttnMask {
    /// `[B, Q, K]`, 1 where the query may attend the key.
    pub allowed: Arc<Vec<u8>>,
    pub b: usize,
    pub q: usize,
    pub k: usize,
    /// The composed path's additive f32 mask on the device, made once per forward pass.
    pub on_device: Arc<OnceLock<Tensor>>,
}

impl AttnMask {
    pub fn new(allowed: Vec<u8>, b: usize, q: usize, k: usize) -> Self {
        AttnMask {
            allowed: Arc::new(allowed),
            b,
            q,
            k,
            on_device: Arc::default(),
        }
    }

    /// Additive `[B, 1, Q, K]` f32 mask (0 or -inf) for the composed path.
    fn additive(&self, dev: &candle_core::Device) -> Result<Tensor> {
        if let Some(m) = self.on_device.get().filter(|m| m.device().same_device(dev)) {
            return Ok(m.clone());
        }
        let v: Vec<f32> = self
            .allowed
            .iter()
            .map(|&a| if a != 0 { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let m = Tensor::from_vec(v, (self.b, 1, self.q, self.k), dev)?;
        let _ = self.on_device.set(m.clone());
        Ok(m)
    }
}

/// `softmax(scores · scale + mask)` over the last dimension of `[B, G, Q, K]`, composed (the
/// composed attention's; the fused attention kernel computes its own probabilities). Half
/// precision scores are normalised in f32, as transformers does, and the result cast back.
fn masked_softmax(scores: &Tensor, mask: &AttnMask, scale: f64) -> Result<Tensor> {
    let dt = scores.dtype();
    let work = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let m = mask.additive(scores.device())?.to_dtype(work)?;
    let s = (scores.to_dtype(work)? * scale)?.broadcast_add(&m)?;
    candle_nn::ops::softmax(&s, D::Minus1)?.to_dtype(dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn var(n: usize, shape: &[usize], k: f32) -> Var {
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * k).sin() * 1.3).collect();
        Var::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn grads(loss: &Tensor, vars: &[&Var]) -> Vec<Vec<f32>> {
        let g = loss.backward().unwrap();
        let mut out = vec![vec![loss.to_scalar::<f32>().unwrap()]];
        for v in vars {
            out.push(host_vec(g.get(v.as_tensor()).unwrap()).unwrap());
        }
        out
    }

    fn close(a: &[Vec<f32>], b: &[Vec<f32>]) {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.len(), y.len());
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() < 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
    }

    fn coef(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).cos()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn inference_rms_norm_in_bf16_matches_the_composition() {
        // Nothing tracks a gradient: candle's kernel (the path of bf16 and CUDA generation).
        let x = Tensor::from_vec(
            (0..96)
                .map(|i| ((i * 7 % 19) as f32 - 9.0) / 4.0)
                .collect::<Vec<_>>(),
            (2, 3, 16),
            &Device::Cpu,
        )
        .unwrap();
        let w = Tensor::from_vec(
            (0..16).map(|i| 0.5 + i as f32 / 16.0).collect::<Vec<_>>(),
            16,
            &Device::Cpu,
        )
        .unwrap();
        let want = host_vec(&rms_norm_composed(&x, &w, 1e-5).unwrap()).unwrap();
        let (xb, wb) = (
            x.to_dtype(DType::BF16).unwrap(),
            w.to_dtype(DType::BF16).unwrap(),
        );
        assert!(no_grad_half_or_f32(&[&xb, &wb]));
        let got = rms_norm(&xb, &wb, 1e-5).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let got = host_vec(&got.to_dtype(DType::F32).unwrap()).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-2 * (1.0 + w.abs()), "{g} vs {w}");
        }
        // A variable's graph keeps the differentiable path.
        let v = Var::from_tensor(&xb).unwrap();
        assert!(!no_grad_half_or_f32(&[v.as_tensor(), &wb]));
    }

    #[test]
    fn fused_rms_norm_matches_composed() {
        let (x, w) = (var(24, &[2, 3, 4], 0.7), var(4, &[4], 1.9));
        let c = coef(&[2, 3, 4]);
        let a = grads(
            &(rms_norm(&x, &w, 1e-5).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap(),
            &[&x, &w],
        );
        let b = grads(
            &(rms_norm_composed(&x, &w, 1e-5).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap(),
            &[&x, &w],
        );
        close(&a, &b);
    }

    #[test]
    fn fused_rope_matches_composed() {
        let x = var(2 * 3 * 2 * 8, &[2, 3, 2, 8], 0.3);
        let t = RopeTable::new(&[1.0, 0.1, 0.01, 0.001], &[0, 1, 2, 5, 6, 7]);
        let c = coef(&[2, 2, 3, 8]);
        let a = grads(
            &(rope(&x, &t).unwrap() * &c).unwrap().sum_all().unwrap(),
            &[&x],
        );
        // The composed path runs on f64 and is compared after conversion.
        let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let y = rope(&x64, &t).unwrap();
        let l = (y * c.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = l.backward().unwrap();
        let b = vec![
            vec![l.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()],
            host_vec(
                &g.get(x64.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
            .unwrap(),
        ];
        close(&a, &b);
    }

    /// The fused attention works in blocks of query rows that stop at their last attended key:
    /// with several blocks per head (T > 32), a cached prefix (K > T), a padded row, a row whose
    /// first block attends nothing but the cache, and grouped heads, its output and the gradients
    /// of q, k and v equal the composed (full T × K) attention's.
    #[test]
    fn fused_attention_in_row_blocks_matches_composed() {
        let (b, nh, nkv, t, d) = (2, 4, 2, 70, 8);
        let (rep, past) = (nh / nkv, 5);
        let kl = past + t;
        let mut allowed = Vec::with_capacity(b * rep * t * kl);
        for bi in 0..b {
            // Row 1: its last 20 positions are padding (their keys are never attended).
            let len = if bi == 0 { t } else { t - 20 };
            for _ in 0..rep {
                for i in 0..t {
                    allowed.extend((0..kl).map(|j| {
                        let key_ok = j < past || j - past < len;
                        // Row 1 does not see the cache.
                        let cache_ok = bi == 0 || j >= past;
                        u8::from(key_ok && cache_ok && j <= past + i)
                    }));
                }
            }
        }
        let mask = AttnMask::new(allowed, b, rep * t, kl);
        let q = var(b * nh * t * d, &[b, nh, t, d], 0.31);
        let k = var(b * nkv * kl * d, &[b, nkv, kl, d], 0.17);
        let v = var(b * nkv * kl * d, &[b, nkv, kl, d], 0.23);
        let c = coef(&[b, t, nh * d]);
        let run = |fused_path: bool| {
            crate::kernels::with_fused(fused_path, || {
                let y =
                    attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.35).unwrap();
                let l = (y * &c).unwrap().sum_all().unwrap();
                grads(&l, &[&q, &k, &v])
            })
        };
        close(&run(true), &run(false));
    }

    #[test]
    fn fused_frozen_linear_matches_composed() {
        let (b, g, q, k) = (2, 3, 4, 4);
        let allowed: Vec<u8> = (0..b * q * k)
            .map(|i| {
                let (bi, qi, ki) = (i / (q * k), (i / k) % q, i % k);
                u8::from(ki <= qi && ki < 3 - bi)
            })
            .collect();
        let mask = AttnMask::new(allowed, b, q, k);
        let x = var(b * g * q * k, &[b, g, q, k], 0.9);
        let w = var(5 * k, &[5, k], 0.4).as_tensor().detach();
        let c = coef(&[b, g, q, 5]);
        let run = |fused_path: bool| {
            let p = masked_softmax(&x, &mask, 0.5).unwrap();
            let y = if fused_path {
                // The weight kept transposed gives the same product as the plain one.
                let wt = FrozenWeight::new(w.clone()).unwrap();
                let a = frozen_linear(&p, &wt, None).unwrap();
                let b = frozen_linear(&p, &FrozenWeight::plain(w.clone()).unwrap(), None).unwrap();
                close(&[host_vec(&a).unwrap()], &[host_vec(&b).unwrap()]);
                a
            } else {
                matmul_t(&p, &w).unwrap()
            };
            let l = (y * &c).unwrap().sum_all().unwrap();
            let gr = l.backward().unwrap();
            vec![
                vec![l.to_scalar::<f32>().unwrap()],
                host_vec(gr.get(x.as_tensor()).unwrap()).unwrap(),
            ]
        };
        close(&run(true), &run(false));
        // A weight that is a variable still gets its gradient (the plain path).
        let wv = Var::from_tensor(&w).unwrap();
        let p = masked_softmax(&x, &mask, 0.5).unwrap();
        let l = linear(&p, wv.as_tensor(), None).unwrap().sum_all().unwrap();
        assert!(l.backward().unwrap().get(wv.as_tensor()).is_some());
    }
}
