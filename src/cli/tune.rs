//! `llara tune`: flags ↔ `tune.toml`, the options they make, loading a run's parts, and the run itself.

use anyhow::{bail, Context, Result};
use clap::Args;
use llara::data::Dataset;
use llara::llara::head::{Head, HeadConfig};
use llara::llara::projector::Projector;
use llara::llara::prompts::{AnswerFormat, Templates};
use llara::llara::tune::{self, Objective, Ranker, RunDir, Setup, Start, TuneOptions};
use llara::llara::{CandEmb, Curriculum, Recommender};
use llara::llm::{self, LlmOptions, LoraConfig, Target};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::progress::Bars;
use super::rundir::{sha256_file, RunInfo};
use llara::comm::Communicator;

/// The options a tune run was made with (`RUN/tune.toml`): `None` when the run has no such file.
pub(super) fn tune_config(run: &Path) -> Result<Option<TuneArgs>> {
    let path = run.join("tune.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(
            toml::from_str(&text).with_context(|| path.display().to_string())?,
        )),
        Err(_) => Ok(None),
    }
}

/// `llara tune`'s flags, also the schema of the run's `tune.toml` (written from them, read back by
/// `--resume` and `llara report`).
#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
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
    #[command(flatten)]
    #[serde(flatten)]
    pub dev: super::DeviceArgs,
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
    /// The processes the run spans (recorded in tune.toml from the launcher, `mpirun -np N`; a
    /// resume on another count keeps the global batch by changing --grad-accum).
    #[arg(long, hide = true, value_name = "N")]
    pub ranks: Option<usize>,
    /// Continue the run in this folder from its last checkpoint (its tune.toml gives every option).
    #[arg(long, value_name = "RUN", conflicts_with_all = ["data", "sr", "llm", "out"])]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
}

