//! `llara tune`'s progress: the training and validation bars (loss, learning rate, hybrid
//! share, tokens/s, ETA), what a stop request shows, and `--dump-batches`.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use llara::llara::tune::{EvalLog, Hooks, StepLog};
use std::path::{Path, PathBuf};

pub(super) struct Bars {
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
    /// The training bar (hidden with `quiet`), writing every micro-batch to `dump` when given;
    /// `checkpoint` is the step a resumed run starts from.
    pub(super) fn new(quiet: bool, dump: Option<&Path>, checkpoint: Option<usize>) -> Result<Self> {
        let train = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        if quiet {
            train.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Ok(Bars {
            train,
            eval: None,
            running: None,
            quiet,
            dump: dump.map(BatchDump::create).transpose()?,
            checkpoint,
            stopping: false,
        })
    }

    /// Clears the bar and completes `--dump-batches`.
    pub(super) fn finish(mut self) -> Result<()> {
        self.train.finish_and_clear();
        if let Some(d) = self.dump.take() {
            d.finish()?;
        }
        Ok(())
    }

    /// Shows once that a signal arrived and what happens next.
    fn note_stop(&mut self) {
        let Some(sig) = llara::interrupt::requested() else {
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
        llara::interrupt::requested().is_some()
    }

    fn on_checkpoint(&mut self, step: usize) {
        self.checkpoint = Some(step);
    }

    fn on_warning(&mut self, msg: &str) {
        self.train.suspend(|| tracing::warn!("{msg}"));
    }

    fn on_batch(&mut self, step: usize, hybrid: bool, rows: &[&llara::llara::Tokenized]) {
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
