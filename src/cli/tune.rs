//! `llara tune` (curriculum prompt tuning) and `llara eval` (generation-based HR@1).

use crate::data::Dataset;
use crate::eval::metrics::{RankAccumulator, RankMetrics};
use crate::llara::evaluate::{
    score_candidates, score_with_head, EvalOptions, GenMetrics, ScoreMode, ScoreOptions,
};
use crate::llara::head::{Head, HeadConfig};
use crate::llara::projector::Projector;
use crate::llara::prompts::{AnswerFormat, Templates};
use crate::llara::tune::{
    self, EvalLog, Hooks, Objective, Ranker, RunDir, RunState, Setup, StepLog, TuneOptions,
};
use crate::llara::{Behaviour, CandEmb, Curriculum, PromptKit, Recommender};
use crate::llm::{self, LlmOptions, LoraConfig, Target};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone, Serialize)]
pub struct TuneArgs {
    /// Dataset folder (from `llara data`).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The frozen recommender: a `train-sr` run folder or LLaRA's released `.safetensors`.
    #[arg(long, value_name = "SR_RUN")]
    pub sr: Option<PathBuf>,
    /// The backbone: a Hugging Face folder, a .gguf file, a hub id, or builtin:tiny (a tiny random
    /// model for demos and tests).
    #[arg(long, value_name = "SPEC")]
    pub llm: Option<String>,
    /// Hub revision when --llm is a hub id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Output run folder.
    #[arg(long, value_name = "RUN")]
    pub out: Option<PathBuf>,
    /// linear (the paper), text-only, hybrid-only, id-only, two-stage:K or mixed:P.
    #[arg(long, default_value = "linear")]
    pub curriculum: String,
    /// generative: the paper's loss on the target's answer tokens; listwise: a softmax over the
    /// candidates' scores (see --ranker), cross-entropy on the target; both: the two summed (the
    /// ranking is learnt, generation keeps working).
    #[arg(long, default_value = "generative", value_parser = ["generative", "listwise", "both"])]
    pub objective: String,
    /// What the listwise objective ranks with: head (a scoring head over the candidates' hidden
    /// states) or answer (each candidate's answer log-likelihood after the shared prompt, one
    /// packed pass per row).
    #[arg(long, default_value = "head", value_parser = ["head", "answer"])]
    pub ranker: String,
    /// What the model answers: title (LLaRA) or letter (candidates listed as "(A) title", …, the
    /// answer is the target's letter: a one-token verbalizer; at most 26 candidates).
    #[arg(long, default_value = "title", value_parser = ["title", "letter"])]
    pub answer: String,
    /// Rank of the scoring head's bilinear form (listwise objectives).
    #[arg(long, default_value_t = 64)]
    pub head_rank: usize,
    /// Add the recommender's own candidate scores (times a learned weight starting at 1) to the
    /// head's on hybrid prompts: the run starts ranking like its recommender and learns from there.
    #[arg(long)]
    pub head_prior: bool,
    /// Hybrid prompts follow the history with a [UserEmb] token carrying the recommender's
    /// projected state of the whole history.
    #[arg(long)]
    pub user_token: bool,
    /// Which recommender vectors fill the candidates' [CansEmb]: input (LLaRA's item embeddings)
    /// or output (the s_fc rows the recommender scores its state against).
    #[arg(long, default_value = "input", value_parser = ["input", "output"])]
    pub cand_emb: String,
    /// Train only the projector (and the head) for the first N optimizer steps.
    #[arg(long, default_value_t = 0)]
    pub projector_warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Forward passes per optimizer step (effective batch = batch-size × grad-accum).
    #[arg(long, default_value_t = 32)]
    pub grad_accum: usize,
    /// Peak learning rate (after a warm-up over the first 5% of steps from lr/100).
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Peak learning rate of the scoring head (default: --lr); it follows --lr's schedule, scaled.
    #[arg(long)]
    pub head_lr: Option<f64>,
    /// Floor of the cosine decay.
    #[arg(long, default_value_t = 1e-6)]
    pub min_lr: f64,
    /// AdamW weight decay of the projector (LoRA has none).
    #[arg(long, default_value_t = 1e-5)]
    pub projector_weight_decay: f64,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// LoRA targets: q,k,v,o,gate,up,down or all.
    #[arg(long, default_value = "all")]
    pub lora_targets: String,
    /// Train on a seeded subset of this many rows.
    #[arg(long)]
    pub max_train_samples: Option<usize>,
    /// Cap the schedule at this many optimizer steps (curriculum and learning rate complete within it).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Stop this invocation after N optimizer steps; continue later with --resume.
    #[arg(long)]
    #[serde(skip)]
    pub stop_after: Option<usize>,
    /// Also validate every N optimizer steps (always after each epoch).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Validate on a fixed seeded subset of the valid split.
    #[arg(long)]
    pub valid_samples: Option<usize>,
    /// Prompt template used for validation (training draws one per example).
    #[arg(long, default_value_t = 0)]
    pub template: usize,
    /// Prompt templates file (default: the embedded ones for the dataset's domain).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub eval_batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Recompute each decoder layer in the backward pass (less memory, more time).
    #[arg(long)]
    pub checkpoint_layers: bool,
    /// Also write the resumable checkpoint every N optimizer steps (it is always written at
    /// validation points, on Ctrl-C and at the end).
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Also write the checkpoint when M minutes of training have passed since the last one
    /// [default: 15; 0: off].
    #[arg(long, value_name = "M")]
    pub checkpoint_minutes: Option<f64>,
    /// Skip up to N optimizer steps whose loss or gradient is NaN or infinite (no update) before
    /// stopping the run as diverged.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_bad_steps: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Frozen weights' dtype: f32, bf16 or f16 (default f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// CPU threads for tensor ops.
    #[arg(long, default_value_t = 2)]
    #[serde(skip)]
    pub threads: usize,
    /// Replace an existing output folder.
    #[arg(long)]
    #[serde(skip)]
    pub force: bool,
    /// Also write every micro-batch the model trains on (token ids, answer start, the recommender
    /// items behind the embedding slots; one JSON line each) to FILE, to replay the exact workload
    /// elsewhere (scripts/reference/tune_step_torch.py).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub dump_batches: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (its tune.toml gives every option).
    #[arg(long, value_name = "RUN", conflicts_with_all = ["data", "sr", "llm", "out"])]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
}

