//! Adam with L2 regularisation added to the gradient, exactly as PyTorch's `torch.optim.Adam` with
//! `weight_decay` (which LLaRA's recommender recipe uses); candle's `AdamW` decays decoupled instead.

use candle_core::{backprop::GradStore, Result, Tensor, Var};

pub struct Adam {
    vars: Vec<(Var, Tensor, Tensor)>, // var, first moment, second moment
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: i32,
}

impl Adam {
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let vars = vars
            .into_iter()
            .map(|v| {
                let m = v.zeros_like()?;
                let s = v.zeros_like()?;
                Ok((v, m, s))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            vars,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
        })
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        for (var, m, v) in &mut self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = if self.weight_decay != 0.0 {
                (g + (var.as_tensor() * self.weight_decay)?)?
            } else {
                g.clone()
            };
            *m = ((&*m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = (m.div(&denom)? * (self.lr / bc1))?;
            var.set(&var.as_tensor().sub(&update)?)?;
        }
        Ok(())
    }
}
