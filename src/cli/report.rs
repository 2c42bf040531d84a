//! `llara report RUN...`: one table of every metric on the same fixed candidate sets, for
//! recommender runs (`train-sr`) and LLaRA runs (`tune`, with their `eval` results).

use super::rundir::{
    read_json, GenReport, RunInfo, ScoreReport, SrEvalReport, SrRunConfig, SrRunMetrics,
};
use super::tune::{tune_config, TuneArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use llara::eval::metrics::RankMetrics;
use llara::llara::tune::StepLog;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Run folders: `train-sr` runs and `tune` runs (evaluated with `llara eval`, both modes).
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// Split whose metrics are reported.
    #[arg(long, default_value = "test", value_parser = ["valid", "test"])]
    pub split: String,
    /// Also write report.md, report.csv and, per tune run, its training curves
    /// (curves-N-NAME.svg: loss, p(τ), realised hybrid fraction) into this folder.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// One line of the table.
#[derive(Debug, Clone, serde::Serialize)]
struct Line {
    run: String,
    model: String,
    dataset: String,
    method: String,
    config: String,
    seed: String,
    #[serde(rename = "hr@1")]
    hr1: Option<f64>,
    #[serde(rename = "hr@5")]
    hr5: Option<f64>,
    #[serde(rename = "hr@10")]
    hr10: Option<f64>,
    #[serde(rename = "ndcg@5")]
    ndcg5: Option<f64>,
    #[serde(rename = "ndcg@10")]
    ndcg10: Option<f64>,
    mrr: Option<f64>,
    valid_ratio: Option<f64>,
    rows: Option<u64>,
    train_seconds: Option<f64>,
}

/// A tune run's optimizer steps from `train_log.jsonl` (its validation lines left out), if it has one.
fn step_log(run: &Path) -> Option<Vec<StepLog>> {
    let log = std::fs::read_to_string(run.join("train_log.jsonl")).ok()?;
    Some(
        log.lines()
            .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
            .collect(),
    )
}

/// A line with a [`RankMetrics`]' numbers (a recommender's, or candidate scoring).
fn ranked(base: Line, m: &RankMetrics) -> Line {
    Line {
        hr1: Some(m.hr1),
        hr5: Some(m.hr5),
        hr10: Some(m.hr10),
        ndcg5: Some(m.ndcg5),
        ndcg10: Some(m.ndcg10),
        mrr: Some(m.mrr),
        // Every candidate gets a score: no answer is invalid.
        valid_ratio: Some(1.0),
        rows: Some(m.rows as u64),
        ..base
    }
}

fn empty_line(run: &Path) -> Line {
    Line {
        run: run.display().to_string(),
        model: String::new(),
        dataset: String::new(),
        method: String::new(),
        config: String::new(),
        seed: String::new(),
        hr1: None,
        hr5: None,
        hr10: None,
        ndcg5: None,
        ndcg10: None,
        mrr: None,
        valid_ratio: None,
        rows: None,
        train_seconds: None,
    }
}

fn sr_lines(run: &Path, split: &str) -> Result<Vec<Line>> {
    let cfg: SrRunConfig = read_json(&run.join("config.json"))?;
    let m: SrRunMetrics = read_json(&run.join("metrics.json"))?;
    let metrics = if split == "valid" { &m.valid } else { &m.test };
    let t = &cfg.training;
    let base = Line {
        model: cfg.model.model.name().to_string(),
        dataset: cfg.dataset.name.clone(),
        method: "recommender scores".into(),
        config: format!(
            "hidden {}, lr {}, best epoch {}",
            cfg.model.hidden_size, t.lr, m.best_epoch
        ),
        seed: t.seed.to_string(),
        train_seconds: Some(m.train_seconds),
        ..empty_line(run)
    };
    Ok(vec![ranked(base, metrics)])
}

/// An `llara eval-sr --out DIR` folder (a recommender file or a count baseline on one split).
fn eval_sr_lines(run: &Path, split: &str) -> Result<Vec<Line>> {
    let m: SrEvalReport = read_json(&run.join("metrics.json"))?;
    if m.split != split {
        bail!(
            "{}: scored on the {} split, not {split}",
            run.display(),
            m.split
        );
    }
    let base = Line {
        model: m.model.clone(),
        dataset: m.dataset.clone(),
        method: "recommender scores".into(),
        config: m.source.clone(),
        seed: "-".into(),
        ..empty_line(run)
    };
    Ok(vec![ranked(base, &m.metrics)])
}

fn llara_lines(run: &Path, split: &str) -> Result<Vec<Line>> {
    let info: RunInfo = read_json(&run.join("run.json"))?;
    let t: TuneArgs = tune_config(run)?.unwrap_or_default();
    // Training time: the sum of the logged steps (tokens / tokens per second).
    let train_seconds = step_log(run).map(|log| {
        log.iter()
            .map(|s| s.tokens as f64 / s.tokens_per_second)
            .sum::<f64>()
    });
    let objective = t.objective.as_str();
    let letters = if t.answer == "letter" {
        ", letter answers"
    } else {
        ""
    };
    let listwise = objective == "listwise" || objective == "both";
    let head = if listwise && t.ranker == "answer" {
        format!(", {objective} loss over the answers{letters}")
    } else if listwise {
        format!(
            ", {objective} loss, head{}{}{}",
            if t.head_prior {
                " + recommender prior"
            } else {
                ""
            },
            if t.user_token { ", [UserEmb]" } else { "" },
            if t.cand_emb == "output" {
                ", s_fc candidates"
            } else {
                ""
            }
        ) + letters
    } else {
        letters.to_string()
    };
    let config = format!(
        "{} ({}), curriculum {}{head}, lr {}, epochs {}, batch {}×{}{}",
        Path::new(&info.llm)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        info.sr_arch,
        t.curriculum,
        t.lr,
        t.epochs,
        t.batch_size,
        t.grad_accum,
        t.max_train_samples
            .map(|v| format!(", {v} train rows"))
            .unwrap_or_default()
    );
    let dataset = llara::data::Dataset::open(&info.data)
        .ok()
        .map(|d| d.meta.name)
        .or_else(|| {
            info.data
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let base = Line {
        model: format!("LLaRA {}", t.curriculum),
        dataset,
        config,
        seed: t.seed.to_string(),
        train_seconds,
        ..empty_line(run)
    };
    let mut out = vec![];
    for (dir, method) in [
        (format!("eval-{split}"), "generation"),
        (
            format!("eval-{split}-constrained"),
            "generation (constrained)",
        ),
    ] {
        let generated = run.join(dir).join("metrics.json");
        if !generated.is_file() {
            continue;
        }
        let m: GenReport = read_json(&generated)?;
        out.push(Line {
            method: method.into(),
            hr1: Some(m.metrics.hr1),
            valid_ratio: Some(m.metrics.valid_ratio),
            rows: Some(m.metrics.rows as u64),
            ..base.clone()
        });
    }
    let scored = run.join(format!("eval-{split}-score/metrics.json"));
    if scored.is_file() {
        let m: ScoreReport = read_json(&scored)?;
        let method = if m.scorer == "head" {
            "scoring (head)".to_string()
        } else {
            format!("scoring ({})", m.score)
        };
        out.push(ranked(
            Line {
                method,
                ..base.clone()
            },
            &m.metrics,
        ));
    }
    if out.is_empty() {
        out.push(Line {
            method: format!(
                "not evaluated (llara eval --run {} --split {split} [--mode score])",
                run.display()
            ),
            ..base
        });
    }
    Ok(out)
}

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.4}"))
}

fn markdown(lines: &[Line], split: &str) -> String {
    let mut s = format!("Metrics on the fixed {split} candidate sets (20 per row; ties count against the target).\n\n");
    s.push_str("| model | dataset | method | HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 | MRR | valid ratio | rows | train s | seed | config | run |\n");
    s.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n");
    for l in lines {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            l.model,
            l.dataset,
            l.method,
            cell(l.hr1),
            cell(l.hr5),
            cell(l.hr10),
            cell(l.ndcg5),
            cell(l.ndcg10),
            cell(l.mrr),
            cell(l.valid_ratio),
            l.rows.map_or("-".into(), |r| r.to_string()),
            l.train_seconds.map_or("-".into(), |t| format!("{t:.0}")),
            l.seed,
            l.config,
            l.run
        ));
    }
    s
}

