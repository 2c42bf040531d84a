//! `--llm SPEC`: a local Hugging Face folder, a local `.gguf` file, or a hub id fetched into the
//! standard cache (`HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE` honoured).

use super::config::Config;
use super::llama::Llama;
use super::tokenizer::{LlmTokenizer, ADDED_TOKENS};
use super::{gguf, LlmError};
use crate::kernels::weight::{Blocks, Precision};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

pub struct LlmOptions {
    pub device: Device,
    /// The frozen weights' dtype, optionally with the projections in GGUF blocks; `None`: f32 on
    /// the CPU, bf16 on CUDA.
    pub dtype: Option<Precision>,
    /// Hub revision (branch, tag or commit) for hub ids.
    pub revision: Option<String>,
    /// What the model will run: when set (and on the CPU), the peak memory is estimated from the
    /// config before any weight is read, and a job that does not fit is refused
    /// ([`super::memory::check`]).
    pub workload: Option<super::memory::Workload>,
}

impl LlmOptions {
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            revision: None,
            workload: None,
        }
    }

    /// The float dtype of the weights (of those not in blocks).
    pub fn dtype(&self) -> DType {
        self.precision().dtype
    }

    pub fn precision(&self) -> Precision {
        self.dtype.unwrap_or_else(|| {
            if self.device.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            }
            .into()
        })
    }
}

/// Where a backbone came from.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    Folder {
        path: PathBuf,
        weights: Vec<PathBuf>,
    },
    Gguf {
        path: PathBuf,
        quantization: Vec<String>,
        tokenizer: String,
    },
    Hub {
        id: String,
        revision: String,
        path: PathBuf,
        weights: Vec<PathBuf>,
    },
    Builtin {
        name: String,
    },
}

pub struct Loaded {
    pub model: Llama,
    pub tokenizer: LlmTokenizer,
    pub source: Source,
}

impl Loaded {
    /// A one-line name for logs and adapter configs (the spec as given).
    pub fn name(&self) -> String {
        match &self.source {
            Source::Folder { path, .. } | Source::Gguf { path, .. } => path.display().to_string(),
            Source::Hub { id, .. } => id.clone(),
            Source::Builtin { name } => name.clone(),
        }
    }
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.starts_with('.')
        })
}

/// The built-in demo backbone: a tiny random Llama (seeded) with a byte-level tokenizer. No files,
/// no network: what `llara quickstart` and the tests tune. It knows nothing until trained.
pub const BUILTIN_TINY: &str = "builtin:tiny";

/// A backbone of any shape with seeded random weights, from a Hugging Face `config.json`
/// (`builtin:random:configs/llama-1b.json`), and a byte-level tokenizer: real-size memory and
/// speed measurements without a download. It knows nothing.
pub const BUILTIN_RANDOM: &str = "builtin:random:";

/// A backbone of shape `cfg` with seeded random weights and a byte-level tokenizer.
/// Refuses a workload that would not fit (see [`LlmOptions::workload`]).
/// `native`: the block format a GGUF file stores its projections in (`None` for other sources,
/// which `--dtype gguf` refuses).
fn guard(
    spec: &str,
    cfg: &Config,
    opts: &LlmOptions,
    native: Option<candle_core::quantized::GgmlDType>,
) -> Result<(), LlmError> {
    let mut p = opts.precision();
    if p.blocks == Some(Blocks::Native) {
        match native {
            Some(dt) => p.blocks = Some(Blocks::To(dt)),
            None => {
                return Err(LlmError::Spec {
                    spec: spec.to_string(),
                    msg: "--dtype gguf keeps a GGUF file's own blocks, and this is not a GGUF file (quantize it at load with --dtype q4_k, q8_0, …)".into(),
                })
            }
        }
    }
    let Some(w) = &opts.workload else {
        return Ok(());
    };
    if !opts.device.is_cpu() {
        return Ok(());
    }
    let e = super::memory::check(cfg, p, w).map_err(|e| LlmError::Memory {
        spec: spec.to_string(),
        why: Box::new(e),
    })?;
    tracing::info!(
        "estimated peak memory {} (weights {}, embeddings {}, activations {})",
        super::memory::gb(e.total()),
        super::memory::gb(e.weights),
        super::memory::gb(e.embeddings),
        super::memory::gb(e.activations)
    );
    Ok(())
}

fn random_backbone(spec: &str, cfg: &Config, opts: &LlmOptions) -> Result<Loaded, LlmError> {
    guard(spec, cfg, opts, None)?;
    // Made one tensor at a time as the loader asks (never the whole model twice).
    let w = crate::llm::llama::RandomWeights::new(cfg, 0, opts.dtype(), &opts.device);
    let model = Llama::load(&w, cfg, ADDED_TOKENS.len(), opts.precision(), &opts.device)?;
    Ok(Loaded {
        model,
        tokenizer: crate::llm::tokenizer::byte_level_tokenizer(cfg.vocab_size),
        source: Source::Builtin {
            name: spec.to_string(),
        },
    })
}

/// Loads the backbone named by `spec`.
pub fn load(spec: &str, opts: &LlmOptions) -> Result<Loaded, LlmError> {
    // Each weight is read, turned into its format and dropped: give those buffers back as we go.
    crate::kernels::alloc::releasing(|| load_spec(spec, opts))
}

