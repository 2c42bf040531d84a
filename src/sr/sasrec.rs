//! SASRec as LLaRA ships it (DROS' `SASRec`): item + learned positional embeddings, one causal
//! self-attention block whose queries are the layer-normalised sequence and keys/values the raw one,
//! a point-wise feed-forward block, and a linear head on the state at position `len - 1`.

use super::nn::{LayerNorm, Linear};
use super::{Batch, Config};
use crate::kernels::dropout::{maybe_dropout, Dropout};
use crate::kernels::nn::{add_trailing, embed, row_sums};
use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

/// PyTorch's masking constant `-2 ** 32 + 1`.
const NEG: f64 = -4_294_967_295.0;

pub struct MultiHeadAttention {
    pub linear_q: Linear,
    pub linear_k: Linear,
    pub linear_v: Linear,
    pub num_heads: usize,
    pub hidden: usize,
}

impl MultiHeadAttention {
    pub fn load(vb: VarBuilder, hidden: usize, num_heads: usize) -> Result<Self> {
        Ok(Self {
            linear_q: Linear::load(vb.pp("linear_q"), hidden, hidden)?,
            linear_k: Linear::load(vb.pp("linear_k"), hidden, hidden)?,
            linear_v: Linear::load(vb.pp("linear_v"), hidden, hidden)?,
            num_heads,
            hidden,
        })
    }

    /// `queries [B, Tq, H]` at sequence positions `positions` (`B·Tq`, row-major) attend the
    /// `keys [B, Tk, H]` at or before their position. Returns attention output + queries.
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        positions: &[usize],
        dropout: &mut Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, tq, h) = queries.dims3()?;
        let tk = keys.dim(1)?;
        let nh = self.num_heads;
        let scale = 1.0 / (self.hidden as f64).sqrt();
        let q_lin = self.linear_q.forward(queries)?;
        let k_lin = self.linear_k.forward(keys)?;
        let v_lin = self.linear_v.forward(keys)?;
        // Key masking (keys whose features sum to zero: the zeroed padding), causality, and query
        // masking after the softmax, as in the original: masked scores become -2^32+1.
        let key_sums = row_sums(keys)?; // [B·Tk]
        let qmask: Vec<f32> = row_sums(queries)?
            .iter()
            .map(|&s| f32::from(u8::from(s != 0.0)))
            .collect();
        let mut allowed = vec![0f32; b * tq * tk];
        for (r, row) in allowed.chunks_exact_mut(tk).enumerate() {
            let (bi, pos) = (r / tq, positions[r]);
            for (j, a) in row.iter_mut().enumerate().take(pos + 1) {
                *a = f32::from(u8::from(key_sums[bi * tk + j] != 0.0));
            }
        }
        if crate::kernels::fused(&[queries]) {
            let drop = dropout.as_mut().map(|d| d.mask_values(b * nh * tq * tk));
            let op = super::ops::MaskedAttention {
                heads: nh,
                scale: scale as f32,
                neg: NEG as f32,
                allowed,
                qmask,
                dropout: drop,
            };
            let out =
                q_lin
                    .contiguous()?
                    .apply_op3(&k_lin.contiguous()?, &v_lin.contiguous()?, op)?;
            return out + queries;
        }
        let dev = queries.device();
        let d = h / nh;
        let split = |x: Tensor, t: usize| -> Result<Tensor> {
            x.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (split(q_lin, tq)?, split(k_lin, tk)?, split(v_lin, tk)?);
        let scores = (q.matmul(&k.t()?)? * scale)?; // [B, nh, Tq, Tk]
        let allowed = Tensor::from_vec(allowed, (b, 1, tq, tk), dev)?.to_dtype(scores.dtype())?;
        let blocked = allowed.affine(-1.0, 1.0)?;
        let masked =
            (scores.broadcast_mul(&allowed)? + (blocked * NEG)?.broadcast_as(scores.shape())?)?;
        let probs = candle_nn::ops::softmax(&masked, D::Minus1)?;
        let qmask = Tensor::from_vec(qmask, (b, 1, tq, 1), dev)?.to_dtype(probs.dtype())?;
        let probs = probs.broadcast_mul(&qmask)?;
        let probs = maybe_dropout(&probs, dropout)?;
        let out = probs.matmul(&v)?; // [B, nh, Tq, d]
        let out = out.transpose(1, 2)?.reshape((b, tq, h))?;
        out + queries
    }
}

pub struct PositionwiseFeedForward {
    pub w_1: Linear,
    pub w_2: Linear,
    pub layer_norm: LayerNorm,
}

impl PositionwiseFeedForward {
    pub fn load(vb: VarBuilder, hidden: usize) -> Result<Self> {
        Ok(Self {
            w_1: Linear::load_reshaped(vb.pp("w_1"), &[hidden, hidden, 1], hidden, hidden)?,
            w_2: Linear::load_reshaped(vb.pp("w_2"), &[hidden, hidden, 1], hidden, hidden)?,
            layer_norm: LayerNorm::load(vb.pp("layer_norm"), hidden)?,
        })
    }

    pub fn forward(&self, x: &Tensor, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        let y = self.w_2.forward(&self.w_1.forward(x)?.relu()?)?;
        let y = maybe_dropout(&y, dropout)?;
        self.layer_norm.forward(&(y + x)?)
    }
}

pub struct SASRec {
    pub item_embeddings: Tensor,
    pub positional_embeddings: Tensor,
    pub ln_1: LayerNorm,
    pub ln_2: LayerNorm,
    pub ln_3: LayerNorm,
    pub mh_attn: MultiHeadAttention,
    pub feed_forward: PositionwiseFeedForward,
    pub s_fc: Linear,
}

