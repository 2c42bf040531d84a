//! The LLM engine: Llama-family backbones from a Hugging Face folder, a GGUF file or a hub id;
//! the tokenizer (with LLaRA's added tokens); LoRA adapters in PEFT's layout; input-embedding
//! injection; masked batched forward; generation with a KV cache.

pub mod adapter;
pub mod bench;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod llama;
pub mod load;
pub mod lora;
pub mod memory;
pub mod ops;
pub mod safetensors;
pub mod tokenizer;

pub use adapter::{LoraConfig, Target};
pub use config::Config;
pub use llama::{Llama, Step};
pub use load::{load, LlmOptions, Loaded, Source};
pub use tokenizer::{LlmTokenizer, ADDED_TOKENS};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    #[error("{}: tokenizer: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{}: adapter: {msg}", path.display())]
    Adapter { path: PathBuf, msg: String },
    #[error("--llm {spec}: {msg}")]
    Spec { spec: String, msg: String },
    #[error("--llm {spec}: {why}")]
    Memory {
        spec: String,
        why: Box<memory::MemoryError>,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl LlmError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LlmError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