fn load_spec(spec: &str, opts: &LlmOptions) -> Result<Loaded, LlmError> {
    if let Some(config) = spec.strip_prefix(BUILTIN_RANDOM) {
        let cfg = Config::from_hf_file(Path::new(config))?;
        return random_backbone(spec, &cfg, opts);
    }
    if spec == BUILTIN_TINY {
        let cfg = Config {
            hidden_size: 64,
            intermediate_size: 128,
            head_dim: 16,
            vocab_size: 260,
            eos_token_ids: vec![256],
            ..Config::tiny(260)
        };
        return random_backbone(spec, &cfg, opts);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        let weights = folder_weights(path)?;
        let (model, tokenizer) = load_folder(path, &weights, opts)?;
        return Ok(Loaded {
            model,
            tokenizer,
            source: Source::Folder {
                path: path.to_path_buf(),
                weights,
            },
        });
    }
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return load_gguf(path, opts);
        }
        if path.file_name().is_some_and(|n| n == "config.json") {
            return load_spec(
                &path
                    .parent()
                    .unwrap_or(Path::new("."))
                    .display()
                    .to_string(),
                opts,
            );
        }
        return Err(LlmError::Spec {
            spec: spec.into(),
            msg: "expected a Hugging Face model folder, a .gguf file or a hub id (owner/name)"
                .into(),
        });
    }
    if looks_like_hub_id(spec) {
        return load_hub(spec, opts);
    }
    Err(LlmError::Spec {
        spec: spec.into(),
        msg: "no such file or folder (and not a hub id of the form owner/name)".into(),
    })
}

/// The safetensors files of a folder: `model.safetensors` or the shards of its index.
fn folder_weights(dir: &Path) -> Result<Vec<PathBuf>, LlmError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return shard_files(&index).map(|names| names.into_iter().map(|n| dir.join(n)).collect());
    }
    Err(LlmError::Weights {
        path: dir.to_path_buf(),
        msg: "neither model.safetensors nor model.safetensors.index.json is here (pytorch_model.bin is not read)".into(),
    })
}

fn shard_files(index: &Path) -> Result<Vec<String>, LlmError> {
    let text = std::fs::read_to_string(index).map_err(|e| LlmError::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LlmError::Weights {
        path: index.to_path_buf(),
        msg: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LlmError::Weights {
            path: index.to_path_buf(),
            msg: "weight_map object expected".into(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn load_folder(
    dir: &Path,
    weights: &[PathBuf],
    opts: &LlmOptions,
) -> Result<(Llama, LlmTokenizer), LlmError> {
    let cfg = Config::from_hf_file(&dir.join("config.json"))?;
    guard(&dir.display().to_string(), &cfg, opts, None)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(LlmError::Tokenizer {
            path: tok_path,
            msg: "file not found (only tokenizer.json is read)".into(),
        });
    }
    let tokenizer = LlmTokenizer::from_file(
        &tok_path,
        cfg.vocab_size,
        cfg.bos_token_id,
        cfg.eos_token_ids.clone(),
    )?;
    for w in weights {
        if !w.is_file() {
            return Err(LlmError::Weights {
                path: w.clone(),
                msg: "weight file not found".into(),
            });
        }
    }
    let st = super::safetensors::Streamed::open(weights)
        .map_err(|(path, msg)| LlmError::Weights { path, msg })?;
    let model = Llama::load(
        &st,
        &cfg,
        ADDED_TOKENS.len(),
        opts.precision(),
        &opts.device,
    )
    .map_err(|e| LlmError::Weights {
        path: dir.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok((model, tokenizer))
}

fn load_gguf(path: &Path, opts: &LlmOptions) -> Result<Loaded, LlmError> {
    let g = gguf::read(path)?;
    guard(
        &path.display().to_string(),
        &g.config,
        opts,
        g.weights.projection_blocks(),
    )?;
    let model = Llama::load(
        &g.weights,
        &g.config,
        ADDED_TOKENS.len(),
        opts.precision(),
        &opts.device,
    )
    .map_err(|e| LlmError::Weights {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(Loaded {
        model,
        tokenizer: g.tokenizer,
        source: Source::Gguf {
            path: path.to_path_buf(),
            quantization: g.quant_types,
            tokenizer: g.tokenizer_kind,
        },
    })
}

fn load_hub(id: &str, opts: &LlmOptions) -> Result<Loaded, LlmError> {
    use hf_hub::{Cache, Repo, RepoType};
    let revision = opts.revision.clone().unwrap_or_else(|| "main".into());
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.clone());
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let err = |msg: String| {
        LlmError::Spec {
        spec: id.to_string(),
        msg: format!(
            "{msg}; to run without the network pass a local path instead: a folder with config.json, tokenizer.json and model.safetensors, or a .gguf file"
        ),
    }
    };
    let cache = Cache::from_env();
    type Fetch = Box<dyn Fn(&str) -> Result<PathBuf, String>>;
    let get: Fetch = if offline {
        let c = cache.repo(repo.clone());
        Box::new(move |f| {
            c.get(f)
                .ok_or_else(|| format!("HF_HUB_OFFLINE is set and {f} is not in the cache"))
        })
    } else {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or(cache.token());
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
            .with_token(token)
            .with_progress(true)
            .build()
            .map_err(|e| err(format!("hub client: {e}")))?;
        let r = api.repo(repo.clone());
        Box::new(move |f| r.get(f).map_err(|e| format!("fetching {f}: {e}")))
    };
    let config = get("config.json").map_err(err)?;
    let dir = config
        .parent()
        .expect("cached file has a folder")
        .to_path_buf();
    get("tokenizer.json").map_err(err)?;
    let weights = match get("model.safetensors") {
        Ok(p) => vec![p],
        Err(first) => {
            let index = get("model.safetensors.index.json").map_err(|_| err(first))?;
            let mut out = vec![];
            for f in shard_files(&index)? {
                out.push(get(&f).map_err(err)?);
            }
            out
        }
    };
    let (model, tokenizer) = load_folder(&dir, &weights, opts)?;
    Ok(Loaded {
        model,
        tokenizer,
        source: Source::Hub {
            id: id.to_string(),
            revision,
            path: dir,
            weights,
        },
    })
}
