//! `llara train-sr` and `llara eval-sr`.

use super::rundir::{write_json, DatasetRef, SrEvalReport, SrRunConfig, SrRunMetrics};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use llara::data::Dataset;
use llara::eval::metrics::{RankMetrics, Selection};
use llara::fsutil::StagedDir;
use llara::sr::train::{train, EpochLog, Loss, TrainOptions};
use llara::sr::{load_model, Arch};
use serde::Serialize;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Serialize)]
pub struct TrainSrArgs {
    /// Dataset folder (from `llara data`).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Architecture.
    #[arg(long, value_parser = super::named::<Arch>(), default_value = "sasrec")]
    pub model: Arch,
    /// Output run folder (written to a temporary folder and renamed at the end).
    #[arg(long, value_name = "RUN")]
    pub out: PathBuf,
    /// Maximum epochs.
    #[arg(long, default_value_t = 150)]
    pub epochs: usize,
    /// Stop after this many epochs without a better valid score (see --select). Default: 20, and
    /// 60 for GRU4Rec, whose valid score can stall for 20+ epochs before it learns.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Embedding and hidden size.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// L2 weight decay (added to the gradient, as PyTorch's Adam does).
    #[arg(long, default_value_t = 1e-4)]
    pub l2: f64,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Dropout in training (SASRec: embeddings, attention, feed-forward; GRU4Rec: inputs and
    /// state; Caser: features). 0.6 is llara's recipe; LLaRA's is 0.1 (configs/train-sr-dros.toml).
    #[arg(long, default_value_t = 0.6)]
    pub dropout: f64,
    /// SASRec attention heads.
    #[arg(long, default_value_t = 1)]
    pub num_heads: usize,
    /// bce: target vs one sampled negative (LLaRA's recipe); ce: full softmax cross-entropy;
    /// sampled: softmax over the target and --negatives sampled items; gbce: gSASRec's calibrated
    /// BCE over the target and --negatives sampled items.
    #[arg(long, value_parser = super::named::<Loss>(), default_value = "bce")]
    pub loss: Loss,
    /// Negatives per step for --loss sampled and gbce (shared by the batch).
    #[arg(long, default_value_t = 256)]
    pub negatives: usize,
    /// gBCE calibration t in [0, 1] (1: calibrated, 0: plain BCE over the negatives).
    #[arg(long, default_value_t = 0.75)]
    pub gbce_t: f64,
    /// What picks the best epoch on valid: expected-hr1 (HR@1 averaged over every possible
    /// candidate set, exact from full-catalogue ranks) or hr1 (the fixed sets' HR@1, LLaRA's rule).
    #[arg(long, value_parser = super::named::<Selection>(), default_value = "expected-hr1")]
    pub select: Selection,
    /// Validate, select and save an exponential moving average of the weights with this decay
    /// per step; 0 turns it off (LLaRA's recipe saves the raw weights).
    #[arg(long, default_value_t = 0.999)]
    pub ema: f64,
    /// Seed of initialisation, shuffling, negatives and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub dev: super::DeviceArgs,
    /// Replace the output folder if it exists.
    #[arg(long)]
    #[serde(skip)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitName {
    Valid,
    Test,
}

#[derive(Args, Debug, Clone)]
pub struct EvalSrArgs {
    /// A train-sr run folder, a .safetensors file with its .json config beside it, or a count
    /// baseline fitted on the dataset's train split: popularity, markov (last item → next item
    /// counts) or cooccurrence (next items of training rows whose history held the last item,
    /// weighted by recency); baselines break ties by popularity.
    #[arg(long, value_name = "RUN_OR_SAFETENSORS")]
    pub model: PathBuf,
    /// Also write scores.jsonl (each row's candidate scores and the target's rank) and
    /// metrics.json into DIR (a folder `llara report` reads).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Dataset folder whose fixed candidate sets are scored.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitName,
    /// Print one JSON object (keys as in metrics.json).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dev: super::DeviceArgs,
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} batches  {msg}  ETA {eta}")
        .expect("valid template")
        .progress_chars("=> ")
}

/// `--patience` when not given: 60 for GRU4Rec, 20 otherwise (docs/results/sr_quality.md).
pub fn default_patience(model: Arch) -> usize {
    match model {
        Arch::Gru4rec => 60,
        Arch::Sasrec | Arch::Caser => 20,
    }
}

