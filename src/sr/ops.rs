//! The recommenders' own fused CPU ops with hand-written backward passes: SASRec's masked
//! attention, GRU4Rec's whole recurrence, Caser's sliding windows. candle's composed versions
//! reduce gradients over leading dimensions through a slow generic path; these do it in one
//! contiguous pass. On other devices (or dtypes) the composed versions are used. The layers the
//! recommenders share with the LLM (LayerNorm, biases, `x Wᵀ`) are in [`crate::kernels::nn`].

use crate::kernels::fused;
use crate::kernels::gemm::mm_serial;
use crate::kernels::simd::{axpy, column_sums, dot, exp_in_place};
use crate::kernels::slice::{f32_slice, host_vec};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};

/// SASRec's masked causal attention, fused: `softmax(mask(Q Kᵀ · scale)) · qmask · dropout · V`
/// for queries `[B, Tq, H]` and keys/values `[B, Tk, H]`. Masked scores are the constant `neg` (as
/// in the original), so a fully masked row is uniform.
pub struct MaskedAttention {
    pub heads: usize,
    pub scale: f32,
    pub neg: f32,
    /// `[B, Tq, Tk]`: 1 where query i may attend key j.
    pub allowed: Vec<f32>,
    /// `[B, Tq]`: the query mask applied after the softmax.
    pub qmask: Vec<f32>,
    /// `[B, heads, Tq, Tk]`: inverted-dropout multipliers on the probabilities, when training.
    pub dropout: Option<Vec<f32>>,
}

/// Sizes of one attention call: batch, query and key lengths, width, heads.
#[derive(Clone, Copy)]
struct SasAttnDims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    nh: usize,
}

impl SasAttnDims {
    fn d(&self) -> usize {
        self.h / self.nh
    }
    /// Offset of head `hi` of query `i` of row `bi` in `[B, Tq, H]`.
    fn q(&self, bi: usize, i: usize, hi: usize) -> usize {
        (bi * self.tq + i) * self.h + hi * self.d()
    }
    /// Offset of head `hi` of key `j` of row `bi` in `[B, Tk, H]`.
    fn k(&self, bi: usize, j: usize, hi: usize) -> usize {
        (bi * self.tk + j) * self.h + hi * self.d()
    }
    /// Start of the probability row of (bi, hi, i) in `[B, heads, Tq, Tk]`.
    fn p(&self, bi: usize, hi: usize, i: usize) -> usize {
        ((bi * self.nh + hi) * self.tq + i) * self.tk
    }
    /// Start of the mask row of (bi, i) in `[B, Tq, Tk]`.
    fn a(&self, bi: usize, i: usize) -> usize {
        (bi * self.tq + i) * self.tk
    }
}

impl MaskedAttention {
    fn dims(&self, q: &Shape, k: &Shape) -> Result<SasAttnDims> {
        let (b, tq, h) = q.dims3()?;
        let (bk, tk, hk) = k.dims3()?;
        if bk != b || hk != h || h % self.heads != 0 {
            candle_core::bail!("masked-attention: queries {q:?} and keys {k:?} do not match");
        }
        if self.allowed.len() != b * tq * tk || self.qmask.len() != b * tq {
            candle_core::bail!("masked-attention: mask sizes do not match {q:?} / {k:?}");
        }
        Ok(SasAttnDims {
            b,
            tq,
            tk,
            h,
            nh: self.heads,
        })
    }

    /// Probabilities (after masks and dropout: the weights applied to V) and the plain softmax.
    fn probs(&self, q: &[f32], k: &[f32], s: SasAttnDims) -> (Vec<f32>, Vec<f32>) {
        let (tk, d) = (s.tk, s.d());
        let mut p = vec![0f32; s.b * s.nh * s.tq * tk];
        let mut pm = vec![0f32; p.len()];
        for bi in 0..s.b {
            for hi in 0..s.nh {
                for i in 0..s.tq {
                    let base = s.p(bi, hi, i);
                    let qrow = &q[s.q(bi, i, hi)..][..d];
                    let allowed = &self.allowed[s.a(bi, i)..][..tk];
                    let row = &mut p[base..base + tk];
                    for j in 0..tk {
                        row[j] = if allowed[j] != 0.0 {
                            dot(qrow, &k[s.k(bi, j, hi)..][..d]) * self.scale
                        } else {
                            self.neg
                        };
                    }
                    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    let qm = self.qmask[bi * s.tq + i];
                    for j in 0..tk {
                        row[j] /= sum;
                        let drop = self.dropout.as_ref().map_or(1.0, |m| m[base + j]);
                        pm[base + j] = row[j] * qm * drop;
                    }
                }
            }
        }
        (p, pm)
    }
}

