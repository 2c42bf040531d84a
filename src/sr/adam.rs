//! Adam with L2 regularisation added to the gradient, exactly as PyTorch's `torch.optim.Adam` with
//! `weight_decay` (which LLaRA's recommender recipe uses); candle's `AdamW` decays decoupled instead.
//!
//! On the CPU the update is one fused in-place pass per parameter (no temporary tensors); elsewhere
//! it is composed from tensor ops.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, Var};
use std::sync::Mutex;

#[derive(Clone, Copy)]
struct Hyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    bc1: f64,
    bc2: f64,
}

/// One parameter's moments.
enum Moments {
    Host(Mutex<(Vec<f32>, Vec<f32>)>),
    Device(Tensor, Tensor),
}

struct FusedStep<'a> {
    h: Hyper,
    moments: &'a Mutex<(Vec<f32>, Vec<f32>)>,
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let p = crate::kernels::slice::f32_slice_mut(s1, l1, "adam-step")?;
        let g = crate::kernels::slice::f32_slice(s2, l2, "adam-step")?;
        let mut guard = self.moments.lock().expect("adam moments");
        let (m, v) = &mut *guard;
        let h = self.h;
        let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
        let wd = h.weight_decay as f32;
        let step = (h.lr / h.bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / h.bc2.sqrt()) as f32;
        let eps = h.eps as f32;
        for (((pi, gi), mi), vi) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = gi + wd * *pi;
            *mi = b1 * *mi + (1.0 - b1) * gi;
            *vi = b2 * *vi + (1.0 - b2) * gi * gi;
            *pi -= step * *mi / (vi.sqrt() * inv_sqrt_bc2 + eps);
        }
        Ok(())
    }
}

pub struct Adam {
    vars: Vec<(Var, Moments)>,
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
                let moments = if crate::kernels::fused(&[v.as_tensor()]) {
                    let n = v.elem_count();
                    Moments::Host(Mutex::new((vec![0f32; n], vec![0f32; n])))
                } else {
                    Moments::Device(v.zeros_like()?, v.zeros_like()?)
                };
                Ok((v, moments))
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
        let h = Hyper {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bc1: 1.0 - self.beta1.powi(self.step),
            bc2: 1.0 - self.beta2.powi(self.step),
        };
        for (var, moments) in &mut self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            match moments {
                Moments::Host(mv) => {
                    let g = g.contiguous()?;
                    var.as_tensor()
                        .inplace_op2(&g, &FusedStep { h, moments: mv })?;
                }
                Moments::Device(m, v) => {
                    let g = if h.weight_decay != 0.0 {
                        (g + (var.as_tensor() * h.weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    *m = ((&*m * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
                    *v = ((&*v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
                    let denom = ((v.sqrt()? / h.bc2.sqrt())? + h.eps)?;
                    let update = (m.div(&denom)? * (h.lr / h.bc1))?;
                    var.set(&var.as_tensor().sub(&update)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused CPU step equals the composed one (PyTorch's formula).
    #[test]
    fn fused_matches_composed() {
        let init: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = Var::from_vec(init.clone(), 37, &Device::Cpu).unwrap();
        let b = Var::from_vec(init, 37, &Device::Cpu).unwrap();
        let mut fused = Adam::new(vec![a.clone()], 1e-2, 1e-3).unwrap();
        let mut composed = Adam::new(vec![b.clone()], 1e-2, 1e-3).unwrap();
        composed.vars[0].1 = Moments::Device(b.zeros_like().unwrap(), b.zeros_like().unwrap());
        for step in 0..5 {
            let la = (a.as_tensor().sqr().unwrap() * (step as f64 + 1.0))
                .unwrap()
                .sum_all()
                .unwrap();
            let lb = (b.as_tensor().sqr().unwrap() * (step as f64 + 1.0))
                .unwrap()
                .sum_all()
                .unwrap();
            fused.step(&la.backward().unwrap()).unwrap();
            composed.step(&lb.backward().unwrap()).unwrap();
        }
        let d = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
        assert_ne!(
            a.as_tensor().to_vec1::<f32>().unwrap()[3],
            (3f32 * 0.37).sin()
        );
    }
}