/// `run.json`: what a run was built from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub llm: String,
    pub llm_source: serde_json::Value,
    pub sr: PathBuf,
    pub sr_sha256: String,
    pub sr_arch: String,
    pub sr_hidden: usize,
    pub data: PathBuf,
    pub data_content_hash: String,
    pub n_items: usize,
    pub prompts: String,
    pub curriculum: String,
    pub eval_view: String,
    #[serde(default)]
    pub objective: Objective,
    #[serde(default)]
    pub head: Option<HeadConfig>,
    #[serde(default)]
    pub user_token: bool,
    #[serde(default)]
    pub cand_emb: CandEmb,
    #[serde(default)]
    pub ranker: Ranker,
    #[serde(default)]
    pub answer: AnswerFormat,
}

pub(super) fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn options(a: &TuneArgs) -> Result<TuneOptions> {
    let objective = Objective::parse(&a.objective).map_err(anyhow::Error::msg)?;
    if a.head_rank == 0 {
        bail!("--head-rank 0: expected at least 1");
    }
    let ranker = Ranker::parse(&a.ranker).map_err(anyhow::Error::msg)?;
    if ranker == Ranker::Answer && !objective.listwise() {
        bail!("--ranker answer: the ranker is what the listwise objective trains (--objective listwise or both)");
    }
    let head_ranks = objective.listwise() && ranker == Ranker::Head;
    if a.head_lr.is_some() && !head_ranks {
        bail!("--head-lr: only a run with a scoring head has one (--objective listwise or both with --ranker head)");
    }
    if a.head_prior && !head_ranks {
        bail!("--head-prior: the prior is part of the scoring head (--objective listwise or both with --ranker head)");
    }
    Ok(TuneOptions {
        curriculum: Curriculum::parse(&a.curriculum).map_err(anyhow::Error::msg)?,
        objective,
        ranker,
        answer: AnswerFormat::parse(&a.answer).map_err(anyhow::Error::msg)?,
        head: head_ranks.then_some(HeadConfig {
            rank: a.head_rank,
            prior: a.head_prior,
        }),
        user_token: a.user_token,
        cand_emb: CandEmb::parse(&a.cand_emb).map_err(anyhow::Error::msg)?,
        projector_warmup: a.projector_warmup,
        epochs: a.epochs,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        head_lr: a.head_lr,
        min_lr: a.min_lr,
        projector_weight_decay: a.projector_weight_decay,
        max_grad_norm: a.max_grad_norm,
        lora: LoraConfig {
            r: a.lora_r,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            targets: Target::parse_list(&a.lora_targets)
                .map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))?,
            rslora: false,
        },
        max_train_samples: a.max_train_samples,
        max_steps: a.max_steps,
        stop_after: a.stop_after,
        eval_every: a.eval_every,
        valid_samples: a.valid_samples,
        template: a.template,
        eval_batch_size: a.eval_batch_size,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
        checkpoint_layers: a.checkpoint_layers,
        checkpoint_every: a.checkpoint_every,
        checkpoint_minutes: a
            .checkpoint_minutes
            .unwrap_or(tune::DEFAULT_CHECKPOINT_MINUTES),
        max_bad_steps: a.max_bad_steps,
    })
}

