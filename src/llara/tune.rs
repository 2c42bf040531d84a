//! Curriculum prompt tuning: LoRA on the backbone (always) and the projector (on hard steps),
//! AdamW with warm-up + cosine, gradient accumulation, generation-based validation, and a run
//! folder with checksummed checkpoints ([`super::checkpoint`]) from which `--resume` continues
//! bit for bit.
//!
//! Every random draw derives from the seed and the optimizer step (curriculum, templates,
//! negatives, dropout) or the epoch (row order), so a resumed run needs only the step counter,
//! the trainable tensors and the optimizer moments; every sum that feeds a weight runs in a fixed
//! order (gradients are kept by name, in name order), so the same inputs give the same bytes in
//! every process, for a given thread count and CPU kernel.
//!
//! Data parallel ([`Setup::comm`] with several ranks): every rank draws the whole global batch
//! (batch size × ranks × grad-accum examples) and the curriculum's coin from the same streams,
//! and computes its shard of it ([`shard_of_step`]); each micro-batch's loss is weighted by its
//! share of the global batch's answer tokens (generative loss) and rows (listwise loss), so the
//! gradients summed over ranks ([`crate::comm::all_reduce_grads`]) are the global batch's, and
//! every rank takes the same optimizer step. LoRA dropout is keyed by example, so a row's mask does
//! not depend on where it is computed. Rank 0 alone writes the run folder.

use super::batch::{answer_targets, split_rows};
pub use super::checkpoint::RunDir;
use super::checkpoint::{self, CheckpointError};
use super::evaluate::{
    evaluate, gather_in_row_order, score_candidates, score_with_head, EvalOptions, GenMetrics,
    RowScores, ScoreMode, ScoreOptions, Shard,
};
use super::head::{self, Head, HeadConfig};
use super::optim::{self, AdamW};
use super::projector::Projector;
use super::prompts::{AnswerFormat, ItemView, Templates};
use super::{
    embed_batch, stream_seed, Behaviour, CandEmb, Curriculum, Example, PromptKit, Recommender,
};
use crate::comm::{self, Communicator};
use crate::data::{Dataset, Row};
use crate::fsutil::StagedDir;
use crate::kernels::dropout::Dropout;
use crate::llm::lora::{self, LoraConfig};
use crate::llm::{Llama, LlmError, LlmTokenizer, Step};
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the run folder: {0}")]
    Write(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error(transparent)]
    Prompt(#[from] super::prompts::PromptError),
    /// The checkpoint's optimizer state does not fit this run.
    #[error("{}: {source}", path.display())]
    State {
        path: PathBuf,
        source: super::optim::StateError,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A collective of a data-parallel run failed, or the ranks disagree.
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    /// No intact checkpoint to resume from.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A non-finite loss, gradient norm or weight: nothing of this step was written.
    #[error("{}", diverged_message(*.step, *.loss, *.grad_norm, *.lr, .what, *.last_checkpoint))]
    Diverged {
        step: usize,
        loss: f64,
        grad_norm: f64,
        lr: f64,
        what: &'static str,
        last_checkpoint: Option<usize>,
    },
    /// Writing `best/` or `checkpoint/` failed; the previous one is unchanged.
    #[error("writing {what} {}: {source}; the previous {what} is unchanged", path.display())]
    Save {
        what: &'static str,
        path: PathBuf,
        source: Box<TuneError>,
    },
}

fn diverged_message(
    step: usize,
    loss: f64,
    grad_norm: f64,
    lr: f64,
    what: &str,
    last_checkpoint: Option<usize>,
) -> String {
    let kept = match last_checkpoint {
        Some(s) => format!("checkpoint/ (step {s}) and best/ are as they were"),
        None => "no checkpoint had been written yet; best/ is as it was".into(),
    };
    format!(
        "training diverged at step {step}: {what} (loss {loss}, gradient norm {grad_norm}, learning rate {lr:.3e}). \
         The usual cause is a learning rate too high for this model: rerun with a lower --lr, or bound the \
         update with --max-grad-norm 1 (--max-bad-steps N skips up to N such micro-batches). Nothing of this \
         step was written: {kept}"
    )
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TuneError + '_ {
    move |source| TuneError::Io {
        path: path.to_path_buf(),
        source,
    }
}

type TResult<T> = Result<T, TuneError>;

/// What the training loss is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// The paper: cross-entropy of the target's title tokens.
    #[default]
    Generative,
    /// A softmax over the candidates' scores from the scoring head (see [`super::head`]).
    Listwise,
    /// Both losses, summed (the head ranks; generation keeps working).
    Both,
}

impl Objective {
    pub fn parse(s: &str) -> Result<Self, super::OptionError> {
        match s {
            "generative" => Ok(Objective::Generative),
            "listwise" => Ok(Objective::Listwise),
            "both" => Ok(Objective::Both),
            o => Err(super::OptionError::new(
                "objective",
                o,
                "expected generative, listwise or both",
            )),
        }
    }
    pub fn generative(self) -> bool {
        self != Objective::Listwise
    }
    pub fn listwise(self) -> bool {
        self != Objective::Generative
    }
}

/// What the listwise objective's softmax ranges over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ranker {
    /// The scoring head's candidate scores.
    #[default]
    Head,
    /// The candidates' answer log-likelihoods after the shared prompt (with letter answers: the
    /// labels' log-probabilities at one position).
    Answer,
}

