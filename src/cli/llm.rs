//! `llara llm info|generate|logits`: quick checks that a backbone (and an adapter) works, and
//! all-position logits for comparison with other implementations.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};
use llara::llm::generate::{generate, GenOptions};
use llara::llm::{self, LlmOptions, Loaded, Step};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum LlmCommand {
    /// Architecture, parameter count, vocabulary, dtype and where the files came from.
    Info(InfoArgs),
    /// Generate a continuation of one or more prompts (greedy unless --temperature > 0).
    Generate(GenerateArgs),
    /// Token ids and the logits at every position of a prompt, as safetensors (`ids`, `logits`).
    Logits(LogitsArgs),
    /// Throughput of a LoRA training step and of greedy generation (tokens/s, peak memory).
    Bench(BenchArgs),
}

/// How to load a backbone: shared by every command that runs an LLM.
#[derive(Args, Debug, Clone)]
pub struct BackboneArgs {
    /// A Hugging Face model folder, a .gguf file, or a hub id (owner/name).
    #[arg(long, value_name = "SPEC")]
    pub llm: String,
    /// Hub revision (branch, tag or commit) when --llm is a hub id.
    #[arg(long)]
    pub revision: Option<String>,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the base weights before running (faster inference).
    #[arg(long)]
    pub merge: bool,
    #[command(flatten)]
    pub dev: super::DeviceArgs,
}

impl BackboneArgs {
    pub fn load(&self) -> Result<Loaded> {
        self.load_for(None)
    }

    /// Loads for `workload`: refused before any weight is read when its estimated peak memory
    /// does not fit ([`llm::memory::check`]).
    pub fn load_for(&self, workload: Option<llm::memory::Workload>) -> Result<Loaded> {
        let device = self.dev.start(2)?;
        let dtype = self.dev.dtype()?;
        let opts = LlmOptions {
            device,
            dtype,
            revision: self.revision.clone(),
            workload,
        };
        let started = std::time::Instant::now();
        let mut loaded = llm::load(&self.llm, &opts)?;
        if let Some(dir) = &self.adapter {
            llm::lora::load_adapter(&mut loaded.model, dir)
                .with_context(|| format!("--adapter {}", dir.display()))?;
            if self.merge {
                llm::lora::merge(&mut loaded.model)?;
            }
        } else if self.merge {
            bail!("--merge needs --adapter");
        }
        tracing::info!(
            "loaded {} in {:.1}s",
            loaded.name(),
            started.elapsed().as_secs_f64()
        );
        Ok(loaded)
    }
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// A prompt (repeat for a batch).
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Stop when the output contains this string (repeatable), e.g. --stop '\n'.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not add the tokenizer's special tokens (BOS) to the prompt.
    #[arg(long)]
    pub no_special: bool,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[arg(long)]
    pub prompt: String,
    /// Output .safetensors file: `ids` (i64 [T]) and `logits` (f32 [T, vocab]).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Do not add the tokenizer's special tokens (BOS) to the prompt.
    #[arg(long)]
    pub no_special: bool,
    /// Also compare with another `llm logits` file (same prompt; e.g. from another device or
    /// implementation): prints the max |difference| and fails if the token ids differ.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,
}

pub fn run(cmd: LlmCommand) -> Result<()> {
    match cmd {
        LlmCommand::Info(a) => info(a),
        LlmCommand::Generate(a) => run_generate(a),
        LlmCommand::Logits(a) => logits(a),
        LlmCommand::Bench(a) => bench(a),
    }
}

/// The peak-memory estimates `llm info` prints: LoRA r 8 training on one 512-token row, with and
/// without activation checkpointing, and inference on it.
fn estimates(m: &llm::Llama) -> Vec<(String, llm::memory::Estimate)> {
    let w = llm::memory::Workload {
        batch: 1,
        seq_len: 512,
        train: true,
        checkpoint: false,
        lora_r: 8,
        infer_batch: 0,
    };
    let dt = llara::kernels::weight::Precision::parse(&m.weight_name())
        .unwrap_or_else(|| m.weight_dtype().into());
    [
        ("train, batch 1 x 512 tokens", w),
        (
            "train with --checkpoint-layers",
            llm::memory::Workload {
                checkpoint: true,
                ..w
            },
        ),
        (
            "inference, batch 1 x 512",
            llm::memory::Workload { train: false, ..w },
        ),
    ]
    .into_iter()
    .map(|(s, w)| (s.to_string(), llm::memory::estimate(&m.cfg, dt, &w)))
    .collect()
}