/// The pieces every LLaRA command loads: dataset, recommender table, backbone, templates.
pub(super) struct Loaded {
    pub(super) ds: Dataset,
    pub(super) rec: Recommender,
    pub(super) sr_weights: PathBuf,
    pub(super) llm: llm::Loaded,
    pub(super) templates: Templates,
}

pub(super) fn load_parts(
    data: &Path,
    sr: &Path,
    spec: &str,
    revision: Option<String>,
    device: &str,
    dtype: Option<&str>,
    prompts: Option<&Path>,
) -> Result<Loaded> {
    let device = crate::device::parse(device).map_err(anyhow::Error::msg)?;
    let ds = Dataset::open(data).with_context(|| format!("--data {}", data.display()))?;
    let (sr_weights, _) =
        crate::sr::resolve_model_path(sr).with_context(|| format!("--sr {}", sr.display()))?;
    let (model, sr_cfg) =
        crate::sr::load_model(sr, &device).with_context(|| format!("--sr {}", sr.display()))?;
    if sr_cfg.item_num != ds.n_items() {
        bail!(
            "--sr {}: the recommender scores {} items but the dataset {} has {} (train it on this dataset)",
            sr.display(),
            sr_cfg.item_num,
            data.display(),
            ds.n_items()
        );
    }
    let rec = Recommender::new(model, sr_cfg)?;
    let opts = LlmOptions {
        device,
        dtype: dtype.map(super::llm::parse_dtype).transpose()?,
        revision,
    };
    let llm = llm::load(spec, &opts).with_context(|| format!("--llm {spec}"))?;
    let templates = match prompts {
        Some(p) => Templates::from_file(p).map_err(|e| anyhow::anyhow!("--prompts: {e}"))?,
        None => Templates::for_domain(&ds.meta.domain),
    };
    Ok(Loaded {
        ds,
        rec,
        sr_weights,
        llm,
        templates,
    })
}

struct Bars {
    train: ProgressBar,
    eval: Option<ProgressBar>,
    running: Option<f64>,
    quiet: bool,
    dump: Option<BatchDump>,
    /// The last checkpoint's step (for what a second Ctrl-C keeps).
    checkpoint: Option<usize>,
    /// The stop request has been shown.
    stopping: bool,
}

impl Bars {
    /// Shows once that a signal arrived and what happens next.
    fn note_stop(&mut self) {
        let Some(sig) = crate::interrupt::requested() else {
            return;
        };
        if self.stopping {
            return;
        }
        self.stopping = true;
        let kept = match self.checkpoint {
            Some(s) => format!("the checkpoint of step {s} stays"),
            None => "no checkpoint yet".into(),
        };
        let msg = format!(
            "{}: finishing this step, then writing a checkpoint (again to exit at once; {kept})",
            sig.name()
        );
        if self.quiet {
            eprintln!("{msg}");
        } else {
            self.train.suspend(|| eprintln!("{msg}"));
        }
    }
}

