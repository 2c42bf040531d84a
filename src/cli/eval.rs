//! `llara eval` (generation and candidate scoring of a tune run) and opening a trained run
//! (`open_run`, shared with `llara recommend`).

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llara::eval::metrics::{RankAccumulator, RankMetrics};
use llara::llara::evaluate::{
    gather_in_row_order, score_candidates, score_with_head, EvalOptions, GenMetrics, ScoreMode,
    ScoreOptions,
};
use llara::llara::head::Head;
use llara::llara::projector::Projector;
use llara::llara::tune::{self};
use llara::llara::{Behaviour, Curriculum, PromptKit};
use serde::Serialize;
use std::path::{Path, PathBuf};

use super::rundir::{sha256_file, write_json, GenReport, RunInfo, ScoreReport};
use super::tune::{load_parts, tune_config, Loaded};

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A tune run folder.
    #[arg(long, value_name = "RUN")]
    pub run: PathBuf,
    /// Dataset folder (default: the run's).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "test", value_parser = ["valid", "test"])]
    pub split: String,
    /// The headline metric: hr@1 (both modes); hr@5, hr@10, ndcg@5, ndcg@10, mrr (--mode score).
    #[arg(long, default_value = "hr@1", value_parser = ["hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"])]
    pub metric: String,
    /// generate: greedy answers judged by LLaRA's substring rule (ValidRatio, HitRatio@1); score: rank
    /// the candidates by the log-likelihood of their answers (HR@k, NDCG@k, MRR).
    #[arg(long, default_value = "generate", value_parser = ["generate", "score"])]
    pub mode: String,
    /// With --mode score: sum or mean (length-normalised) of the answer tokens' log-probabilities.
    #[arg(long, default_value = "sum", value_parser = ["sum", "mean"])]
    pub score: String,
    /// With --mode score: run the whole prompt again for every candidate instead of sharing its KV
    /// cache (the slow reference, for benchmarks).
    #[arg(long)]
    pub no_prompt_cache: bool,
    /// With --mode score: head (the run's scoring head, the default when it has one) or answer
    /// (answer log-likelihoods, the default otherwise).
    #[arg(long, default_value = "auto", value_parser = ["auto", "head", "answer"])]
    pub scorer: String,
    /// Prompt template (fixed for reproducible scores).
    #[arg(long, default_value_t = 0)]
    pub template: usize,
    /// Evaluate only the first N rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Rows per forward pass: prompts generated together, or (--mode score) prompts whose KV
    /// caches are filled together before their candidates are scored.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// With --mode generate: decode only the candidates' titles (greedy over a token trie of the
    /// row's candidate answers), so every answer names exactly one candidate.
    #[arg(long)]
    pub constrained: bool,
    /// Longest generated answer, in tokens (--mode generate).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Backbone override (default: the run's --llm).
    #[arg(long, value_name = "SPEC")]
    pub llm: Option<String>,
    /// Where predictions.jsonl (scores.jsonl) and metrics.json go (default RUN/eval-<split>,
    /// RUN/eval-<split>-constrained, or RUN/eval-<split>-score).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the metrics as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dev: super::DeviceArgs,
}

