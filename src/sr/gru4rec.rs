//! GRU4Rec as LLaRA ships it: item embedding → one-layer GRU over the true length → the last hidden
//! state → linear head. Gates follow PyTorch's `nn.GRU` (r, z, n order in `weight_ih_l0`).

use super::nn::{embed, matmul_t, Linear};
use super::{Batch, Config};
use candle_core::{Result, Tensor, D};
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

    /// The GRU's hidden state after each history's last item: `[B, H]`.
    pub fn state(&self, batch: &Batch) -> Result<Tensor> {
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
        let emb = embed(&self.item_embeddings, &batch.seq.narrow(1, 0, steps)?)?;
        // Input projections of every step at once: [B, steps, 3H].
        let gi = matmul_t(&emb, &self.weight_ih)?.broadcast_add(&self.bias_ih)?;
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
        self.s_fc.forward(&self.state(batch)?)
    }
}
