//! Fused CPU (f32) kernels with hand-written backward passes, built on `gemm`. Each op keeps only
//! what its backward needs (a LoRA projection saves its input, not five intermediates; attention
//! recomputes its probabilities instead of keeping `[B, heads, T, T]` scores and probabilities).
//! [`super::ops`] chooses between these and differentiable compositions.

use crate::sr::ops::{exp_in_place, f32_slice};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::Arc;

/// `c[m, n] = (acc ? c : 0) + alpha · op(a) · op(b)` for row-major contiguous slices; `op(a)` is
/// `a [m, k]`, or `a [k, m]` transposed when `ta`; likewise `op(b)` is `b [k, n]` or `b [n, k]`ᵀ.
#[allow(clippy::too_many_arguments)]
pub fn mm(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    acc: bool,
    alpha: f32,
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "mm: slice too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            c[..m * n].fill(0.0);
        }
        return;
    }
    if m <= 4 && !ta && tb {
        // A few rows times a row-major matrix (generation): row dot products stream `b` once,
        // where gemm would pack it first.
        return small_m(c, a, b, m, n, k, acc, alpha);
    }
    // SAFETY: `c` holds at least m·n elements (asserted above).
    unsafe { gemm_blocks(c.as_mut_ptr(), a, b, m, n, k, ta, tb, acc, alpha) }
}

/// A new row-major `[m, n]` = `alpha · op(a) · op(b)` (see [`mm`]), which the GEMM writes without
/// the buffer being zero-filled first.
#[allow(clippy::too_many_arguments)]
pub fn mm_new(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 || (m <= 4 && !ta && tb) {
        let mut c = vec![0f32; m * n];
        mm(&mut c, a, b, m, n, k, ta, tb, false, alpha);
        return c;
    }
    assert!(
        a.len() >= m * k && b.len() >= k * n,
        "mm_new: slice too short"
    );
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: the buffer has capacity m·n; with `acc` false the GEMM writes every element of the
    // m·n result and reads none, so all of them are initialized before `set_len`.
    unsafe {
        gemm_blocks(c.as_mut_ptr(), a, b, m, n, k, ta, tb, false, alpha);
        c.set_len(m * n);
    }
    c
}

