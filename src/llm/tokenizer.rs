//! The backbone's tokenizer: a Hugging Face `tokenizer.json`, or one rebuilt from a GGUF file's
//! `tokenizer.ggml.*` metadata, plus LLaRA's added tokens (single ids after the base vocabulary,
//! never split).

use super::LlmError;
use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::{AddedToken, Tokenizer};

crate::message_error!(
    /// What the tokenizer could not do: build itself (from a `tokenizer.json` or GGUF metadata),
    /// add LLaRA's tokens, encode or decode. The message says what and why.
    TokenizerError
);

/// Byte spans of tokens in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// LLaRA's added tokens, in id order after the base vocabulary: a fixed placeholder, the three
/// slots that carry projected recommender item embeddings, and `[UserEmb]`, the slot that carries
/// the recommender's projected state of the whole history.
pub const ADDED_TOKENS: [&str; 5] = [
    "[PH]",
    "[HistoryEmb]",
    "[CansEmb]",
    "[ItemEmb]",
    "[UserEmb]",
];

#[derive(Clone)]
pub struct LlmTokenizer {
    pub inner: Tokenizer,
    /// The model's base vocabulary size: added tokens get ids `vocab_size + k`.
    pub vocab_size: u32,
    /// Tokenizer ids of the added tokens, in [`ADDED_TOKENS`] order.
    added: Vec<u32>,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
}

impl LlmTokenizer {
    /// Wraps `inner` and registers the added tokens. `vocab_size` is the model's (which may exceed
    /// the tokenizer's when the embedding matrix is padded).
    pub fn new(
        mut inner: Tokenizer,
        vocab_size: usize,
        bos: Option<u32>,
        eos: Vec<u32>,
    ) -> Result<Self, TokenizerError> {
        let toks: Vec<AddedToken> = ADDED_TOKENS
            .iter()
            .map(|t| AddedToken::from(*t, true).normalized(false))
            .collect();
        inner
            .add_special_tokens(toks)
            .map_err(|e| format!("adding LLaRA's tokens: {e}"))?;
        let added = ADDED_TOKENS
            .iter()
            .map(|t| {
                inner
                    .token_to_id(t)
                    .ok_or(format!("could not add token {t}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let eos = if eos.is_empty() {
            [
                "</s>",
                "<|im_end|>",
                "<|endoftext|>",
                "<|eot_id|>",
                "<|end_of_text|>",
            ]
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .take(1)
            .collect()
        } else {
            eos
        };
        Ok(Self {
            inner,
            vocab_size: vocab_size as u32,
            added,
            bos,
            eos,
        })
    }

    pub fn from_file(
        path: &Path,
        vocab_size: usize,
        bos: Option<u32>,
        eos: Vec<u32>,
    ) -> Result<Self, LlmError> {
        let bad = |msg: String| LlmError::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let inner = Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        Self::new(inner, vocab_size, bos, eos).map_err(|e| bad(e.0))
    }

    /// The model id of an added token (`[HistoryEmb]` → `vocab_size + 1`).
    pub fn added_id(&self, token: &str) -> Option<u32> {
        ADDED_TOKENS
            .iter()
            .position(|t| *t == token)
            .map(|k| self.vocab_size + k as u32)
    }

    /// Model ids of `text`; `special` adds the tokenizer's own specials (BOS where it uses one).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| e.to_string())?;
        Ok(enc
            .get_ids()
            .iter()
            .map(|&id| match self.added.iter().position(|&a| a == id) {
                Some(k) => self.vocab_size + k as u32,
                None => id,
            })
            .collect())
    }

    /// [`LlmTokenizer::encode`] with each token's byte span in `text` (`(0, 0)` for specials).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        special: bool,
    ) -> Result<(Vec<u32>, Offsets), TokenizerError> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| e.to_string())?;
        let ids = enc
            .get_ids()
            .iter()
            .map(|&id| match self.added.iter().position(|&a| a == id) {
                Some(k) => self.vocab_size + k as u32,
                None => id,
            })
            .collect();
        Ok((ids, enc.get_offsets().to_vec()))
    }

    /// Text of model ids, skipping special and added tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| i < self.vocab_size)
            .collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| TokenizerError(e.to_string()))
    }

    /// The token string of a model id (for displays).
    pub fn token(&self, id: u32) -> String {
        if id >= self.vocab_size {
            return ADDED_TOKENS
                .get((id - self.vocab_size) as usize)
                .map_or(format!("<{id}>"), |s| s.to_string());
        }
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<{id}>"))
    }
}

