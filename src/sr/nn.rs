//! Small differentiable building blocks (candle's fused layer norm has no backward) and a seeded
//! dropout, so that training is reproducible from the seed.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// PyTorch's `nn.Linear`: `weight [out, in]`, `bias [out]`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn load(vb: VarBuilder, inp: usize, out: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out, inp), "weight")?,
            bias: vb.get(out, "bias")?,
        })
    }

    /// From a weight stored in another shape (1×1 convolutions `[out, in, 1]`).
    pub fn load_reshaped(vb: VarBuilder, shape: &[usize], inp: usize, out: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(shape, "weight")?.reshape((out, inp))?,
            bias: vb.get(out, "bias")?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.t()?;
        let y = match x.rank() {
            2 => x.matmul(&w)?,
            _ => x.broadcast_matmul(&w)?,
        };
        y.broadcast_add(&self.bias)
    }
}

/// PyTorch's `nn.LayerNorm` (eps 1e-5), built from differentiable primitives.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: 1e-5,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Inverted dropout with masks drawn from a seeded stream.
pub struct Dropout {
    pub p: f64,
    rng: ChaCha8Rng,
}

impl Dropout {
    pub fn new(p: f64, rng: ChaCha8Rng) -> Self {
        Self { p, rng }
    }

    pub fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let n = x.elem_count();
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if self.rng.random::<f64>() < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// Applies dropout when training (`Some`), the identity otherwise.
pub fn maybe_dropout(x: &Tensor, d: &mut Option<&mut Dropout>) -> Result<Tensor> {
    match d {
        Some(d) => d.apply(x),
        None => Ok(x.clone()),
    }
}

/// Rows of `table` for the ids in `ids` (any shape): `[.., hidden]`.
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    let flat = ids.flatten_all()?;
    let rows = table.index_select(&flat, 0)?;
    dims.push(table.dim(1)?);
    rows.reshape(dims)
}