pub fn run_eval(a: EvalArgs, quiet: bool, comm: &dyn llara::comm::Communicator) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size 0: expected at least 1 row per batch");
    }
    let device = a.dev.start(2)?;
    let or = open_run(
        &a.run,
        a.data.as_deref(),
        a.llm.as_deref(),
        &device,
        a.dev.dtype()?,
        (
            // `--limit 2` runs one pass of 2 rows, whatever the batch size.
            a.batch_size.min(a.limit.unwrap_or(usize::MAX).max(1)),
            inference_tokens(if a.mode == "score" {
                SCORED_TOKENS
            } else {
                a.max_new_tokens
            }),
        ),
    )?;
    let (parts, view) = (&or.parts, or.view);
    let mut rows = llara::llara::batch::split_rows(&parts.ds, &a.split, a.template, None, 0);
    if let Some(n) = a.limit {
        rows.truncate(n);
    }
    let kit = or.kit();
    let eopts = EvalOptions {
        view,
        template: a.template,
        batch_size: a.batch_size,
        max_new_tokens: a.max_new_tokens,
        constrained: a.constrained,
        shard: llara::llara::evaluate::Shard::of(comm),
    };
    let bar = ProgressBar::new(rows.len() as u64).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} rows  ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(a.split.clone());
    // Under mpirun each rank computes its shard of the rows' batches; rank 0 gathers them in row
    // order, reports and writes.
    let writer = comm.rank() == 0;
    if quiet || a.json || !writer {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let behaviour = or.behaviour();
    let behaviour = behaviour.as_ref();
    let started = std::time::Instant::now();
    if a.mode == "score" {
        let mode = ScoreMode::parse(&a.score)?;
        let so = ScoreOptions {
            shared_prompt: !a.no_prompt_cache,
            ..ScoreOptions::new(mode)
        };
        let use_head = or.head.is_some() && a.scorer != "answer";
        if a.scorer == "head" && or.head.is_none() {
            bail!(
                "--scorer head: {} has no scoring head (tune with --objective listwise or both)",
                a.run.display()
            );
        }
        let scored = match &or.head {
            Some(hd) if use_head => {
                score_with_head(&parts.llm.model, &kit, behaviour, hd, &rows, &eopts, |n| {
                    bar.inc(n as u64)
                })?
            }
            _ => score_candidates(&parts.llm.model, &kit, behaviour, &rows, &eopts, so, |n| {
                bar.inc(n as u64)
            })?,
        };
        bar.finish_and_clear();
        let scored = gather_in_row_order(comm, &rows, scored, |r| r.row)?;
        if !writer {
            return Ok(());
        }
        let mut acc = RankAccumulator::default();
        for r in &scored {
            acc.push(r.rank);
        }
        let m = acc.finish();
        let out = a
            .out
            .clone()
            .unwrap_or(a.run.join(format!("eval-{}-score", a.split)));
        let report = ScoreReport {
            split: a.split.clone(),
            mode: "score".into(),
            score: a.score.clone(),
            scorer: if use_head { "head" } else { "answer" }.into(),
            template: a.template,
            view: view.name().to_string(),
            dtype: dtype_name(parts),
            metrics: m,
            seconds: started.elapsed().as_secs_f64(),
        };
        write_eval(&out, "scores.jsonl", &scored, &report)?;
        let report = serde_json::to_value(&report)?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", RankMetrics::table(&[(a.split.as_str(), &m)]));
            println!(
                "{}: {:.4}; scores: {}",
                a.metric,
                report[a.metric.as_str()].as_f64().unwrap_or(f64::NAN),
                out.join("scores.jsonl").display()
            );
        }
        return Ok(());
    }
    if a.metric != "hr@1" {
        bail!(
            "--metric {}: generation gives hr@1 only (use --mode score for ranking metrics)",
            a.metric
        );
    }
    let preds =
        llara::llara::evaluate::evaluate(&parts.llm.model, &kit, behaviour, &rows, &eopts, |n| {
            bar.inc(n as u64)
        })?;
    bar.finish_and_clear();
    let preds = gather_in_row_order(comm, &rows, preds, |p| p.row)?;
    if !writer {
        return Ok(());
    }
    let m = GenMetrics::of(&preds);
    let out = a.out.clone().unwrap_or(a.run.join(if a.constrained {
        format!("eval-{}-constrained", a.split)
    } else {
        format!("eval-{}", a.split)
    }));
    let report = GenReport {
        split: a.split.clone(),
        mode: "generate".into(),
        constrained: a.constrained,
        template: a.template,
        view: view.name().to_string(),
        dtype: dtype_name(parts),
        metrics: m,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_eval(&out, "predictions.jsonl", &preds, &report)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_metrics(&a.split, &m);
        println!("predictions: {}", out.join("predictions.jsonl").display());
    }
    Ok(())
}

/// The frozen weights' dtype of the loaded backbone, as the reports write it (`f32`, `bf16`).
fn dtype_name(parts: &Loaded) -> String {
    parts.llm.model.weight_name()
}

/// Writes `lines` (one JSON object each) and `metrics.json` into `out`, atomically.
fn write_eval<T: Serialize, R: Serialize>(
    out: &Path,
    name: &str,
    lines: &[T],
    report: &R,
) -> Result<()> {
    let staged = llara::fsutil::StagedDir::new(out, true)
        .with_context(|| format!("--out {}", out.display()))?;
    let mut text = String::new();
    for p in lines {
        text.push_str(&serde_json::to_string(p)?);
        text.push('\n');
    }
    std::fs::write(staged.path().join(name), text)?;
    write_json(&staged.path().join("metrics.json"), report)?;
    staged
        .commit()
        .with_context(|| format!("--out {}", out.display()))?;
    Ok(())
}

fn print_metrics(split: &str, m: &GenMetrics) {
    println!("split   rows   valid_ratio   hr@1     hr@1_of_valid");
    println!(
        "{split:<7} {:<6} {:<13.4} {:<8.4} {:.4}",
        m.rows, m.valid_ratio, m.hr1, m.hr1_of_valid
    );
}