impl Ranker {
    pub fn parse(s: &str) -> Result<Self, super::OptionError> {
        match s {
            "head" => Ok(Ranker::Head),
            "answer" => Ok(Ranker::Answer),
            o => Err(super::OptionError::new(
                "ranker",
                o,
                "expected head or answer",
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TuneOptions {
    pub curriculum: Curriculum,
    pub objective: Objective,
    /// What a listwise objective ranks with.
    pub ranker: Ranker,
    /// Titles, or lettered candidates answered by their letter.
    pub answer: AnswerFormat,
    /// The scoring head (listwise objectives).
    pub head: Option<HeadConfig>,
    /// Hybrid prompts carry a `[UserEmb]` token (the recommender's state of the history).
    pub user_token: bool,
    /// Which recommender rows fill `[CansEmb]`.
    pub cand_emb: CandEmb,
    /// Optimizer steps at the start that train only the projector and the head (LoRA frozen).
    pub projector_warmup: usize,
    pub epochs: usize,
    /// Examples per forward pass.
    pub batch_size: usize,
    /// Forward passes per optimizer step (effective batch = batch_size × grad_accum).
    pub grad_accum: usize,
    pub lr: f64,
    /// The scoring head's peak learning rate (`None`: `lr`); its schedule is `lr`'s, scaled.
    #[serde(default)]
    pub head_lr: Option<f64>,
    pub min_lr: f64,
    pub projector_weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub lora: LoraConfig,
    pub max_train_samples: Option<usize>,
    /// Caps the schedule's total steps (the curriculum and the learning rate complete within it).
    pub max_steps: Option<usize>,
    /// Stops this invocation after that many optimizer steps (the schedule is unchanged; continue
    /// with resume).
    pub stop_after: Option<usize>,
    /// Validate every N steps as well as after each epoch.
    pub eval_every: Option<usize>,
    /// Validate on a fixed seeded subset of the valid split.
    pub valid_samples: Option<usize>,
    pub template: usize,
    pub eval_batch_size: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub checkpoint_layers: bool,
    /// Also write `checkpoint/` every N optimizer steps.
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    /// Also write `checkpoint/` when this many minutes of training have passed since the last one
    /// (0: only at validation points, `checkpoint_every` and the end).
    #[serde(default = "default_checkpoint_minutes")]
    pub checkpoint_minutes: f64,
    /// Optimizer steps whose loss or gradient is non-finite that are skipped (no update) before
    /// the run stops with [`TuneError::Diverged`].
    #[serde(default)]
    pub max_bad_steps: usize,
}

/// The default of [`TuneOptions::checkpoint_minutes`].
pub const DEFAULT_CHECKPOINT_MINUTES: f64 = 15.0;

fn default_checkpoint_minutes() -> f64 {
    DEFAULT_CHECKPOINT_MINUTES
}

/// Consecutive steps with a zero gradient norm after which a run warns that it has stalled.
pub const STALL_STEPS: usize = 20;

/// What one optimizer step did (a line of `train_log.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub p_hybrid: f64,
    pub hybrid: bool,
    /// Fraction of hard steps so far (tracks the mean of p).
    pub hybrid_fraction: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_second: f64,
    /// The step's loss or gradient was non-finite: no update was made (`--max-bad-steps`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalLog {
    pub step: usize,
    pub epoch: usize,
    pub valid: GenMetrics,
    pub best: bool,
}

/// The resumable part of a run (`checkpoint/state.json`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RunState {
    pub step: usize,
    pub total_steps: usize,
    pub hybrid_steps: usize,
    pub best: Option<EvalLog>,
    pub evals: Vec<EvalLog>,
    pub finished: bool,
    /// The checkpoint was written at a validation point before validating: a resumed run
    /// validates first.
    #[serde(default)]
    pub pending_eval: bool,
    /// Steps skipped for a non-finite loss or gradient.
    #[serde(default)]
    pub bad_steps: usize,
    /// What the run warned about (a stalled gradient, skipped steps).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The thread count and CPU kernels the run computed with (a resume that differs cannot
    /// continue bit for bit, and says so).
    #[serde(default)]
    pub signature: Option<crate::kernels::Signature>,
}

/// Called as training goes (progress bars, logs).
pub trait Hooks {
    fn on_start(&mut self, _total_steps: usize, _done: usize) {}
    fn on_step(&mut self, _log: &StepLog) {}
    fn on_eval_start(&mut self, _rows: usize) {}
    fn on_eval_progress(&mut self, _done: usize) {}
    fn on_eval(&mut self, _log: &EvalLog) {}
    /// One micro-batch as the model is about to see it (for replaying the exact workload elsewhere).
    fn on_batch(&mut self, _step: usize, _hybrid: bool, _rows: &[&super::Tokenized]) {}
    /// Asked between optimizer steps: `true` stops the run after writing a checkpoint (a
    /// signal, a deadline). The run is then resumable where it stopped.
    fn should_stop(&mut self) -> bool {
        false
    }
    /// A checkpoint of step `step` was written.
    fn on_checkpoint(&mut self, _step: usize) {}
    /// Something the user should know about (a stalled gradient, a skipped step).
    fn on_warning(&mut self, msg: &str) {
        tracing::warn!("{msg}");
    }
}

impl Hooks for () {}

/// The inputs of a tuning run.
pub struct Setup<'a> {
    pub model: &'a mut Llama,
    pub tok: &'a LlmTokenizer,
    pub templates: &'a Templates,
    pub ds: &'a Dataset,
    /// The frozen recommender (behaviour tokens, the head's prior).
    pub rec: &'a Recommender,
    /// The backbone's name as the adapters record it.
    pub llm_name: &'a str,
    /// The processes this run spans (one: [`crate::comm::single::Single`]).
    pub comm: &'a dyn Communicator,
}

/// The training rows after `max_train_samples` (a seeded subset, in the file's order).
pub fn training_rows<'a>(ds: &'a Dataset, opts: &TuneOptions) -> Vec<&'a Row> {
    let rows: Vec<&Row> = ds.splits.train.iter().collect();
    match opts.max_train_samples {
        Some(n) if n < rows.len() => {
            let mut idx: Vec<usize> = (0..rows.len()).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(stream_seed(
                opts.seed,
                "train-subset",
                0,
            )));
            let mut keep: Vec<usize> = idx[..n].to_vec();
            keep.sort_unstable();
            keep.into_iter().map(|i| rows[i]).collect()
        }
        _ => rows,
    }
}

