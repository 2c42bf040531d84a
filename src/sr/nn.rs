//! Small differentiable building blocks (candle's fused layer norm has no backward) and a seeded
//! dropout, so that training is reproducible from the seed.

use candle_core::{Result, Tensor};
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
        super::ops::add_trailing(&matmul_t(x, &self.weight)?, &self.bias)
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
        super::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Inverted dropout with masks drawn from a seeded stream.
#[derive(Clone)]
pub struct Dropout {
    pub p: f64,
    rng: ChaCha8Rng,
}

impl Dropout {
    pub fn new(p: f64, rng: ChaCha8Rng) -> Self {
        Self { p, rng }
    }

    /// `n` multipliers: `1 / (1 - p)` with probability `1 - p`, else 0.
    pub fn mask_values(&mut self, n: usize) -> Vec<f32> {
        let scale = self.scale();
        self.keep_flags(n)
            .into_iter()
            .map(|k| if k != 0 { scale } else { 0.0 })
            .collect()
    }

    /// `n` keep flags (1 with probability `1 - p`): the same draws as [`Dropout::mask_values`].
    pub fn keep_flags(&mut self, n: usize) -> Vec<u8> {
        let keep = 1.0 - self.p;
        // Compare 32-bit draws with a threshold: one draw per element.
        let threshold = (keep * 4_294_967_296.0).min(4_294_967_295.0) as u32;
        (0..n)
            .map(|_| u8::from(self.rng.random::<u32>() < threshold))
            .collect()
    }

    /// A dropout with the same rate and its own stream, seeded by one draw from this one.
    pub fn fork(&mut self) -> Dropout {
        use rand::SeedableRng;
        Dropout::new(self.p, ChaCha8Rng::seed_from_u64(self.rng.random::<u64>()))
    }

    /// The multiplier of kept elements, `1 / (1 - p)`.
    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    pub fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let mask = self.mask_values(x.elem_count());
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
