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
//! - [`quantized`]: a GGUF block format (`q8_0`, `q4_k`, …), multiplied block by block; the input
//!   gradient dequantizes a tile of rows at a time (`--dtype q4_k`, or a GGUF's own blocks).
//!
//! Callers never branch on the format: the fused CPU kernels ask [`FrozenWeight::cpu_kernels`]
//! and call [`FrozenWeight::forward`] / [`FrozenWeight::input_grad`] on f32 slices; the composed
//! path (other devices, `--fused off`) asks [`FrozenWeight::tensor`] for `W` as a tensor.

pub mod dense;
pub mod packed;
pub mod quantized;

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
    /// The name of the stored values' type, as `--dtype` and the reports write it (`bf16`, `q4_k`).
    fn name(&self) -> String {
        format!("{:?}", self.dtype()).to_lowercase()
    }
    /// `W + scale · b · a` (an adapter `b [out, r]`, `a [r, in]` merged in) as a new weight of this
    /// format, or `None` where the format cannot hold it: a block format would round the adapter
    /// away, so it keeps its adapter beside it. By default through [`Format::tensor`] in f32
    /// (f64 for f64 weights), stored back in this dtype.
    fn merged(&self, b: &Tensor, a: &Tensor, scale: f64) -> Result<Option<FrozenWeight>> {
        let dt = self.dtype();
        let acc = if dt == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let delta = (b.to_dtype(acc)?.matmul(&a.to_dtype(acc)?)? * scale)?;
        // Detached: a merged weight must not carry the adapter's graph, or every activation
        // computed from it would be kept for a backward pass that never comes.
        let w = (self.tensor()?.to_dtype(acc)? + delta)?
            .to_dtype(dt)?
            .detach();
        FrozenWeight::new(w).map(Some)
    }
    /// Whether [`Format::forward`] and [`Format::input_grad`] run (CPU, f32 activations).
    fn cpu_kernels(&self) -> bool;
    /// `x · Wᵀ`: a new row-major `[m, out]` from a row-major `x [m, in]`.
    fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>>;
    /// `g · W`: a new row-major `[m, in]` from `g [m, out]` (the input's gradient).
    fn input_grad(&self, g: &[f32], m: usize) -> Result<Vec<f32>>;
    /// `W [out, in]` as a tensor of [`Format::dtype`] on [`Format::device`]: a view where the
    /// format holds one, else made on the fly (the composed path, merging an adapter).
    fn tensor(&self) -> Result<Tensor>;
    /// The rows `ids` of `W` as a tensor `[ids, in]` on [`Format::device`] (an embedding lookup),
    /// in [`Format::dtype`] or, for a block format, f32; by default through [`Format::tensor`].
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(ids, ids.len(), &self.device())?;
        self.tensor()?.index_select(&idx, 0)
    }
    /// `x [.., in] · Wᵀ (+ b)` as a tensor op whose backward gives `x` its gradient only (the
    /// composed path: other devices, `--fused off`).
    fn linear(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let w = self.tensor()?.to_dtype(x.dtype())?;
        crate::kernels::frozen::linear(x, &w, b)
    }
}

/// Frozen projections kept in GGUF blocks (`--dtype q4_k`, `--dtype gguf`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// Every projection quantized to this block format at load (a row that is not a whole number
    /// of its blocks falls back to `q8_0`, then to the float dtype).
    To(candle_core::quantized::GgmlDType),
    /// A GGUF file's projections in the block formats the file stores them in.
    Native,
}

/// How a backbone's frozen weights are stored: a float dtype, optionally with the projections in
/// GGUF blocks (then `dtype` is that of the rest: embeddings, norms, the projections that are not
/// block-sized).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    pub dtype: DType,
    pub blocks: Option<Blocks>,
}

impl From<DType> for Precision {
    fn from(dtype: DType) -> Self {
        Precision {
            dtype,
            blocks: None,
        }
    }
}

impl Precision {
    /// As `--dtype` writes it: `f32`, `bf16`, `q4_k`, `gguf`.
    pub fn name(&self) -> String {
        match self.blocks {
            None => format!("{:?}", self.dtype).to_lowercase(),
            Some(Blocks::To(dt)) => quantized::name(dt),
            Some(Blocks::Native) => "gguf".into(),
        }
    }