/// Steps per epoch and the schedule's total, for a run on `ranks` processes (the global batch is
/// batch size × grad-accum × ranks).
pub fn schedule(n_rows: usize, opts: &TuneOptions, ranks: usize) -> (usize, usize) {
    let per_step = opts.batch_size * opts.grad_accum * ranks.max(1);
    let per_epoch = n_rows.div_ceil(per_step.max(1)).max(1);
    let total = per_epoch * opts.epochs;
    (per_epoch, opts.max_steps.map_or(total, |m| m.min(total)))
}

/// The target and `k − 1` distinct uniform negatives outside the history, shuffled.
pub fn sample_candidates(row: &Row, n_items: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let mut out = vec![row.next];
    let k = k.min(n_items.saturating_sub(row.history.len()).max(1));
    while out.len() < k {
        let c = rng.random_range(0..n_items as u32);
        if !out.contains(&c) && !row.history.contains(&c) {
            out.push(c);
        }
    }
    out.shuffle(rng);
    out
}

/// The micro-batches rank `rank` of `ranks` computes of a step's `n` examples (the global batch in
/// its drawn order), as ranges of example indices: micro-batch `m` of rank `r` is the `b`
/// examples from `(m · ranks + r) · b` (those past `n` are absent). On one rank: consecutive
/// micro-batches of `b`.
pub fn shard_of_step(
    n: usize,
    b: usize,
    grad_accum: usize,
    rank: usize,
    ranks: usize,
) -> Vec<std::ops::Range<usize>> {
    let b = b.max(1);
    (0..grad_accum.max(1) * ranks.max(1) * b)
        .step_by(b)
        .enumerate()
        .filter(|(i, _)| i % ranks.max(1) == rank)
        .map(|(_, start)| start.min(n)..(start + b).min(n))
        .filter(|r| !r.is_empty())
        .collect()
}

/// The curriculum draw of optimizer step `step`: p(τ), whether the step is hard, and the step's
/// random stream (templates and negatives are drawn from it next).
pub fn draw_step(
    c: Curriculum,
    seed: u64,
    step: usize,
    total: usize,
    epoch: usize,
) -> (f64, bool, ChaCha8Rng) {
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, "step", step as u64));
    let p = c.p_hard(step, total, epoch);
    let hard = rng.random::<f64>() < p;
    (p, hard, rng)
}

struct Trainables {
    projector: Projector,
    head: Option<Head>,
    opt: AdamW,
    vars: Vec<(String, Var)>,
}

impl Trainables {
    /// Whether every trainable weight is finite (one reduction per tensor: a NaN or an infinity
    /// anywhere makes its sum of magnitudes non-finite).
    fn finite(&self) -> TResult<bool> {
        for (_, v) in &self.vars {
            let s = v
                .as_tensor()
                .abs()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?;
            if !s.to_scalar::<f64>()?.is_finite() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn trainables(
    model: &Llama,
    projector: Projector,
    head: Option<Head>,
    opts: &TuneOptions,
) -> TResult<Trainables> {
    let mut vars: Vec<(String, Var)> = lora::adapter_vars(model);
    let mut groups: Vec<(String, Var, f64)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.clone(), 0.0))
        .collect();
    for (n, v) in projector.vars() {
        let name = format!("projector.{n}");
        groups.push((name.clone(), v.clone(), opts.projector_weight_decay));
        vars.push((name, v));
    }
    for (n, v) in head.iter().flat_map(Head::vars) {
        groups.push((n.clone(), v.clone(), 0.0));
        vars.push((n, v));
    }
    let mut opt = AdamW::new(groups)?;
    if let Some(h) = opts.head_lr {
        if !(h.is_finite() && h >= 0.0) || (opts.lr == 0.0 && h != 0.0) {
            return Err(TuneError::Invalid(format!(
                "--head-lr {h}: expected a finite rate of at least 0 (and --lr above 0, whose schedule it follows)"
            )));
        }
        if opts.lr > 0.0 {
            opt.set_lr_scale("head.", h / opts.lr);
        }
    }
    Ok(Trainables {
        projector,
        head,
        opt,
        vars,
    })
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> TResult<()> {
    std::fs::write(
        path,
        serde_json::to_string_pretty(v).expect("serialisable") + "\n",
    )
    .map_err(io(path))
}

/// Writes adapter + projector (+ the head, and the optimizer and state for a checkpoint) into the
/// folder `dir` (a staged one: see [`checkpoint::save`]).
fn write_weights(
    model: &Llama,
    t: &Trainables,
    dir: &Path,
    llm_name: &str,
    state: Option<&RunState>,
) -> TResult<()> {
    lora::save_adapter(model, &dir.join("adapter"), llm_name, false)?;
    t.projector.save(&dir.join("projector.safetensors"))?;
    if let Some(h) = &t.head {
        h.save(&dir.join("head.safetensors"))?;
    }
    if let Some(state) = state {
        candle_core::safetensors::save(&t.opt.state()?, dir.join("optimizer.safetensors"))?;
        write_json(&dir.join(checkpoint::STATE_FILE), state)?;
    }
    Ok(())
}

/// Where a run starts: new trainable weights, or a checkpoint's.
pub struct Start {
    pub projector: Projector,
    pub head: Option<Head>,
    pub state: RunState,
    /// The checkpoint folder the run resumes from, whose optimizer moments it loads (`None`: a
    /// fresh run, whose model carries new adapters already).
    pub checkpoint: Option<PathBuf>,
}

impl Start {
    /// A fresh run (the model carries new adapters already).
    pub fn fresh(projector: Projector, head: Option<Head>) -> Self {
        Self {
            projector,
            head,
            state: RunState::default(),
            checkpoint: None,
        }
    }

    /// The newest intact checkpoint of `run` (see [`checkpoint::latest`]): its state, and its
    /// adapter, projector and head loaded onto `model`.
    pub fn resume(
        model: &mut Llama,
        found: checkpoint::Found<RunState>,
        d_sr: usize,
        head: Option<HeadConfig>,
    ) -> TResult<Self> {
        let (projector, head) = load_weights(model, &found.dir, d_sr, head)?;
        Ok(Self {
            projector,
            head,
            state: found.state,
            checkpoint: Some(found.dir),
        })
    }
}

/// The newest intact checkpoint of `run` (call it holding the run's lock: see
/// [`crate::fsutil::lock`]).
pub fn resume_point(run: &RunDir) -> TResult<checkpoint::Found<RunState>> {
    Ok(checkpoint::latest(run)?)
}

/// Runs (or resumes) tuning in `run`: see [`Run`].
pub fn tune(
    setup: Setup<'_>,
    start: Start,
    opts: &TuneOptions,
    run: &RunDir,
    hooks: &mut dyn Hooks,
) -> TResult<RunState> {
    Run::open(setup, start, opts, run, hooks)?.train(hooks)
}

/// The checks on a run's options that need nothing loaded.
fn check_options(opts: &TuneOptions, templates: &Templates, has_head: bool) -> TResult<()> {
    let head_ranks = opts.objective.listwise() && opts.ranker == Ranker::Head;
    if head_ranks != has_head {
        return Err(TuneError::Invalid(
            "a listwise objective ranking with the head needs the scoring head, and only it trains one"
                .into(),
        ));
    }
    if opts.batch_size == 0 || opts.grad_accum == 0 || opts.epochs == 0 {
        return Err(TuneError::Invalid(
            "--batch-size, --grad-accum and --epochs must be at least 1".into(),
        ));
    }
    if !(opts.lr.is_finite() && opts.lr >= 0.0 && opts.min_lr.is_finite() && opts.min_lr >= 0.0) {
        return Err(TuneError::Invalid(format!(
            "--lr {} / --min-lr {}: learning rates must be finite and at least 0",
            opts.lr, opts.min_lr
        )));
    }
    if opts.template >= templates.list.len() {
        return Err(TuneError::Invalid(format!(
            "--template {}: {} has {} templates",
            opts.template,
            templates.source,
            templates.list.len()
        )));
    }
    if !(opts.checkpoint_minutes.is_finite() && opts.checkpoint_minutes >= 0.0) {
        return Err(TuneError::Invalid(format!(
            "--checkpoint-minutes {}: expected a number of minutes of at least 0 (0: no time-based checkpoints)",
            opts.checkpoint_minutes
        )));
    }
    if opts.checkpoint_every == Some(0) {
        return Err(TuneError::Invalid(
            "--checkpoint-every 0: expected at least 1 optimizer step".into(),
        ));
    }
    Ok(())
}

/// `train_log.jsonl`: one line per optimizer step, appended as the run goes.
struct TrainLog {
    file: std::fs::File,
    path: PathBuf,
}

impl TrainLog {
    /// Opens the log keeping the lines of the steps before `step` (a resumed run drops any after
    /// its checkpoint; the kept lines are rewritten atomically).
    fn open(path: PathBuf, step: usize) -> TResult<Self> {
        let kept: String = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step < step))
            .map(|l| format!("{l}\n"))
            .collect();
        crate::fsutil::write_file_atomic(&path, |p| std::fs::write(p, &kept).map_err(io(p)))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Self { file, path })
    }

    fn write(&mut self, entry: &StepLog) -> TResult<()> {
        let line = serde_json::to_string(entry).expect("serialisable");
        writeln!(self.file, "{line}").map_err(io(&self.path))
    }
}

