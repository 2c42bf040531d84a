//! A frozen weight kept in a GGUF block format (`q8_0`, `q4_0`, `q4_k`, …): the blocks of a
//! candle [`QTensor`] are the only copy. On the CPU, products over many rows (a prompt, a training
//! batch: [`GEMM_ROWS`] or more) dequantize `W` a tile of rows at a time into the bf16 GEMM of
//! [`crate::kernels::bf16`] (the f32 GEMM where the CPU lacks AVX512-BF16), for the forward
//! `x · Wᵀ` and the input gradient `g · W` alike, so no dequantized copy of the weight exists
//! beyond one tile and the activations are rounded as under `--dtype bf16`. A few rows (decoding
//! a token) take candle's block dot products instead, the activations quantized to the format's
//! dot-product type (8-bit blocks), in parallel over fixed groups of output columns: reading the
//! blocks once is the whole cost there. Elsewhere (CUDA, the composed path) the forward is
//! candle's `QMatMul` and the backward multiplies by a dequantized `W` made for that call. Every
//! order of summation is fixed: the same inputs give the same bits on any thread count.

use super::dense::transpose;
use super::{Format, FrozenWeight};
use crate::kernels::bf16;
use crate::kernels::gemm::mm;
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Runs `$body` with `$T` the block type of `$dt`.
macro_rules! with_block {
    ($dt:expr, $T:ident, $body:block) => {
        match $dt {
            GgmlDType::Q4_0 => {
                type $T = k_quants::BlockQ4_0;
                $body
            }
            GgmlDType::Q4_1 => {
                type $T = k_quants::BlockQ4_1;
                $body
            }
            GgmlDType::Q5_0 => {
                type $T = k_quants::BlockQ5_0;
                $body
            }
            GgmlDType::Q5_1 => {
                type $T = k_quants::BlockQ5_1;
                $body
            }
            GgmlDType::Q8_0 => {
                type $T = k_quants::BlockQ8_0;
                $body
            }
            GgmlDType::Q2K => {
                type $T = k_quants::BlockQ2K;
                $body
            }
            GgmlDType::Q3K => {
                type $T = k_quants::BlockQ3K;
                $body
            }
            GgmlDType::Q4K => {
                type $T = k_quants::BlockQ4K;
                $body
            }
            GgmlDType::Q5K => {
                type $T = k_quants::BlockQ5K;
                $body
            }
            GgmlDType::Q6K => {
                type $T = k_quants::BlockQ6K;
                $body
            }
            other => {
                candle_core::bail!("{other:?} is not a block format frozen weights are kept in")
            }
        }
    };
}

/// The block formats a frozen weight may be kept in, by the names `--dtype` takes.
pub const FORMATS: [(&str, GgmlDType); 10] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q6_k", GgmlDType::Q6K),
    ("q5_k", GgmlDType::Q5K),
    ("q4_k", GgmlDType::Q4K),
    ("q3_k", GgmlDType::Q3K),
    ("q2_k", GgmlDType::Q2K),
];

/// `q4_k` for [`GgmlDType::Q4K`].
pub fn name(dt: GgmlDType) -> String {
    FORMATS
        .iter()
        .find(|(_, d)| *d == dt)
        .map_or_else(|| format!("{dt:?}").to_lowercase(), |(n, _)| n.to_string())
}

/// The block format called `s` (`q4_k`, `Q4_K`, `q4k`).
pub fn parse(s: &str) -> Option<GgmlDType> {
    let s = s.to_ascii_lowercase().replace('_', "");
    FORMATS
        .iter()
        .find(|(n, _)| n.replace('_', "") == s)
        .map(|(_, d)| *d)
}

/// Whether `dt` is one of [`FORMATS`].
pub fn is_block_format(dt: GgmlDType) -> bool {
    FORMATS.iter().any(|(_, d)| *d == dt)
}

/// Bytes per weight in `dt` (`q4_k`: 144 bytes per 256 weights).
pub fn bytes_per_weight(dt: GgmlDType) -> f64 {
    dt.type_size() as f64 / dt.block_size() as f64
}

pub struct Quantized {
    q: Arc<QTensor>,
    /// `(out, in)`.
    dims: (usize, usize),
}