fn meta<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value, String> {
    md.get(key)
        .ok_or_else(|| format!("metadata key {key} is missing"))
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>, String> {
    let arr = v.to_vec().map_err(|_| format!("{key}: array expected"))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|_| format!("{key}: string array expected"))
        })
        .collect()
}

fn numbers(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<f64>>, String> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let arr = v.to_vec().map_err(|_| format!("{key}: array expected"))?;
    arr.iter()
        .map(|x| match x {
            Value::F32(f) => Ok(*f as f64),
            Value::F64(f) => Ok(*f),
            Value::I32(i) => Ok(*i as f64),
            Value::U32(i) => Ok(*i as f64),
            Value::I8(i) => Ok(*i as f64),
            Value::U8(i) => Ok(*i as f64),
            _ => Err(format!("{key}: numeric array expected")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

pub fn meta_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| match v {
        Value::U32(x) => Some(*x),
        Value::I32(x) => Some(*x as u32),
        Value::U64(x) => Some(*x as u32),
        Value::I64(x) => Some(*x as u32),
        Value::U16(x) => Some(*x as u32),
        Value::U8(x) => Some(*x as u32),
        _ => None,
    })
}

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(regex: &str) -> serde_json::Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> serde_json::Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// Rebuilds the tokenizer from `tokenizer.ggml.*` metadata: GPT-2 byte-level BPE (`gpt2`, with
/// the pre-tokenizer named by `tokenizer.ggml.pre`) or a SentencePiece BPE vocabulary (`llama`,
/// merges recovered from the piece scores, byte fallback).
pub fn from_gguf(
    md: &HashMap<String, Value>,
    vocab_size: usize,
) -> Result<(LlmTokenizer, String), TokenizerError> {
    let model = meta(md, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|_| "tokenizer.ggml.model: string expected".to_string())?
        .clone();
    let tokens = strings(meta(md, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
    let types = numbers(md, "tokenizer.ggml.token_type")?.unwrap_or_default();
    let bos = meta_u32(md, "tokenizer.ggml.bos_token_id");
    let eos = meta_u32(md, "tokenizer.ggml.eos_token_id");
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(model == "llama");
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are never split.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i).map(|t| *t as i64), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] as i64 == 3})
        })
        .collect();
    let bos_post = |bos: Option<u32>| -> serde_json::Value {
        match (add_bos, bos) {
            (true, Some(b)) => {
                let t = &tokens[b as usize];
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {t: {"id": t, "ids": [b], "tokens": [t]}}})
            }
            _ => serde_json::Value::Null,
        }
    };
    let (pre_name, doc) = match model.as_str() {
        "gpt2" => {
            let merges = strings(meta(md, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
            let merges: Vec<[&str; 2]> = merges
                .iter()
                .map(|m| {
                    let (a, b) = m
                        .split_once(' ')
                        .ok_or(format!("merge {m:?} has no space"))?;
                    Ok([a, b])
                })
                .collect::<Result<_, String>>()?;
            let pre = md
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_else(|| "gpt2".into());
            let pre_tok = match pre.as_str() {
                // `smollm` as transformers converts it: the byte-level GPT-2 regex alone (its
                // vocabulary has no multi-digit tokens, so digits come out one by one anyway).
                "gpt2" | "default" | "smollm" => byte_level(true),
                "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
                    split(LLAMA3_REGEX), byte_level(false)]}),
                "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
                    split(QWEN2_REGEX), byte_level(false)]}),
                "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, split(GPT2_REGEX), byte_level(false)]}),
                other => {
                    return Err(format!(
                        "tokenizer.ggml.pre {other:?} is not supported (gpt2, smollm, llama-bpe, qwen2, starcoder)"
                    )
                    .into())
                }
            };
            let post = match bos_post(bos) {
                serde_json::Value::Null => {
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
                }
                t => json!({"type": "Sequence", "processors": [
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}, t]}),
            };
            (
                pre,
                json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                    "normalizer": null, "pre_tokenizer": pre_tok, "post_processor": post,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                        "ignore_merges": false, "vocab": vocab, "merges": merges}}),
            )
        }
        "llama" => {
            let scores = numbers(md, "tokenizer.ggml.scores")?.ok_or(
                "tokenizer.ggml.scores is missing (needed for a SentencePiece vocabulary)",
            )?;
            let merges = spm_merges(&tokens, &scores, &types);
            let unk = meta_u32(md, "tokenizer.ggml.unknown_token_id").unwrap_or(0);
            (
                "llama".into(),
                json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "\u{2581}"},
                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
                    "pre_tokenizer": null, "post_processor": bos_post(bos),
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                    "model": {"type": "BPE", "dropout": null, "unk_token": tokens.get(unk as usize),
                        "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                        "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges}}),
            )
        }
        other => {
            return Err(
                format!("tokenizer.ggml.model {other:?} is not supported (gpt2, llama)").into(),
            )
        }
    };
    let inner = Tokenizer::from_bytes(serde_json::to_vec(&doc).expect("json"))
        .map_err(|e| e.to_string())?;
    let tok = LlmTokenizer::new(inner, vocab_size, bos, eos.into_iter().collect())?;
    Ok((tok, format!("{model}/{pre_name}")))
}