/// Gradients by trainable tensor's name, in name order: every sum over them (the global norm)
/// runs in one order in every process.
type Grads = BTreeMap<String, Tensor>;

/// A tuning run in progress: the trainable weights, their optimizer and the run's state, and
/// where each guarantee of a run lives —
/// [`Run::step`] (one optimizer step, the same bytes from the same seed, step and state),
/// [`Run::checkpoint`] (the state on disk, whole, checksummed, the previous one kept),
/// [`Run::validate`] (valid metrics, `best/`), and [`Run::open`] (a resumed run continues from
/// the checkpoint's step exactly as the uninterrupted run would have).
pub struct Run<'a> {
    model: &'a Llama,
    kit: PromptKit<'a>,
    rec: &'a Recommender,
    opts: &'a TuneOptions,
    dir: &'a RunDir,
    llm_name: &'a str,
    rows: Vec<&'a Row>,
    valid: Vec<(usize, Example)>,
    n_items: usize,
    candidates: usize,
    templates: usize,
    per_epoch: usize,
    total: usize,
    answer_ranks: bool,
    t: Trainables,
    state: RunState,
    /// The run's processes; rank 0 writes (the log, checkpoints, `best/`, metrics).
    comm: &'a dyn Communicator,
    /// `None` on ranks other than 0.
    log: Option<TrainLog>,
    /// The epoch whose row order `order` is.
    order: Option<(usize, Vec<usize>)>,
    /// The checkpoint a diverged run leaves in place (the one it resumed from, then its own).
    last_checkpoint: Option<usize>,
    last_save: std::time::Instant,
    /// The state on disk is the state in memory (nothing to write when stopping).
    saved: bool,
    /// Steps done by this invocation.
    done_now: usize,
    zero_grad_run: usize,
}

