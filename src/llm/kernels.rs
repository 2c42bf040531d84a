//! The decoder's fused CPU (f32) kernels with hand-written backward passes, built on the shared
//! GEMM of [`crate::kernels::gemm`] (and, for frozen bf16 weights, [`crate::kernels::bf16`]). Each
//! op keeps only
//! what its backward needs (a LoRA projection saves its input, not five intermediates; attention
//! recomputes its probabilities instead of keeping `[B, heads, T, T]` scores and probabilities).
//! [`super::ops`] chooses between these and differentiable compositions.

use crate::kernels::gemm::{mm, mm_new};
use crate::kernels::simd::{exp_in_place, masked_softmax_row};
use crate::kernels::slice::{cpu_tensor as tensor, f32_slice, par_blocks, with, with_all, BLOCK};
use crate::kernels::weight::FrozenWeight;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Arc;

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
/// `W` gets no gradient; with LoRA the op's inputs are `(x, A, B)`, else just `x`. `W` is any
/// [`FrozenWeight`] whose format multiplies f32 activations on the CPU
/// ([`FrozenWeight::cpu_kernels`]); activations, LoRA and gradients stay f32.
#[derive(Clone)]
pub struct Linear {
    pub w: FrozenWeight,
    pub bias: Option<Tensor>,
    pub scale: f32,
    pub drop: Option<DropMask>,
}

impl Linear {
    fn dims(&self, x: &Layout) -> Result<(usize, usize, usize, Shape)> {
        let (o, i) = self.w.dims();
        let dims = x.shape().dims();
        if dims.last() != Some(&i) {
            candle_core::bail!("linear: input {:?}, weight [{o}, {i}]", dims);
        }
        let m = x.shape().elem_count() / i;
        let mut out = dims.to_vec();
        *out.last_mut().expect("rank >= 1") = o;
        Ok((m, i, o, Shape::from(out)))
    }

    fn base(&self, x: &[f32], m: usize, o: usize) -> Result<Vec<f32>> {
        let mut y = self.w.forward(x, m)?;
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
        let (m, _, o, shape) = self.dims(l)?;
        let y = self.base(f32_slice(s, l, "frozen-linear")?, m, o)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let i = self.w.dims().1;
        let m = x.elem_count() / i;
        let dx = with(grad, |g| self.w.input_grad(g, m))??;
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
        let mut y = self.base(x, m, o)?;
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
        let (o, i) = self.w.dims();
        let r = a.dims2()?.0;
        let m = x.elem_count() / i;
        let (dx, da, db) = with_all(&[x, a, b, grad], |s| {
            let (xv, av, bv, gv) = (s[0], s[1], s[2], s[3]);
            let xd = self.dropped(xv);
            let xin = xd.as_deref().unwrap_or(xv);
            let mut dx = self.w.input_grad(gv, m)?; // g · W
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
            Ok::<_, candle_core::Error>((dx, da, db))
        })??;
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

/// Sizes of one grouped-query attention call.
struct GqaDims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    k: usize,
    d: usize,
}

impl GqaDims {
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
}

/// Query rows per block of attention probabilities: each block stops at its last attended key,
/// so a causal mask costs about half the full `T × K` work.
const ATT_ROWS: usize = 32;

/// Probabilities of one block of query rows: rows `row0..row0 + rows` of a group, keys
/// `0..keys` (every later key is masked for all of them), `p [rows, keys]`.
struct ProbBlock {
    row0: usize,
    rows: usize,
    keys: usize,
    p: Vec<f32>,
}

impl Attention {
    /// Probabilities of batch row `bi` for the query group `qg [rep·T, d]` and keys `kg [K, d]`,
    /// in blocks of [`ATT_ROWS`] rows (never across two heads' rows), each over the keys up to
    /// its last allowed one; keys past it have probability 0.
    fn probs(&self, dm: &GqaDims, bi: usize, qg: &[f32], kg: &[f32]) -> Vec<ProbBlock> {
        let (rt, k, d) = (dm.rep() * dm.t, dm.k, dm.d);
        let allowed = &self.allowed[bi * rt * k..(bi + 1) * rt * k];
        let mut blocks = Vec::with_capacity(dm.rep() * dm.t.div_ceil(ATT_ROWS));
        for r in 0..dm.rep() {
            let mut t0 = 0;
            while t0 < dm.t {
                let rows = ATT_ROWS.min(dm.t - t0);
                let row0 = r * dm.t + t0;
                let al = &allowed[row0 * k..(row0 + rows) * k];
                let keys = al
                    .chunks_exact(k)
                    .map(|a| a.iter().rposition(|&x| x != 0).map_or(0, |j| j + 1))
                    .max()
                    .unwrap_or(0);
                let mut p = if keys == 0 {
                    Vec::new()
                } else {
                    let q = &qg[row0 * d..(row0 + rows) * d];
                    mm_new(q, &kg[..keys * d], rows, keys, d, false, true, self.scale)
                };
                if keys > 0 {
                    for (row, a) in p.chunks_exact_mut(keys).zip(al.chunks_exact(k)) {
                        masked_softmax_row(row, |j| a[j] != 0);
                    }
                }
                blocks.push(ProbBlock {
                    row0,
                    rows,
                    keys,
                    p,
                });
                t0 += rows;
            }
        }
        debug_assert_eq!(blocks.iter().map(|b| b.rows).sum::<usize>(), rt);
        blocks
    }