/// The GEMM behind [`mm`] and [`mm_new`].
///
/// # Safety
/// `c` must be valid for writes (and, with `acc`, reads) of `m·n` elements; `a` and `b` must
/// hold `m·k` and `k·n`; `m`, `n`, `k` > 0.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_blocks(
    c: *mut f32,
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    acc: bool,
    alpha: f32,
) {
    let threads = candle_core::utils::get_num_threads();
    let (a_cs, a_rs) = if ta { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if tb { (k as isize, 1) } else { (1, n as isize) };
    // gemm's own multi-threading does not give the same bits from run to run; split `c` into one
    // block per thread instead, each a single-threaded gemm (deterministic for a given thread
    // count). Each block packs the operand it shares with the others, so the split runs along
    // the longer side of `c`: rows (tokens) when there are more of them than columns, else
    // columns (a weight's outputs), so that a short prompt's GEMMs do not pack every weight once
    // per thread.
    let parallel = threads > 1 && m * n * k >= 64 * 64 * 64;
    let by_cols = parallel && n > m && m >= 8 && n >= 32 * threads;
    let blocks = if by_cols || (parallel && m >= 2 * threads) {
        threads
    } else {
        1
    };
    let (a_ptr, b_ptr, c_ptr) = (a.as_ptr() as usize, b.as_ptr() as usize, c as usize);
    // One gemm over rows i0..i0+mb and columns j0..j0+nb of c.
    let block = |i0: usize, mb: usize, j0: usize, nb: usize| {
        // SAFETY: blocks write disjoint rows (or columns) of c; the operand pointers are offset
        // to row i0 of op(a) and column j0 of op(b) (element offsets that depend on whether each
        // is stored transposed); the caller guarantees the sizes, and the strides address exactly
        // those row-major layouts.
        unsafe {
            let a_off = if ta { i0 } else { i0 * k };
            let b_off = if tb { j0 * k } else { j0 };
            gemm::gemm(
                mb,
                nb,
                k,
                (c_ptr as *mut f32).add(i0 * n + j0),
                1,
                n as isize,
                acc,
                (a_ptr as *const f32).add(a_off),
                a_cs,
                a_rs,
                (b_ptr as *const f32).add(b_off),
                b_cs,
                b_rs,
                1.0,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let run = |bi: usize| {
        if by_cols {
            // Column blocks in multiples of 16 (one AVX-512 vector of f32).
            let cols = n.div_ceil(blocks).div_ceil(16) * 16;
            let j0 = bi * cols;
            if j0 < n {
                block(0, m, j0, cols.min(n - j0));
            }
        } else {
            let rows = m.div_ceil(blocks);
            let i0 = bi * rows;
            if i0 < m {
                block(i0, rows.min(m - i0), 0, n);
            }
        }
    };
    if blocks == 1 {
        run(0);
    } else {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().for_each(run);
    }
}

#[allow(clippy::too_many_arguments)]
fn small_m(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    acc: bool,
    alpha: f32,
) {
    use rayon::prelude::*;
    let rows = |j0: usize, out: &mut [f32]| {
        // out[i * len + jj] for rows i of a and columns j0 + jj.
        let len = out.len() / m;
        for jj in 0..len {
            let brow = &b[(j0 + jj) * k..][..k];
            for i in 0..m {
                out[i * len + jj] = alpha * dot(&a[i * k..][..k], brow);
            }
        }
    };
    let threads = candle_core::utils::get_num_threads();
    let chunk = n.div_ceil(threads.max(1)).max(1);
    let mut parts: Vec<Vec<f32>> = (0..n.div_ceil(chunk))
        .map(|p| vec![0f32; m * chunk.min(n - p * chunk)])
        .collect();
    if n * k >= 1 << 16 && threads > 1 {
        parts
            .par_iter_mut()
            .enumerate()
            .for_each(|(p, out)| rows(p * chunk, out));
    } else {
        parts
            .iter_mut()
            .enumerate()
            .for_each(|(p, out)| rows(p * chunk, out));
    }
    for (p, out) in parts.iter().enumerate() {
        let len = out.len() / m;
        for i in 0..m {
            let dst = &mut c[i * n + p * chunk..][..len];
            let src = &out[i * len..][..len];
            if acc {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Runs `f` on the f32 contents of a CPU tensor (made contiguous first).
fn with<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_all(&[t], |s| f(s[0]))
}

/// Runs `f` on the f32 contents of several CPU tensors at once (each made contiguous first),
/// without copying them.
fn with_all<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let ts = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (st, l) in &guards {
        let Storage::Cpu(cs) = &**st else {
            candle_core::bail!("fused kernel: CPU tensor expected");
        };
        slices.push(f32_slice(cs, l, "fused kernel")?);
    }
    Ok(f(&slices))
}

/// Element-wise work on blocks of this many values runs in parallel (the blocks do not depend on
/// the thread count, so neither do the results).
const BLOCK: usize = 1 << 14;

/// Fills `out` block by block in parallel: `f(offset, block)`.
fn par_blocks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    use rayon::prelude::*;
    if out.len() <= BLOCK {
        return f(0, out);
    }
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(c, blk)| f(c * BLOCK, blk));
}

fn tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

// ---------------------------------------------------------------------------------------------

/// Inverted-dropout keep flags of a LoRA input (`1/(1-p)` where kept).
#[derive(Clone)]
pub struct DropMask {
    pub keep: Arc<Vec<u8>>,
    pub scale: f32,
}

impl DropMask {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        par_blocks(&mut out, |o, blk| {
            for ((y, v), &k) in blk.iter_mut().zip(&x[o..]).zip(&self.keep[o..]) {
                *y = v * (k as f32 * self.scale);
            }
        });
        out
    }
}

/// `y = x Wᵀ (+ b) [+ s · (drop(x) Aᵀ) Bᵀ]` over `x [M, in]` (leading dims flattened). The frozen
/// `W` gets no gradient; with LoRA the op's inputs are `(x, A, B)`, else just `x`.
#[derive(Clone)]
pub struct Linear {
    pub w: Tensor,
    /// `w` transposed, contiguous `[in, out]` (optional; the forward GEMM is faster with it).
    pub wt: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub scale: f32,
    pub drop: Option<DropMask>,
}

impl Linear {
    fn dims(&self, x: &Layout) -> Result<(usize, usize, usize, Shape)> {
        let (o, i) = self.w.dims2()?;
        let dims = x.shape().dims();
        if dims.last() != Some(&i) {
            candle_core::bail!("linear: input {:?}, weight [{o}, {i}]", dims);
        }
        let m = x.shape().elem_count() / i;
        let mut out = dims.to_vec();
        *out.last_mut().expect("rank >= 1") = o;
        Ok((m, i, o, Shape::from(out)))
    }

    fn base(&self, x: &[f32], m: usize, i: usize, o: usize) -> Result<Vec<f32>> {
        let mut y = match &self.wt {
            Some(wt) => with(wt, |wt| mm_new(x, wt, m, o, i, false, false, 1.0))?,
            None => with(&self.w, |w| mm_new(x, w, m, o, i, false, true, 1.0))?,
        };
        if let Some(b) = &self.bias {
            with(b, |b| {
                for row in y.chunks_exact_mut(o) {
                    row.iter_mut().zip(b).for_each(|(v, c)| *v += c);
                }
            })?;
        }
        Ok(y)
    }

    fn dropped(&self, x: &[f32]) -> Option<Vec<f32>> {
        self.drop.as_ref().map(|d| d.apply(x))
    }
}

impl CustomOp1 for Linear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, i, o, shape) = self.dims(l)?;
        let y = self.base(f32_slice(s, l, "frozen-linear")?, m, i, o)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (o, i) = self.w.dims2()?;
        let m = x.elem_count() / i;
        let mut dx = vec![0f32; m * i];
        with(grad, |g| {
            with(&self.w, |w| {
                mm(&mut dx, g, w, m, i, o, false, false, false, 1.0)
            })
        })??;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let (m, i, o, shape) = self.dims(l1)?;
        let x = f32_slice(s1, l1, "lora-linear")?;
        let a = f32_slice(s2, l2, "lora-linear")?;
        let b = f32_slice(s3, l3, "lora-linear")?;
        let r = a.len() / i;
        let mut y = self.base(x, m, i, o)?;
        let xd = self.dropped(x);
        let u = mm_new(xd.as_deref().unwrap_or(x), a, m, r, i, false, true, 1.0);
        mm(&mut y, &u, b, m, o, r, false, true, true, self.scale);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (o, i) = self.w.dims2()?;
        let r = a.dims2()?.0;
        let m = x.elem_count() / i;
        let (dx, da, db) = with_all(&[x, a, b, grad, &self.w], |s| {
            let (xv, av, bv, gv, w) = (s[0], s[1], s[2], s[3], s[4]);
            let xd = self.dropped(xv);
            let xin = xd.as_deref().unwrap_or(xv);
            let mut dx = mm_new(gv, w, m, i, o, false, false, 1.0);
            let u = mm_new(xin, av, m, r, i, false, true, 1.0);
            let db = mm_new(gv, &u, o, r, m, true, false, self.scale);
            let du = mm_new(gv, bv, m, r, o, false, false, self.scale);
            let da = mm_new(&du, xin, r, i, m, true, false, 1.0);
            match &self.drop {
                None => mm(&mut dx, &du, av, m, i, r, false, false, true, 1.0),
                Some(d) => {
                    let t = mm_new(&du, av, m, i, r, false, false, 1.0);
                    par_blocks(&mut dx, |off, blk| {
                        for ((o, v), &k) in blk.iter_mut().zip(&t[off..]).zip(&d.keep[off..]) {
                            *o += v * (k as f32 * d.scale);
                        }
                    });
                }
            }
            (dx, da, db)
        })?;
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(da, a.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------

/// Grouped-query attention `softmax(Q Kᵀ · scale + mask) V` over `q [B, heads, T, d]`,
/// `k, v [B, kv_heads, K, d]`, returning `[B, T, heads·d]`; probabilities are recomputed in the
/// backward pass instead of being stored.
pub struct Attention {
    /// `[B, rep·T, K]`: 1 where the query may attend the key (query rows stacked per KV group).
    pub allowed: Arc<Vec<u8>>,
    pub scale: f32,
}

struct AttnDims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    k: usize,
    d: usize,
}

impl AttnDims {
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
}

impl Attention {
    /// Probabilities `[rep·T, K]` of batch row `bi` for the query group `qg` and keys `kg`.
    fn probs(&self, dm: &AttnDims, bi: usize, qg: &[f32], kg: &[f32]) -> Vec<f32> {
        let (rt, k) = (dm.rep() * dm.t, dm.k);
        let mut p = mm_new(qg, kg, rt, k, dm.d, false, true, self.scale);
        let allowed = &self.allowed[bi * rt * k..(bi + 1) * rt * k];
        for (row, al) in p.chunks_exact_mut(k).zip(allowed.chunks_exact(k)) {
            let mut max = f32::NEG_INFINITY;
            for (v, &a) in row.iter().zip(al) {
                if a != 0 && *v > max {
                    max = *v;
                }
            }
            row.iter_mut().for_each(|v| *v -= max);
            exp_in_place(row);
            let mut sum = 0f32;
            for (v, &a) in row.iter_mut().zip(al) {
                if a == 0 {
                    *v = 0.0;
                }
                sum += *v;
            }
            if sum > 0.0 {
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
        p
    }

    fn dims(q: &Shape, k: &Shape) -> Result<AttnDims> {
        let (b, nh, t, d) = q.dims4()?;
        let (_, nkv, kl, _) = k.dims4()?;
        Ok(AttnDims {
            b,
            nh,
            nkv,
            t,
            k: kl,
            d,
        })
    }
}

/// Copies rows `[rep·T, d]` of a group between the head-stacked layout and `[T, heads·d]`.
fn scatter_group(out: &mut [f32], og: &[f32], dm: &AttnDims, bi: usize, g: usize) {
    let (t, d, nh) = (dm.t, dm.d, dm.nh);
    for r in 0..dm.rep() {
        let h = g * dm.rep() + r;
        for ti in 0..t {
            let dst = (bi * t + ti) * nh * d + h * d;
            out[dst..dst + d].copy_from_slice(&og[(r * t + ti) * d..][..d]);
        }
    }
}

fn gather_group(src: &[f32], dm: &AttnDims, bi: usize, g: usize) -> Vec<f32> {
    let (t, d, nh) = (dm.t, dm.d, dm.nh);
    let mut out = Vec::with_capacity(dm.rep() * t * d);
    for r in 0..dm.rep() {
        let h = g * dm.rep() + r;
        for ti in 0..t {
            let s = (bi * t + ti) * nh * d + h * d;
            out.extend_from_slice(&src[s..s + d]);
        }
    }
    out
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        let dm = Self::dims(l1.shape(), l2.shape())?;
        let (q, k, v) = (
            f32_slice(s1, l1, "attention")?,
            f32_slice(s2, l2, "attention")?,
            f32_slice(s3, l3, "attention")?,
        );
        let (rt, d) = (dm.rep() * dm.t, dm.d);
        let mut out = vec![0f32; dm.b * dm.t * dm.nh * d];
        // (batch row, KV group) pairs are independent: one task each (deterministic: a group's
        // result does not depend on how the groups are scheduled).
        use rayon::prelude::*;
        let groups: Vec<(usize, usize)> = (0..dm.b)
            .flat_map(|bi| (0..dm.nkv).map(move |g| (bi, g)))
            .collect();
        let outs: Vec<Vec<f32>> = groups
            .par_iter()
            .map(|&(bi, g)| {
                let qg = &q[(bi * dm.nkv + g) * rt * d..][..rt * d];
                let kg = &k[(bi * dm.nkv + g) * dm.k * d..][..dm.k * d];
                let vg = &v[(bi * dm.nkv + g) * dm.k * d..][..dm.k * d];
                let p = self.probs(&dm, bi, qg, kg);
                mm_new(&p, vg, rt, d, dm.k, false, false, 1.0)
            })
            .collect();
        for (&(bi, g), og) in groups.iter().zip(&outs) {
            scatter_group(&mut out, og, &dm, bi, g);
        }
        Ok((CpuStorage::F32(out), Shape::from((dm.b, dm.t, dm.nh * d))))
    }

    fn bwd(
        &self,
        qt: &Tensor,
        kt: &Tensor,
        vt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Self::dims(qt.shape(), kt.shape())?;
        let (rt, d, kl) = (dm.rep() * dm.t, dm.d, dm.k);
        let (dq, dk, dv) = with_all(&[qt, kt, vt, grad], |s| {
            let (q, k, v, go) = (s[0], s[1], s[2], s[3]);
            let mut dq = vec![0f32; q.len()];
            let mut dk = vec![0f32; k.len()];
            let mut dv = vec![0f32; v.len()];
            // One task per (batch row, KV group), each writing its own rows of dQ, dK and dV
            // (groups are stored in that order: chunk index = bi · kv_heads + g).
            use rayon::prelude::*;
            dq.par_chunks_mut(rt * d)
                .zip(dk.par_chunks_mut(kl * d))
                .zip(dv.par_chunks_mut(kl * d))
                .enumerate()
                .for_each(|(gi, ((dqg, dkg), dvg))| {
                    let (bi, g) = (gi / dm.nkv, gi % dm.nkv);
                    let (qg, kg, vg) = (
                        &q[gi * rt * d..][..rt * d],
                        &k[gi * kl * d..][..kl * d],
                        &v[gi * kl * d..][..kl * d],
                    );
                    let p = self.probs(&dm, bi, qg, kg);
                    let dog = gather_group(go, &dm, bi, g);
                    let mut dp = vec![0f32; rt * kl];
                    // dV = Pᵀ dO ; dP = dO Vᵀ ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
                    mm(dvg, &p, &dog, kl, d, rt, true, false, false, 1.0);
                    mm(&mut dp, &dog, vg, rt, kl, d, false, true, false, 1.0);
                    for (dr, pr) in dp.chunks_exact_mut(kl).zip(p.chunks_exact(kl)) {
                        let s: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                        for (x, &pj) in dr.iter_mut().zip(pr) {
                            *x = pj * (*x - s) * self.scale;
                        }
                    }
                    mm(dqg, &dp, kg, rt, d, kl, false, false, false, 1.0);
                    mm(dkg, &dp, qg, kl, d, rt, true, false, false, 1.0);
                });
            (dq, dk, dv)
        })?;
        Ok((
            Some(tensor(dq, qt.shape())?),
            Some(tensor(dk, kt.shape())?),
            Some(tensor(dv, vt.shape())?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------

/// `silu(g) · u`.
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(s1, l1, "swiglu")?, f32_slice(s2, l2, "swiglu")?);
        let mut out = vec![0f32; g.len()];
        par_blocks(&mut out, |o, blk| {
            let (g, u) = (&g[o..o + blk.len()], &u[o..o + blk.len()]);
            // blk ← e^-g, then g·u / (1 + e^-g) = silu(g)·u.
            blk.iter_mut().zip(g).for_each(|(e, g)| *e = -g);
            exp_in_place(blk);
            for ((y, g), u) in blk.iter_mut().zip(g).zip(u) {
                *y = g * u / (1.0 + *y);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_all(&[g, u, grad], |s| {
            let (gv, uv, dy) = (s[0], s[1], s[2]);
            use rayon::prelude::*;
            let mut dg = vec![0f32; gv.len()];
            let mut du = vec![0f32; gv.len()];
            dg.par_chunks_mut(BLOCK)
                .zip(du.par_chunks_mut(BLOCK))
                .enumerate()
                .for_each(|(c, (dgc, duc))| {
                    let o = c * BLOCK;
                    let n = dgc.len();
                    let (gv, uv, dy) = (&gv[o..o + n], &uv[o..o + n], &dy[o..o + n]);
                    // dgc ← e^-g first; σ(g) = 1 / (1 + e^-g).
                    dgc.iter_mut().zip(gv).for_each(|(e, g)| *e = -g);
                    exp_in_place(dgc);
                    for (j, (dgj, duj)) in dgc.iter_mut().zip(duc.iter_mut()).enumerate() {
                        let (g, u, d) = (gv[j], uv[j], dy[j]);
                        let s = 1.0 / (1.0 + *dgj);
                        *duj = d * g * s;
                        *dgj = d * u * s * (1.0 + g * (1.0 - s));
                    }
                });
            (dg, du)
        })?;
        Ok((Some(tensor(dg, g.shape())?), Some(tensor(du, u.shape())?)))
    }
}

// ---------------------------------------------------------------------------------------------

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
            let mut db = vec![0f32; o];
            for row in gv.chunks_exact(o) {
                db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
            }
            (dx, dw, db)
        })?;
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(dw, w.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_into_a_fresh_buffer_matches_a_naive_product() {
        for &(m, n, k) in &[
            (3, 5, 7),
            (70, 65, 66),
            (130, 9, 80),
            (40, 200, 70),
            (9, 333, 100),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0)
                .collect();
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
                let bt = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
                let c = mm_new(&a, &b, m, n, k, ta, tb, 0.5);
                assert_eq!(c.len(), m * n);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = 0.5 * (0..k).map(|l| at(i, l) * bt(l, j)).sum::<f32>();
                        assert!((c[i * n + j] - want).abs() < 1e-3, "{m}x{n}x{k} {ta} {tb}");
                    }
                }
            }
        }
    }
}