impl<'a> Run<'a> {
    /// Checks the options, builds the optimizer (with the checkpoint's moments when resuming),
    /// cleans up writes a kill cut short and opens the log.
    pub fn open(
        setup: Setup<'a>,
        start: Start,
        opts: &'a TuneOptions,
        dir: &'a RunDir,
        hooks: &mut dyn Hooks,
    ) -> TResult<Self> {
        let Setup {
            model,
            tok,
            templates,
            ds,
            rec,
            llm_name,
            comm,
        } = setup;
        check_options(opts, templates, start.head.is_some())?;
        let writer = comm.rank() == 0;
        model.set_checkpointing(opts.checkpoint_layers)?;
        let model: &'a Llama = model;
        if opts.lr > 0.1 {
            hooks.on_warning(&format!(
                "--lr {}: far above the rates LoRA trains with (1e-4 to 1e-3); expect a diverging or stalled run",
                opts.lr
            ));
        }
        let rows = training_rows(ds, opts);
        if rows.is_empty() {
            return Err(TuneError::Invalid(format!(
                "{}: the train split is empty",
                ds.dir.display()
            )));
        }
        let (per_epoch, total) = schedule(rows.len(), opts, comm.size());
        let mut state = start.state;
        state.total_steps = total;
        let mut t = trainables(model, start.projector, start.head, opts)?;
        if writer {
            checkpoint::recover(dir).map_err(io(&dir.dir))?;
        }
        if let Some(from) = &start.checkpoint {
            let path = from.join("optimizer.safetensors");
            let st = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
            t.opt.load_state(&st).map_err(|source| TuneError::State {
                path: path.clone(),
                source,
            })?;
        }
        let now = crate::kernels::Signature::current();
        if let Some(was) = state.signature.as_ref().filter(|w| **w != now) {
            let msg = format!(
                "the checkpoint at step {} was computed with {was}, this process computes with {now}: \
                 the rest of the run will not be bit-identical to an uninterrupted one (pass --threads {} \
                 on the same CPU for that)",
                state.step, was.threads
            );
            hooks.on_warning(&msg);
            state.warnings.push(msg);
        }
        state.signature = Some(now);
        let log = writer
            .then(|| TrainLog::open(dir.log(), state.step))
            .transpose()?;
        Ok(Self {
            model,
            kit: PromptKit {
                tok,
                templates,
                titles: &ds.titles,
                user_token: opts.user_token,
                answer: opts.answer,
            },
            rec,
            opts,
            dir,
            llm_name,
            valid: split_rows(ds, "valid", opts.template, opts.valid_samples, opts.seed),
            n_items: ds.n_items(),
            candidates: ds.meta.candidates,
            templates: templates.list.len(),
            rows,
            per_epoch,
            total,
            answer_ranks: opts.objective.listwise() && opts.ranker == Ranker::Answer,
            t,
            last_checkpoint: (state.step > 0).then_some(state.step),
            state,
            comm,
            log,
            order: None,
            last_save: std::time::Instant::now(),
            saved: true,
            done_now: 0,
            zero_grad_run: 0,
        })
    }

    /// Trains to the end of the schedule (or until `--stop-after` / [`Hooks::should_stop`]),
    /// leaving the position resumable, and writes `metrics.json`.
    pub fn train(mut self, hooks: &mut dyn Hooks) -> TResult<RunState> {
        hooks.on_start(self.total, self.state.step);
        if self.state.pending_eval {
            // Stopped between writing a validation point's checkpoint and validating it.
            let epoch = self.state.step.saturating_sub(1) / self.per_epoch;
            self.validate(epoch, hooks)?;
        }
        while self.state.step < self.total {
            if self.opts.stop_after.is_some_and(|s| self.done_now >= s)
                || self.should_stop(hooks)?
            {
                break;
            }
            let epoch = self.state.step / self.per_epoch;
            self.step(hooks)?;
            let step = self.state.step;
            let end_of_epoch = step.is_multiple_of(self.per_epoch);
            let periodic = self
                .opts
                .eval_every
                .is_some_and(|n| n > 0 && step.is_multiple_of(n));
            let last = step == self.total;
            let due = self
                .opts
                .checkpoint_every
                .is_some_and(|n| step.is_multiple_of(n))
                || (self.opts.checkpoint_minutes > 0.0
                    && self.last_save.elapsed().as_secs_f64()
                        >= 60.0 * self.opts.checkpoint_minutes);
            let validate = (end_of_epoch || periodic || last) && !self.valid.is_empty();
            if end_of_epoch || periodic || last || due {
                // At a validation point the checkpoint comes first: a run stopped while
                // validating validates again when resumed.
                self.state.pending_eval = validate;
                self.checkpoint(hooks)?;
            }
            if validate && !self.should_stop(hooks)? {
                self.validate(epoch, hooks)?;
            }
        }
        if !self.saved {
            // Stopped early (--stop-after, a signal): make the position resumable.
            self.checkpoint(hooks)?;
        }
        if self.state.step == self.total && !self.state.finished && !self.state.pending_eval {
            // The run's result: the best validated weights (or the last ones without a valid split).
            if self.state.best.is_none() {
                self.save_best()?;
            }
            if self.writer() {
                publish_best(self.dir)?;
            }
            self.state.finished = true;
            self.checkpoint(&mut ())?;
        }
        let s = &self.state;
        let metrics = serde_json::json!({
            "best": s.best,
            "evals": s.evals,
            "steps": s.step,
            "total_steps": self.total,
            "hybrid_fraction": if s.step > 0 { s.hybrid_steps as f64 / s.step as f64 } else { 0.0 },
            "finished": s.finished,
            "bad_steps": s.bad_steps,
            "warnings": s.warnings,
        });
        if self.writer() {
            crate::fsutil::write_file_atomic(&self.dir.dir.join("metrics.json"), |p| {
                write_json(p, &metrics)
            })?;
        }
        Ok(self.state)
    }