/// A trained run ready to answer: its dataset, recommender, backbone with the run's adapter,
/// projector, scoring head (when it has one), and the prompt kind it is evaluated with.
pub(super) struct OpenRun {
    pub(super) parts: Loaded,
    pub(super) projector: Projector,
    pub(super) head: Option<Head>,
    pub(super) view: llara::llara::prompts::ItemView,
    pub(super) info: RunInfo,
}

impl OpenRun {
    pub(super) fn kit(&self) -> PromptKit<'_> {
        PromptKit {
            tok: &self.parts.llm.tokenizer,
            templates: &self.parts.templates,
            titles: &self.parts.ds.titles,
            user_token: self.info.user_token,
            answer: self.info.answer,
        }
    }

    /// The behaviour tokens' source, for runs whose evaluation prompt carries them.
    pub(super) fn behaviour(&self) -> Option<Behaviour<'_>> {
        self.view.uses_embeddings().then_some(Behaviour {
            rec: &self.parts.rec,
            cand_emb: self.info.cand_emb,
            projector: &self.projector,
        })
    }
}

/// Tokens per row the memory guard takes for inference on a run: a LLaRA prompt (a few hundred
/// tokens; 512 as tune takes) plus what follows it in one pass.
pub(super) fn inference_tokens(after_prompt: usize) -> usize {
    512 + after_prompt
}

/// One pass of `--mode score`: a chunk of 20 candidates' answers packed after the prompt
/// (titles of ~16 tokens each).
pub(super) const SCORED_TOKENS: usize = 20 * 16;

pub(super) fn open_run(
    run: &Path,
    data: Option<&Path>,
    llm_spec: Option<&str>,
    device: &candle_core::Device,
    dtype: Option<llara::kernels::weight::Precision>,
    (rows, tokens): (usize, usize),
) -> Result<OpenRun> {
    let info_path = run.join("run.json");
    let info: RunInfo = serde_json::from_str(
        &std::fs::read_to_string(&info_path)
            .with_context(|| format!("--run {}: not a tune run (run.json)", run.display()))?,
    )
    .with_context(|| info_path.display().to_string())?;
    // A tune.toml that does not parse leaves the embedded prompts (as a missing one does).
    let config = tune_config(run).ok().flatten();
    // Without --dtype, the dtype the run was trained with (`--dtype bf16` on the CPU: bf16 weights).
    let dtype = match dtype {
        Some(d) => Some(d),
        None => config.as_ref().and_then(|t| t.dev.dtype().ok().flatten()),
    };
    // The memory guard's workload: `rows` prompts of `tokens` each through the adapted backbone.
    let workload = llara::llm::memory::Workload {
        batch: rows,
        seq_len: tokens,
        train: false,
        checkpoint: false,
        lora_r: config.as_ref().map_or(8, |t| t.lora_r),
        infer_batch: 0,
    };
    let prompts = config.and_then(|t| t.prompts);
    let data = data.map(Path::to_path_buf).unwrap_or(info.data.clone());
    let spec = llm_spec.map(String::from).unwrap_or(info.llm.clone());
    let mut parts = load_parts(
        &data,
        &info.sr,
        &spec,
        llara::llm::LlmOptions {
            device: device.clone(),
            dtype,
            revision: None,
            workload: Some(workload),
        },
        prompts.as_deref(),
    )?;
    if sha256_file(&parts.sr_weights)? != info.sr_sha256 {
        bail!(
            "{}: the recommender changed since the run was trained",
            info.sr.display()
        );
    }
    let weights = if run.join("adapter").is_dir() && run.join("projector.safetensors").is_file() {
        run.to_path_buf()
    } else if run.join("best/adapter").is_dir() {
        run.join("best")
    } else {
        bail!(
            "--run {}: no trained weights yet (adapter/ or best/)",
            run.display()
        );
    };
    let (projector, head) = tune::load_weights(
        &mut parts.llm.model,
        &weights,
        parts.rec.cfg.hidden_size,
        info.head,
    )?;
    // Inference only from here: fold the adapters into the base weights (W + s·BA), so generation
    // and scoring run plain linears instead of base + two rank-r products per projection.
    llara::llm::lora::merge(&mut parts.llm.model)?;
    let view = Curriculum::parse(&info.curriculum)?.eval_view();
    Ok(OpenRun {
        parts,
        projector,
        head,
        view,
        info,
    })
}
