//! Curriculum prompt tuning: LoRA on the backbone (always) and the projector (on hard steps),
//! AdamW with warm-up + cosine, gradient accumulation, generation-based validation, and a run
//! folder with atomic checkpoints from which `--resume` continues bit for bit.
//!
//! Every random draw derives from the seed and the optimizer step (curriculum, templates,
//! negatives, dropout) or the epoch (row order), so a resumed run needs only the step counter,
//! the trainable tensors and the optimizer moments.

use super::batch::{answer_targets, split_rows};
use super::evaluate::{
    evaluate, score_candidates, score_with_head, EvalOptions, GenMetrics, ScoreMode, ScoreOptions,
};
use super::head::{self, Head, HeadConfig};
use super::optim::{self, AdamW};
use super::projector::Projector;
use super::prompts::{AnswerFormat, ItemView, Templates};
use super::{
    embed_batch, stream_seed, Behaviour, CandEmb, Curriculum, Example, PromptKit, Recommender,
};
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
use std::collections::HashMap;
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
}

/// Where a run keeps its files.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join("best")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("train_log.jsonl")
    }
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

/// Steps per epoch and the schedule's total.
pub fn schedule(n_rows: usize, opts: &TuneOptions) -> (usize, usize) {
    let per_step = opts.batch_size * opts.grad_accum;
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

/// Writes adapter + projector (+ optimizer and state for a checkpoint) into `dest` atomically.
fn save_weights(
    model: &Llama,
    t: &Trainables,
    dest: &Path,
    llm_name: &str,
    state: Option<&RunState>,
) -> TResult<()> {
    let staged = StagedDir::new(dest, true).map_err(io(dest))?;
    lora::save_adapter(model, &staged.path().join("adapter"), llm_name, false)?;
    t.projector
        .save(&staged.path().join("projector.safetensors"))?;
    if let Some(h) = &t.head {
        h.save(&staged.path().join("head.safetensors"))?;
    }
    if let Some(state) = state {
        candle_core::safetensors::save(
            &t.opt.state()?,
            staged.path().join("optimizer.safetensors"),
        )?;
        write_json(&staged.path().join("state.json"), state)?;
    }
    staged.commit().map_err(io(dest))?;
    Ok(())
}

/// Runs (or resumes) tuning in `run`. A fresh run expects adapters on the model already and a
/// new projector; a resumed one loads both from the checkpoint first (see [`resume_weights`]).
#[allow(clippy::too_many_arguments)]
pub fn tune(
    setup: Setup<'_>,
    projector: Projector,
    head: Option<Head>,
    opts: &TuneOptions,
    run: &RunDir,
    mut state: RunState,
    llm_name: &str,
    hooks: &mut dyn Hooks,
) -> TResult<RunState> {
    let Setup {
        model,
        tok,
        templates,
        ds,
        rec,
    } = setup;
    let head_ranks = opts.objective.listwise() && opts.ranker == Ranker::Head;
    if head_ranks != head.is_some() {
        return Err(TuneError::Invalid(
            "a listwise objective ranking with the head needs the scoring head, and only it trains one"
                .into(),
        ));
    }
    let answer_ranks = opts.objective.listwise() && opts.ranker == Ranker::Answer;
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
    model.set_checkpointing(opts.checkpoint_layers)?;
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
    let (per_epoch, total) = schedule(rows.len(), opts);
    state.total_steps = total;
    let mut t = trainables(model, projector, head, opts)?;
    // Leftovers of a write that a crash or SIGKILL cut short.
    for dest in [run.checkpoint(), run.best(), run.dir.join("adapter")] {
        crate::fsutil::recover_staged(&dest).map_err(io(&dest))?;
    }
    if state.step > 0 {
        let path = run.checkpoint().join("optimizer.safetensors");
        let st = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
        t.opt.load_state(&st).map_err(|source| TuneError::State {
            path: path.clone(),
            source,
        })?;
    }
    let kit = PromptKit {
        tok,
        templates,
        titles: &ds.titles,
        user_token: opts.user_token,
        answer: opts.answer,
    };
    let valid = split_rows(ds, "valid", opts.template, opts.valid_samples, opts.seed);
    let n_items = ds.n_items();
    let k = ds.meta.candidates;
    // The log keeps the lines of steps already done (a resumed run drops any after its checkpoint).
    let log_path = run.log();
    let kept: Vec<String> = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step < state.step))
        .map(String::from)
        .collect();
    let mut log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
    for l in &kept {
        writeln!(log, "{l}").map_err(io(&log_path))?;
    }
    let ctx = Ctx {
        model: &*model,
        kit: &kit,
        rec,
        opts,
        valid: &valid,
        answer_ranks,
        run,
        llm_name,
    };
    hooks.on_start(total, state.step);
    // The checkpoint this invocation may fall back to (the one it resumed from, then its own).
    let mut last_checkpoint = (state.step > 0).then_some(state.step);
    let mut last_save = std::time::Instant::now();
    // The state on disk is the state in memory (nothing to write when stopping).
    let mut saved = true;
    if state.pending_eval {
        // Stopped between writing a validation point's checkpoint and validating it.
        let epoch = state.step.saturating_sub(1) / per_epoch;
        ctx.validate(&t, &mut state, epoch, hooks)?;
    }
    let mut order: Option<(usize, Vec<usize>)> = None;
    let mut done_now = 0;
    let mut zero_grad_run = 0;
    while state.step < total {
        if opts.stop_after.is_some_and(|s| done_now >= s) || hooks.should_stop() {
            break;
        }
        let step = state.step;
        let epoch = step / per_epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut o: Vec<usize> = (0..rows.len()).collect();
            o.shuffle(&mut ChaCha8Rng::seed_from_u64(stream_seed(
                opts.seed,
                "epoch",
                epoch as u64,
            )));
            order = Some((epoch, o));
        }
        let o = &order.as_ref().expect("set above").1;
        let per_step = opts.batch_size * opts.grad_accum;
        let start = (step % per_epoch) * per_step;
        let idx = &o[start.min(o.len())..(start + per_step).min(o.len())];
        let (p, hard, mut rng) = draw_step(opts.curriculum, opts.seed, step, total, epoch);
        let view = if hard {
            opts.curriculum.hard_view()
        } else {
            ItemView::Text
        };
        let examples: Vec<Example> = idx
            .iter()
            .map(|&i| {
                let row = rows[i];
                let template = rng.random_range(0..templates.list.len());
                Example {
                    history: row.history.clone(),
                    candidates: sample_candidates(row, n_items, k, &mut rng),
                    target: row.next,
                    template,
                }
            })
            .collect();
        let mut dropout = Dropout::new(
            opts.lora.dropout,
            ChaCha8Rng::seed_from_u64(stream_seed(opts.seed, "dropout", step as u64)),
        );
        let started = std::time::Instant::now();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        let behaviour = Behaviour {
            rec,
            cand_emb: opts.cand_emb,
            projector: &t.projector,
        };
        for micro in examples.chunks(opts.batch_size) {
            let (loss, micro_tokens) = if answer_ranks {
                // One packed pass per row: every candidate's answer log-likelihood.
                let cands = micro
                    .iter()
                    .map(|ex| super::listwise::candidate_answers(&kit, ex, view))
                    .collect::<Result<Vec<_>, _>>()?;
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
                (loss, s.tokens)
            } else {
                let toks = micro
                    .iter()
                    .map(|ex| kit.tokenize(ex, view, opts.objective.generative()))
                    .collect::<Result<Vec<_>, _>>()?;
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
                let loss = micro_loss(model, t.head.as_ref(), rec, &h, &refs, micro, view, opts)?;
                (loss, lengths.iter().sum::<usize>())
            };
            tokens += micro_tokens;
            let share = micro.len() as f64 / examples.len() as f64;
            loss_sum += loss.to_scalar::<f32>()? as f64 * share;
            let g = model.backward(&(loss * share)?)?;
            accumulate(&mut grads, &t.vars, &g)?;
        }
        if step < opts.projector_warmup {
            // Warm-up: only the projector and the head move.
            grads.retain(|n, _| n.starts_with("projector.") || n.starts_with("head."));
        }
        let grad_norm = optim::clip(&mut grads, opts.max_grad_norm)?;
        let lr = optim::lr_at(step, total, opts.lr, opts.min_lr);
        let bad = !(loss_sum.is_finite() && grad_norm.is_finite());
        let diverged = |what: &'static str| TuneError::Diverged {
            step,
            loss: loss_sum,
            grad_norm,
            lr,
            what,
            last_checkpoint,
        };
        let mut entry = StepLog {
            step,
            epoch,
            loss: loss_sum,
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
            state.bad_steps += 1;
            if state.bad_steps > opts.max_bad_steps {
                // The step's line stays in the log (what diverged); nothing else is written.
                entry.tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
                log_step(&mut log, &log_path, &entry)?;
                return Err(diverged(if loss_sum.is_finite() {
                    "the gradient norm is not finite"
                } else {
                    "the loss is not finite"
                }));
            }
            let msg = format!(
                "step {step}: loss {loss_sum}, gradient norm {grad_norm}: skipped without an update ({} of --max-bad-steps {})",
                state.bad_steps, opts.max_bad_steps
            );
            hooks.on_warning(&msg);
            state.warnings.push(msg);
        } else {
            t.opt.step(&grads, lr)?;
            if !t.finite()? {
                return Err(diverged("the update made a weight non-finite"));
            }
        }
        zero_grad_run = if !bad && grad_norm == 0.0 && step >= opts.projector_warmup {
            zero_grad_run + 1
        } else {
            0
        };
        if zero_grad_run == STALL_STEPS {
            let msg = format!(
                "steps {}..{step}: the gradient norm is 0 and the loss flat at {loss_sum:.4}: training has stalled \
                 (a saturated model, usually from a learning rate far too high: --lr {})",
                step + 1 - STALL_STEPS,
                opts.lr
            );
            hooks.on_warning(&msg);
            state.warnings.push(msg);
        }
        state.step += 1;
        done_now += 1;
        saved = false;
        state.hybrid_steps += usize::from(hard);
        entry.hybrid_fraction = state.hybrid_steps as f64 / state.step as f64;
        entry.tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        log_step(&mut log, &log_path, &entry)?;
        hooks.on_step(&entry);
        let end_of_epoch = state.step.is_multiple_of(per_epoch);
        let periodic = opts
            .eval_every
            .is_some_and(|n| n > 0 && state.step.is_multiple_of(n));
        let last = state.step == total;
        let due = opts
            .checkpoint_every
            .is_some_and(|n| state.step.is_multiple_of(n))
            || (opts.checkpoint_minutes > 0.0
                && last_save.elapsed().as_secs_f64() >= 60.0 * opts.checkpoint_minutes);
        let validate = (end_of_epoch || periodic || last) && !valid.is_empty();
        if end_of_epoch || periodic || last || due {
            // At a validation point the checkpoint comes first: a run stopped while validating
            // validates again when resumed.
            state.pending_eval = validate;
            ctx.save("checkpoint/", &t, &run.checkpoint(), Some(&state))?;
            last_checkpoint = Some(state.step);
            last_save = std::time::Instant::now();
            saved = true;
            hooks.on_checkpoint(state.step);
        }
        if validate && !hooks.should_stop() {
            ctx.validate(&t, &mut state, epoch, hooks)?;
        }
    }
    if !saved {
        // Stopped early (--stop-after, a signal): make the position resumable.
        ctx.save("checkpoint/", &t, &run.checkpoint(), Some(&state))?;
        hooks.on_checkpoint(state.step);
    }
    if state.step == total && !state.finished && !state.pending_eval {
        // The run's result: the best validated weights (or the last ones without a valid split).
        if state.best.is_none() {
            ctx.save("best/", &t, &run.best(), None)?;
        }
        publish_best(run)?;
        state.finished = true;
        ctx.save("checkpoint/", &t, &run.checkpoint(), Some(&state))?;
    }
    let metrics = serde_json::json!({
        "best": state.best,
        "evals": state.evals,
        "steps": state.step,
        "total_steps": total,
        "hybrid_fraction": if state.step > 0 { state.hybrid_steps as f64 / state.step as f64 } else { 0.0 },
        "finished": state.finished,
        "bad_steps": state.bad_steps,
        "warnings": state.warnings,
    });
    crate::fsutil::write_file_atomic(&run.dir.join("metrics.json"), |p| write_json(p, &metrics))?;
    Ok(state)
}