impl Quantized {
    /// `q [out, in]` in one of [`FORMATS`].
    pub fn new(q: QTensor) -> Result<Self> {
        let (o, i) = q.shape().dims2()?;
        if !is_block_format(q.dtype()) {
            candle_core::bail!(
                "a frozen weight in {:?}: a block format expected",
                q.dtype()
            );
        }
        Ok(Quantized {
            q: Arc::new(q),
            dims: (o, i),
        })
    }

    /// `q` (on the CPU) kept on `dev`, its blocks as they are.
    pub fn new_on(q: QTensor, dev: &Device) -> Result<Self> {
        if dev.is_cpu() && q.device().is_cpu() {
            return Self::new(q);
        }
        let storage = QStorage::from_data(q.data()?, dev, q.dtype())?;
        Self::new(QTensor::new(storage, q.shape().clone())?)
    }

    /// A CPU f32 `w [out, in]` quantized to `dt` on `dev`, rows in parallel (candle's quantizer
    /// is serial: a 7B model's projections would take minutes).
    /// `w` may be in any float dtype: it is widened to f32 a slice of rows at a time (an 8B
    /// model's 128K-row table is 2.1 GB in f32, which would otherwise exist beside the model).
    pub fn quantize(w: &Tensor, dt: GgmlDType, dev: &Device) -> Result<Self> {
        let (o, i) = w.dims2()?;
        if !i.is_multiple_of(dt.block_size()) {
            candle_core::bail!(
                "a row of {i} values is not a whole number of {} blocks ({} values)",
                name(dt),
                dt.block_size()
            );
        }
        // Rows per slice: about 64 MB of f32.
        let chunk = ((16 << 20) / i.max(1)).max(16);
        let mut bytes = Vec::new();
        for r0 in (0..o).step_by(chunk) {
            let n = chunk.min(o - r0);
            let part = w.narrow(0, r0, n)?.to_dtype(candle_core::DType::F32)?;
            let b = crate::kernels::slice::with(&part, |v| {
                with_block!(dt, T, { Ok(quantize_rows::<T>(v, n, i)) })
            })??;
            if r0 == 0 && n == o {
                bytes = b;
            } else {
                bytes.extend_from_slice(&b);
            }
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), dev, dt)?;
        Self::new(QTensor::new(storage, (o, i))?)
    }

    pub fn block_format(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// The blocks of `W` as `T`s (the CPU storage is a `Vec<T>`: aligned for `T`).
    fn blocks<'a, T: GgmlType>(&self, bytes: &'a [u8]) -> Result<&'a [T]> {
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size)
            || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        {
            candle_core::bail!("quantized weight storage is not a whole, aligned block array");
        }
        // SAFETY: `T` is a plain-data block type, and the bytes are the storage of a `Vec<T>`
        // (checked for size and alignment above), borrowed for `'a`.
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
    }
}

/// The blocks of the rows of `v [rows, k]`, as bytes (the layout of a `Vec<T>`).
fn quantize_rows<T: GgmlType>(v: &[f32], rows: usize, k: usize) -> Vec<u8> {
    let kb = k / T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); rows * kb];
    blocks
        .par_chunks_mut(kb.max(1) * 16)
        .zip(v.par_chunks(k.max(1) * 16))
        .for_each(|(b, x)| T::from_float(x, b));
    let size = std::mem::size_of::<T>();
    // SAFETY: plain-data blocks viewed as their bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, blocks.len() * size) };
    bytes.to_vec()
}

/// Output columns (weight rows) per task of the block dot products, and activation rows per tile
/// (kept in the cache while a task's weight rows pass over them).
const COLS: usize = 16;
const ROW_TILE: usize = 64;
/// Weight rows dequantized at a time for the tiled GEMM.
const TILE_ROWS: usize = 256;
/// From this many activation rows on, the forward runs the tiled GEMM (measured on AMD EPYC, 2
/// threads, 4096 × 4096 q4_k: at 64 rows the block dot products take 17 ms, dequantized tiles
/// through the f32 GEMM 26 ms; at 512 rows 140 ms against 108 ms, and the bf16 GEMM halves that).
pub const GEMM_ROWS: usize = 32;