    fn dims(q: &Shape, k: &Shape) -> Result<GqaDims> {
        let (b, nh, t, d) = q.dims4()?;
        let (_, nkv, kl, _) = k.dims4()?;
        Ok(GqaDims {
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
fn scatter_group(out: &mut [f32], og: &[f32], dm: &GqaDims, bi: usize, g: usize) {
    let (t, d, nh) = (dm.t, dm.d, dm.nh);
    for r in 0..dm.rep() {
        let h = g * dm.rep() + r;
        for ti in 0..t {
            let dst = (bi * t + ti) * nh * d + h * d;
            out[dst..dst + d].copy_from_slice(&og[(r * t + ti) * d..][..d]);
        }
    }
}

fn gather_group(src: &[f32], dm: &GqaDims, bi: usize, g: usize) -> Vec<f32> {
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
                let mut og = vec![0f32; rt * d];
                for b in self.probs(&dm, bi, qg, kg) {
                    if b.keys > 0 {
                        let o = &mut og[b.row0 * d..(b.row0 + b.rows) * d];
                        mm(
                            o,
                            &b.p,
                            &vg[..b.keys * d],
                            b.rows,
                            d,
                            b.keys,
                            false,
                            false,
                            false,
                            1.0,
                        );
                    }
                }
                og
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
                    let dog = gather_group(go, &dm, bi, g);
                    // Per block of query rows, over its keys only (the others have P = 0, so
                    // dS = 0 there): dV += Pᵀ dO ; dP = dO Vᵀ ;
                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale ; dQ = dS K ; dK += dSᵀ Q.
                    // dQ, dK and dV start at zero (fresh buffers); blocks add in a fixed order.
                    for b in self.probs(&dm, bi, qg, kg) {
                        let (n, kb) = (b.rows, b.keys);
                        if kb == 0 {
                            continue;
                        }
                        let dob = &dog[b.row0 * d..(b.row0 + n) * d];
                        let qb = &qg[b.row0 * d..(b.row0 + n) * d];
                        mm(
                            &mut dvg[..kb * d],
                            &b.p,
                            dob,
                            kb,
                            d,
                            n,
                            true,
                            false,
                            true,
                            1.0,
                        );
                        let mut dp = mm_new(dob, &vg[..kb * d], n, kb, d, false, true, 1.0);
                        for (dr, pr) in dp.chunks_exact_mut(kb).zip(b.p.chunks_exact(kb)) {
                            let s: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                            for (x, &pj) in dr.iter_mut().zip(pr) {
                                *x = pj * (*x - s) * self.scale;
                            }
                        }
                        let dqb = &mut dqg[b.row0 * d..(b.row0 + n) * d];
                        mm(dqb, &dp, &kg[..kb * d], n, d, kb, false, false, false, 1.0);
                        mm(
                            &mut dkg[..kb * d],
                            &dp,
                            qb,
                            kb,
                            d,
                            n,
                            true,
                            false,
                            true,
                            1.0,
                        );
                    }
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