    /// Whether this process writes the run folder (rank 0).
    fn writer(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Whether to stop before the next step: asked of the hooks on every rank, and agreed (a
    /// signal that reached one rank stops them all at the same step).
    fn should_stop(&self, hooks: &mut dyn Hooks) -> TResult<bool> {
        Ok(comm::any(self.comm, hooks.should_stop())?)
    }

    /// The examples of optimizer step `step`: its rows (the epoch's seeded order), the
    /// curriculum's draw, and each row's template and negatives from the step's stream.
    fn batch(&mut self, step: usize) -> (f64, bool, Vec<Example>) {
        let (opts, per_epoch) = (self.opts, self.per_epoch);
        let epoch = step / per_epoch;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut o: Vec<usize> = (0..self.rows.len()).collect();
            o.shuffle(&mut ChaCha8Rng::seed_from_u64(stream_seed(
                opts.seed,
                "epoch",
                epoch as u64,
            )));
            self.order = Some((epoch, o));
        }
        let o = &self.order.as_ref().expect("set above").1;
        let per_step = opts.batch_size * opts.grad_accum * self.comm.size();
        let start = (step % per_epoch) * per_step;
        let idx = &o[start.min(o.len())..(start + per_step).min(o.len())];
        let (p, hard, mut rng) = draw_step(opts.curriculum, opts.seed, step, self.total, epoch);
        let examples = idx
            .iter()
            .map(|&i| {
                let row = self.rows[i];
                let template = rng.random_range(0..self.templates);
                Example {
                    history: row.history.clone(),
                    candidates: sample_candidates(row, self.n_items, self.candidates, &mut rng),
                    target: row.next,
                    template,
                }
            })
            .collect();
        (p, hard, examples)
    }

    /// This rank's part of one optimizer step: its micro-batches of the step's examples
    /// ([`shard_of_step`]), each loss weighted by its share of the global batch's answer tokens
    /// (generative loss) and rows (listwise losses), so that the parts summed over ranks are the
    /// global batch's loss and gradients. Returns the weighted loss, the tokens and the gradients.
    fn gradients(
        &self,
        step: usize,
        view: ItemView,
        examples: &[Example],
        hooks: &mut dyn Hooks,
    ) -> TResult<(f64, usize, Grads)> {
        let (model, opts, kit) = (self.model, self.opts, &self.kit);
        let micros = shard_of_step(
            examples.len(),
            opts.batch_size,
            opts.grad_accum,
            self.comm.rank(),
            self.comm.size(),
        );
        let behaviour = Behaviour {
            rec: self.rec,
            cand_emb: opts.cand_emb,
            projector: &self.t.projector,
        };
        // Every micro-batch's inputs first: the global counts weight each one before any
        // backward pass.
        let inputs = micros
            .iter()
            .map(|r| -> TResult<Input> {
                let micro = &examples[r.clone()];
                Ok(if self.answer_ranks {
                    Input::Answers(
                        micro
                            .iter()
                            .map(|ex| super::listwise::candidate_answers(kit, ex, view))
                            .collect::<Result<_, _>>()?,
                    )
                } else {
                    Input::Prompts(
                        micro
                            .iter()
                            .map(|ex| kit.tokenize(ex, view, opts.objective.generative()))
                            .collect::<Result<_, _>>()?,
                    )
                })
            })
            .collect::<TResult<Vec<_>>>()?;
        let local_rows: usize = micros.iter().map(|r| r.len()).sum();
        let local_answer: usize = inputs.iter().map(Input::answer_tokens).sum();
        let global = comm::sum_f32(self.comm, &[local_rows as f32, local_answer as f32])?;
        let (all_rows, all_answer) = (global[0] as f64, (global[1] as f64).max(1.0));
        let mut grads = Grads::new();
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for (range, input) in micros.iter().zip(&inputs) {
            let micro = &examples[range.clone()];
            // Each example's masks from its own stream (its index in the step).
            let mut dropout = Dropout::new(
                opts.lora.dropout,
                ChaCha8Rng::seed_from_u64(stream_seed(opts.seed, "dropout", step as u64)),
            )
            .with_rows(range.clone().map(|i| i as u64).collect());
            let row_share = micro.len() as f64 / all_rows;
            let (loss, micro_tokens) = match input {
                Input::Answers(cands) => {
                    // One packed pass per row: every candidate's answer log-likelihood.
                    let refs: Vec<_> = cands.iter().collect();
                    let prompts: Vec<_> = cands.iter().map(|c| &c.prompt).collect();
                    hooks.on_batch(step, view.uses_embeddings(), &prompts);
                    let targets: Vec<u32> = micro.iter().map(|e| e.target).collect();
                    let idx = head::target_indices(&prompts, &targets)?;
                    let s = super::listwise::answer_scores(
                        model,
                        &refs,
                        &idx,
                        view.uses_embeddings().then_some(&behaviour),
                        (opts.lora.dropout > 0.0).then_some(&mut dropout),
                    )?;
                    let mut loss = head::listwise_loss(&s.scores, &idx)?;
                    if opts.objective.generative() {
                        loss = (loss - s.target_mean_logp.mean_all()?)?;
                    }
                    ((loss * row_share)?, s.tokens)
                }
                Input::Prompts(toks) => {
                    let refs: Vec<_> = toks.iter().collect();
                    hooks.on_batch(step, view.uses_embeddings(), &refs);
                    let (x, lengths) = embed_batch(
                        model,
                        &refs,
                        |t| t.ids.len(),
                        view.uses_embeddings().then_some(&behaviour),
                    )?;
                    let tt = x.dim(1)?;
                    let h = model.forward(
                        &x,
                        Step::padded(&lengths, tt),
                        (opts.lora.dropout > 0.0).then_some(&mut dropout),
                    )?;
                    let (gen, list) = micro_loss(
                        model,
                        self.t.head.as_ref(),
                        self.rec,
                        &h,
                        &refs,
                        micro,
                        view,
                        opts,
                    )?;
                    let answer_share = input.answer_tokens() as f64 / all_answer;
                    let loss = match (gen, list) {
                        (Some(g), Some(l)) => ((g * answer_share)? + (l * row_share)?)?,
                        (Some(g), None) => (g * answer_share)?,
                        (None, Some(l)) => (l * row_share)?,
                        (None, None) => return Err(TuneError::Invalid("no loss to train".into())),
                    };
                    (loss, lengths.iter().sum::<usize>())
                }
            };
            tokens += micro_tokens;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = model.backward(&loss)?;
            accumulate(&mut grads, &self.t.vars, &g)?;
        }
        if step < opts.projector_warmup {
            // Warm-up: only the projector and the head move.
            grads.retain(|n, _| n.starts_with("projector.") || n.starts_with("head."));
        }
        Ok((loss_sum, tokens, grads))
    }

    /// One optimizer step: gradients, clipping, the update (or a skip of a non-finite step), the
    /// log line.
    pub fn step(&mut self, hooks: &mut dyn Hooks) -> TResult<()> {
        let opts = self.opts;
        let step = self.state.step;
        let epoch = step / self.per_epoch;
        let (p, hard, examples) = self.batch(step);
        let view = if hard {
            opts.curriculum.hard_view()
        } else {
            ItemView::Text
        };
        let started = std::time::Instant::now();
        let (loss, tokens, mut grads) = self.gradients(step, view, &examples, hooks)?;
        // The global batch's loss, tokens and gradients, on every rank.
        let mut extra = [loss as f32, tokens as f32];
        comm::all_reduce_grads(self.comm, &self.t.vars, &mut grads, &mut extra)?;
        let (loss, tokens) = if self.comm.size() > 1 {
            (extra[0] as f64, extra[1] as usize)
        } else {
            (loss, tokens)
        };
        let grad_norm = optim::clip(&mut grads, opts.max_grad_norm)?;
        let lr = optim::lr_at(step, self.total, opts.lr, opts.min_lr);
        let bad = !(loss.is_finite() && grad_norm.is_finite());
        let diverged = |what: &'static str| TuneError::Diverged {
            step,
            loss,
            grad_norm,
            lr,
            what,
            last_checkpoint: self.last_checkpoint,
        };
        let mut entry = StepLog {
            step,
            epoch,
            loss,
            lr,
            p_hybrid: p,
            hybrid: hard,
            hybrid_fraction: 0.0,
            grad_norm,
            tokens,
            tokens_per_second: 0.0,
            skipped: bad,
        };
        if bad {
            self.state.bad_steps += 1;
            if self.state.bad_steps > opts.max_bad_steps {
                // The step's line stays in the log (what diverged); nothing else is written.
                entry.tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
                if let Some(log) = &mut self.log {
                    log.write(&entry)?;
                }
                return Err(diverged(if loss.is_finite() {
                    "the gradient norm is not finite"
                } else {
                    "the loss is not finite"
                }));
            }
            let msg = format!(
                "step {step}: loss {loss}, gradient norm {grad_norm}: skipped without an update ({} of --max-bad-steps {})",
                self.state.bad_steps, opts.max_bad_steps
            );
            hooks.on_warning(&msg);
            self.state.warnings.push(msg);
        } else {
            self.t.opt.step(&grads, lr)?;
            if !self.t.finite()? {
                return Err(diverged("the update made a weight non-finite"));
            }
        }
        self.zero_grad_run = if !bad && grad_norm == 0.0 && step >= opts.projector_warmup {
            self.zero_grad_run + 1
        } else {
            0
        };
        if self.zero_grad_run == STALL_STEPS {
            let msg = format!(
                "steps {}..{step}: the gradient norm is 0 and the loss flat at {loss:.4}: training has stalled \
                 (a saturated model, usually from a learning rate far too high: --lr {})",
                step + 1 - STALL_STEPS,
                opts.lr
            );
            hooks.on_warning(&msg);
            self.state.warnings.push(msg);
        }
        self.state.step += 1;
        self.done_now += 1;
        self.saved = false;
        self.state.hybrid_steps += usize::from(hard);
        entry.hybrid_fraction = self.state.hybrid_steps as f64 / self.state.step as f64;
        entry.tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        if let Some(log) = &mut self.log {
            log.write(&entry)?;
        }
        hooks.on_step(&entry);
        Ok(())
    }

