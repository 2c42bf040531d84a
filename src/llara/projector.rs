//! LLaRA's projector: `Linear(d_sr → d_llm) → GELU → Linear(d_llm → d_llm)`, mapping a frozen
//! recommender's item embeddings into the LLM's input space. Saved with PyTorch's
//! `nn.Sequential` names (`0.weight`, `0.bias`, `2.weight`, `2.bias`).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// Saves named trainable tensors as one safetensors file (the projector's, the head's).
pub fn save_vars(vars: &[(String, Var)], path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&map, path)
}

/// Removes tensor `name` from a loaded safetensors file as a `Var` of dtype `dt`, checking its shape
/// (`why` is appended to a shape error).
pub fn take_var(
    t: &mut HashMap<String, Tensor>,
    path: &Path,
    name: &str,
    shape: &[usize],
    dt: DType,
    why: &str,
) -> Result<Var> {
    let x = t.remove(name).ok_or_else(|| {
        candle_core::Error::Msg(format!("{}: tensor {name} is missing", path.display()))
    })?;
    if x.dims() != shape {
        candle_core::bail!(
            "{}: tensor {name} has shape {:?}, expected {shape:?}{why}",
            path.display(),
            x.dims()
        );
    }
    Var::from_tensor(&x.to_dtype(dt)?)
}

/// `x Wᵀ + b` (the shared deterministic kernel: [`crate::kernels::nn::affine`]).
fn affine(x: &Tensor, w: &Var, b: &Var) -> Result<Tensor> {
    crate::kernels::nn::affine(x, w.as_tensor(), b.as_tensor())
}

pub struct Projector {
    pub w1: Var,
    pub b1: Var,
    pub w2: Var,
    pub b2: Var,
    /// The first layer's weight for vectors of the recommender's state space (`[UserEmb]`, `s_fc`
    /// rows) when that differs in size from its item embeddings (Caser: `[d_llm, d_state]`, saved
    /// as `state.0.weight`); the rest of the projector is shared.
    pub ws: Option<Var>,
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
            ws: None,
        })
    }

    /// Adds a first-layer weight for state-space vectors of size `d_state` (PyTorch's `nn.Linear`
    /// initialisation, seeded).
    pub fn add_state_input(&mut self, d_state: usize, seed: u64) -> Result<()> {
        let d_llm = self.b1.dims1()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5354_4154);
        let bound = 1.0 / (d_state as f64).sqrt();
        let v: Vec<f64> = (0..d_llm * d_state)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let t =
            Tensor::from_vec(v, (d_llm, d_state), self.w1.device())?.to_dtype(self.w1.dtype())?;
        self.ws = Some(Var::from_tensor(&t)?);
        Ok(())
    }

    /// `[M, d_state]` → `[M, d_llm]`: state-space vectors, through `ws` when the projector has one.
    pub fn forward_state(&self, x: &Tensor) -> Result<Tensor> {
        let Some(ws) = &self.ws else {
            return self.forward(x);
        };
        let x = x.to_dtype(ws.dtype())?;
        let h = affine(&x, ws, &self.b1)?.gelu_erf()?;
        affine(&h, &self.w2, &self.b2)
    }

    /// `[M, d_sr]` → `[M, d_llm]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.w1.dtype())?;
        let h = affine(&x, &self.w1, &self.b1)?.gelu_erf()?;
        affine(&h, &self.w2, &self.b2)
    }

    /// The trainable tensors with their PyTorch names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("0.weight".into(), self.w1.clone()),
            ("0.bias".into(), self.b1.clone()),
            ("2.weight".into(), self.w2.clone()),
            ("2.bias".into(), self.b2.clone()),
        ]
        .into_iter()
        .chain(self.ws.iter().map(|w| ("state.0.weight".into(), w.clone())))
        .collect()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        save_vars(&self.vars(), path)
    }

    /// Loads `projector.safetensors`, checking its shapes against `d_sr → d_llm`.
    pub fn load(path: &Path, d_sr: usize, d_llm: usize, dt: DType, dev: &Device) -> Result<Self> {
        let mut t = candle_core::safetensors::load(path, dev)?;
        let state_dims = t.get("state.0.weight").map(|w| w.dims().to_vec());
        let why = format!(" (recommender dim {d_sr} → LLM dim {d_llm})");
        let mut get = |name: &str, shape: &[usize]| take_var(&mut t, path, name, shape, dt, &why);
        let (w1, b1, w2, b2) = (
            get("0.weight", &[d_llm, d_sr])?,
            get("0.bias", &[d_llm])?,
            get("2.weight", &[d_llm, d_llm])?,
            get("2.bias", &[d_llm])?,
        );
        let ws = match state_dims {
            Some(d) if d.len() == 2 && d[0] == d_llm => Some(get("state.0.weight", &d)?),
            Some(d) => candle_core::bail!(
                "{}: state.0.weight has shape {d:?}, expected [{d_llm}, d_state]",
                path.display()
            ),
            None => None,
        };
        Ok(Self { w1, b1, w2, b2, ws })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_projector_matches_composed_in_value_and_gradient() {
        let dev = Device::Cpu;
        let run = |dt: DType| {
            let p = Projector::new(6, 5, 3, dt, &dev).unwrap();
            let x: Vec<f64> = (0..24).map(|i| (i as f64 * 0.37).sin()).collect();
            let x = Var::from_tensor(
                &Tensor::from_vec(x, (4, 6), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let c: Vec<f64> = (0..20).map(|i| (i as f64 * 0.11).cos()).collect();
            let c = Tensor::from_vec(c, (4, 5), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let loss = (p.forward(x.as_tensor()).unwrap() * c)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let mut out = vec![loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()];
            for v in [
                x.clone(),
                p.w1.clone(),
                p.b1.clone(),
                p.w2.clone(),
                p.b2.clone(),
            ] {
                let gv: Vec<f64> = g
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                out.extend(gv);
            }
            out
        };
        let (a, b) = (run(DType::F32), run(DType::F64));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn save_load_round_trip_and_shape_errors() {
        let dev = Device::Cpu;
        let p = Projector::new(6, 5, 3, DType::F32, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("projector.safetensors");
        p.save(&f).unwrap();
        let q = Projector::load(&f, 6, 5, DType::F32, &dev).unwrap();
        for ((_, a), (_, b)) in p.vars().iter().zip(q.vars()) {
            let (x, y): (Vec<f32>, Vec<f32>) = (
                a.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
                b.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(x, y);
        }
        let e = Projector::load(&f, 8, 5, DType::F32, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("0.weight") && e.contains("recommender dim 8"),
            "{e}"
        );
    }
}
