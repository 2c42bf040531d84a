//! GGUF (llama architecture): hyper-parameters from the metadata, every tensor dequantized with
//! candle's quantized module and renamed to the Hugging Face layout, with the Q/K row permutation
//! of llama.cpp's converter undone so the half-split rotary embedding applies.

use super::config::Config;
use super::tokenizer::{self, meta_u32, LlmTokenizer};
use super::LlmError;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub struct GgufModel {
    pub config: Config,
    /// Dequantized f32 tensors under Hugging Face names.
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: LlmTokenizer,
    /// `gpt2/smollm`, `llama/llama`: the tokenizer model and pre-tokenizer.
    pub tokenizer_kind: String,
    /// Quantization types present (`Q4_1`, `Q8_0`, `F32`, …).
    pub quant_types: Vec<String>,
}

fn num(md: &HashMap<String, Value>, key: &str) -> Option<f64> {
    md.get(key).and_then(|v| match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => meta_u32(md, key).map(|x| x as f64),
    })
}

/// Reads the metadata and dequantizes every tensor.
pub fn read(path: &Path) -> Result<GgufModel, LlmError> {
    let bad = |msg: String| LlmError::Weights {
        path: path.to_path_buf(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(|e| LlmError::io(path, e))?;
    let content =
        Content::read(&mut f).map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if arch != "llama" {
        return Err(bad(format!(
            "general.architecture {arch:?} is not supported (expected \"llama\")"
        )));
    }
    let need = |k: &str| -> Result<usize, LlmError> {
        meta_u32(md, &format!("llama.{k}"))
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("metadata key llama.{k} is missing")))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = meta_u32(md, "llama.attention.head_count_kv").map_or(heads, |v| v as usize);
    let head_dim =
        meta_u32(md, "llama.attention.key_length").map_or(hidden / heads, |v| v as usize);
    let vocab = match meta_u32(md, "llama.vocab_size") {
        Some(v) => v as usize,
        None => md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| {
                bad("neither llama.vocab_size nor tokenizer.ggml.tokens is present".into())
            })?,
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let config = Config {
        architecture: "llama (GGUF)".into(),
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: need("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: num(md, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: num(md, "llama.rope.freq_base").unwrap_or(10000.0),
        rope_llama3: None,
        max_position_embeddings: need("context_length").unwrap_or(4096),
        tie_word_embeddings: tied,
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: meta_u32(md, "tokenizer.ggml.bos_token_id"),
        eos_token_ids: meta_u32(md, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect(),
    };
    config.validate().map_err(|e| bad(e.0))?;
    let (tokenizer, tokenizer_kind) =
        tokenizer::from_gguf(md, vocab).map_err(|m| LlmError::Tokenizer {
            path: path.to_path_buf(),
            msg: m.0,
        })?;
    let mut tensors = HashMap::new();
    let mut quant_types = vec![];
    for (name, info) in &content.tensor_infos {
        let q = content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        let qt = format!("{:?}", info.ggml_dtype);
        if !quant_types.contains(&qt) {
            quant_types.push(qt);
        }
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        let Some(hf) = hf_name(name) else {
            // rope_freqs and other auxiliary tensors are not weights of the model.
            if name == "rope_freqs.weight" {
                return Err(bad(
                    "rope_freqs (Llama 3.1 rope scaling) in GGUF is not supported".into(),
                ));
            }
            continue;
        };
        let t = if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
            unpermute(&t, heads)
        } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
            unpermute(&t, kv_heads)
        } else {
            Ok(t)
        }
        .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        tensors.insert(hf, t);
    }
    quant_types.sort();
    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
        tokenizer_kind,
        quant_types,
    })
}

/// llama.cpp's converter stores Q/K rows as `w.reshape(heads, 2, d/2, in).swap(1, 2)`; undo it.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    let d = out / heads;
    w.reshape((heads, d / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The Hugging Face name of a GGUF tensor.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let m = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{m}.{kind}"))
}