pub fn train_sr(mut a: TrainSrArgs) -> Result<()> {
    // Resolved here so that the run's config.toml records the value used.
    let patience = *a.patience.get_or_insert(default_patience(a.model));
    a.dev.f32_only()?;
    let device = a.dev.start(1)?;
    let ds = Dataset::open(&a.data).with_context(|| format!("--data {}", a.data.display()))?;
    // Fail before training if the output cannot be written.
    let staged = StagedDir::new_locked(&a.out, a.force)
        .with_context(|| format!("--out {}", a.out.display()))?;
    let opts = TrainOptions {
        model: a.model,
        hidden: a.hidden,
        lr: a.lr,
        l2: a.l2,
        batch_size: a.batch_size,
        epochs: a.epochs,
        patience,
        dropout: a.dropout,
        num_heads: a.num_heads,
        loss: a.loss,
        negatives: a.negatives,
        gbce_t: a.gbce_t,
        select: a.select,
        ema: a.ema,
        seed: a.seed,
    };
    tracing::info!(
        "training {} on {} ({} train rows, {} items), seed {}",
        a.model.name(),
        ds.meta.name,
        ds.splits.train.len(),
        ds.n_items(),
        a.seed
    );
    let bar = ProgressBar::new(0).with_style(style());
    let rows = ds.splits.train.len() as f64;
    let batch_size = a.batch_size;
    let started = std::cell::Cell::new(std::time::Instant::now());
    let running = std::cell::Cell::new(0.0f64);
    let lr = a.lr;
    let start_all = std::time::Instant::now();
    // Ctrl-C / SIGTERM stop after the current batch; nothing is written (runs take minutes).
    llara::interrupt::install().context("installing the Ctrl-C handler")?;
    let trained = train(
        &ds,
        &opts,
        &device,
        |epoch, n| {
            bar.reset();
            bar.set_length(n as u64);
            bar.set_prefix(format!("epoch {epoch:>3}"));
            started.set(std::time::Instant::now());
            running.set(0.0);
        },
        |done, loss| {
            let avg = if done == 1 {
                loss
            } else {
                0.9 * running.get() + 0.1 * loss
            };
            running.set(avg);
            let ex = (done * batch_size) as f64 / started.get().elapsed().as_secs_f64().max(1e-9);
            bar.set_position(done as u64);
            bar.set_message(format!("loss {avg:.4}  lr {lr:.0e}  {ex:.0} ex/s"));
            match llara::interrupt::requested() {
                Some(_) => std::ops::ControlFlow::Break(()),
                None => std::ops::ControlFlow::Continue(()),
            }
        },
        |e: &EpochLog, improved| {
            bar.suspend(|| {
                tracing::info!(
                    "epoch {:>3}  loss {:.4}  valid HR@1 {:.4}  expected HR@1 {:.4}  NDCG@5 {:.4}  {:.1}s  {:.0} ex/s{}",
                    e.epoch,
                    e.loss,
                    e.valid.hr1,
                    e.valid.expected_hr1.unwrap_or(f64::NAN),
                    e.valid.ndcg5,
                    e.seconds,
                    rows / e.seconds,
                    if improved { "  *" } else { "" }
                )
            });
        },
    );
    bar.finish_and_clear();
    let trained = match trained {
        Err(llara::sr::SrError::Stopped { epoch, step }) => {
            let signal = llara::interrupt::requested().expect("only a signal stops training");
            return Err(llara::interrupt::Interrupted {
                signal,
                message: format!(
                    "stopped at epoch {epoch}, batch {step}; nothing was written to {} (rerun the command)",
                    a.out.display()
                ),
            }
            .into());
        }
        other => other?,
    };
    let train_seconds = start_all.elapsed().as_secs_f64();

    let dir = staged.path();
    trained
        .varmap
        .save(dir.join("model.safetensors"))
        .context("writing model.safetensors")?;
    let run_config = SrRunConfig {
        model: trained.config.clone(),
        training: opts.clone(),
        dataset: DatasetRef {
            dir: a.data.display().to_string(),
            name: ds.meta.name.clone(),
            content_hash: ds.meta.content_hash.clone(),
            seed: ds.meta.seed,
        },
    };
    write_json(&dir.join("config.json"), &run_config)?;
    let metrics = SrRunMetrics {
        test: trained.test,
        split: "test".into(),
        valid: trained.valid,
        best_epoch: trained.best_epoch,
        epochs_run: trained.log.len(),
        train_seconds,
    };
    write_json(&dir.join("metrics.json"), &metrics)?;
    let mut log = std::fs::File::create(dir.join("train_log.jsonl"))?;
    for e in &trained.log {
        writeln!(log, "{}", serde_json::to_string(e)?)?;
    }
    drop(log);
    let toml = toml::to_string(&a).context("serializing the run's config")?;
    std::fs::write(
        dir.join("config.toml"),
        format!("# The exact options of this run: `llara train-sr --config config.toml` reproduces it.\n{toml}"),
    )?;
    staged
        .commit()
        .with_context(|| format!("--out {}", a.out.display()))?;
    println!(
        "{} on {}: best epoch {} of {} ({:.1}s); wrote {}",
        a.model.name(),
        ds.meta.name,
        trained.best_epoch,
        trained.log.len(),
        train_seconds,
        a.out.display()
    );
    print!(
        "{}",
        RankMetrics::table(&[("valid", &trained.valid), ("test", &trained.test)])
    );
    Ok(())
}

