//! An exponential moving average of a model's weights, updated after every optimizer step: what
//! `llara train-sr --ema` validates, selects and saves. The decay ramps up as (1 + t) / (10 + t) to
//! its target (TensorFlow's `ExponentialMovingAverage` with `num_updates`), so a short run's average
//! is not stuck near the initial weights.
//!
//! On the CPU the update is one in-place pass per parameter; elsewhere it is composed from tensor
//! ops.

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, Var};

/// `a = a·d + p·(1 − d)`, both factors rounded to f32 from f64 as candle's `affine` rounds them,
/// so the in-place pass equals the composed form bit for bit.
struct Blend {
    decay: f64,
}

impl InplaceOp2 for Blend {
    fn name(&self) -> &'static str {
        "ema-blend"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let a = crate::kernels::slice::f32_slice_mut(s1, l1, "ema-blend")?;
        let p = crate::kernels::slice::f32_slice(s2, l2, "ema-blend")?;
        let (keep, take) = (self.decay as f32, (1.0 - self.decay) as f32);
        for (ai, pi) in a.iter_mut().zip(p) {
            *ai = *ai * keep + pi * take;
        }
        Ok(())
    }
}

/// The average of `vars`, one copy per variable.
pub struct Ema {
    decay: f64,
    steps: u64,
    avg: Vec<Var>,
}

impl Ema {
    /// Starts the average at the variables' current values.
    pub fn new(vars: &[Var], decay: f64) -> Result<Self> {
        let avg = vars
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().detach().copy()?))
            .collect::<Result<_>>()?;
        Ok(Self {
            decay,
            steps: 0,
            avg,
        })
    }

    /// Blends the variables' current values in (call after every optimizer step).
    pub fn update(&mut self, vars: &[Var]) -> Result<()> {
        self.steps += 1;
        let t = self.steps as f64;
        let d = self.decay.min((1.0 + t) / (10.0 + t));
        for (a, v) in self.avg.iter().zip(vars) {
            let p = v.as_tensor().detach();
            if crate::kernels::fused(&[a.as_tensor()]) {
                a.as_tensor()
                    .inplace_op2(&p.contiguous()?, &Blend { decay: d })?;
            } else {
                a.set(&((a.as_tensor() * d)? + (p * (1.0 - d))?)?)?;
            }
        }
        Ok(())
    }

    /// The averaged values, in the order of the variables given to [`Ema::new`].
    pub fn values(&self) -> impl Iterator<Item = &Tensor> {
        self.avg.iter().map(|v| v.as_tensor())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place CPU pass equals the composed form bit for bit.
    #[test]
    fn in_place_equals_composed() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[0.3f32, -1.7, 2.9e-3, 5.0], &dev).unwrap();
        let p = Tensor::new(&[1.1f32, 0.2, -4.4, 5.0], &dev).unwrap();
        let d = 0.999f64.min(1234.0 / 1243.0);
        let composed = ((&a * d).unwrap() + (&p * (1.0 - d)).unwrap()).unwrap();
        let fused = a.copy().unwrap();
        fused.inplace_op2(&p, &Blend { decay: d }).unwrap();
        assert_eq!(
            fused.to_vec1::<f32>().unwrap(),
            composed.to_vec1::<f32>().unwrap()
        );
    }

    /// The ramped decay follows the definition.
    #[test]
    fn blends_with_a_ramped_decay() {
        let dev = Device::Cpu;
        let v = Var::from_tensor(&Tensor::new(&[0f32, 10.0], &dev).unwrap()).unwrap();
        let mut ema = Ema::new(std::slice::from_ref(&v), 0.5).unwrap();
        v.set(&Tensor::new(&[1f32, 20.0], &dev).unwrap()).unwrap();
        ema.update(std::slice::from_ref(&v)).unwrap();
        // Step 1: decay min(0.5, 2/11) = 2/11.
        let d = 2.0f32 / 11.0;
        let want = [d * 0.0 + (1.0 - d) * 1.0, d * 10.0 + (1.0 - d) * 20.0];
        let got = ema.values().next().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        // Much later the target decay applies.
        for _ in 0..100 {
            ema.update(std::slice::from_ref(&v)).unwrap();
        }
        v.set(&Tensor::new(&[3f32, 20.0], &dev).unwrap()).unwrap();
        ema.update(std::slice::from_ref(&v)).unwrap();
        let got = ema.values().next().unwrap().to_vec1::<f32>().unwrap();
        assert!((got[0] - 2.0).abs() < 1e-4, "{}", got[0]);
        // The raw weights are untouched.
        assert_eq!(v.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0, 20.0]);
    }
}