/// `--dump-batches FILE`: written beside FILE and renamed when the run ends.
struct BatchDump {
    dest: PathBuf,
    tmp: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
    err: Option<std::io::Error>,
}

impl BatchDump {
    fn create(dest: &Path) -> Result<Self> {
        let mut name = dest.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let tmp = dest.with_file_name(name);
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("--dump-batches {}", dest.display()))?;
        Ok(BatchDump {
            dest: dest.to_path_buf(),
            tmp,
            w: std::io::BufWriter::new(f),
            err: None,
        })
    }

    fn finish(mut self) -> Result<()> {
        use std::io::Write;
        if let Some(e) = self.err.take() {
            return Err(e).with_context(|| format!("--dump-batches {}", self.dest.display()));
        }
        self.w
            .flush()
            .and_then(|_| std::fs::rename(&self.tmp, &self.dest))
            .with_context(|| format!("--dump-batches {}", self.dest.display()))
    }
}

impl Hooks for Bars {
    fn on_start(&mut self, total: usize, done: usize) {
        self.train.set_length(total as u64);
        self.train.set_position(done as u64);
        self.train.reset_eta();
    }

    fn on_step(&mut self, l: &StepLog) {
        let avg = match self.running {
            None => l.loss,
            Some(r) => 0.95 * r + 0.05 * l.loss,
        };
        self.running = Some(avg);
        self.train.set_position(l.step as u64 + 1);
        self.train.set_message(format!(
            "epoch {}  loss {avg:.4}  lr {:.2e}  p {:.2} ({})  {:.0} tok/s",
            l.epoch + 1,
            l.lr,
            l.p_hybrid,
            if l.hybrid { "hybrid" } else { "text" },
            l.tokens_per_second
        ));
    }

    fn on_eval_start(&mut self, rows: usize) {
        let b = ProgressBar::new(rows as u64).with_style(
            ProgressStyle::with_template("  validating [{bar:30}] {pos}/{len} rows  ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        if self.quiet {
            b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        self.eval = Some(b);
    }

    fn on_eval_progress(&mut self, n: usize) {
        if let Some(b) = &self.eval {
            b.inc(n as u64);
        }
        self.note_stop();
    }

    fn should_stop(&mut self) -> bool {
        self.note_stop();
        crate::interrupt::requested().is_some()
    }

    fn on_checkpoint(&mut self, step: usize) {
        self.checkpoint = Some(step);
    }

    fn on_warning(&mut self, msg: &str) {
        self.train.suspend(|| tracing::warn!("{msg}"));
    }

    fn on_batch(&mut self, step: usize, hybrid: bool, rows: &[&crate::llara::Tokenized]) {
        use std::io::Write;
        self.note_stop();
        let Some(d) = self.dump.as_mut().filter(|d| d.err.is_none()) else {
            return;
        };
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "ids": r.ids, "answer_start": r.answer_start, "slot_items": r.slot_items,
                })
            })
            .collect();
        let line = serde_json::json!({"step": step, "hybrid": hybrid, "rows": rows});
        if let Err(e) = writeln!(d.w, "{line}") {
            d.err = Some(e);
        }
    }

    fn on_eval(&mut self, e: &EvalLog) {
        if let Some(b) = self.eval.take() {
            b.finish_and_clear();
        }
        self.train.suspend(|| {
            tracing::info!(
                "step {:>5}  valid HR@1 {:.4}  valid ratio {:.4}  ({} rows){}",
                e.step,
                e.valid.hr1,
                e.valid.valid_ratio,
                e.valid.rows,
                if e.best { "  *" } else { "" }
            )
        });
    }
}