/// Appends one step's line to `train_log.jsonl`.
fn log_step(log: &mut std::fs::File, path: &Path, entry: &StepLog) -> TResult<()> {
    let line = serde_json::to_string(entry).expect("serialisable");
    writeln!(log, "{line}").map_err(io(path))
}

/// Wraps a failed write of `what` at `path` (the previous one is unchanged).
fn saving<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(TuneError) -> TuneError + 'a {
    move |e| TuneError::Save {
        what,
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// What validation and checkpoint writes need from a run.
struct Ctx<'a> {
    model: &'a Llama,
    kit: &'a PromptKit<'a>,
    rec: &'a Recommender,
    opts: &'a TuneOptions,
    valid: &'a [(usize, Example)],
    answer_ranks: bool,
    run: &'a RunDir,
    llm_name: &'a str,
}

impl Ctx<'_> {
    /// Writes `dest` atomically; a failure names it (the previous one is unchanged).
    fn save(
        &self,
        what: &'static str,
        t: &Trainables,
        dest: &Path,
        state: Option<&RunState>,
    ) -> TResult<()> {
        save_weights(self.model, t, dest, self.llm_name, state).map_err(saving(what, dest))
    }

    /// Validates the current weights, keeps them as `best/` when they beat the best so far, and
    /// records the result in the checkpoint's `state.json` (whose weights are these).
    fn validate(
        &self,
        t: &Trainables,
        state: &mut RunState,
        epoch: usize,
        hooks: &mut dyn Hooks,
    ) -> TResult<()> {
        let (model, kit, opts, valid) = (self.model, self.kit, self.opts, self.valid);
        // The steps' activation buffers go back before the KV caches are made.
        crate::kernels::alloc::trim();
        hooks.on_eval_start(valid.len());
        let eval_opts = EvalOptions {
            view: opts.curriculum.eval_view(),
            template: opts.template,
            batch_size: opts.eval_batch_size,
            max_new_tokens: opts.max_new_tokens,
            constrained: false,
        };
        let behaviour = Behaviour {
            rec: self.rec,
            cand_emb: opts.cand_emb,
            projector: &t.projector,
        };
        let behaviour = eval_opts.view.uses_embeddings().then_some(&behaviour);
        let m = match &t.head {
            // Head runs validate by the head's ranking (valid ratio 1).
            Some(hd) => {
                let scored = score_with_head(model, kit, behaviour, hd, valid, &eval_opts, |n| {
                    hooks.on_eval_progress(n)
                })?;
                GenMetrics::of_ranks(scored.iter().map(|r| r.rank))
            }
            // Answer-ranking runs validate by that ranking.
            None if self.answer_ranks => {
                let scored = score_candidates(
                    model,
                    kit,
                    behaviour,
                    valid,
                    &eval_opts,
                    ScoreOptions::new(ScoreMode::Sum),
                    |n| hooks.on_eval_progress(n),
                )?;
                GenMetrics::of_ranks(scored.iter().map(|r| r.rank))
            }
            None => GenMetrics::of(&evaluate(model, kit, behaviour, valid, &eval_opts, |n| {
                hooks.on_eval_progress(n)
            })?),
        };
        let better = state.best.as_ref().is_none_or(|b| m.hr1 > b.valid.hr1);
        let e = EvalLog {
            step: state.step,
            epoch,
            valid: m,
            best: better,
        };
        if better {
            self.save("best/", t, &self.run.best(), None)?;
            state.best = Some(e.clone());
        }
        state.evals.push(e.clone());
        state.pending_eval = false;
        let p = self.run.checkpoint().join("state.json");
        crate::fsutil::write_file_atomic(&p, |p| write_json(p, &*state))
            .map_err(saving("checkpoint/", &p))?;
        hooks.on_eval(&e);
        Ok(())
    }
}