pub fn eval_sr(a: EvalSrArgs) -> Result<()> {
    a.dev.f32_only()?;
    let device = a.dev.start(1)?;
    let ds = Dataset::open(&a.data).with_context(|| format!("--data {}", a.data.display()))?;
    let (name, rows, cands) = match a.split {
        SplitName::Valid => ("valid", &ds.splits.valid, &ds.candidates_valid),
        SplitName::Test => ("test", &ds.splits.test, &ds.candidates_test),
    };
    let baseline = (!a.model.exists())
        .then(|| a.model.to_str().and_then(llara::sr::baselines::Kind::parse))
        .flatten();
    // Each row's candidate scores (in candidate order), and for a trained model every item's
    // score (the full-catalogue metrics).
    type Scored = (String, Vec<Vec<f32>>, Option<Vec<Vec<f32>>>);
    let (label, scores, all): Scored = if let Some(kind) = baseline {
        let b = llara::sr::baselines::Baseline::fit(kind, &ds.splits.train, ds.n_items());
        let s = rows
            .iter()
            .zip(cands)
            .map(|(r, c)| b.score(&r.history, c))
            .collect();
        (kind.name().to_string(), s, None)
    } else {
        let (model, cfg) = load_model(&a.model, &device).with_context(|| {
            format!(
                "--model {}: not a recommender (nor popularity, markov or cooccurrence)",
                a.model.display()
            )
        })?;
        if cfg.item_num != ds.n_items() {
            bail!(
                "--model {} scores {} items but the dataset {} has {}; use a model trained on this dataset",
                a.model.display(),
                cfg.item_num,
                a.data.display(),
                ds.n_items()
            );
        }
        let all = llara::sr::train::score_rows(&model, &cfg, rows, &device)?;
        let s = all
            .iter()
            .zip(cands)
            .map(|(s, c)| c.iter().map(|&i| s[i as usize]).collect())
            .collect();
        (cfg.model.name().to_string(), s, Some(all))
    };
    let mut acc = llara::eval::metrics::RankAccumulator::default();
    let mut lines = vec![];
    for (i, ((r, c), s)) in rows.iter().zip(cands).zip(&scores).enumerate() {
        let ti = c.iter().position(|&x| x == r.next).unwrap_or(0);
        let rank = llara::eval::metrics::rank_among(s, ti);
        acc.push(rank);
        if let Some(all) = &all {
            acc.push_full(
                llara::eval::metrics::full_rank_of(&all[i], &r.history, r.next),
                c.len(),
            );
        }
        lines.push(serde_json::json!({
            "row": i, "target": r.next, "candidates": c, "scores": s, "rank": rank,
        }));
    }
    let m = acc.finish();
    if let Some(out) = &a.out {
        let staged = llara::fsutil::StagedDir::new(out, true)
            .with_context(|| format!("--out {}", out.display()))?;
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l)?);
            text.push('\n');
        }
        std::fs::write(staged.path().join("scores.jsonl"), text)?;
        let report = SrEvalReport {
            split: name.to_string(),
            model: label.to_string(),
            source: a.model.display().to_string(),
            dataset: ds.meta.name.clone(),
            metrics: m,
        };
        write_json(&staged.path().join("metrics.json"), &report)?;
        staged
            .commit()
            .with_context(|| format!("--out {}", out.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
        println!(
            "{} ({}) on {} {}:",
            a.model.display(),
            label,
            ds.meta.name,
            name
        );
        print!("{}", RankMetrics::table(&[(name, &m)]));
    }
    Ok(())
}