pub fn run_tune(a: TuneArgs, quiet: bool) -> Result<()> {
    if let Some(run) = &a.resume {
        let cfg = run.join("tune.toml");
        if !cfg.is_file() {
            bail!(
                "--resume {}: no tune.toml here (not a tune run folder)",
                run.display()
            );
        }
        let mut argv: Vec<OsString> =
            vec!["llara".into(), "tune".into(), "--config".into(), cfg.into()];
        argv.extend(["--threads".into(), a.threads.to_string().into()]);
        if let Some(s) = a.stop_after {
            argv.extend(["--stop-after".into(), s.to_string().into()]);
        }
        if let Some(f) = &a.dump_batches {
            argv.extend(["--dump-batches".into(), f.clone().into()]);
        }
        // How often to checkpoint does not change the result: a resumed run may choose anew.
        if let Some(n) = a.checkpoint_every {
            argv.extend(["--checkpoint-every".into(), n.to_string().into()]);
        }
        if let Some(m) = a.checkpoint_minutes {
            argv.extend(["--checkpoint-minutes".into(), m.to_string().into()]);
        }
        let cli = super::parse(argv)?;
        let super::Command::Tune(args) = cli.command else {
            unreachable!("parsed a tune command")
        };
        return tune_in(*args, true, quiet);
    }
    tune_in(a, false, quiet)
}

