//! SASRec as LLaRA ships it (DROS' `SASRec`): item + learned positional embeddings, one causal
//! self-attention block whose queries are the layer-normalised sequence and keys/values the raw one,
//! a point-wise feed-forward block, and a linear head on the state at position `len - 1`.

use super::nn::{embed, maybe_dropout, Dropout, LayerNorm, Linear};
use super::{Batch, Config};
use candle_core::{DType, Result, Tensor, D};
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

    /// `queries`, `keys`: `[B, T, H]`. Returns attention output + queries.
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        dropout: &mut Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, t, h) = queries.dims3()?;
        let nh = self.num_heads;
        let scale = 1.0 / (self.hidden as f64).sqrt();
        let q_lin = self.linear_q.forward(queries)?;
        let k_lin = self.linear_k.forward(keys)?;
        let v_lin = self.linear_v.forward(keys)?;
        // Key masking (keys whose features sum to zero: the zeroed padding), causality, and query
        // masking after the softmax, as in the original: masked scores become -2^32+1.
        let key_mask = keys.sum(D::Minus1)?.ne(0f32)?.to_dtype(DType::F32)?; // [B, T]
        let query_mask = queries.sum(D::Minus1)?.ne(0f32)?.to_dtype(DType::F32)?; // [B, T]
        let causal = Tensor::tril2(t, DType::F32, queries.device())?; // [T, T]
        let allowed = key_mask
            .reshape((b, 1, t))?
            .broadcast_mul(&causal.reshape((1, t, t))?)?; // [B, T, T]
        if super::ops::fused_ok(queries) {
            let drop = dropout.as_mut().map(|d| d.mask_values(b * nh * t * t));
            let op = super::ops::MaskedAttention {
                heads: nh,
                scale: scale as f32,
                neg: NEG as f32,
                allowed: allowed.flatten_all()?.to_vec1()?,
                qmask: query_mask.flatten_all()?.to_vec1()?,
                dropout: drop,
            };
            let out =
                q_lin
                    .contiguous()?
                    .apply_op3(&k_lin.contiguous()?, &v_lin.contiguous()?, op)?;
            return out + queries;
        }
        let d = h / nh;
        let split = |x: Tensor| -> Result<Tensor> {
            x.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (split(q_lin)?, split(k_lin)?, split(v_lin)?);
        let scores = (q.matmul(&k.t()?)? * scale)?; // [B, nh, T, T]
        let allowed = allowed.reshape((b, 1, t, t))?;
        let blocked = allowed.affine(-1.0, 1.0)?;
        let masked =
            (scores.broadcast_mul(&allowed)? + (blocked * NEG)?.broadcast_as(scores.shape())?)?;
        let probs = candle_nn::ops::softmax(&masked, D::Minus1)?;
        let probs = probs.broadcast_mul(&query_mask.reshape((b, 1, t, 1))?)?;
        let probs = maybe_dropout(&probs, dropout)?;
        let out = probs.matmul(&v)?; // [B, nh, T, d]
        let out = out.transpose(1, 2)?.reshape((b, t, h))?;
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

    /// The hidden state at position `len - 1`: `[B, H]` (LLaRA's `cacul_h`).
    pub fn state(&self, batch: &Batch, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let emb = embed(&self.item_embeddings, &batch.seq)?;
        let emb = super::ops::add_trailing(&emb, &self.positional_embeddings)?;
        let seq = maybe_dropout(&emb, &mut dropout)?;
        let seq = seq.broadcast_mul(&batch.mask)?;
        let normed = self.ln_1.forward(&seq)?;
        let attn = self.mh_attn.forward(&normed, &seq, &mut dropout)?;
        let ff = self
            .feed_forward
            .forward(&self.ln_2.forward(&attn)?, &mut dropout)?;
        let ff = ff.broadcast_mul(&batch.mask)?;
        let ff = self.ln_3.forward(&ff)?;
        ff.broadcast_mul(&batch.last)?.sum(1)
    }

    pub fn forward(&self, batch: &Batch, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        self.s_fc.forward(&self.state(batch, dropout)?)
    }
}
