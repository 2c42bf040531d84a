//! Throughput of the two hot loops on a real backbone: a LoRA training step (forward, backward,
//! AdamW on the adapters, answer-span loss) and greedy generation with the KV cache. Reported by
//! `llara llm bench`; scripts/bench_llm.sh runs it next to PyTorch + PEFT on the same weights.

use super::generate::{generate_timed, GenOptions};
use super::llama::{Llama, Step};
use super::lora::{self, LoraConfig};
use super::tokenizer::LlmTokenizer;
use candle_core::Result;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchConfig {
    pub batch: usize,
    pub seq_len: usize,
    /// Loss on the last `answer_len` tokens of each row.
    pub answer_len: usize,
    pub steps: usize,
    pub warmup: usize,
    pub lora: LoraConfig,
    pub gen_prompt_len: usize,
    pub gen_new_tokens: usize,
    pub seed: u64,
    /// Activation checkpointing per decoder layer.
    pub checkpoint: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub train_tokens_per_second: f64,
    pub train_seconds_per_step: f64,
    pub train_losses: Vec<f32>,
    /// The prompt's prefill, warm (a first generation call has run on the merged weights).
    pub gen_prefill_seconds: f64,
    /// The first prefill after merging (one-time work included: transposed weight copies, fresh pages).
    pub gen_first_prefill_seconds: f64,
    pub gen_decode_tokens_per_second: f64,
    pub gen_new_tokens: usize,
    pub peak_rss_bytes: Option<u64>,
    /// Peak before the benchmark started (loading the backbone).
    pub peak_rss_after_load_bytes: Option<u64>,
    /// Peak after the training steps (before generation).
    pub peak_rss_after_train_bytes: Option<u64>,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the benchmark on `model` (adapters are added here).
pub fn run(model: &mut Llama, tok: &LlmTokenizer, cfg: &BenchConfig) -> Result<BenchReport> {
    let after_load = peak_rss();
    lora::add_adapters(model, &cfg.lora, cfg.seed)?;
    model.set_checkpointing(cfg.checkpoint)?;
    let vars: Vec<candle_core::Var> = lora::adapter_vars(model)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-4,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let v = model.cfg.vocab_size as u32;
    let (b, t, a) = (cfg.batch, cfg.seq_len, cfg.answer_len.min(cfg.seq_len - 1));
    let mut dropout = crate::kernels::dropout::Dropout::new(
        cfg.lora.dropout,
        ChaCha8Rng::seed_from_u64(cfg.seed + 1),
    );
    let mut losses = vec![];
    let mut timed = 0.0;
    for step in 0..cfg.warmup + cfg.steps {
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..t).map(|_| rng.random_range(0..v)).collect())
            .collect();
        // Position p predicts token p + 1: the answer span is the last `a` tokens of each row.
        let mut pos = vec![];
        let mut targets = vec![];
        for (bi, r) in rows.iter().enumerate() {
            for p in t - a - 1..t - 1 {
                pos.push(bi * t + p);
                targets.push(r[p + 1]);
            }
        }
        let started = Instant::now();
        let x = model.embed(&rows, None)?;
        let h = model.forward(&x, Step::padded(&vec![t; b], t), Some(&mut dropout))?;
        let loss = model.loss_at(&h, &pos, &targets)?;
        let grads = model.backward(&loss)?;
        opt.step(&grads)?;
        let l = loss.to_scalar::<f32>()?;
        // The clock is read after the device finished the step (GPU kernels are asynchronous).
        model.device().synchronize()?;
        if step >= cfg.warmup {
            timed += started.elapsed().as_secs_f64();
            losses.push(l);
        }
    }
    let after_train = peak_rss();
    model.set_checkpointing(false)?;
    // As tune does before validating: the steps' buffers go back before generation's.
    crate::kernels::alloc::trim();
    lora::merge(model)?;
    let prompt: Vec<u32> = (0..cfg.gen_prompt_len)
        .map(|_| rng.random_range(0..v))
        .collect();
    let x = model.embed(std::slice::from_ref(&prompt), None)?;
    // EOS must not end the run early: no stop tokens while benchmarking.
    let mut tok_no_eos = tok.clone();
    tok_no_eos.eos.clear();
    let first = GenOptions {
        max_new_tokens: 1,
        ..Default::default()
    };
    let (_, cold) = generate_timed(model, &tok_no_eos, &x, &[prompt.len()], &first)?;
    let opts = GenOptions {
        max_new_tokens: cfg.gen_new_tokens,
        ..Default::default()
    };
    let (out, timing) = generate_timed(model, &tok_no_eos, &x, &[prompt.len()], &opts)?;
    let n = out[0].ids.len();
    Ok(BenchReport {
        train_tokens_per_second: (b * t * cfg.steps) as f64 / timed,
        train_seconds_per_step: timed / cfg.steps as f64,
        train_losses: losses,
        gen_prefill_seconds: timing.prefill_seconds,
        gen_first_prefill_seconds: cold.prefill_seconds,
        gen_decode_tokens_per_second: timing.decode_steps as f64 / timing.decode_seconds.max(1e-9),
        gen_new_tokens: n,
        peak_rss_bytes: peak_rss(),
        peak_rss_after_load_bytes: after_load,
        peak_rss_after_train_bytes: after_train,
    })
}
