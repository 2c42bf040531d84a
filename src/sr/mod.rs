//! Sequential recommenders (LLaRA's SASRec, GRU4Rec and Caser) in candle, with PyTorch's tensor names
//! so that LLaRA's released weights load directly and llara's own weights load in PyTorch.
//!
//! Inputs follow LLaRA: a history of `state_size` (10) item ids, oldest first, right-padded with the
//! id `item_num`; the item embedding has `item_num + 1` rows, the padding row last; the head `s_fc`
//! scores the `item_num` real items.

pub mod adam;
pub mod baselines;
pub mod caser;
pub mod ema;
pub mod gru4rec;
pub mod nn;
pub mod ops;
pub mod sasrec;
pub mod train;

use crate::data::Row;
use crate::kernels::dropout::Dropout;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

crate::message_error!(
    /// A recommender config whose sizes do not fit together (the message says which).
    ConfigError
);

/// Errors of the recommender stage.
#[derive(Debug, thiserror::Error)]
pub enum SrError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The caller asked training to stop (a signal).
    #[error("stopped at epoch {epoch}, step {step}")]
    Stopped { epoch: usize, step: usize },
}

pub type Result<T> = std::result::Result<T, SrError>;

/// The architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Sasrec,
    Gru4rec,
    Caser,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Sasrec, Arch::Gru4rec, Arch::Caser];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Sasrec => "sasrec",
            Arch::Gru4rec => "gru4rec",
            Arch::Caser => "caser",
        }
    }
}

fn default_state_size() -> usize {
    crate::data::MAX_HISTORY
}
fn default_heads() -> usize {
    1
}
fn default_dropout() -> f64 {
    0.1
}
fn default_filters() -> usize {
    16
}
fn default_filter_sizes() -> Vec<usize> {
    vec![2, 3, 4]
}

/// The checkpoint's own configuration (the `.json` beside LLaRA's released weights, and llara's
/// `config.json`, which adds a `training` section this struct ignores).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub model: Arch,
    pub item_num: usize,
    pub hidden_size: usize,
    #[serde(default = "default_state_size")]
    pub state_size: usize,
    /// Always `item_num` (checked on load).
    #[serde(default)]
    pub padding_item_id: Option<usize>,
    /// SASRec attention heads.
    #[serde(default = "default_heads")]
    pub num_heads: usize,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Caser filters per height.
    #[serde(default = "default_filters")]
    pub num_filters: usize,
    /// Caser filter heights.
    #[serde(default = "default_filter_sizes")]
    pub filter_sizes: Vec<usize>,
}

impl Config {
    pub fn new(model: Arch, item_num: usize, hidden_size: usize) -> Self {
        Self {
            model,
            item_num,
            hidden_size,
            state_size: default_state_size(),
            padding_item_id: Some(item_num),
            num_heads: default_heads(),
            dropout: default_dropout(),
            num_filters: default_filters(),
            filter_sizes: default_filter_sizes(),
        }
    }

    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SrError::File {
            path: path.to_path_buf(),
            msg: format!("cannot read the model config: {e}"),
        })?;
        let cfg: Config = serde_json::from_str(&text).map_err(|e| SrError::File {
            path: path.to_path_buf(),
            msg: format!(
                "not a recommender config ({e}); expected {{\"model\": \"sasrec\"|\"gru4rec\"|\"caser\", \"item_num\": N, \"hidden_size\": H, ...}}"
            ),
        })?;
        cfg.validate().map_err(|e| SrError::File {
            path: path.to_path_buf(),
            msg: e.0,
        })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.item_num == 0 || self.hidden_size == 0 || self.state_size == 0 {
            return Err("item_num, hidden_size and state_size must be positive".into());
        }
        if let Some(p) = self.padding_item_id {
            if p != self.item_num {
                return Err(format!(
                    "padding_item_id {p} must equal item_num {} (the padding row is the last)",
                    self.item_num
                )
                .into());
            }
        }
        if self.model == Arch::Sasrec
            && (self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads))
        {
            return Err(format!(
                "num_heads {} must divide hidden_size {}",
                self.num_heads, self.hidden_size
            )
            .into());
        }
        if self.model == Arch::Caser
            && (self.filter_sizes.is_empty()
                || self
                    .filter_sizes
                    .iter()
                    .any(|&h| h == 0 || h > self.state_size))
        {
            return Err(format!(
                "filter_sizes {:?} must be non-empty and within 1..={}",
                self.filter_sizes, self.state_size
            )
            .into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout {} must be in [0, 1)", self.dropout).into());
        }
        Ok(())
    }
}

/// A batch of histories ready for a forward pass.
pub struct Batch {
    /// `[B, T]` u32 item ids, right-padded with `item_num`.
    pub seq: Tensor,
    /// True lengths (history items, at most T).
    pub lens: Vec<usize>,
    /// `[B, T, 1]`: 1 at real positions, 0 at padding.
    pub mask: Tensor,
    /// `[B, T, 1]`: 1 at position `len - 1` (all zeros for an empty history).
    pub last: Tensor,
}