    /// Writes `checkpoint/` (the previous one becomes `checkpoint.prev/`); a failure names it and
    /// leaves the previous one as it was.
    pub fn checkpoint(&mut self, hooks: &mut dyn Hooks) -> TResult<()> {
        let (model, t, name, state) = (self.model, &self.t, self.llm_name, &self.state);
        if self.writer() {
            checkpoint::save(self.dir, |p| write_weights(model, t, p, name, Some(state)))
                .map_err(saving("checkpoint/", &self.dir.checkpoint()))?;
        }
        // Every rank has the checkpoint's step behind it once it is on disk (a rank stopped
        // after this has a resumable run).
        self.comm.barrier()?;
        self.last_checkpoint = Some(self.state.step);
        self.last_save = std::time::Instant::now();
        self.saved = true;
        hooks.on_checkpoint(self.state.step);
        Ok(())
    }

    /// Writes `best/` from the current weights.
    fn save_best(&self) -> TResult<()> {
        if !self.writer() {
            return Ok(());
        }
        let (model, t, name) = (self.model, &self.t, self.llm_name);
        let dest = self.dir.best();
        checkpoint::save_dir(&dest, |p| write_weights(model, t, p, name, None))
            .map_err(saving("best/", &dest))
    }

    /// Validates the current weights, keeps them as `best/` when they beat the best so far, and
    /// checkpoints the state with the result (the checkpoint's weights are these).
    pub fn validate(&mut self, epoch: usize, hooks: &mut dyn Hooks) -> TResult<()> {
        let (model, kit, opts, valid) = (self.model, &self.kit, self.opts, &self.valid);
        // The steps' activation buffers go back before the KV caches are made.
        crate::kernels::alloc::trim();
        hooks.on_eval_start(valid.len());
        let eval_opts = EvalOptions {
            view: opts.curriculum.eval_view(),
            template: opts.template,
            batch_size: opts.eval_batch_size,
            max_new_tokens: opts.max_new_tokens,
            constrained: false,
            shard: Shard::of(self.comm),
        };
        let behaviour = Behaviour {
            rec: self.rec,
            cand_emb: opts.cand_emb,
            projector: &self.t.projector,
        };
        let behaviour = eval_opts.view.uses_embeddings().then_some(&behaviour);
        // Each rank scores its shard of the rows; rank 0 gathers them and its metrics are
        // everyone's.
        let comm = self.comm;
        let by_rank = |scored: Vec<RowScores>| -> TResult<GenMetrics> {
            let all = gather_in_row_order(comm, valid, scored, |r| r.row)?;
            Ok(GenMetrics::of_ranks(all.iter().map(|r| r.rank)))
        };
        let m = match &self.t.head {
            // Head runs validate by the head's ranking (valid ratio 1).
            Some(hd) => by_rank(score_with_head(
                model,
                kit,
                behaviour,
                hd,
                valid,
                &eval_opts,
                |n| hooks.on_eval_progress(n),
            )?)?,
            // Answer-ranking runs validate by that ranking.
            None if self.answer_ranks => by_rank(score_candidates(
                model,
                kit,
                behaviour,
                valid,
                &eval_opts,
                ScoreOptions::new(ScoreMode::Sum),
                |n| hooks.on_eval_progress(n),
            )?)?,
            None => {
                let preds = evaluate(model, kit, behaviour, valid, &eval_opts, |n| {
                    hooks.on_eval_progress(n)
                })?;
                GenMetrics::of(&gather_in_row_order(comm, valid, preds, |p| p.row)?)
            }
        };
        let m = comm::broadcast_json(comm, m)?;
        let better = self.state.best.as_ref().is_none_or(|b| m.hr1 > b.valid.hr1);
        let e = EvalLog {
            step: self.state.step,
            epoch,
            valid: m,
            best: better,
        };
        if better {
            self.save_best()?;
            self.state.best = Some(e.clone());
        }
        self.state.evals.push(e.clone());
        self.state.pending_eval = false;
        self.checkpoint(&mut ())?;
        hooks.on_eval(&e);
        Ok(())
    }
}

