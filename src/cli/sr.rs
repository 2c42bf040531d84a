//! `llara train-sr` and `llara eval-sr`.

use crate::data::Dataset;
use crate::eval::metrics::{RankMetrics, Selection};
use crate::fsutil::StagedDir;
use crate::sr::train::{train, EpochLog, Loss, TrainOptions};
use crate::sr::{load_model, Arch};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Serialize)]
pub struct TrainSrArgs {
    /// Dataset folder (from `llara data`).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Architecture.
    #[arg(long, value_enum, default_value = "sasrec")]
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
    #[arg(long, value_enum, default_value = "bce")]
    pub loss: Loss,
    /// Negatives per step for --loss sampled and gbce (shared by the batch).
    #[arg(long, default_value_t = 256)]
    pub negatives: usize,
    /// gBCE calibration t in [0, 1] (1: calibrated, 0: plain BCE over the negatives).
    #[arg(long, default_value_t = 0.75)]
    pub gbce_t: f64,
    /// What picks the best epoch on valid: expected-hr1 (HR@1 averaged over every possible
    /// candidate set, exact from full-catalogue ranks) or hr1 (the fixed sets' HR@1, LLaRA's rule).
    #[arg(long, value_enum, default_value = "expected-hr1")]
    pub select: Selection,
    /// Validate, select and save an exponential moving average of the weights with this decay
    /// per step; 0 turns it off (LLaRA's recipe saves the raw weights).
    #[arg(long, default_value_t = 0.999)]
    pub ema: f64,
    /// Seed of initialisation, shuffling, negatives and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for tensor ops (these models are small: one thread is fastest on 2 cores).
    #[arg(long, default_value_t = 1)]
    #[serde(skip)]
    pub threads: usize,
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
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for tensor ops.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

#[derive(Serialize)]
struct RunConfig<'a> {
    #[serde(flatten)]
    model: &'a crate::sr::Config,
    training: &'a TrainOptions,
    dataset: DatasetRef,
}

#[derive(Serialize)]
struct DatasetRef {
    dir: String,
    name: String,
    content_hash: String,
    seed: u64,
}

#[derive(Serialize)]
struct MetricsFile<'a> {
    #[serde(flatten)]
    test: &'a RankMetrics,
    split: &'static str,
    valid: &'a RankMetrics,
    best_epoch: usize,
    epochs_run: usize,
    train_seconds: f64,
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} batches  {msg}  ETA {eta}")
        .expect("valid template")
        .progress_chars("=> ")
}

/// Sets the size of candle's CPU thread pools; must run before the first tensor op.
pub fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        bail!("--threads must be at least 1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle 0.11 runs its element-wise ops on a second pool of spinning threads beside rayon's;
    // on a machine with as many cores as rayon threads they compete with the fused kernels and
    // the GEMMs (a LLaRA training step on 2 cores ran 10% slower with it), so those ops run on
    // the calling thread unless CANDLE_NUM_THREADS says otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    Ok(())
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
    set_threads(a.threads)?;
    let device = crate::device::parse(&a.device).map_err(anyhow::Error::msg)?;
    let ds = Dataset::open(&a.data).with_context(|| format!("--data {}", a.data.display()))?;
    // Fail before training if the output cannot be written.
    let staged =
        StagedDir::new(&a.out, a.force).with_context(|| format!("--out {}", a.out.display()))?;
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
    crate::interrupt::install().context("installing the Ctrl-C handler")?;
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
            match crate::interrupt::requested() {
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
        Err(crate::sr::SrError::Stopped { epoch, step }) => {
            let signal = crate::interrupt::requested().expect("only a signal stops training");
            return Err(crate::interrupt::Interrupted {
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
    let run_config = RunConfig {
        model: &trained.config,
        training: &opts,
        dataset: DatasetRef {
            dir: a.data.display().to_string(),
            name: ds.meta.name.clone(),
            content_hash: ds.meta.content_hash.clone(),
            seed: ds.meta.seed,
        },
    };
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&run_config)? + "\n",
    )?;
    let metrics = MetricsFile {
        test: &trained.test,
        split: "test",
        valid: &trained.valid,
        best_epoch: trained.best_epoch,
        epochs_run: trained.log.len(),
        train_seconds,
    };
    std::fs::write(
        dir.join("metrics.json"),
        serde_json::to_string_pretty(&metrics)? + "\n",
    )?;
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
    set_threads(a.threads)?;
    let device = crate::device::parse(&a.device).map_err(anyhow::Error::msg)?;
    let ds = Dataset::open(&a.data).with_context(|| format!("--data {}", a.data.display()))?;
    let (name, rows, cands) = match a.split {
        SplitName::Valid => ("valid", &ds.splits.valid, &ds.candidates_valid),
        SplitName::Test => ("test", &ds.splits.test, &ds.candidates_test),
    };
    let baseline = (!a.model.exists())
        .then(|| a.model.to_str().and_then(crate::sr::baselines::Kind::parse))
        .flatten();
    // Each row's candidate scores (in candidate order), and for a trained model every item's
    // score (the full-catalogue metrics).
    type Scored = (String, Vec<Vec<f32>>, Option<Vec<Vec<f32>>>);
    let (label, scores, all): Scored = if let Some(kind) = baseline {
        let b = crate::sr::baselines::Baseline::fit(kind, &ds.splits.train, ds.n_items());
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
        let all = crate::sr::train::score_rows(&model, &cfg, rows, &device)?;
        let s = all
            .iter()
            .zip(cands)
            .map(|(s, c)| c.iter().map(|&i| s[i as usize]).collect())
            .collect();
        (cfg.model.name().to_string(), s, Some(all))
    };
    let mut acc = crate::eval::metrics::RankAccumulator::default();
    let mut lines = vec![];
    for (i, ((r, c), s)) in rows.iter().zip(cands).zip(&scores).enumerate() {
        let ti = c.iter().position(|&x| x == r.next).unwrap_or(0);
        let rank = crate::eval::metrics::rank_among(s, ti);
        acc.push(rank);
        if let Some(all) = &all {
            acc.push_full(
                crate::eval::metrics::full_rank_of(&all[i], &r.history, r.next),
                c.len(),
            );
        }
        lines.push(serde_json::json!({
            "row": i, "target": r.next, "candidates": c, "scores": s, "rank": rank,
        }));
    }
    let m = acc.finish();
    if let Some(out) = &a.out {
        let staged = crate::fsutil::StagedDir::new(out, true)
            .with_context(|| format!("--out {}", out.display()))?;
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l)?);
            text.push('\n');
        }
        std::fs::write(staged.path().join("scores.jsonl"), text)?;
        let mut report = serde_json::to_value(m)?;
        let o = report.as_object_mut().expect("object");
        o.insert("split".into(), serde_json::json!(name));
        o.insert("model".into(), serde_json::json!(label));
        o.insert(
            "source".into(),
            serde_json::json!(a.model.display().to_string()),
        );
        o.insert("rows".into(), serde_json::json!(rows.len()));
        o.insert("dataset".into(), serde_json::json!(ds.meta.name));
        std::fs::write(
            staged.path().join("metrics.json"),
            serde_json::to_string_pretty(&report)? + "\n",
        )?;
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
