//! AdamW with parameter groups (PyTorch's semantics: decoupled weight decay, per-parameter step
//! counts, parameters without a gradient skipped), its state for bit-exact resume, the learning-
//! rate schedule (linear warm-up from lr/100, then cosine to the floor) and global-norm clipping.

use candle_core::{DType, Result, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

pub struct Param {
    pub name: String,
    pub var: Var,
    pub weight_decay: f64,
    /// This parameter's learning rate is the schedule's times this (1 unless set).
    pub lr_scale: f64,
    m: Tensor,
    v: Tensor,
    step: u64,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamW {
    /// `(name, var, weight decay)` for every trainable tensor.
    pub fn new(params: Vec<(String, Var, f64)>) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var, weight_decay)| {
                let z = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                Ok(Param {
                    name,
                    var,
                    weight_decay,
                    lr_scale: 1.0,
                    m: z.clone(),
                    v: z,
                    step: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// Scales the learning rate of every parameter whose name starts with `prefix`.
    pub fn set_lr_scale(&mut self, prefix: &str, scale: f64) {
        for p in self
            .params
            .iter_mut()
            .filter(|p| p.name.starts_with(prefix))
        {
            p.lr_scale = scale;
        }
    }

    /// One update with `grads` (by parameter name); parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        for p in self.params.iter_mut() {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let lr = lr * p.lr_scale;
            let g = g.to_dtype(DType::F32)?;
            p.step += 1;
            let t = p.step as i32;
            p.m = ((&p.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            p.v = ((&p.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let bc1 = 1.0 - self.beta1.powi(t);
            let bc2 = 1.0 - self.beta2.powi(t);
            let w = p.var.as_tensor().to_dtype(DType::F32)?;
            let w = (w * (1.0 - lr * p.weight_decay))?;
            let denom = ((p.v.clone() / bc2)?.sqrt()? + self.eps)?;
            let upd = ((&p.m / bc1)? / denom)?;
            let w = (w - (upd * lr)?)?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// Moments and step counts as tensors (`{name}.m`, `{name}.v`, `{name}.step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("{}.m", p.name), p.m.clone());
            out.insert(format!("{}.v", p.name), p.v.clone());
            out.insert(
                format!("{}.step", p.name),
                Tensor::new(&[p.step as i64], p.m.device())?,
            );
        }
        Ok(out)
    }

    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), StateError> {
        for p in self.params.iter_mut() {
            let get = |k: &str| {
                state
                    .get(&format!("{}.{k}", p.name))
                    .ok_or_else(|| StateError::Missing(p.name.clone()))
            };
            let (m, v) = (get("m")?, get("v")?);
            if m.dims() != p.m.dims() || v.dims() != p.v.dims() {
                return Err(StateError::Shape(p.name.clone()));
            }
            p.m = m.to_device(p.m.device())?;
            p.v = v.to_device(p.v.device())?;
            let s: Vec<i64> = get("step")?.to_vec1()?;
            p.step = s.first().copied().unwrap_or(0) as u64;
        }
        Ok(())
    }
}

/// A saved optimizer state that does not fit the parameters being resumed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("optimizer state for {0} is missing")]
    Missing(String),
    #[error("optimizer state for {0} has the wrong shape")]
    Shape(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over the first 5%
/// of steps from lr/100 to lr, then cosine down to `min_lr`.
pub fn lr_at(step: usize, total: usize, lr: f64, min_lr: f64) -> f64 {
    let warm = (total as f64 * 0.05).ceil().max(1.0) as usize;
    if step < warm {
        return lr * (0.01 + 0.99 * step as f64 / warm as f64);
    }
    let span = total.saturating_sub(warm).max(1) as f64;
    let progress = ((step - warm) as f64 / span).min(1.0);
    min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`; returns the norm before.
/// The squares are summed in the map's order (by name): the same norm, to the bit, in every
/// process (a hash map's order changes from process to process, and with it the sum's last bits,
/// the clipping factor and every weight after it).
pub fn clip(grads: &mut BTreeMap<String, Tensor>, max_norm: Option<f64>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if let Some(max) = max_norm {
        if norm > max && norm > 0.0 {
            let s = max / (norm + 1e-6);
            for g in grads.values_mut() {
                *g = (&*g * s)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let (lr, min) = (1e-3, 1e-5);
        assert!((lr_at(0, 100, lr, min) - 1e-5).abs() < 1e-12);
        assert!((lr_at(5, 100, lr, min) - lr).abs() < 1e-12);
        assert!(lr_at(50, 100, lr, min) < lr && lr_at(50, 100, lr, min) > min);
        assert!((lr_at(100, 100, lr, min) - min).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_pytorch_on_one_parameter() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01), p = [1, -2], grads [0.5, 0.25] then [-1, 2].
        let v = Var::new(&[1f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let mut o = AdamW::new(vec![("p".into(), v.clone(), 0.01)]).unwrap();
        for g in [[0.5f32, 0.25], [-1.0, 2.0]] {
            let grads = BTreeMap::from([(
                "p".to_string(),
                Tensor::new(&g, &candle_core::Device::Cpu).unwrap(),
            )]);
            o.step(&grads, 0.1).unwrap();
        }
        let got: Vec<f32> = v.as_tensor().to_vec1().unwrap();
        // PyTorch's update rule, computed in f64.
        let want = [0.934_711_35_f32, -2.178_048_6];
        assert!((got[0] - want[0]).abs() < 1e-5, "{got:?}");
        assert!((got[1] - want[1]).abs() < 1e-5, "{got:?}");
    }
}
