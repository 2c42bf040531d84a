//! GRU4Rec as LLaRA ships it: item embedding → one-layer GRU over the true length → the last hidden
//! state → linear head. Gates follow PyTorch's `nn.GRU` (r, z, n order in `weight_ih_l0`).
//!
//! In training, dropout applies to the input embeddings and to the final state (LLaRA's code has
//! none; `--dropout 0` reproduces it). Inference is unchanged either way.

use super::nn::Linear;
use super::{Batch, Config};
use crate::kernels::dropout::{maybe_dropout, Dropout};
use crate::kernels::nn::{add_trailing, embed, matmul_t};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

pub struct GRU4Rec {
    pub item_embeddings: Tensor,
    pub weight_ih: Tensor,
    pub weight_hh: Tensor,
    pub bias_ih: Tensor,
    pub bias_hh: Tensor,
    pub s_fc: Linear,
    pub hidden: usize,
}

impl GRU4Rec {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let g = vb.pp("gru");
        Ok(Self {
            item_embeddings: vb.get((cfg.item_num + 1, h), "item_embeddings.weight")?,
            weight_ih: g.get((3 * h, h), "weight_ih_l0")?,
            weight_hh: g.get((3 * h, h), "weight_hh_l0")?,
            bias_ih: g.get(3 * h, "bias_ih_l0")?,
            bias_hh: g.get(3 * h, "bias_hh_l0")?,
            s_fc: Linear::load(vb.pp("s_fc"), h, cfg.item_num)?,
            hidden: h,
        })
    }

    /// The GRU's hidden state after each history's last item: `[B, H]`. `dropout` is `Some` in
    /// training mode.
    pub fn state(&self, batch: &Batch, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let state = if crate::kernels::fused(&[&self.item_embeddings]) {
            self.state_fused(batch, &mut dropout)?
        } else {
            self.state_composed(batch, &mut dropout)?
        };
        maybe_dropout(&state, &mut dropout)
    }

    /// Input projections of every step at once: `[B, steps, 3H]`.
    fn input_gates(
        &self,
        batch: &Batch,
        steps: usize,
        dropout: &mut Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let emb = embed(&self.item_embeddings, &batch.seq.narrow(1, 0, steps)?)?;
        let emb = maybe_dropout(&emb, dropout)?;
        add_trailing(&matmul_t(&emb, &self.weight_ih)?, &self.bias_ih)
    }

    /// The whole recurrence as one fused op; rows past their length keep their state.
    pub fn state_fused(&self, batch: &Batch, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        let (b, _) = batch.seq.dims2()?;
        let steps = batch.lens.iter().copied().max().unwrap_or(0);
        if steps == 0 {
            return Tensor::zeros((b, self.hidden), DType::F32, self.item_embeddings.device());
        }
        let gi = self.input_gates(batch, steps, dropout)?.contiguous()?;
        let op = super::ops::GruSequence::new(batch.lens.clone());
        gi.apply_op3(
            &self.weight_hh.contiguous()?,
            &self.bias_hh.contiguous()?,
            op,
        )
    }

    /// The same from differentiable primitives (any device).
    pub fn state_composed(
        &self,
        batch: &Batch,
        dropout: &mut Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let h = self.hidden;
        let (b, _) = batch.seq.dims2()?;
        let steps = batch.lens.iter().copied().max().unwrap_or(0);
        let mut state = Tensor::zeros(
            (b, h),
            self.item_embeddings.dtype(),
            self.item_embeddings.device(),
        )?;
        if steps == 0 {
            return Ok(state);
        }
        let gi = self.input_gates(batch, steps, dropout)?;
        let w_hh = self.weight_hh.t()?;
        let mut states = Vec::with_capacity(steps);
        for t in 0..steps {
            let gi_t = gi.narrow(1, t, 1)?.squeeze(1)?;
            let gh = state.matmul(&w_hh)?.broadcast_add(&self.bias_hh)?;
            let r = candle_nn::ops::sigmoid(
                &(gi_t.narrow(D::Minus1, 0, h)? + gh.narrow(D::Minus1, 0, h)?)?,
            )?;
            let z = candle_nn::ops::sigmoid(
                &(gi_t.narrow(D::Minus1, h, h)? + gh.narrow(D::Minus1, h, h)?)?,
            )?;
            let n = (gi_t.narrow(D::Minus1, 2 * h, h)?
                + r.mul(&gh.narrow(D::Minus1, 2 * h, h)?)?)?
            .tanh()?;
            // h' = (1 - z) * n + z * h = n + z * (h - n)
            state = (&n + z.mul(&(&state - &n)?)?)?;
            states.push(state.clone());
        }
        let all = Tensor::stack(&states, 1)?; // [B, steps, H]
        all.broadcast_mul(&batch.last.narrow(1, 0, steps)?)?.sum(1)
    }

    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        self.s_fc.forward(&self.state(batch, None)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sr::train::init_varmap;
    use crate::sr::{Arch, Config};
    use candle_core::Device;

    /// The fused GRU gives the composed GRU's state and gradients.
    #[test]
    fn fused_matches_composed() {
        let dev = Device::Cpu;
        let cfg = Config::new(Arch::Gru4rec, 30, 8);
        let vm = init_varmap(&cfg, 5, &dev).unwrap();
        let m = GRU4Rec::load(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
        let hist: Vec<Vec<u32>> = vec![
            vec![1, 2, 3],
            vec![4],
            vec![],
            (0..12).collect(),
            vec![7, 7, 8, 9],
        ];
        let refs: Vec<&[u32]> = hist.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&refs, &cfg, &dev).unwrap();
        let coef = Tensor::from_vec(
            (0..40).map(|i| (i as f32 * 0.7).sin()).collect::<Vec<_>>(),
            (5, 8),
            &dev,
        )
        .unwrap();
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let s = if fused {
                m.state_fused(&batch, &mut None)
            } else {
                m.state_composed(&batch, &mut None)
            }
            .unwrap();
            let loss = (s * &coef).unwrap().sum_all().unwrap();
            let grads = |g: candle_core::backprop::GradStore| -> Vec<Vec<f32>> {
                [
                    &m.item_embeddings,
                    &m.weight_ih,
                    &m.weight_hh,
                    &m.bias_ih,
                    &m.bias_hh,
                ]
                .iter()
                .map(|t| g.get(t).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                .collect()
            };
            let first = grads(loss.backward().unwrap());
            // A second backward pass over the same graph recomputes what the first one used up.
            assert_eq!(first, grads(loss.backward().unwrap()));
            let mut out = vec![vec![loss.to_scalar::<f32>().unwrap()]];
            out.extend(first);
            out
        };
        for (a, b) in run(true).iter().zip(&run(false)) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    /// Over several 64-row blocks: the same state and gradients on 1 and 3 threads (bit for bit),
    /// and the composed GRU's within rounding.
    #[test]
    fn blocks_are_thread_count_independent() {
        let dev = Device::Cpu;
        let cfg = Config::new(Arch::Gru4rec, 50, 8);
        let vm = init_varmap(&cfg, 9, &dev).unwrap();
        let m = GRU4Rec::load(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
        let hist: Vec<Vec<u32>> = (0..150u32)
            .map(|r| (0..r % 13).map(|k| (r * 7 + k * 3) % 50).collect())
            .collect();
        let refs: Vec<&[u32]> = hist.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&refs, &cfg, &dev).unwrap();
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let s = if fused {
                m.state_fused(&batch, &mut None)
            } else {
                m.state_composed(&batch, &mut None)
            }
            .unwrap();
            let loss = s.sin().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let mut out = vec![s.flatten_all().unwrap().to_vec1().unwrap()];
            for t in [&m.item_embeddings, &m.weight_ih, &m.weight_hh, &m.bias_hh] {
                out.push(g.get(t).unwrap().flatten_all().unwrap().to_vec1().unwrap());
            }
            out
        };
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| run(true))
        };
        let one = on(1);
        assert_eq!(one, on(3));
        for (a, b) in one.iter().zip(&run(false)) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
    }
}