impl CustomOp3 for MaskedAttention {
    fn name(&self) -> &'static str {
        "masked-attention"
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
        let q = f32_slice(s1, l1, "masked-attention")?;
        let k = f32_slice(s2, l2, "masked-attention")?;
        let v = f32_slice(s3, l3, "masked-attention")?;
        if l2.shape() != l3.shape() {
            candle_core::bail!("masked-attention: keys and values differ in shape");
        }
        let s = self.dims(l1.shape(), l2.shape())?;
        let d = s.d();
        let (_, pm) = self.probs(q, k, s);
        let mut out = vec![0f32; s.b * s.tq * s.h];
        for bi in 0..s.b {
            for hi in 0..s.nh {
                for i in 0..s.tq {
                    let prow = &pm[s.p(bi, hi, i)..][..s.tk];
                    let orow = &mut out[s.q(bi, i, hi)..][..d];
                    for (j, &pj) in prow.iter().enumerate() {
                        if pj != 0.0 {
                            axpy(orow, pj, &v[s.k(bi, j, hi)..][..d]);
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        qt: &Tensor,
        kt: &Tensor,
        vt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.dims(qt.shape(), kt.shape())?;
        let (tk, d) = (s.tk, s.d());
        let (q, k, v, go) = (host_vec(qt)?, host_vec(kt)?, host_vec(vt)?, host_vec(grad)?);
        let (p, pm) = self.probs(&q, &k, s);
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        let mut dp = vec![0f32; tk];
        for bi in 0..s.b {
            for hi in 0..s.nh {
                for i in 0..s.tq {
                    let base = s.p(bi, hi, i);
                    let qoff = s.q(bi, i, hi);
                    let gorow = &go[qoff..][..d];
                    let qm = self.qmask[bi * s.tq + i];
                    // dV += Pmᵀ dO ; dPm = dO Vᵀ ; dP = dPm · qmask · dropout
                    for j in 0..tk {
                        let koff = s.k(bi, j, hi);
                        let pmj = pm[base + j];
                        if pmj != 0.0 {
                            axpy(&mut dv[koff..koff + d], pmj, gorow);
                        }
                        let drop = self.dropout.as_ref().map_or(1.0, |m| m[base + j]);
                        dp[j] = dot(gorow, &v[koff..koff + d]) * qm * drop;
                    }
                    // Softmax backward; masked scores are constants.
                    let prow = &p[base..base + tk];
                    let allowed = &self.allowed[s.a(bi, i)..][..tk];
                    let dot: f32 = prow.iter().zip(&dp).map(|(a, c)| a * c).sum();
                    for j in 0..tk {
                        if allowed[j] == 0.0 {
                            continue;
                        }
                        let ds = prow[j] * (dp[j] - dot) * self.scale;
                        if ds == 0.0 {
                            continue;
                        }
                        let koff = s.k(bi, j, hi);
                        axpy(&mut dq[qoff..qoff + d], ds, &k[koff..koff + d]);
                        axpy(&mut dk[koff..koff + d], ds, &q[qoff..qoff + d]);
                    }
                }
            }
        }
        let dev = qt.device();
        Ok((
            Some(Tensor::from_vec(dq, qt.shape(), dev)?),
            Some(Tensor::from_vec(dk, kt.shape(), dev)?),
            Some(Tensor::from_vec(dv, vt.shape(), dev)?),
        ))
    }
}

/// One row's GRU gates from its input and hidden pre-activations `gi, gh [3·hd]` (PyTorch's r, z, n
/// order): `(r, z, n)` as three `hd`-long slices of `scratch [3·hd]`, with `σ(x) = 1 / (1 + e^-x)`
/// and `tanh(x) = 1 − 2 / (e^{2x} + 1)` through the vectorized [`exp_in_place`].
fn gates<'a>(
    gi: &[f32],
    gh: &[f32],
    hd: usize,
    scratch: &'a mut [f32],
) -> (&'a [f32], &'a [f32], &'a [f32]) {
    let (rz, n) = scratch.split_at_mut(2 * hd);
    for ((e, a), b) in rz.iter_mut().zip(&gi[..2 * hd]).zip(&gh[..2 * hd]) {
        *e = -(a + b);
    }
    exp_in_place(rz);
    rz.iter_mut().for_each(|e| *e = 1.0 / (1.0 + *e));
    for (j, e) in n.iter_mut().enumerate() {
        *e = 2.0 * (gi[2 * hd + j] + rz[j] * gh[2 * hd + j]);
    }
    exp_in_place(n);
    n.iter_mut().for_each(|e| *e = 1.0 - 2.0 / (*e + 1.0));
    let (r, z) = rz.split_at(hd);
    (r, z, n)
}

/// PyTorch's one-layer GRU over whole sequences, fused (recurrence, gates and the hidden-state
/// GEMMs in one op): the input projections `gi = x W_ihᵀ + b_ih` of every step `[B, S, 3H]` (gate
/// order r, z, n), `W_hh [3H, H]` and `b_hh [3H]` → the hidden state after each row's last step
/// `[B, H]`, from a zero state. Row `r` runs `lens[r]` steps. The forward pass keeps its states
/// and hidden pre-activations for the backward pass (which recomputes them if they were taken
/// already), which then runs back through time.
pub struct GruSequence {
    lens: Vec<usize>,
    saved: std::sync::Mutex<Option<Vec<GruTrace>>>,
}

/// The forward recurrence: every step's hidden pre-activations `gh [S, B, 3H]`, the states
/// before each step `hs [S + 1, B, H]` (`hs[S]` is the result) and the gates `[S, B, 3H]` (r, z, n).
fn gru_forward(
    gi: &[f32],
    w: &[f32],
    bias: &[f32],
    lens: &[usize],
    steps: usize,
    hd: usize,
) -> GruTrace {
    let b = lens.len();
    let g3 = 3 * hd;
    let mut gh = vec![0f32; steps * b * g3];
    let mut hs = vec![0f32; (steps + 1) * b * hd];
    let mut gs = vec![0f32; steps * b * g3];
    for t in 0..steps {
        let (before, after) = hs.split_at_mut((t + 1) * b * hd);
        let h = &before[t * b * hd..];
        let next = &mut after[..b * hd];
        let ght = &mut gh[t * b * g3..][..b * g3];
        mm_serial(ght, h, w, b, g3, hd, false, true, false, 1.0);
        for (r, &len) in lens.iter().enumerate() {
            let (hp, hn) = (&h[r * hd..][..hd], &mut next[r * hd..][..hd]);
            if t >= len {
                hn.copy_from_slice(hp);
                continue;
            }
            let ghr = &mut ght[r * g3..][..g3];
            ghr.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
            let slot = &mut gs[(t * b + r) * g3..][..g3];
            let (_, zg, ng) = gates(&gi[(r * steps + t) * g3..][..g3], ghr, hd, slot);
            for j in 0..hd {
                hn[j] = ng[j] + zg[j] * (hp[j] - ng[j]);
            }
        }
    }
    GruTrace { gh, hs, gates: gs }
}

/// What the GRU's forward pass keeps for its backward pass (see [`gru_forward`]).
struct GruTrace {
    gh: Vec<f32>,
    hs: Vec<f32>,
    gates: Vec<f32>,
}

impl GruSequence {
    pub fn new(lens: Vec<usize>) -> Self {
        Self {
            lens,
            saved: std::sync::Mutex::new(None),
        }
    }

    fn dims(&self, gi: &Shape, w: &Shape) -> Result<(usize, usize)> {
        let (b, steps, g3) = gi.dims3()?;
        let (w3, hd) = w.dims2()?;
        if b != self.lens.len() || g3 != w3 || g3 != 3 * hd || self.lens.iter().any(|&l| l > steps)
        {
            candle_core::bail!(
                "gru-sequence: gi {gi:?}, W_hh {w:?} and {} lengths do not match",
                self.lens.len()
            );
        }
        Ok((steps, hd))
    }

    /// The forward recurrence of every [`GRU_BLOCK`]-row block, in parallel, in block order.
    fn forward_blocks(
        &self,
        gi: &[f32],
        w: &[f32],
        bias: &[f32],
        steps: usize,
        hd: usize,
    ) -> Vec<GruTrace> {
        use rayon::prelude::*;
        self.lens
            .par_chunks(GRU_BLOCK)
            .zip(gi.par_chunks(GRU_BLOCK * steps * 3 * hd))
            .map(|(lens, gi)| gru_forward(gi, w, bias, lens, steps, hd))
            .collect()
    }
}

/// Rows per independent block of the recurrence: blocks run in parallel on rayon's threads, and the
/// block size is fixed so that results never depend on the thread count.
const GRU_BLOCK: usize = 64;

/// Back-propagation through time for one block of rows: `dh` is dL/d(final state) for those rows
/// (`[nb, H]`). Returns dL/dgi `[nb, S, 3H]` and every step's dL/dgh `[S, nb, 3H]`.
fn gru_backward(
    trace: &GruTrace,
    w: &[f32],
    lens: &[usize],
    mut dh: Vec<f32>,
    steps: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>) {
    let b = lens.len();
    let g3 = 3 * hd;
    let GruTrace { gh, hs, gates } = trace;
    let mut dgi = vec![0f32; b * steps * g3];
    let mut dgh_all = vec![0f32; steps * b * g3]; // inactive rows stay 0
    for t in (0..steps).rev() {
        let dgh = &mut dgh_all[t * b * g3..][..b * g3];
        let h = &hs[t * b * hd..][..b * hd];
        let ght = &gh[t * b * g3..][..b * g3];
        for (r, &len) in lens.iter().enumerate() {
            if t >= len {
                continue; // the state passes through unchanged
            }
            let dghr = &mut dgh[r * g3..][..g3];
            let o = (r * steps + t) * g3;
            let ghr = &ght[r * g3..][..g3];
            let g = &gates[(t * b + r) * g3..][..g3];
            let (rgs, zgs, ngs) = (&g[..hd], &g[hd..2 * hd], &g[2 * hd..]);
            let dhr = &mut dh[r * hd..][..hd];
            for j in 0..hd {
                let (rg, zg, ng) = (rgs[j], zgs[j], ngs[j]);
                let go = dhr[j];
                let dz = go * (h[r * hd + j] - ng);
                let dn = go * (1.0 - zg);
                dhr[j] = go * zg;
                let dn_pre = dn * (1.0 - ng * ng);
                let dr_pre = dn_pre * ghr[2 * hd + j] * rg * (1.0 - rg);
                let dz_pre = dz * zg * (1.0 - zg);
                dgi[o + j] = dr_pre;
                dgi[o + hd + j] = dz_pre;
                dgi[o + 2 * hd + j] = dn_pre;
                dghr[j] = dr_pre;
                dghr[hd + j] = dz_pre;
                dghr[2 * hd + j] = dn_pre * rg;
            }
        }
        // gh = h W_hhᵀ + b_hh: dh += dgh W_hh (W_hh's gradients are summed over all steps later).
        mm_serial(&mut dh, dgh, w, b, hd, g3, false, false, true, 1.0);
    }
    (dgi, dgh_all)
}

impl CustomOp3 for GruSequence {
    fn name(&self) -> &'static str {
        "gru-sequence"
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
        let (steps, hd) = self.dims(l1.shape(), l2.shape())?;
        let gi = f32_slice(s1, l1, "gru-sequence")?;
        let w = f32_slice(s2, l2, "gru-sequence")?;
        let bias = f32_slice(s3, l3, "gru-sequence")?;
        let b = self.lens.len();
        let traces = self.forward_blocks(gi, w, bias, steps, hd);
        let mut out = Vec::with_capacity(b * hd);
        for (trace, lens) in traces.iter().zip(self.lens.chunks(GRU_BLOCK)) {
            out.extend_from_slice(&trace.hs[steps * lens.len() * hd..]);
        }
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(traces);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, hd))))
    }

    fn bwd(
        &self,
        git: &Tensor,
        wt: &Tensor,
        biast: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let (steps, hd) = self.dims(git.shape(), wt.shape())?;
        let (gi, w, bias) = (host_vec(git)?, host_vec(wt)?, host_vec(biast)?);
        let g3 = 3 * hd;
        let blocks = self.lens.len().div_ceil(GRU_BLOCK);
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let traces: Vec<GruTrace> = match saved {
            Some(t) if t.len() == blocks => t,
            _ => self.forward_blocks(&gi, &w, &bias, steps, hd),
        };
        let go = host_vec(grad)?;
        let parts: Vec<(Vec<f32>, Vec<f32>)> = traces
            .par_iter()
            .zip(self.lens.par_chunks(GRU_BLOCK))
            .zip(go.par_chunks(GRU_BLOCK * hd))
            .map(|((trace, lens), dh)| gru_backward(trace, &w, lens, dh.to_vec(), steps, hd))
            .collect();
        // dW_hh = Σ_t dgh_tᵀ h_t, one GEMM over every (step, row) of each block, blocks in order;
        // db_hh = Σ dgh.
        let mut dgi = Vec::with_capacity(gi.len());
        let mut dw = vec![0f32; w.len()];
        let mut db = vec![0f32; g3];
        for ((dgi_b, dgh_b), (trace, lens)) in parts
            .iter()
            .zip(traces.iter().zip(self.lens.chunks(GRU_BLOCK)))
        {
            dgi.extend_from_slice(dgi_b);
            let rows = steps * lens.len();
            mm_serial(
                &mut dw, dgh_b, &trace.hs, g3, hd, rows, true, false, true, 1.0,
            );
            db.iter_mut()
                .zip(column_sums(dgh_b, g3))
                .for_each(|(d, s)| *d += s);
        }
        let dev = git.device();
        Ok((
            Some(Tensor::from_vec(dgi, git.shape(), dev)?),
            Some(Tensor::from_vec(dw, wt.shape(), dev)?),
            Some(Tensor::from_vec(db, biast.shape(), dev)?),
        ))
    }
}