impl Batch {
    /// Builds a batch from histories (the last `state_size` items of each are used).
    pub fn new(histories: &[&[u32]], cfg: &Config, device: &Device) -> Result<Self> {
        let t = cfg.state_size;
        let b = histories.len();
        let mut seq = vec![cfg.item_num as u32; b * t];
        let mut mask = vec![0f32; b * t];
        let mut last = vec![0f32; b * t];
        let mut lens = Vec::with_capacity(b);
        for (i, h) in histories.iter().enumerate() {
            let h = &h[h.len().saturating_sub(t)..];
            for (k, &id) in h.iter().enumerate() {
                if id as usize >= cfg.item_num {
                    return Err(SrError::Invalid(format!(
                        "item id {id} is out of range for a model of {} items",
                        cfg.item_num
                    )));
                }
                seq[i * t + k] = id;
                mask[i * t + k] = 1.0;
            }
            if !h.is_empty() {
                last[i * t + h.len() - 1] = 1.0;
            }
            lens.push(h.len());
        }
        Ok(Self {
            seq: Tensor::from_vec(seq, (b, t), device)?,
            lens,
            mask: Tensor::from_vec(mask, (b, t, 1), device)?,
            last: Tensor::from_vec(last, (b, t, 1), device)?,
        })
    }

    pub fn from_rows(rows: &[&Row], cfg: &Config, device: &Device) -> Result<Self> {
        let h: Vec<&[u32]> = rows.iter().map(|r| r.history.as_slice()).collect();
        Self::new(&h, cfg, device)
    }
}

/// One of the three recommenders.
pub enum SeqRec {
    Sasrec(sasrec::SASRec),
    Gru4rec(gru4rec::GRU4Rec),
    Caser(caser::Caser),
}

impl SeqRec {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate().map_err(|e| SrError::Invalid(e.0))?;
        Ok(match cfg.model {
            Arch::Sasrec => SeqRec::Sasrec(sasrec::SASRec::load(vb, cfg)?),
            Arch::Gru4rec => SeqRec::Gru4rec(gru4rec::GRU4Rec::load(vb, cfg)?),
            Arch::Caser => SeqRec::Caser(caser::Caser::load(vb, cfg)?),
        })
    }

    /// The features the head scores: `[B, D]`. `dropout` is `Some` in training mode.
    pub fn state(&self, batch: &Batch, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        Ok(match self {
            SeqRec::Sasrec(m) => m.state(batch, dropout)?,
            SeqRec::Gru4rec(m) => m.state(batch, dropout)?,
            SeqRec::Caser(m) => m.state(batch, dropout)?,
        })
    }

    /// The linear head `s_fc` over the `item_num` items.
    pub fn head(&self) -> &nn::Linear {
        match self {
            SeqRec::Sasrec(m) => &m.s_fc,
            SeqRec::Gru4rec(m) => &m.s_fc,
            SeqRec::Caser(m) => &m.s_fc,
        }
    }

    /// Scores `[B, item_num]`. `dropout` is `Some` in training mode.
    pub fn forward(&self, batch: &Batch, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        Ok(self.head().forward(&self.state(batch, dropout)?)?)
    }

    /// The head's scores of chosen items only: `state [B, D]`, `items [B, K]` u32 → `[B, K]`.
    /// Equal to gathering from [`SeqRec::forward`], without computing every item's score.
    pub fn score_items(&self, state: &Tensor, items: &Tensor) -> Result<Tensor> {
        let head = self.head();
        let (b, k) = items.dims2()?;
        let flat = items.flatten_all()?;
        let w = head.weight.index_select(&flat, 0)?.reshape((b, k, ()))?; // [B, K, D]
        let bias = head.bias.index_select(&flat, 0)?.reshape((b, k))?;
        Ok((w
            .broadcast_mul(&state.unsqueeze(1)?)?
            .sum(candle_core::D::Minus1)?
            + bias)?)
    }

    /// The item embedding table `[item_num + 1, hidden]` (LLaRA's behaviour-token source).
    pub fn item_embeddings(&self) -> &Tensor {
        match self {
            SeqRec::Sasrec(m) => &m.item_embeddings,
            SeqRec::Gru4rec(m) => &m.item_embeddings,
            SeqRec::Caser(m) => &m.item_embeddings,
        }
    }
}

/// Where a model's weights and config are: a run folder (`model.safetensors` + `config.json`) or a
/// `.safetensors` file with its `.json` beside it (LLaRA's released weights in `../shared/recmodels`).
pub fn resolve_model_path(spec: &Path) -> Result<(PathBuf, PathBuf)> {
    if spec.is_dir() {
        let w = spec.join("model.safetensors");
        let c = spec.join("config.json");
        for p in [&w, &c] {
            if !p.exists() {
                return Err(SrError::File {
                    path: p.clone(),
                    msg: "missing; expected a llara train-sr run folder".into(),
                });
            }
        }
        return Ok((w, c));
    }
    if !spec.exists() {
        return Err(SrError::File {
            path: spec.to_path_buf(),
            msg: "no such run folder or weights file".into(),
        });
    }
    let c = spec.with_extension("json");
    if !c.exists() {
        return Err(SrError::File {
            path: c,
            msg: format!(
                "missing: the config of {} is expected beside it",
                spec.display()
            ),
        });
    }
    Ok((spec.to_path_buf(), c))
}

/// Loads a trained model for inference.
pub fn load_model(spec: &Path, device: &Device) -> Result<(SeqRec, Config)> {
    let (weights, cfg_path) = resolve_model_path(spec)?;
    let cfg = Config::from_file(&cfg_path)?;
    // SAFETY: the file is memory-mapped read-only; llara never writes a file it has mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
        .map_err(|e| SrError::File {
            path: weights.clone(),
            msg: format!("cannot read safetensors: {e}"),
        })?;
    let model = SeqRec::load(vb, &cfg).map_err(|e| SrError::File {
        path: weights.clone(),
        msg: format!("does not match its config {} ({e})", cfg_path.display()),
    })?;
    Ok((model, cfg))
}