pub fn run(a: ReportArgs) -> Result<()> {
    let mut lines = vec![];
    for r in &a.runs {
        let l = if r.join("run.json").is_file() {
            llara_lines(r, &a.split)?
        } else if r.join("scores.jsonl").is_file() && r.join("metrics.json").is_file() {
            eval_sr_lines(r, &a.split)?
        } else if r.join("config.json").is_file() && r.join("metrics.json").is_file() {
            sr_lines(r, &a.split)?
        } else {
            bail!(
                "{}: neither a tune run (run.json), a train-sr run (config.json + metrics.json) nor an eval-sr --out folder (scores.jsonl + metrics.json)",
                r.display()
            );
        };
        lines.extend(l);
    }
    let datasets: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l.dataset.as_str()).collect();
    if datasets.len() > 1 {
        tracing::warn!(
            "the runs cover several datasets ({}): compare rows of the same dataset only",
            datasets.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let md = markdown(&lines, &a.split);
    print!("{md}");
    if let Some(out) = &a.out {
        let staged = llara::fsutil::StagedDir::new(out, true)
            .with_context(|| format!("--out {}", out.display()))?;
        std::fs::write(staged.path().join("report.md"), &md)?;
        let mut w = csv::Writer::from_path(staged.path().join("report.csv"))?;
        for l in &lines {
            w.serialize(l)?;
        }
        w.flush()?;
        drop(w);
        for (i, r) in a.runs.iter().enumerate() {
            if r.join("run.json").is_file() {
                let name = r
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                plot_curves(
                    r,
                    &staged.path().join(format!("curves-{}-{name}.svg", i + 1)),
                )?;
            }
        }
        staged
            .commit()
            .with_context(|| format!("--out {}", out.display()))?;
    }
    Ok(())
}

/// Training curves of a tune run as SVG: the loss, and p(τ) with the realised fraction of hybrid
/// steps, against the optimizer step.
fn plot_curves(run: &Path, dest: &Path) -> Result<bool> {
    use plotters::prelude::*;
    let Some(rows) = step_log(run) else {
        return Ok(false);
    };
    if rows.len() < 2 {
        return Ok(false);
    }
    let pts = |k: fn(&StepLog) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.step as f64, k(r))).collect()
    };
    let (loss, p, frac) = (
        pts(|r| r.loss),
        pts(|r| r.p_hybrid),
        pts(|r| r.hybrid_fraction),
    );
    let max_step = loss.last().map_or(1.0, |x| x.0).max(1.0);
    let (lo, hi) = loss
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x.1), b.max(x.1))
        });
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", dest.display());
    let root = SVGBackend::new(dest, (800, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(300);
    let title = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut c = ChartBuilder::on(&top)
        .caption(format!("{title}: training loss"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..max_step, (lo * 0.95)..(hi * 1.05))
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(loss, &BLUE))
        .map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&bottom)
        .caption(
            "curriculum: p(τ) and the realised fraction of hybrid steps",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..max_step, 0f64..1.05)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("optimizer step")
        .y_desc("probability")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(p, &RED))
        .map_err(|e| err(&e))?
        .label("p(τ)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    c.draw_series(LineSeries::new(frac, &BLACK))
        .map_err(|e| err(&e))?
        .label("hybrid fraction so far")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}
