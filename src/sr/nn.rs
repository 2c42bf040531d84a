//! PyTorch's `nn.Linear` and `nn.LayerNorm` as the recommenders load them (their checkpoints'
//! names and shapes), over the shared fused kernels of [`crate::kernels::nn`] (candle's fused
//! layer norm has no backward).

use crate::kernels::nn::{add_trailing, layer_norm, matmul_t};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

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
        add_trailing(&matmul_t(x, &self.weight)?, &self.bias)
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
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