impl SASRec {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            item_embeddings: vb.get((cfg.item_num + 1, h), "item_embeddings.weight")?,
            positional_embeddings: vb.get((cfg.state_size, h), "positional_embeddings.weight")?,
            ln_1: LayerNorm::load(vb.pp("ln_1"), h)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), h)?,
            ln_3: LayerNorm::load(vb.pp("ln_3"), h)?,
            mh_attn: MultiHeadAttention::load(vb.pp("mh_attn"), h, cfg.num_heads)?,
            feed_forward: PositionwiseFeedForward::load(vb.pp("feed_forward"), h)?,
            s_fc: Linear::load(vb.pp("s_fc"), h, cfg.item_num)?,
        })
    }

    /// The keys and values of the attention: embeddings + positions, dropout, padding zeroed:
    /// `[B, T, H]`.
    fn sequence(&self, batch: &Batch, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        let emb = embed(&self.item_embeddings, &batch.seq)?;
        let emb = add_trailing(&emb, &self.positional_embeddings)?;
        maybe_dropout(&emb, dropout)?.broadcast_mul(&batch.mask)
    }

    /// The hidden state at position `len - 1`: `[B, H]` (LLaRA's `cacul_h`; zeros for an empty
    /// history). Every layer after the attention's keys and values works position by position, so
    /// only that position's query is computed: the same state as [`SASRec::states`]' row `len - 1`
    /// (dropout masks aside: they are drawn for the positions computed).
    pub fn state(&self, batch: &Batch, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let seq = self.sequence(batch, &mut dropout)?;
        let (b, t, h) = seq.dims3()?;
        let positions: Vec<usize> = batch.lens.iter().map(|l| l.saturating_sub(1)).collect();
        let rows: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, seq.device())?;
        let at_last = seq
            .reshape((b * t, h))?
            .index_select(&rows, 0)?
            .reshape((b, 1, h))?;
        let ff = self.block(&at_last, &seq, &positions, &mut dropout)?;
        let state = self.ln_3.forward(&ff)?.reshape((b, h))?;
        if batch.lens.contains(&0) {
            let nonempty: Vec<f32> = batch
                .lens
                .iter()
                .map(|&l| f32::from(u8::from(l > 0)))
                .collect();
            let nonempty =
                Tensor::from_vec(nonempty, (b, 1), seq.device())?.to_dtype(state.dtype())?;
            return state.broadcast_mul(&nonempty);
        }
        Ok(state)
    }

    /// The output of every position, `[B, T, H]` (padding positions zeroed before the last
    /// LayerNorm, as in the original).
    pub fn states(&self, batch: &Batch, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let seq = self.sequence(batch, &mut dropout)?;
        let (b, t, _) = seq.dims3()?;
        let positions: Vec<usize> = (0..b * t).map(|r| r % t).collect();
        let ff = self.block(&seq, &seq, &positions, &mut dropout)?;
        self.ln_3.forward(&ff.broadcast_mul(&batch.mask)?)
    }

    /// The attention + feed-forward block for queries taken from `seq` at `positions` (their
    /// LayerNorm applied here), keys and values `seq`: `[B, Tq, H]` before the last LayerNorm.
    fn block(
        &self,
        queries: &Tensor,
        seq: &Tensor,
        positions: &[usize],
        dropout: &mut Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let normed = self.ln_1.forward(queries)?;
        let attn = self.mh_attn.forward(&normed, seq, positions, dropout)?;
        self.feed_forward
            .forward(&self.ln_2.forward(&attn)?, dropout)
    }

    pub fn forward(&self, batch: &Batch, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        self.s_fc.forward(&self.state(batch, dropout)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sr::train::init_varmap;
    use crate::sr::{Arch, Config};
    use candle_core::{DType, Device};

    /// The last-position state equals row `len - 1` of every position's output (zeros for an
    /// empty history), with the same gradients.
    #[test]
    fn last_position_state_matches_every_position() {
        let dev = Device::Cpu;
        let mut cfg = Config::new(Arch::Sasrec, 30, 8);
        cfg.num_heads = 2;
        let vm = init_varmap(&cfg, 7, &dev).unwrap();
        let m = SASRec::load(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
        let hist: Vec<Vec<u32>> = vec![
            vec![1, 2, 3],
            vec![4],
            vec![],
            (0..14).collect(),
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
        let run = |last_only: bool| -> Vec<Vec<f32>> {
            let s = if last_only {
                m.state(&batch, None).unwrap()
            } else {
                let all = m.states(&batch, None).unwrap();
                all.broadcast_mul(&batch.last).unwrap().sum(1).unwrap()
            };
            let loss = (s.clone() * &coef).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let mut out = vec![s.flatten_all().unwrap().to_vec1().unwrap()];
            let vars = vm.data().lock().unwrap();
            let mut names: Vec<&String> = vars.keys().filter(|n| !n.starts_with("s_fc")).collect();
            names.sort();
            for name in names {
                let var = &vars[name];
                let grad = g.get(var.as_tensor());
                assert!(grad.is_some(), "no gradient for {name}");
                out.push(grad.unwrap().flatten_all().unwrap().to_vec1().unwrap());
            }
            out
        };
        let (a, b) = (run(true), run(false));
        assert!(a[0][16..24].iter().all(|&v| v == 0.0), "empty history");
        assert!(a[0].iter().any(|&v| v != 0.0));
        for (x, y) in a.iter().zip(&b) {
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() < 1e-5, "{u} vs {v}");
            }
        }
    }
}
