//! The adapter types a [`super::llama::Llama`] carries: which projections LoRA adapts
//! ([`Target`]), rank and scaling ([`LoraConfig`]), one adapter pair ([`Lora`]). Adding, saving,
//! loading and merging adapters on a model is [`super::lora`]'s.

use candle_core::Var;
use serde::{Deserialize, Serialize};

/// A projection LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT's module name (`q_proj`, …).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The parent module in the checkpoint (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim();
        let s = s.strip_suffix("_proj").unwrap_or(s);
        Some(match s {
            "q" => Target::Q,
            "k" => Target::K,
            "v" => Target::V,
            "o" => Target::O,
            "gate" => Target::Gate,
            "up" => Target::Up,
            "down" => Target::Down,
            _ => return None,
        })
    }

    /// Parses a comma-separated list (`q,k,v,o,gate,up,down`, `q_proj,v_proj`, or `all`).
    pub fn parse_list(s: &str) -> std::result::Result<Vec<Target>, TargetError> {
        if s.trim() == "all" {
            return Ok(Target::ALL.to_vec());
        }
        let mut out = vec![];
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let t = Target::parse(part).ok_or_else(|| TargetError::Unknown(part.to_string()))?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() {
            return Err(TargetError::Empty);
        }
        out.sort();
        Ok(out)
    }
}

/// A list of LoRA targets that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("unknown LoRA target {0:?} (expected q, k, v, o, gate, up, down or all)")]
    Unknown(String),
    #[error("no LoRA target given")]
    Empty,
}

/// Rank, scaling, dropout and targets of the adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One adapter pair on a frozen projection.
#[derive(Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}