/// The rows `r0..r0 + rn` of `W [n, k]` in blocks `w`, dequantized into `tile [rn, k]`.
fn dequantize_rows<T: GgmlType>(w: &[T], k: usize, r0: usize, rn: usize, tile: &mut [f32]) {
    let kb = k / T::BLCK_SIZE;
    tile[..rn * k]
        .par_chunks_mut(k)
        .zip(w[r0 * kb..(r0 + rn) * kb].par_chunks(kb))
        .for_each(|(t, b)| T::to_float(b, t));
}

/// Whether the tiles go through the bf16 GEMM (else the f32 one).
fn bf16_tiles() -> bool {
    bf16::kernel() == bf16::Kernel::Avx512Bf16
}

/// `x [m, k] · Wᵀ` for `W [n, k]` in blocks `w`, tile by tile of dequantized rows: `[m, n]`.
fn matmul_t_tiled<T: GgmlType>(x: &[f32], m: usize, w: &[T], n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let mut tile = vec![0f32; TILE_ROWS.min(n) * k];
    let mut part = vec![0f32; m * TILE_ROWS.min(n)];
    for r0 in (0..n).step_by(TILE_ROWS) {
        let rn = (n - r0).min(TILE_ROWS);
        dequantize_rows(w, k, r0, rn, &mut tile);
        let part = &mut part[..m * rn];
        if bf16_tiles() {
            let p = bf16::Packed::from_f32(&tile[..rn * k], k, rn, true);
            bf16::mm(part, x, m, &p, false, 1.0);
        } else {
            mm(part, x, &tile[..rn * k], m, rn, k, false, true, false, 1.0);
        }
        y.par_chunks_mut(n)
            .zip(part.par_chunks(rn))
            .for_each(|(yr, pr)| yr[r0..r0 + rn].copy_from_slice(pr));
    }
    y
}

/// `x [m, k] · Wᵀ` for `W [n, k]` in blocks `w`: `[m, n]`.
fn matmul_t<T: GgmlType>(x: &[f32], m: usize, w: &[T], n: usize, k: usize) -> Vec<f32> {
    let kb = k / T::BLCK_SIZE;
    let mut xq = vec![T::VecDotType::zeros(); m * kb];
    xq.par_chunks_mut(kb.max(1))
        .zip(x.par_chunks(k.max(1)))
        .for_each(|(q, r)| T::VecDotType::from_float(r, q));
    // `yᵀ [n, m]`, one task per group of COLS weight rows: each value is one dot product, so the
    // grouping changes no bits.
    let mut yt = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return yt;
    }
    yt.par_chunks_mut(COLS * m)
        .enumerate()
        .for_each(|(ci, dst)| {
            let j0 = ci * COLS;
            let cn = dst.len() / m;
            let row = |j: usize| &w[(j0 + j) * kb..][..kb];
            for r0 in (0..m).step_by(ROW_TILE) {
                let rn = (m - r0).min(ROW_TILE);
                let mut j = 0;
                while j + 4 <= cn {
                    let (w0, w1, w2, w3) = (row(j), row(j + 1), row(j + 2), row(j + 3));
                    for r in r0..r0 + rn {
                        let (a, b, c, d) = T::vec_dot_4(k, w0, w1, w2, w3, &xq[r * kb..][..kb]);
                        dst[j * m + r] = a;
                        dst[(j + 1) * m + r] = b;
                        dst[(j + 2) * m + r] = c;
                        dst[(j + 3) * m + r] = d;
                    }
                    j += 4;
                }
                for j in j..cn {
                    for r in r0..r0 + rn {
                        dst[j * m + r] = T::vec_dot(k, row(j), &xq[r * kb..][..kb]);
                    }
                }
            }
        });
    transpose(&yt, n, m)
}