fn tune_in(a: TuneArgs, resume: bool, quiet: bool) -> Result<()> {
    super::sr::set_threads(a.threads)?;
    let opts = options(&a)?;
    let (data, sr, spec, out) = match (&a.data, &a.sr, &a.llm, &a.out) {
        (Some(d), Some(s), Some(l), Some(o)) => (d.clone(), s.clone(), l.clone(), o.clone()),
        _ => bail!("--data, --sr, --llm and --out are required (or --resume RUN)"),
    };
    let run = RunDir { dir: out.clone() };
    if !resume && out.exists() {
        if !a.force {
            bail!(
                "--out {}: already exists (pass --force to replace it, or --resume {} to continue it)",
                out.display(),
                out.display()
            );
        }
        std::fs::remove_dir_all(&out).with_context(|| format!("--out {}", out.display()))?;
    }
    let mut parts = load_parts(
        &data,
        &sr,
        &spec,
        a.revision.clone(),
        &a.device,
        a.dtype.as_deref(),
        a.prompts.as_deref(),
    )?;
    let sr_hash = sha256_file(&parts.sr_weights)?;
    let info = RunInfo {
        llm: spec.clone(),
        llm_source: serde_json::to_value(&parts.llm.source)?,
        sr: std::fs::canonicalize(&sr).unwrap_or(sr.clone()),
        sr_sha256: sr_hash.clone(),
        sr_arch: parts.rec.cfg.model.name().to_string(),
        sr_hidden: parts.rec.cfg.hidden_size,
        data: std::fs::canonicalize(&data).unwrap_or(data.clone()),
        data_content_hash: parts.ds.meta.content_hash.clone(),
        n_items: parts.ds.n_items(),
        prompts: parts.templates.source.clone(),
        curriculum: opts.curriculum.name(),
        eval_view: opts.curriculum.eval_view().name().into(),
        objective: opts.objective,
        head: opts.head,
        user_token: opts.user_token,
        cand_emb: opts.cand_emb,
        ranker: opts.ranker,
        answer: opts.answer,
    };
    let d_sr = parts.rec.cfg.hidden_size;
    let d_llm = parts.llm.model.cfg.hidden_size;
    let (projector, head, state) = if resume {
        let old: RunInfo = serde_json::from_str(
            &std::fs::read_to_string(out.join("run.json"))
                .with_context(|| format!("--resume {}", out.display()))?,
        )?;
        if old.sr_sha256 != sr_hash || old.data_content_hash != info.data_content_hash {
            bail!(
                "--resume {}: the recommender or the dataset changed since the run started",
                out.display()
            );
        }
        let state =
            tune::read_state(&run).with_context(|| format!("--resume {}", out.display()))?;
        if state.finished {
            println!(
                "{} is finished ({} steps); nothing to do",
                out.display(),
                state.step
            );
            return Ok(());
        }
        let p = tune::load_weights(&mut parts.llm.model, &run.checkpoint(), d_sr, opts.head)?;
        tracing::info!(
            "resuming {} at step {} of {}",
            out.display(),
            state.step,
            state.total_steps
        );
        (p.0, p.1, state)
    } else {
        std::fs::create_dir_all(&out).with_context(|| format!("--out {}", out.display()))?;
        let toml = toml::to_string(&a).context("serializing the run's options")?;
        crate::fsutil::write_file_atomic(&out.join("tune.toml"), |p| {
            std::fs::write(p, format!("# The exact options of this run: `llara tune --config tune.toml` reruns it, `llara tune --resume RUN` continues it.\n{toml}"))
        })?;
        crate::fsutil::write_file_atomic(&out.join("run.json"), |p| {
            std::fs::write(p, serde_json::to_string_pretty(&info)? + "\n")
        })?;
        llm::lora::add_adapters(&mut parts.llm.model, &opts.lora, opts.seed)?;
        let mut p = Projector::new(
            d_sr,
            d_llm,
            opts.seed,
            candle_core::DType::F32,
            parts.llm.model.device(),
        )?;
        // State-space slots ([UserEmb], s_fc rows) of a recommender whose state is not the size
        // of its item embeddings (Caser) get their own first layer.
        let d_state = parts.rec.state_dim();
        if d_state != d_sr && (opts.user_token || opts.cand_emb == CandEmb::Output) {
            p.add_state_input(d_state, opts.seed)?;
        }
        let head = opts
            .head
            .map(|cfg| Head::new(d_llm, cfg, opts.seed, parts.llm.model.device()))
            .transpose()?;
        (p, head, RunState::default())
    };
    tracing::info!(
        "tuning {} on {} ({} train rows, {} items) with {} ({}), curriculum {}, seed {}",
        spec,
        parts.ds.meta.name,
        tune::training_rows(&parts.ds, &opts).len(),
        parts.ds.n_items(),
        info.sr_arch,
        sr.display(),
        opts.curriculum.name(),
        opts.seed
    );
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut hooks = Bars {
        train: bar,
        eval: None,
        running: None,
        quiet,
        dump: a
            .dump_batches
            .as_deref()
            .map(BatchDump::create)
            .transpose()?,
        checkpoint: (state.step > 0).then_some(state.step),
        stopping: false,
    };
    let llm_name = parts.llm.name();
    let setup = Setup {
        model: &mut parts.llm.model,
        tok: &parts.llm.tokenizer,
        templates: &parts.templates,
        ds: &parts.ds,
        rec: &parts.rec,
    };
    let started = std::time::Instant::now();
    // From here on Ctrl-C / SIGTERM stop the run at the next step boundary, with a checkpoint.
    crate::interrupt::install().context("installing the Ctrl-C handler")?;
    let state = tune::tune(
        setup, projector, head, &opts, &run, state, &llm_name, &mut hooks,
    )?;
    hooks.train.finish_and_clear();
    if let Some(d) = hooks.dump.take() {
        d.finish()?;
    }
    let frac = if state.step > 0 {
        state.hybrid_steps as f64 / state.step as f64
    } else {
        0.0
    };
    match (&state.best, state.finished) {
        (Some(b), true) => println!(
            "{} steps ({:.0}s, {:.0}% hybrid); best valid HR@1 {:.4} (valid ratio {:.4}) at step {}; wrote {}",
            state.step,
            started.elapsed().as_secs_f64(),
            100.0 * frac,
            b.valid.hr1,
            b.valid.valid_ratio,
            b.step,
            out.display()
        ),
        (None, true) => println!(
            "{} steps; no validation rows: kept the last weights; wrote {}",
            state.step,
            out.display()
        ),
        (_, false) => {
            let msg = format!(
                "stopped at step {} of {} ({:.0}% hybrid); checkpoint written; continue with `llara tune --resume {}`",
                state.step,
                state.total_steps,
                100.0 * frac,
                out.display()
            );
            if let Some(signal) = crate::interrupt::requested() {
                return Err(crate::interrupt::Interrupted {
                    signal,
                    message: msg,
                }
                .into());
            }
            println!("{msg}");
        }
    }
    Ok(())
}

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
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub dtype: Option<String>,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

