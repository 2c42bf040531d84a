//! LLaRA's projector: `Linear(d_sr → d_llm) → GELU → Linear(d_llm → d_llm)`, mapping a frozen
//! recommender's item embeddings into the LLM's input space. Saved with PyTorch's
//! `nn.Sequential` names (`0.weight`, `0.bias`, `2.weight`, `2.bias`).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

pub struct Projector {
    pub w1: Var,
    pub b1: Var,
    pub w2: Var,
    pub b2: Var,
}

impl Projector {
    /// PyTorch's `nn.Linear` initialisation (weights and biases uniform in ±1/√fan_in), seeded.
    pub fn new(d_sr: usize, d_llm: usize, seed: u64, dt: DType, dev: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5052_4f4a);
        let mut uniform = |n: usize, fan_in: usize, shape: &[usize]| -> Result<Var> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let v: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, dev)?.to_dtype(dt)?)
        };
        Ok(Self {
            w1: uniform(d_llm * d_sr, d_sr, &[d_llm, d_sr])?,
            b1: uniform(d_llm, d_sr, &[d_llm])?,
            w2: uniform(d_llm * d_llm, d_llm, &[d_llm, d_llm])?,
            b2: uniform(d_llm, d_llm, &[d_llm])?,
        })
    }

    /// `[M, d_sr]` → `[M, d_llm]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.w1.dtype())?;
        let h = x
            .matmul(&self.w1.as_tensor().t()?)?
            .broadcast_add(self.b1.as_tensor())?
            .gelu_erf()?;
        h.matmul(&self.w2.as_tensor().t()?)?
            .broadcast_add(self.b2.as_tensor())
    }

    /// The trainable tensors with their PyTorch names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("0.weight".into(), self.w1.clone()),
            ("0.bias".into(), self.b1.clone()),
            ("2.weight".into(), self.w2.clone()),
            ("2.bias".into(), self.b2.clone()),
        ]
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path)
    }

    /// Loads `projector.safetensors`, checking its shapes against `d_sr → d_llm`.
    pub fn load(path: &Path, d_sr: usize, d_llm: usize, dt: DType, dev: &Device) -> Result<Self> {
        let mut t = candle_core::safetensors::load(path, dev)?;
        let mut get = |name: &str, shape: &[usize]| -> Result<Var> {
            let x = t.remove(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: tensor {name} is missing", path.display()))
            })?;
            if x.dims() != shape {
                candle_core::bail!(
                    "{}: tensor {name} has shape {:?}, expected {shape:?} (recommender dim {d_sr} → LLM dim {d_llm})",
                    path.display(),
                    x.dims()
                );
            }
            Var::from_tensor(&x.to_dtype(dt)?)
        };
        Ok(Self {
            w1: get("0.weight", &[d_llm, d_sr])?,
            b1: get("0.bias", &[d_llm])?,
            w2: get("2.weight", &[d_llm, d_llm])?,
            b2: get("2.bias", &[d_llm])?,
        })
    }
}