/// `g [m, n] · W` for `W [n, k]` in blocks `w`: `[m, k]`, `W` dequantized TILE_ROWS rows at a
/// time into the GEMM, the tiles' products summed in row order.
fn input_grad<T: GgmlType>(g: &[f32], m: usize, w: &[T], n: usize, k: usize) -> Vec<f32> {
    let mut dx = vec![0f32; m * k];
    if m == 0 || n == 0 || k == 0 {
        return dx;
    }
    let gt = transpose(g, m, n);
    let mut tile = vec![0f32; TILE_ROWS.min(n) * k];
    let mut gpart = vec![0f32; m * TILE_ROWS.min(n)];
    for r0 in (0..n).step_by(TILE_ROWS) {
        let rn = (n - r0).min(TILE_ROWS);
        dequantize_rows(w, k, r0, rn, &mut tile);
        let gtile = &gt[r0 * m..(r0 + rn) * m];
        if bf16_tiles() {
            let gpart = &mut gpart[..m * rn];
            gpart.par_chunks_mut(rn).enumerate().for_each(|(r, row)| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = gtile[j * m + r];
                }
            });
            let p = bf16::Packed::from_f32(&tile[..rn * k], rn, k, false);
            bf16::mm(&mut dx, gpart, m, &p, r0 > 0, 1.0);
        } else {
            mm(
                &mut dx,
                gtile,
                &tile[..rn * k],
                m,
                k,
                rn,
                true,
                false,
                r0 > 0,
                1.0,
            );
        }
    }
    dx
}

impl Format for Quantized {
    fn dims(&self) -> (usize, usize) {
        self.dims
    }

    /// The dtype of `W` as a tensor: dequantized values are f32.
    fn dtype(&self) -> DType {
        DType::F32
    }

    fn device(&self) -> Device {
        self.q.device()
    }

    fn bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    fn describe(&self) -> String {
        format!("{} blocks", name(self.q.dtype()))
    }

    fn name(&self) -> String {
        name(self.q.dtype())
    }

    fn cpu_kernels(&self) -> bool {
        self.q.device().is_cpu()
    }

    fn merged(&self, _b: &Tensor, _a: &Tensor, _scale: f64) -> Result<Option<FrozenWeight>> {
        Ok(None)
    }

    fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = self.dims;
        let bytes = self.q.data()?;
        with_block!(self.q.dtype(), T, {
            let w = self.blocks::<T>(&bytes)?;
            Ok(if m >= GEMM_ROWS {
                matmul_t_tiled::<T>(x, m, w, n, k)
            } else {
                matmul_t::<T>(x, m, w, n, k)
            })
        })
    }

    fn input_grad(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = self.dims;
        let bytes = self.q.data()?;
        with_block!(self.q.dtype(), T, {
            Ok(input_grad::<T>(g, m, self.blocks::<T>(&bytes)?, n, k))
        })
    }

    fn tensor(&self) -> Result<Tensor> {
        self.q.dequantize(&self.q.device())
    }

    /// On the CPU each row's blocks are dequantized alone (an embedding table in blocks is never
    /// widened whole).
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (n, k) = self.dims;
        if !self.q.device().is_cpu() {
            let idx = Tensor::from_slice(ids, ids.len(), &self.q.device())?;
            return self.tensor()?.index_select(&idx, 0);
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n) {
            candle_core::bail!("row {bad} of a {n}-row weight");
        }
        let bytes = self.q.data()?;
        let mut out = vec![0f32; ids.len() * k];
        with_block!(self.q.dtype(), T, {
            let w = self.blocks::<T>(&bytes)?;
            let kb = k / T::BLCK_SIZE;
            out.par_chunks_mut(k.max(1))
                .zip(ids.par_iter())
                .for_each(|(row, &i)| T::to_float(&w[i as usize * kb..(i as usize + 1) * kb], row));
            Ok::<(), candle_core::Error>(())
        })?;
        Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)
    }

    /// candle's `QMatMul` forward (f32 activations); the backward multiplies by `W` dequantized
    /// for that call in the gradient's dtype.
    fn linear(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let inp = dims.pop().unwrap_or(0);
        let xf = x.detach().reshape(((), inp))?.to_dtype(DType::F32)?;
        let y = QMatMul::from_arc(self.q.clone())?
            .forward(&xf)?
            .to_dtype(x.dtype())?;
        dims.push(self.dims.0);
        let y = y.reshape(dims.clone())?;
        let q = self.q.clone();
        let y = crate::kernels::frozen::join(x, y, "quantized-linear", move |g| {
            let out = g.dim(candle_core::D::Minus1)?;
            let w = q.dequantize(g.device())?.to_dtype(g.dtype())?;
            let mut d = g.dims().to_vec();
            d.pop();
            d.push(inp);
            g.reshape(((), out))?.matmul(&w)?.reshape(d)
        })?;
        crate::kernels::frozen::add_bias(y, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::slice::host_vec;

    fn weight(o: usize, i: usize) -> Tensor {
        let v: Vec<f32> = (0..o * i)
            .map(|x| (((x * 37 + x / 7) % 101) as f32 - 50.0) / 64.0)
            .collect();
        Tensor::from_vec(v, (o, i), &Device::Cpu).unwrap()
    }

    /// The forward is the product with the dequantized weight up to the activations' rounding (to
    /// the dot-product type for a few rows, to bf16 in the tiled GEMM); the input gradient is the
    /// product with the dequantized tiles (rounded to bf16 for the bf16 GEMM); the same bits on
    /// every call.
    #[test]
    fn quantized_products_follow_the_dequantized_weight() {
        for (dt, o, i, tol) in [
            (GgmlDType::Q8_0, 37, 64, 2e-2),
            (GgmlDType::Q4_0, 300, 96, 2e-2),
            (GgmlDType::Q4_1, 9, 64, 2e-2),
            (GgmlDType::Q4K, 21, 512, 2e-2),
            (GgmlDType::Q6K, 5, 256, 2e-2),
        ] {
            let w = weight(o, i);
            let q = Quantized::quantize(&w, dt, &Device::Cpu).unwrap();
            assert_eq!(q.dims(), (o, i));
            let wd = host_vec(&q.tensor().unwrap()).unwrap();
            // Dequantized values are near the originals (a 4-bit block: within a step of 1/8
            // of the block's range).
            let orig = host_vec(&w).unwrap();
            let err = orig
                .iter()
                .zip(&wd)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 0.2, "{dt:?}: dequantized error {err}");
            // The tiles are rounded to bf16 where they go through the bf16 GEMM.
            let wt: Vec<f32> = if bf16_tiles() {
                wd.iter()
                    .map(|&v| bf16::from_bf16(bf16::to_bf16(v)))
                    .collect()
            } else {
                wd.clone()
            };
            for m in [1, 3, 70] {
                let x: Vec<f32> = (0..m * i).map(|v| ((v % 13) as f32 - 6.0) / 8.0).collect();
                let g: Vec<f32> = (0..m * o).map(|v| ((v % 11) as f32 - 5.0) / 8.0).collect();
                let y = q.forward(&x, m).unwrap();
                assert_eq!(y, q.forward(&x, m).unwrap());
                let dx = q.input_grad(&g, m).unwrap();
                for r in 0..m {
                    for c in 0..o {
                        let s: f32 = (0..i).map(|kk| x[r * i + kk] * wd[c * i + kk]).sum();
                        let scale: f32 = (0..i)
                            .map(|kk| (x[r * i + kk] * wd[c * i + kk]).abs())
                            .sum();
                        assert!(
                            (y[r * o + c] - s).abs() <= tol * (1.0 + scale),
                            "{dt:?} m {m} y[{r},{c}] {} vs {s}",
                            y[r * o + c]
                        );
                    }
                    for c in 0..i {
                        let s: f32 = (0..o).map(|kk| g[r * o + kk] * wt[kk * i + c]).sum();
                        assert!(
                            (dx[r * i + c] - s).abs() <= 1e-4 * (1.0 + s.abs()),
                            "{dt:?} dx"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn block_format_names_parse() {
        assert_eq!(parse("q4_k"), Some(GgmlDType::Q4K));
        assert_eq!(parse("Q4K"), Some(GgmlDType::Q4K));
        assert_eq!(parse("q8_0"), Some(GgmlDType::Q8_0));
        assert_eq!(parse("bf16"), None);
        for (n, d) in FORMATS {
            assert_eq!(name(d), n);
        }
        assert!(Quantized::quantize(&weight(2, 48), GgmlDType::Q4K, &Device::Cpu).is_err());
    }
}
