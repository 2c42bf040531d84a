//! GGUF (`llama`, `qwen2`, `qwen3` architectures): hyper-parameters from the metadata, and each
//! tensor read from the file when the loader asks for it ([`GgufWeights`]), dequantized with
//! candle's quantized module (or kept in its blocks) under its Hugging Face name, with the Q/K row
//! permutation of llama.cpp's converter undone for `llama` so the half-split rotary embedding
//! applies (the converter leaves Qwen's rows as they are). The whole model is never dequantized at
//! once.

use super::config::Config;
use super::tokenizer::{self, meta_u32, LlmTokenizer};
use super::LlmError;
use crate::kernels::weight::quantized;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The `general.architecture` values read.
pub const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "qwen3"];

pub struct GgufModel {
    pub config: Config,
    /// The tensors, read one at a time under Hugging Face names.
    pub weights: GgufWeights,
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

/// Reads the metadata and the tensor index (the tensors are read when asked for).
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
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(bad(format!(
            "general.architecture {arch:?} is not supported (expected one of {})",
            ARCHITECTURES.join(", ")
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<usize, LlmError> {
        meta_u32(md, &key(k))
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("metadata key {} is missing", key(k))))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = meta_u32(md, &key("attention.head_count_kv")).map_or(heads, |v| v as usize);
    let head_dim =
        meta_u32(md, &key("attention.key_length")).map_or(hidden / heads, |v| v as usize);
    let vocab = match meta_u32(md, &key("vocab_size")) {
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
        architecture: format!("{arch} (GGUF)"),
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: need("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: num(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: num(md, &key("rope.freq_base")).unwrap_or(10000.0),
        rope_llama3: None,
        max_position_embeddings: need("context_length").unwrap_or(4096),
        tie_word_embeddings: tied,
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        qk_norm: content
            .tensor_infos
            .contains_key("blk.0.attn_q_norm.weight"),
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
    let mut names = HashMap::new();
    let mut quant_types = vec![];
    for (name, info) in &content.tensor_infos {
        let qt = format!("{:?}", info.ggml_dtype);
        if !quant_types.contains(&qt) {
            quant_types.push(qt);
        }
        match hf_name(name) {
            Some(hf) => {
                names.insert(hf, name.clone());
            }
            // rope_freqs and other auxiliary tensors are not weights of the model.
            None if name == "rope_freqs.weight" => {
                return Err(bad(
                    "rope_freqs (Llama 3.1 rope scaling) in GGUF is not supported".into(),
                ))
            }
            None => {}
        }
    }
    quant_types.sort();
    Ok(GgufModel {
        config,
        weights: GgufWeights {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(f),
            names,
            heads,
            kv_heads,
            permuted: arch == "llama",
        },
        tokenizer,
        tokenizer_kind,
        quant_types,
    })
}

/// A GGUF file's tensors under Hugging Face names, each read and dequantized when asked for.
pub struct GgufWeights {
    path: PathBuf,
    content: Content,
    file: Mutex<std::fs::File>,
    /// Hugging Face name → GGUF name.
    names: HashMap<String, String>,
    heads: usize,
    kv_heads: usize,
    /// Q/K rows in llama.cpp's rotary order (the `llama` architecture).
    permuted: bool,
}

impl GgufWeights {
    /// The tensor stored under `gguf_name`, still in its block format.
    fn qtensor(&self, gguf_name: &str) -> candle_core::Result<candle_core::quantized::QTensor> {
        let mut f = self.file.lock().expect("gguf file lock");
        self.content
            .tensor(&mut *f, gguf_name, &Device::Cpu)
            .map_err(|e| {
                candle_core::Error::Msg(format!("{}: tensor {gguf_name}: {e}", self.path.display()))
            })
    }
}

impl GgufWeights {
    /// The block format of the first layer's `ffn_up` projection (the bulk of the weights), when
    /// it is one llara keeps projections in.
    pub fn projection_blocks(&self) -> Option<GgmlDType> {
        let info = self.content.tensor_infos.get("blk.0.ffn_up.weight")?;
        quantized::is_block_format(info.ggml_dtype).then_some(info.ggml_dtype)
    }
}

impl super::llama::WeightSource for GgufWeights {
    fn stored_blocks(&self, name: &str) -> candle_core::Result<Option<QTensor>> {
        let Some(g) = self.names.get(name) else {
            return Ok(None);
        };
        let q = self.qtensor(g)?;
        if !quantized::is_block_format(q.dtype()) {
            return Ok(None);
        }
        let heads = if !self.permuted {
            return Ok(Some(q));
        } else if g.ends_with("attn_q.weight") {
            self.heads
        } else if g.ends_with("attn_k.weight") {
            self.kv_heads
        } else {
            return Ok(Some(q));
        };
        let (out, _) = q.shape().dims2()?;
        let bytes = q.data()?;
        let row = bytes.len() / out.max(1);
        let mut rows = vec![0u8; bytes.len()];
        // Hugging Face row (h, s, j) is GGUF row (h, j, s), s < 2, j < d/2 (see `unpermute`).
        let d = out / heads;
        for h in 0..heads {
            for s in 0..2 {
                for j in 0..d / 2 {
                    let hf = h * d + s * (d / 2) + j;
                    let gg = h * d + j * 2 + s;
                    rows[hf * row..][..row].copy_from_slice(&bytes[gg * row..][..row]);
                }
            }
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(rows), &Device::Cpu, q.dtype())?;
        Ok(Some(QTensor::new(storage, q.shape().clone())?))
    }

    fn tensor(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        let Some(g) = self.names.get(name) else {
            return Ok(None);
        };
        let t = self.qtensor(g)?.dequantize(&Device::Cpu)?;
        let t = if !self.permuted {
            t
        } else if g.ends_with("attn_q.weight") || g.ends_with("attn_q.bias") {
            unpermute(&t, self.heads)?
        } else if g.ends_with("attn_k.weight") || g.ends_with("attn_k.bias") {
            unpermute(&t, self.kv_heads)?
        } else {
            t
        };
        Ok(Some(t))
    }
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
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{m}.{kind}"))
}