/// Merges of a SentencePiece BPE vocabulary from its scores, as Hugging Face's converter derives
/// them: every piece that splits into two pieces of the vocabulary yields that merge, ranked by the
/// piece's score (higher first), then by the ids of its parts.
pub fn spm_merges(tokens: &[String], scores: &[f64], types: &[f64]) -> Vec<[String; 2]> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = vec![];
    for (piece_id, piece) in tokens.iter().enumerate() {
        // Only normal pieces are merge results (not control, byte or unused ones).
        if types.get(piece_id).is_some_and(|&t| t as i64 != 1) {
            continue;
        }
        let score = scores.get(piece_id).copied().unwrap_or(0.0);
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((score, piece_id, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then((a.2, a.3).cmp(&(b.2, b.3)))
    });
    merges
        .into_iter()
        .map(|(_, _, l, r)| [tokens[l].clone(), tokens[r].clone()])
        .collect()
}

/// GPT-2's byte → printable-character table (`bytes_to_unicode`).
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(&chars) {
        table[*b as usize] = char::from_u32(*c).expect("valid code point");
    }
    table
}

/// A byte-level tokenizer without merges (one token per byte, ids 0..255) and `<|endoftext|>`
/// (id 256, the EOS): it encodes any text, for the built-in demo backbone and tests.
pub fn byte_level_tokenizer(vocab_size: usize) -> LlmTokenizer {
    let table = byte_chars();
    let mut vocab: serde_json::Map<String, serde_json::Value> = table
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    vocab.insert("<|endoftext|>".into(), json!(256));
    let doc = json!({"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": byte_level(true),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}});
    let inner =
        Tokenizer::from_bytes(serde_json::to_vec(&doc).expect("json")).expect("valid tokenizer");
    LlmTokenizer::new(inner, vocab_size, None, vec![256]).expect("added tokens")
}