pub fn run_eval(a: EvalArgs, quiet: bool) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size 0: expected at least 1 row per batch");
    }
    super::sr::set_threads(a.threads)?;
    let or = open_run(
        &a.run,
        a.data.as_deref(),
        a.llm.as_deref(),
        &a.device,
        a.dtype.as_deref(),
    )?;
    let (parts, view) = (&or.parts, or.view);
    let mut rows = tune::split_rows(&parts.ds, &a.split, a.template, None, 0);
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
    };
    let bar = ProgressBar::new(rows.len() as u64).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} rows  ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(a.split.clone());
    if quiet || a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let behaviour = or.behaviour();
    let behaviour = behaviour.as_ref();
    let started = std::time::Instant::now();
    if a.mode == "score" {
        let mode = ScoreMode::parse(&a.score).map_err(anyhow::Error::msg)?;
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
        let mut acc = RankAccumulator::default();
        for r in &scored {
            acc.push(r.rank);
        }
        let m = acc.finish();
        let out = a
            .out
            .clone()
            .unwrap_or(a.run.join(format!("eval-{}-score", a.split)));
        let mut report = serde_json::to_value(m)?;
        let o = report.as_object_mut().expect("object");
        for (k, v) in [
            ("split", serde_json::json!(a.split)),
            ("mode", serde_json::json!("score")),
            ("score", serde_json::json!(a.score)),
            (
                "scorer",
                serde_json::json!(if use_head { "head" } else { "answer" }),
            ),
            ("template", serde_json::json!(a.template)),
            ("view", serde_json::json!(view.name())),
            ("valid_ratio", serde_json::json!(1.0)),
            (
                "seconds",
                serde_json::json!(started.elapsed().as_secs_f64()),
            ),
        ] {
            o.insert(k.into(), v);
        }
        write_eval(&out, "scores.jsonl", &scored, &report)?;
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
    let (preds, m) = tune::evaluate_split(&parts.llm.model, &kit, behaviour, &rows, &eopts, |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    let out = a.out.clone().unwrap_or(a.run.join(if a.constrained {
        format!("eval-{}-constrained", a.split)
    } else {
        format!("eval-{}", a.split)
    }));
    let report = serde_json::json!({
        "split": a.split, "mode": "generate", "constrained": a.constrained, "template": a.template, "view": view.name(),
        "valid_ratio": m.valid_ratio, "hr@1": m.hr1, "hr@1_of_valid": m.hr1_of_valid, "rows": m.rows,
        "seconds": started.elapsed().as_secs_f64(),
    });
    write_eval(&out, "predictions.jsonl", &preds, &report)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_metrics(&a.split, &m);
        println!("predictions: {}", out.join("predictions.jsonl").display());
    }
    Ok(())
}

/// Writes `lines` (one JSON object each) and `metrics.json` into `out`, atomically.
fn write_eval<T: Serialize>(
    out: &Path,
    name: &str,
    lines: &[T],
    report: &serde_json::Value,
) -> Result<()> {
    let staged = crate::fsutil::StagedDir::new(out, true)
        .with_context(|| format!("--out {}", out.display()))?;
    let mut text = String::new();
    for p in lines {
        text.push_str(&serde_json::to_string(p)?);
        text.push('\n');
    }
    std::fs::write(staged.path().join(name), text)?;
    std::fs::write(
        staged.path().join("metrics.json"),
        serde_json::to_string_pretty(report)? + "\n",
    )?;
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
    pub(super) view: crate::llara::prompts::ItemView,
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

pub(super) fn open_run(
    run: &Path,
    data: Option<&Path>,
    llm_spec: Option<&str>,
    device: &str,
    dtype: Option<&str>,
) -> Result<OpenRun> {
    let info_path = run.join("run.json");
    let info: RunInfo = serde_json::from_str(
        &std::fs::read_to_string(&info_path)
            .with_context(|| format!("--run {}: not a tune run (run.json)", run.display()))?,
    )
    .with_context(|| info_path.display().to_string())?;
    let toml_path = run.join("tune.toml");
    let prompts: Option<PathBuf> = std::fs::read_to_string(&toml_path)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .and_then(|t| t.get("prompts").and_then(|v| v.as_str()).map(PathBuf::from));
    let data = data.map(Path::to_path_buf).unwrap_or(info.data.clone());
    let spec = llm_spec.map(String::from).unwrap_or(info.llm.clone());
    let mut parts = load_parts(
        &data,
        &info.sr,
        &spec,
        None,
        device,
        dtype,
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
    crate::llm::lora::merge(&mut parts.llm.model)?;
    let view = Curriculum::parse(&info.curriculum)
        .map_err(anyhow::Error::msg)?
        .eval_view();
    Ok(OpenRun {
        parts,
        projector,
        head,
        view,
        info,
    })
}