fn options(a: &TuneArgs) -> Result<TuneOptions> {
    let objective = Objective::parse(&a.objective)?;
    if a.head_rank == 0 {
        bail!("--head-rank 0: expected at least 1");
    }
    let ranker = Ranker::parse(&a.ranker)?;
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
        curriculum: Curriculum::parse(&a.curriculum)?,
        objective,
        ranker,
        answer: AnswerFormat::parse(&a.answer)?,
        head: head_ranks.then_some(HeadConfig {
            rank: a.head_rank,
            prior: a.head_prior,
        }),
        user_token: a.user_token,
        cand_emb: CandEmb::parse(&a.cand_emb)?,
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
    opts: LlmOptions,
    prompts: Option<&Path>,
) -> Result<Loaded> {
    let device = &opts.device;
    let ds = Dataset::open(data).with_context(|| format!("--data {}", data.display()))?;
    let (sr_weights, _) =
        llara::sr::resolve_model_path(sr).with_context(|| format!("--sr {}", sr.display()))?;
    let (model, sr_cfg) =
        llara::sr::load_model(sr, device).with_context(|| format!("--sr {}", sr.display()))?;
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
    // Errors that name the spec or a file already say where they come from.
    let llm = llm::load(spec, &opts).map_err(|e| match e {
        llm::LlmError::Candle(_) => anyhow::Error::new(e).context(format!("--llm {spec}")),
        other => anyhow::Error::new(other),
    })?;
    tracing::info!("frozen weights: {}", llm.model.gemm_path());
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

pub fn run_tune(a: TuneArgs, quiet: bool, comm: &dyn Communicator) -> Result<()> {
    if let Some(run) = &a.resume {
        let cfg = run.join("tune.toml");
        if !cfg.is_file() {
            bail!(
                "--resume {}: no tune.toml here (not a tune run folder)",
                run.display()
            );
        }
        // The run's own thread count (tune.toml records it) unless --threads says otherwise; a
        // different count cannot continue bit for bit (the run warns).
        let mut argv: Vec<OsString> =
            vec!["llara".into(), "tune".into(), "--config".into(), cfg.into()];
        if let Some(n) = a.dev.threads {
            argv.extend(["--threads".into(), n.to_string().into()]);
        }
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
        return tune_in(*args, true, quiet, comm);
    }
    tune_in(a, false, quiet, comm)
}

/// Fits the recorded run to the processes this launch has: a fresh run records their number; a
/// resumed one on another number keeps the global batch (batch × grad-accum × ranks) by changing
/// the gradient accumulation, so that every step trains on the same examples.
fn fit_ranks(a: &mut TuneArgs, resume: bool, size: usize) -> Result<()> {
    match (resume, a.ranks) {
        (false, Some(n)) if n != size => bail!(
            "--ranks {n}: the run would span {size} processes (the launcher decides: `mpirun -np {n}`)"
        ),
        (true, Some(n)) if n != size => {
            let global = a.batch_size * a.grad_accum * n;
            let per = a.batch_size * size;
            if per == 0 || !global.is_multiple_of(per) {
                bail!(
                    "--resume: the run's global batch is {global} examples ({} × grad-accum {} × {n} ranks); \
                     {size} ranks of batch {} cannot make it (launch a number of ranks that divides {})",
                    a.batch_size,
                    a.grad_accum,
                    a.batch_size,
                    global / a.batch_size.max(1)
                );
            }
            tracing::warn!(
                "the run was started on {n} processes and continues on {size}: --grad-accum {} -> {} keeps the global batch of {global}; the results differ from an unbroken run by the order of float sums",
                a.grad_accum,
                global / per
            );
            a.grad_accum = global / per;
        }
        _ => {}
    }
    a.ranks = Some(size);
    Ok(())
}

fn tune_in(mut a: TuneArgs, resume: bool, quiet: bool, comm: &dyn Communicator) -> Result<()> {
    let device = a.dev.start(2)?;
    // Recorded in tune.toml: a resumed run computes on as many threads (the GEMMs' blocks follow
    // the count, and with them the bits).
    a.dev.threads = Some(a.dev.threads.unwrap_or(super::per_rank(2)));
    // Only rank 0 writes the run folder and draws progress.
    let (writer, size) = (comm.rank() == 0, comm.size());
    fit_ranks(&mut a, resume, size)?;
    let quiet = quiet || !writer;
    let opts = options(&a)?;
    let (data, sr, spec, out) = match (&a.data, &a.sr, &a.llm, &a.out) {
        (Some(d), Some(s), Some(l), Some(o)) => (d.clone(), s.clone(), l.clone(), o.clone()),
        _ => bail!("--data, --sr, --llm and --out are required (or --resume RUN)"),
    };
    let run = RunDir { dir: out.clone() };
    if writer && !resume && out.exists() && !a.force {
        bail!(
            "--out {}: already exists (pass --force to replace it, or --resume {} to continue it)",
            out.display(),
            out.display()
        );
    }
    // A resumed run holds the folder's lock before reading its checkpoint; a fresh one takes it
    // once the model has loaded (a refused or failed load leaves no folder behind).
    let mut lock = if resume && writer {
        Some(lock_run(&out)?)
    } else {
        None
    };
    let mut parts = load_parts(
        &data,
        &sr,
        &spec,
        LlmOptions {
            device: device.clone(),
            dtype: a.dev.dtype()?,
            revision: a.revision.clone(),
            // LLaRA's prompts run to a few hundred tokens: the estimate takes 512 per row.
            workload: Some(llara::llm::memory::Workload {
                batch: a.batch_size,
                seq_len: 512,
                train: true,
                checkpoint: a.checkpoint_layers,
                lora_r: a.lora_r,
                // Validation: --eval-batch-size rows at a time (at most --valid-samples).
                infer_batch: a.eval_batch_size.min(a.valid_samples.unwrap_or(usize::MAX)),
            }),
        },
        a.prompts.as_deref(),
    )?;
    if lock.is_none() && writer {
        let l = lock_run(&out)?;
        // What is there besides the lock: another run's files (replaced only with --force).
        let entries: Vec<PathBuf> = std::fs::read_dir(&out)
            .with_context(|| format!("--out {}", out.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("--out {}", out.display()))?;
        let others: Vec<&PathBuf> = entries.iter().filter(|p| *p != l.path()).collect();
        if !others.is_empty() && !a.force {
            bail!(
                "--out {}: already exists (pass --force to replace it, or --resume {} to continue it)",
                out.display(),
                out.display()
            );
        }
        for p in others {
            if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            }
            .with_context(|| format!("--force: removing {}", p.display()))?;
        }
        lock = Some(l);
    }
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
    let start = if resume {
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
        // Rank 0 (holding the lock) picks the checkpoint, setting a damaged one aside; the
        // others read what it picked.
        if !writer {
            comm.barrier()?;
        }
        let found =
            tune::resume_point(&run).with_context(|| format!("--resume {}", out.display()))?;
        if writer && size > 1 {
            comm.barrier()?;
        }
        llara::comm::agree(
            comm,
            "checkpoint (is the run folder on a file system every node shares?)",
            &format!("{} at step {}", found.dir.display(), found.state.step),
        )?;
        if let Some(why) = &found.passed_over {
            tracing::warn!(
                "{why}; resuming from the previous checkpoint, {} (the damaged one is kept in {})",
                found.dir.display(),
                run.damaged().display()
            );
        }
        if found.state.finished {
            if !writer {
                return Ok(());
            }
            println!(
                "{} is finished ({} steps); nothing to do",
                out.display(),
                found.state.step
            );
            return Ok(());
        }
        tracing::info!(
            "resuming {} from {} at step {} of {}",
            out.display(),
            found.dir.display(),
            found.state.step,
            found.state.total_steps
        );
        Start::resume(&mut parts.llm.model, found, d_sr, opts.head)?
    } else {
        if writer {
            let toml = toml::to_string(&a).context("serializing the run's options")?;
            llara::fsutil::write_file_atomic(&out.join("tune.toml"), |p| {
                std::fs::write(p, format!("# The exact options of this run: `llara tune --config tune.toml` reruns it, `llara tune --resume RUN` continues it.\n{toml}"))
            })?;
            llara::fsutil::write_file_atomic(&out.join("run.json"), |p| {
                std::fs::write(p, serde_json::to_string_pretty(&info)? + "\n")
            })?;
        }
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
        Start::fresh(p, head)
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
    if size > 1 {
        // Every rank must run the same program on the same inputs from the same step.
        let exe = std::env::current_exe().context("locating this program")?;
        let fingerprint = format!(
            "{}|{}|{}|{}|{}",
            sha256_file(&exe)?,
            toml::to_string(&a).context("serializing the run's options")?,
            sr_hash,
            info.data_content_hash,
            start.state.step
        );
        llara::comm::agree(comm, "binary, options, inputs or start step", &fingerprint)?;
        tracing::info!(
            "data parallel over {size} processes ({}): global batch {} = {} × grad-accum {} × {size}",
            comm.engine(),
            a.batch_size * a.grad_accum * size,
            a.batch_size,
            a.grad_accum
        );
    }
    let mut hooks = Bars::new(
        quiet,
        a.dump_batches.as_deref().filter(|_| writer),
        (start.state.step > 0).then_some(start.state.step),
    )?;
    let llm_name = parts.llm.name();
    let setup = Setup {
        model: &mut parts.llm.model,
        tok: &parts.llm.tokenizer,
        templates: &parts.templates,
        ds: &parts.ds,
        rec: &parts.rec,
        llm_name: &llm_name,
        comm,
    };
    let started = std::time::Instant::now();
    // From here on Ctrl-C / SIGTERM stop the run at the next step boundary, with a checkpoint.
    llara::interrupt::install().context("installing the Ctrl-C handler")?;
    let state = tune::tune(setup, start, &opts, &run, &mut hooks)?;
    drop(lock);
    hooks.finish()?;
    if !writer {
        // Rank 0 reports; a rank the signal reached returns its status.
        return match (state.finished, llara::interrupt::requested()) {
            (false, Some(signal)) => Err(llara::interrupt::Interrupted {
                signal,
                message: format!("rank {} stopped at step {}", comm.rank(), state.step),
            }
            .into()),
            _ => Ok(()),
        };
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
            if let Some(signal) = llara::interrupt::requested() {
                return Err(llara::interrupt::Interrupted {
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

/// Takes the run folder's lock (one writer per run), noting a stale lock a killed run left.
fn lock_run(out: &Path) -> Result<llara::fsutil::lock::DirLock> {
    let l = llara::fsutil::lock::DirLock::acquire(out)?;
    if let Some(pid) = l.took_over {
        tracing::warn!(
            "{}: took over the lock left by PID {pid}, which is no longer running (a run that was killed)",
            l.path().display()
        );
    }
    Ok(l)
}