    /// `--dtype`'s value: a float dtype, a block format (its non-block parts in bf16), or `gguf`.
    pub fn parse(s: &str) -> Option<Self> {
        let float = match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f16" | "float16" => Some(DType::F16),
            _ => None,
        };
        if let Some(dtype) = float {
            return Some(dtype.into());
        }
        let blocks = if s.eq_ignore_ascii_case("gguf") {
            Blocks::Native
        } else {
            Blocks::To(quantized::parse(s)?)
        };
        Some(Precision {
            dtype: DType::BF16,
            blocks: Some(blocks),
        })
    }

    /// The block format a projection with rows of `inp` values is kept in under `To(dt)`: `dt`,
    /// else `q8_0` where the row is a whole number of its 32-value blocks, else none (float).
    pub fn fit(
        dt: candle_core::quantized::GgmlDType,
        inp: usize,
    ) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType;
        [dt, GgmlDType::Q8_0]
            .into_iter()
            .find(|d| inp.is_multiple_of(d.block_size()))
    }

    /// Under blocks quantized at load, the block formats of the input table and of an untied LM
    /// head with rows of `hidden` values, as llama.cpp's K-quant mixes store them: the table in
    /// the projections' format, the head in `q6_k` (`q8_0` under `q8_0`), each through
    /// [`Precision::fit`]; `None` for a table kept as floats.
    pub fn table_blocks(
        self,
        hidden: usize,
    ) -> (
        Option<candle_core::quantized::GgmlDType>,
        Option<candle_core::quantized::GgmlDType>,
    ) {
        use candle_core::quantized::GgmlDType;
        let Some(Blocks::To(dt)) = self.blocks else {
            return (None, None);
        };
        let head = if dt == GgmlDType::Q8_0 {
            dt
        } else {
            GgmlDType::Q6K
        };
        (Self::fit(dt, hidden), Self::fit(head, hidden))
    }
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

    /// A weight already in a block format.
    pub fn quantized(q: candle_core::quantized::QTensor) -> Result<Self> {
        Ok(Self::from(quantized::Quantized::new(q)?))
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

    pub fn name(&self) -> String {
        self.0.name()
    }

    /// The rows `ids` of `W` (see [`Format::rows`]).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        self.0.rows(ids)
    }

    /// `W + scale · b · a` in the same format, or `None` (see [`Format::merged`]).
    pub fn merged(&self, b: &Tensor, a: &Tensor, scale: f64) -> Result<Option<FrozenWeight>> {
        self.0.merged(b, a, scale)
    }

    /// `x · Wᵀ (+ b)` on the composed path (see [`Format::linear`]).
    pub fn linear(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.0.linear(x, b)
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

    /// Merging an adapter gives `W + scale · B·A` in the weight's own format, each value within
    /// one rounding of the dtype of the exact sum; a block format keeps its adapter (`None`).
    #[test]
    fn merging_an_adapter_adds_its_product_in_the_same_format() {
        let (o, i, r) = (70, 130, 3);
        let b = Tensor::from_vec(
            (0..o * r)
                .map(|v| ((v % 7) as f32 - 3.0) / 16.0)
                .collect::<Vec<f32>>(),
            (o, r),
            &Device::Cpu,
        )
        .unwrap();
        let a = Tensor::from_vec(
            (0..r * i)
                .map(|v| ((v % 5) as f32 - 2.0) / 8.0)
                .collect::<Vec<f32>>(),
            (r, i),
            &Device::Cpu,
        )
        .unwrap();
        let scale = 2.0;
        let f32s = |t: &Tensor| host_vec(&t.to_dtype(DType::F32).unwrap()).unwrap();
        let (bv, av) = (f32s(&b), f32s(&a));
        for (dt, ulp) in [(DType::F32, 1e-6f32), (DType::BF16, 1.0 / 256.0)] {
            let w = weight(o, i, dt);
            let wv = f32s(&w);
            let f = FrozenWeight::new(w).unwrap();
            let m = f
                .merged(&b, &a, scale)
                .unwrap()
                .expect("a float weight merges");
            assert_eq!((m.dims(), m.dtype()), ((o, i), dt));
            assert_eq!(m.describe(), f.describe());
            let got = f32s(&m.tensor().unwrap());
            for row in 0..o {
                for c in 0..i {
                    let d: f32 = (0..r).map(|q| bv[row * r + q] * av[q * i + c]).sum();
                    let want = wv[row * i + c] + scale as f32 * d;
                    let e = (got[row * i + c] - want).abs();
                    assert!(e <= ulp * want.abs().max(1e-3), "{dt:?} at {row},{c}: {e}");
                }
            }
        }
        let q = candle_core::quantized::QTensor::quantize(
            &weight(8, 64, DType::F32),
            candle_core::quantized::GgmlDType::Q8_0,
        )
        .unwrap();
        let f = FrozenWeight::quantized(q).unwrap();
        let (b8, a8) = (
            Tensor::zeros((8, 1), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((1, 64), DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(f.merged(&b8, &a8, 1.0).unwrap().is_none());
    }

    /// An embedding lookup reads exactly the rows of `W` each format holds (blocks: the rows of
    /// the dequantized weight), in any order and with repeats; a row past the end is an error.
    #[test]
    fn rows_are_the_rows_of_the_weight_held() {
        let (o, i) = (70, 64);
        let ids = [5u32, 0, 69, 5];
        let f32s = |t: &Tensor| host_vec(&t.to_dtype(DType::F32).unwrap()).unwrap();
        let q = candle_core::quantized::QTensor::quantize(
            &weight(o, i, DType::F32),
            candle_core::quantized::GgmlDType::Q8_0,
        )
        .unwrap();
        let formats = [
            FrozenWeight::new(weight(o, i, DType::F32)).unwrap(),
            FrozenWeight::plain(weight(o, i, DType::F32)).unwrap(),
            FrozenWeight::new(weight(o, i, DType::BF16)).unwrap(),
            FrozenWeight::quantized(q).unwrap(),
        ];
        for f in &formats {
            let whole = f32s(&f.tensor().unwrap());
            let got = f32s(&f.rows(&ids).unwrap());
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&r| whole[r as usize * i..(r as usize + 1) * i].to_vec())
                .collect();
            assert_eq!(got, want, "{}", f.describe());
            assert!(f.rows(&[o as u32]).is_err(), "{}", f.describe());
        }
    }
}