/// Caser's sliding windows over positions: `x [B, T, H]` → `[B, T−h+1, h·H]`, window `w` being rows
/// `w..w+h` side by side (what concatenating `h` shifted narrows gives, without their `h` copies
/// forward and `h` zero-padded gradients backward).
pub fn unfold(x: &Tensor, height: usize) -> Result<Tensor> {
    let (_, t, _) = x.dims3()?;
    if height == 0 || height > t {
        candle_core::bail!("unfold: window height {height} for {t} positions");
    }
    if fused(&[x]) {
        return x.contiguous()?.apply_op1(Unfold { height });
    }
    unfold_composed(x, height)
}

/// [`unfold`] from candle ops (any device, any dtype).
pub fn unfold_composed(x: &Tensor, height: usize) -> Result<Tensor> {
    let windows = x.dim(1)? + 1 - height;
    let shifted: Vec<Tensor> = (0..height)
        .map(|k| x.narrow(1, k, windows))
        .collect::<Result<_>>()?;
    Tensor::cat(&shifted, D::Minus1)
}

struct Unfold {
    height: usize,
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "unfold")?;
        let (b, t, h) = l.shape().dims3()?;
        let (w, span) = (t + 1 - self.height, self.height * h);
        let mut out = Vec::with_capacity(b * w * span);
        for bi in 0..b {
            for wi in 0..w {
                // Rows wi..wi+height of a contiguous [T, H] block are one contiguous span.
                out.extend_from_slice(&x[(bi * t + wi) * h..][..span]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, w, span))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, h) = x.dims3()?;
        let (w, span) = (t + 1 - self.height, self.height * h);
        let g = host_vec(grad)?;
        let mut dx = vec![0f32; b * t * h];
        for bi in 0..b {
            for wi in 0..w {
                let dst = &mut dx[(bi * t + wi) * h..][..span];
                let src = &g[(bi * w + wi) * span..][..span];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn fused_unfold_matches_the_composed_one_with_gradients() {
        let dev = Device::Cpu;
        let run = |height: usize, fused: bool| -> (Vec<f32>, Vec<f32>) {
            let x = Var::from_vec(
                (0..60)
                    .map(|i| ((i * 7 % 13) as f32 * 0.3).sin())
                    .collect::<Vec<_>>(),
                (3, 5, 4),
                &dev,
            )
            .unwrap();
            let y = if fused {
                unfold(x.as_tensor(), height)
            } else {
                unfold_composed(x.as_tensor(), height)
            }
            .unwrap();
            let n = y.elem_count();
            let coef = Tensor::from_vec(
                (0..n).map(|i| (i as f32 * 0.1).cos()).collect::<Vec<_>>(),
                y.shape(),
                &dev,
            )
            .unwrap();
            let g = (&y * coef).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(x.as_tensor()).unwrap();
            (
                y.flatten_all().unwrap().to_vec1().unwrap(),
                dx.flatten_all().unwrap().to_vec1().unwrap(),
            )
        };
        for height in [1, 2, 4, 5] {
            let (yf, gf) = run(height, true);
            let (yc, gc) = run(height, false);
            assert_eq!(yf, yc, "height {height}");
            for (a, b) in gf.iter().zip(&gc) {
                assert!((a - b).abs() < 1e-5, "height {height}: {a} vs {b}");
            }
        }
        let x = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        assert!(unfold(&x, 4).is_err());
    }

    fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>]) {
        for (x, y) in a.iter().zip(b) {
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
    }

    /// The fused attention against a composition of candle ops, values and gradients, for
    /// queries at `positions` (one per row of `[B, Tq]`) over `tk` keys.
    fn check_attention(tq: usize, tk: usize, positions: &[usize]) {
        let dev = Device::Cpu;
        let (b, h, nh) = (2usize, 6usize, 2usize);
        let d = h / nh;
        let mk = |seed: usize, t: usize| {
            Var::from_vec(
                (0..b * t * h)
                    .map(|i| (((i + seed) * 37 % 23) as f32 * 0.21).sin())
                    .collect::<Vec<_>>(),
                (b, t, h),
                &dev,
            )
            .unwrap()
        };
        let (q, k, v) = (mk(1, tq), mk(2, tk), mk(3, tk));
        // Row 1 has its last key padded; the last query of row 0 is masked after the softmax.
        let mut allowed = vec![0f32; b * tq * tk];
        for bi in 0..b {
            for i in 0..tq {
                for j in 0..=positions[bi * tq + i] {
                    allowed[(bi * tq + i) * tk + j] =
                        if bi == 1 && j == tk - 1 { 0.0 } else { 1.0 };
                }
            }
        }
        let mut qmask = vec![1f32; b * tq];
        qmask[tq - 1] = 0.0;
        let drop: Vec<f32> = (0..b * nh * tq * tk)
            .map(|i| if i % 5 == 0 { 0.0 } else { 1.25 })
            .collect();
        let coef = Tensor::from_vec(
            (0..b * tq * h)
                .map(|i| (i as f32 * 0.3).cos())
                .collect::<Vec<_>>(),
            (b, tq, h),
            &dev,
        )
        .unwrap();
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let out = if fused {
                let op = MaskedAttention {
                    heads: nh,
                    scale: 0.4,
                    neg: -4_294_967_295.0,
                    allowed: allowed.clone(),
                    qmask: qmask.clone(),
                    dropout: Some(drop.clone()),
                };
                q.as_tensor()
                    .apply_op3(k.as_tensor(), v.as_tensor(), op)
                    .unwrap()
            } else {
                let split = |x: &Tensor, t: usize| {
                    x.reshape((b, t, nh, d))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                };
                let (qs, ks, vs) = (
                    split(q.as_tensor(), tq),
                    split(k.as_tensor(), tk),
                    split(v.as_tensor(), tk),
                );
                let scores = (qs.matmul(&ks.t().unwrap()).unwrap() * 0.4).unwrap();
                let al = Tensor::from_vec(allowed.clone(), (b, 1, tq, tk), &dev).unwrap();
                let blocked = al.affine(-1.0, 1.0).unwrap();
                let masked = (scores.broadcast_mul(&al).unwrap()
                    + (blocked * -4_294_967_295.0)
                        .unwrap()
                        .broadcast_as(scores.shape())
                        .unwrap())
                .unwrap();
                let p = candle_nn::ops::softmax(&masked, D::Minus1).unwrap();
                let p = p
                    .broadcast_mul(&Tensor::from_vec(qmask.clone(), (b, 1, tq, 1), &dev).unwrap())
                    .unwrap();
                let p = p
                    .mul(&Tensor::from_vec(drop.clone(), (b, nh, tq, tk), &dev).unwrap())
                    .unwrap();
                p.matmul(&vs)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, tq, h))
                    .unwrap()
            };
            let loss = (out * &coef).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let mut r = vec![vec![loss.to_scalar::<f32>().unwrap()]];
            for x in [&q, &k, &v] {
                r.push(
                    g.get(x.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                );
            }
            r
        };
        assert_close(&run(true), &run(false));
    }

    #[test]
    fn fused_attention_matches_composed() {
        // Every position queries (causal self-attention).
        check_attention(4, 4, &[0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn fused_attention_of_one_query_per_row_matches_composed() {
        // One query per row at its own position (SASRec's last-position state).
        check_attention(1, 5, &[2, 4]);
    }
}