/// Wraps a failed write of `what` at `path` (the previous one is unchanged).
fn saving<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(TuneError) -> TuneError + 'a {
    move |e| TuneError::Save {
        what,
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Adds a micro-batch's gradients of the trainable `vars` to `grads`.
fn accumulate(
    grads: &mut Grads,
    vars: &[(String, Var)],
    g: &candle_core::backprop::GradStore,
) -> TResult<()> {
    for (name, v) in vars {
        if let Some(gv) = g.get(v.as_tensor()) {
            // Detached: a gradient computed by composed ops (the head's) would otherwise keep
            // this step's whole graph alive in the optimizer's moments.
            let gv = gv.detach();
            let sum = match grads.remove(name) {
                Some(old) => (old + gv)?,
                None => gv,
            };
            grads.insert(name.clone(), sum);
        }
    }
    Ok(())
}

/// Copies `best/` to the run's top level (`adapter/`, `projector.safetensors`), each atomically.
fn publish_best(run: &RunDir) -> TResult<()> {
    let best = run.best();
    crate::fsutil::checksums::verify(&best)
        .map_err(|d| TuneError::Invalid(format!("best/ is damaged: {d}")))?;
    let dest = run.dir.join("adapter");
    let staged = StagedDir::new(&dest, true).map_err(io(&dest))?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let from = best.join("adapter").join(f);
        std::fs::copy(&from, staged.path().join(f)).map_err(io(&from))?;
    }
    staged.commit().map_err(io(&dest))?;
    for f in ["projector.safetensors", "head.safetensors"] {
        let from = best.join(f);
        if f == "head.safetensors" && !from.exists() {
            continue;
        }
        crate::fsutil::write_file_atomic(&run.dir.join(f), |p| {
            std::fs::copy(&from, p).map(|_| ()).map_err(io(&from))
        })?;
    }
    Ok(())
}

/// Loads the trainable state of a checkpoint folder (adapter + projector, and the head when the
/// run has one) onto a fresh model.
pub fn load_weights(
    model: &mut Llama,
    dir: &Path,
    d_sr: usize,
    head: Option<HeadConfig>,
) -> TResult<(Projector, Option<Head>)> {
    lora::load_adapter(model, &dir.join("adapter"))?;
    let d_llm = model.cfg.hidden_size;
    let p = dir.join("projector.safetensors");
    let projector = Projector::load(&p, d_sr, d_llm, candle_core::DType::F32, model.device())
        .map_err(|e| TuneError::Invalid(e.to_string()))?;
    let head = head
        .map(|cfg| Head::load(&dir.join("head.safetensors"), d_llm, cfg, model.device()))
        .transpose()
        .map_err(|e| TuneError::Invalid(e.to_string()))?;
    Ok((projector, head))
}

/// The losses of one micro-batch: the answer tokens' mean cross-entropy (generative objectives)
/// and the head's mean listwise cross-entropy over the rows' candidates (listwise ones).
#[allow(clippy::too_many_arguments)]
fn micro_loss(
    model: &Llama,
    hd: Option<&Head>,
    rec: &Recommender,
    h: &Tensor,
    refs: &[&super::Tokenized],
    micro: &[Example],
    view: ItemView,
    opts: &TuneOptions,
) -> TResult<(Option<Tensor>, Option<Tensor>)> {
    let tt = h.dim(1)?;
    let mut gen = None;
    if opts.objective.generative() {
        let (pos, targets) = answer_targets(refs, tt);
        gen = Some(model.loss_at(h, &pos, &targets)?);
    }
    if let Some(hd) = hd.filter(|_| opts.objective.listwise()) {
        let prior = hd.prior(rec, refs, view)?;
        let scores = hd.scores(h, refs, prior.as_ref())?;
        let targets: Vec<u32> = micro.iter().map(|e| e.target).collect();
        let idx = head::target_indices(refs, &targets)?;
        return Ok((gen, Some(head::listwise_loss(&scores, &idx)?)));
    }
    Ok((gen, None))
}

/// A micro-batch's model inputs.
enum Input {
    /// Packed prompt + every candidate's answer (the answer ranker).
    Answers(Vec<super::listwise::CandidateAnswers>),
    /// Prompts with the target's answer (generative) or without (the head).
    Prompts(Vec<super::Tokenized>),
}

impl Input {
    /// The answer tokens the generative loss averages over.
    fn answer_tokens(&self) -> usize {
        match self {
            Input::Answers(_) => 0,
            Input::Prompts(t) => t.iter().map(|t| t.ids.len() - t.answer_start).sum(),
        }
    }
}
