//! The backbone's hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use super::LlmError;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Llama-family hyper-parameters (Llama, Mistral, Qwen2 where the differences are config-only;
/// Qwen3: an RMSNorm over each head of q and k before the rotary embedding).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, or
    /// `llama` / `qwen2` / `qwen3` (GGUF).
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Llama 3.1-style frequency scaling, when the checkpoint asks for it.
    pub rope_llama3: Option<RopeLlama3>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2; Llama's `attention_bias` also puts one on o).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's RMSNorm over each head of q and k (`self_attn.q_norm`, `self_attn.k_norm`).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RopeLlama3 {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    bos_token_id: Option<Value>,
    #[serde(default)]
    eos_token_id: Option<Value>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_max_pos() -> usize {
    4096
}

fn ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

crate::message_error!(
    /// A backbone config that does not describe a supported model (the message says which field and why).
    ConfigError
);

impl Config {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, LlmError> {
        let text = std::fs::read_to_string(path).map_err(|e| LlmError::io(path, e))?;
        Self::from_hf_json(&text).map_err(|m| LlmError::Config {
            path: path.to_path_buf(),
            msg: m.0,
        })
    }

    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let c: HfConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let arch = c
            .architectures
            .first()
            .cloned()
            .or(c.model_type.clone())
            .unwrap_or_else(|| "LlamaForCausalLM".into());
        let known = [
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
        ];
        if !known.contains(&arch.as_str()) {
            return Err(format!(
                "architecture {arch:?} is not supported (expected one of {})",
                known.join(", ")
            )
            .into());
        }
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                return Err(
                    format!("hidden_act {act:?} is not supported (expected \"silu\")").into(),
                );
            }
        }
        let qwen = arch.starts_with("Qwen");
        let qwen2 = arch == "Qwen2ForCausalLM";
        let qwen3 = arch == "Qwen3ForCausalLM";
        if let (Some(w), true) = (c.sliding_window, c.use_sliding_window.unwrap_or(!qwen)) {
            if w < c.max_position_embeddings && arch == "MistralForCausalLM" {
                return Err(format!(
                    "sliding-window attention (window {w}) is not supported; only checkpoints with the window off or at least max_position_embeddings"
                ).into());
            }
        }
        let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
        let rope_theta = c
            .rope_theta
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0);
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let rope_llama3 = match rope_type {
            "default" => None,
            "llama3" => {
                let r = rope.expect("rope_type came from it");
                let f = |k: &str| {
                    r.get(k)
                        .and_then(|v| v.as_f64())
                        .ok_or(format!("rope {k} missing"))
                };
                Some(RopeLlama3 {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?
                        as usize,
                })
            }
            other => {
                return Err(
                    format!("rope_type {other:?} is not supported (default, llama3)").into(),
                )
            }
        };
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        let cfg = Config {
            architecture: arch,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_llama3,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            // Qwen2 always has a bias on q/k/v and none on o; Llama and Qwen3 put one on all four
            // where `attention_bias` says so.
            qkv_bias: if qwen2 {
                true
            } else {
                c.attention_bias.unwrap_or(false)
            },
            o_bias: !qwen2 && c.attention_bias.unwrap_or(false),
            mlp_bias: c.mlp_bias,
            qk_norm: qwen3,
            bos_token_id: ids(&c.bos_token_id).first().copied(),
            eos_token_ids: ids(&c.eos_token_id),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )
            .into());
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return Err(format!("head_dim {} must be even and positive", self.head_dim).into());
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_hidden_layers == 0 {
            return Err("hidden_size, vocab_size and num_hidden_layers must be positive".into());
        }
        Ok(())
    }

    /// Parameters of the base model (embeddings, projections, norms; lm_head once when tied).
    pub fn parameter_count(&self) -> usize {
        let (h, f, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (nh, nkv) = (self.num_attention_heads, self.num_key_value_heads);
        let attn = h * nh * d * 2
            + h * nkv * d * 2
            + if self.qkv_bias {
                nh * d + 2 * nkv * d
            } else {
                0
            }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * f + if self.mlp_bias { 2 * f + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let emb = self.vocab_size * h;
        emb * if self.tie_word_embeddings { 1 } else { 2 } + self.num_hidden_layers * layer + h
    }

    /// Inverse frequencies of the rotary embedding (with Llama 3 scaling when configured).
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64);
                match self.rope_llama3 {
                    None => f,
                    Some(r) => {
                        let old = r.original_max_position_embeddings as f64;
                        let low_wl = old / r.low_freq_factor;
                        let high_wl = old / r.high_freq_factor;
                        let wl = 2.0 * std::f64::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / r.factor
                        } else {
                            let s = (old / wl - r.low_freq_factor)
                                / (r.high_freq_factor - r.low_freq_factor);
                            (1.0 - s) * f / r.factor + s * f
                        }
                    }
                }
            })
            .collect()
    }
}

impl Config {
    /// A tiny Llama shape for tests and the offline demo (GQA, untied head).
    pub fn tiny(vocab_size: usize) -> Self {
        Config {
            architecture: "LlamaForCausalLM".into(),
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            vocab_size,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_llama3: None,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transformers_5_rope_parameters_and_eos_lists() {
        let c = Config::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":176,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "rope_parameters":{"rope_theta":500.0,"rope_type":"default"},"eos_token_id":[2,7],
            "bos_token_id":1}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500.0);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert_eq!(c.head_dim, 16);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn rejects_other_architectures_and_bad_heads() {
        let base =
            r#""hidden_size":64,"intermediate_size":176,"num_hidden_layers":2,"vocab_size":100"#;
        let e = Config::from_hf_json(&format!(
            r#"{{"architectures":["GPT2LMHeadModel"],"num_attention_heads":4,{base}}}"#
        ))
        .unwrap_err();
        assert!(e.0.contains("GPT2LMHeadModel"), "{e}");
        let e = Config::from_hf_json(&format!(
            r#"{{"num_attention_heads":4,"num_key_value_heads":3,{base}}}"#
        ))
        .unwrap_err();
        assert!(e.0.contains("num_key_value_heads"), "{e}");
        let q = Config::from_hf_json(&format!(
            r#"{{"architectures":["Qwen2ForCausalLM"],"num_attention_heads":4,{base}}}"#
        ))
        .unwrap();
        assert!(q.qkv_bias && !q.o_bias);
    }
}