/// Adds a micro-batch's gradients of the trainable `vars` to `grads`.
fn accumulate(
    grads: &mut HashMap<String, Tensor>,
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

/// The loss of one micro-batch: the answer tokens' cross-entropy, the head's listwise
/// cross-entropy over the candidates, or their sum.
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
) -> TResult<Tensor> {
    let tt = h.dim(1)?;
    let mut loss: Option<Tensor> = None;
    if opts.objective.generative() {
        let (pos, targets) = answer_targets(refs, tt);
        loss = Some(model.loss_at(h, &pos, &targets)?);
    }
    if let Some(hd) = hd.filter(|_| opts.objective.listwise()) {
        let prior = hd.prior(rec, refs, view)?;
        let scores = hd.scores(h, refs, prior.as_ref())?;
        let targets: Vec<u32> = micro.iter().map(|e| e.target).collect();
        let idx = head::target_indices(refs, &targets)?;
        let l = head::listwise_loss(&scores, &idx)?;
        loss = Some(match loss {
            Some(g) => (g + l)?,
            None => l,
        });
    }
    loss.ok_or_else(|| TuneError::Invalid("no loss to train".into()))
}
/// The checkpoint's state.
pub fn read_state(run: &RunDir) -> TResult<RunState> {
    let p = run.checkpoint().join("state.json");
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text).map_err(|e| TuneError::Invalid(format!("{}: {e}", p.display())))
}
