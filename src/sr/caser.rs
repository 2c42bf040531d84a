//! Caser as LLaRA ships it: item embeddings (padding zeroed) → horizontal convolutions of heights
//! 2, 3, 4 (ReLU, max-pool over time) + one vertical convolution over the positions → concatenate →
//! dropout → linear head.

use super::nn::Linear;
use super::{Batch, Config};
use crate::kernels::dropout::{maybe_dropout, Dropout};
use crate::kernels::nn::{embed, matmul_t};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub struct Caser {
    pub item_embeddings: Tensor,
    /// Per height h: weight `[filters, h * H]` (from PyTorch's `[filters, 1, h, H]`) and bias.
    pub horizontal: Vec<(usize, Tensor, Tensor)>,
    /// `[T]` weights and `[1]` bias of the vertical convolution.
    pub vertical_w: Tensor,
    pub vertical_b: Tensor,
    pub s_fc: Linear,
    pub hidden: usize,
    pub state_size: usize,
}

impl Caser {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let f = cfg.num_filters;
        let mut horizontal = Vec::new();
        for (i, &height) in cfg.filter_sizes.iter().enumerate() {
            let c = vb.pp(format!("horizontal_cnn.{i}"));
            let w = c
                .get((f, 1, height, h), "weight")?
                .reshape((f, height * h))?;
            horizontal.push((height, w, c.get(f, "bias")?));
        }
        let v = vb.pp("vertical_cnn");
        Ok(Self {
            item_embeddings: vb.get((cfg.item_num + 1, h), "item_embeddings.weight")?,
            horizontal,
            vertical_w: v
                .get((1, 1, cfg.state_size, 1), "weight")?
                .reshape(cfg.state_size)?,
            vertical_b: v.get(1, "bias")?,
            s_fc: Linear::load(vb.pp("s_fc"), h + f * cfg.filter_sizes.len(), cfg.item_num)?,
            hidden: h,
            state_size: cfg.state_size,
        })
    }

    /// The features fed to the head: `[B, filters * heights + H]`.
    pub fn state(&self, batch: &Batch, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let t = self.state_size;
        let emb = embed(&self.item_embeddings, &batch.seq)?.broadcast_mul(&batch.mask)?; // [B, T, H]
        let mut parts = Vec::with_capacity(self.horizontal.len() + 1);
        for (height, w, b) in &self.horizontal {
            let unfolded = super::ops::unfold(&emb, *height)?; // [B, windows, h*H]
            let conv = matmul_t(&unfolded, w)?.broadcast_add(b)?.relu()?; // [B, windows, F]
            parts.push(conv.max(1)?);
        }
        // Vertical: a weighted sum over positions, per feature, as one matmul over [T, B*H].
        let (b, _, h) = emb.dims3()?;
        let by_position = emb.transpose(0, 1)?.contiguous()?.reshape((t, b * h))?;
        let v = self
            .vertical_w
            .reshape((1, t))?
            .matmul(&by_position)?
            .reshape((b, h))?
            .broadcast_add(&self.vertical_b)?
            .relu()?; // [B, H]
        parts.push(v);
        let out = Tensor::cat(&parts, 1)?;
        maybe_dropout(&out, &mut dropout)
    }

    pub fn forward(&self, batch: &Batch, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        self.s_fc.forward(&self.state(batch, dropout)?)
    }
}