fn info(a: InfoArgs) -> Result<()> {
    let l = a.backbone.load()?;
    let c = &l.model.cfg;
    let adapter_params: usize = llm::lora::adapter_vars(&l.model)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let v = serde_json::json!({
        "architecture": c.architecture,
        "parameters": c.parameter_count(),
        "adapter_parameters": adapter_params,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "added_tokens": llm::ADDED_TOKENS.iter().map(|t| (t.to_string(), l.tokenizer.added_id(t))).collect::<HashMap<_, _>>(),
        "tied_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "bos": l.tokenizer.bos,
        "eos": l.tokenizer.eos,
        "dtype": l.model.weight_name(),
        "activations": format!("{:?}", l.model.dtype()).to_lowercase(),
        "gemm": l.model.gemm_path(),
        "weight_format": l.model.weight_format(),
        "memory_estimate": estimates(&l.model),
        "device": format!("{:?}", l.model.device()),
        "source": l.source,
        "lora": l.model.lora,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("architecture   {}", c.architecture);
    println!(
        "parameters     {} ({:.1} M){}",
        c.parameter_count(),
        c.parameter_count() as f64 / 1e6,
        if adapter_params > 0 {
            format!(" + {adapter_params} LoRA")
        } else {
            String::new()
        }
    );
    println!(
        "shape          {} layers, hidden {}, ffn {}, {} heads / {} kv heads, head dim {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!(
        "vocabulary     {} (+ {} added: {}), tied embeddings: {}",
        c.vocab_size,
        llm::ADDED_TOKENS.len(),
        llm::ADDED_TOKENS.join(" "),
        c.tie_word_embeddings
    );
    println!(
        "rope theta     {}, rms eps {:e}",
        c.rope_theta, c.rms_norm_eps as f32
    );
    println!("gemm           {}", l.model.gemm_path());
    println!("weights        {}", l.model.weight_format());
    for (what, e) in estimates(&l.model) {
        println!(
            "memory         {what}: {} estimated peak (weights {}, embeddings {}, activations {})",
            llm::memory::gb(e.total()),
            llm::memory::gb(e.weights),
            llm::memory::gb(e.embeddings),
            llm::memory::gb(e.activations)
        );
    }
    println!(
        "dtype, device  {}, {}",
        v["dtype"].as_str().unwrap_or(""),
        v["device"].as_str().unwrap_or("")
    );
    println!("source         {}", serde_json::to_string(&l.source)?);
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let l = a.backbone.load()?;
    let rows: Vec<Vec<u32>> = a
        .prompt
        .iter()
        .map(|p| l.tokenizer.encode(p, !a.no_special))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    if let Some(i) = rows.iter().position(|r| r.is_empty()) {
        bail!("--prompt {:?} has no tokens", a.prompt[i]);
    }
    let lengths: Vec<usize> = rows.iter().map(|r| r.len()).collect();
    let embeds = l.model.embed(&rows, None)?;
    let stop = a
        .stop
        .iter()
        .map(|s| s.replace("\\n", "\n").replace("\\t", "\t"))
        .collect();
    let opts = GenOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        stop,
        seed: a.seed,
    };
    let started = std::time::Instant::now();
    let out = generate(&l.model, &l.tokenizer, &embeds, &lengths, &opts)?;
    let n: usize = out.iter().map(|g| g.ids.len()).sum();
    for g in &out {
        println!("{}", g.text);
    }
    tracing::info!(
        "{n} tokens in {:.2}s ({:.1} tokens/s)",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let l = a.backbone.load()?;
    let ids = l
        .tokenizer
        .encode(&a.prompt, !a.no_special)
        .map_err(anyhow::Error::msg)?;
    if ids.is_empty() {
        bail!("--prompt has no tokens");
    }
    let t = ids.len();
    let x = l.model.embed(std::slice::from_ref(&ids), None)?;
    let h = l.model.forward(&x, Step::padded(&[t], t), None)?;
    let logits = l
        .model
        .logits_at(&h, &(0..t).collect::<Vec<_>>())?
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    let ids_t = Tensor::from_vec(
        ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        t,
        &candle_core::Device::Cpu,
    )?;
    let tensors: HashMap<String, Tensor> =
        [("ids".to_string(), ids_t), ("logits".to_string(), logits)].into();
    llara::fsutil::write_file_atomic(&a.out, |tmp| -> Result<()> {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })
    .with_context(|| format!("--out {}", a.out.display()))?;
    eprintln!("{} tokens → {}", t, a.out.display());
    if let Some(other) = &a.compare {
        let theirs = candle_core::safetensors::load(other, &candle_core::Device::Cpu)
            .with_context(|| format!("--compare {}", other.display()))?;
        let (Some(their_ids), Some(their_logits)) = (theirs.get("ids"), theirs.get("logits"))
        else {
            bail!(
                "--compare {}: expected the tensors `ids` and `logits` (an `llm logits` file)",
                other.display()
            );
        };
        if their_ids.to_dtype(DType::I64)?.to_vec1::<i64>()? != tensors["ids"].to_vec1::<i64>()? {
            bail!("--compare {}: the token ids differ", other.display());
        }
        let ours = &tensors["logits"];
        if their_logits.dims() != ours.dims() {
            bail!(
                "--compare {}: logits {:?}, expected {:?}",
                other.display(),
                their_logits.dims(),
                ours.dims()
            );
        }
        let d = (their_logits.to_dtype(DType::F32)? - ours)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        println!("max |difference| {d:e} ({} positions)", t);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Loss on the last N tokens of each row.
    #[arg(long, default_value_t = 32)]
    pub answer_len: usize,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// LoRA targets: q,k,v,o,gate,up,down or all.
    #[arg(long, default_value = "all")]
    pub lora_targets: String,
    #[arg(long, default_value_t = 256)]
    pub gen_prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub gen_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Activation checkpointing per decoder layer (less memory, more compute).
    #[arg(long)]
    pub checkpoint: bool,
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.adapter_given() {
        bail!("llm bench adds fresh adapters itself; drop --adapter");
    }
    if a.seq_len < 2 || a.batch == 0 || a.steps == 0 || a.gen_prompt_len == 0 {
        bail!("--batch, --steps, --gen-prompt-len must be at least 1 and --seq-len at least 2");
    }
    let mut l = a.backbone.load_for(Some(llm::memory::Workload {
        batch: a.batch,
        seq_len: a.seq_len.max(a.gen_prompt_len + a.gen_new_tokens),
        train: true,
        checkpoint: a.checkpoint,
        lora_r: a.lora_r,
        // The generation after the steps: one row.
        infer_batch: 1,
    }))?;
    let cfg = llm::bench::BenchConfig {
        batch: a.batch,
        seq_len: a.seq_len,
        answer_len: a.answer_len,
        steps: a.steps,
        warmup: a.warmup,
        lora: llm::LoraConfig {
            r: a.lora_r,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            targets: llm::Target::parse_list(&a.lora_targets)
                .map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))?,
            rslora: false,
        },
        gen_prompt_len: a.gen_prompt_len,
        gen_new_tokens: a.gen_new_tokens,
        seed: a.seed,
        checkpoint: a.checkpoint,
    };
    let report = llm::bench::run(&mut l.model, &l.tokenizer, &cfg)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({"impl": "llara", "llm": l.name(), "threads": threads,
            "dtype": l.model.weight_name(),
            "gemm": l.model.gemm_path(), "config": cfg, "report": report})
    );
    Ok(())
}

impl BenchArgs {
    fn adapter_given(&self) -> bool {
        self.backbone.adapter.is_some()
    }
}
