//! `llara recommend`: ask a tuned run about one user (or many, as JSON lines on stdin).

use super::eval::open_run;
use anyhow::{bail, Context, Result};
use clap::Args;
use llara::llara::evaluate::{
    score_candidates, score_with_head, EvalOptions, ScoreMode, ScoreOptions,
};
use llara::llara::Example;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct RecommendArgs {
    /// A tune run folder.
    #[arg(long, value_name = "RUN")]
    pub run: PathBuf,
    /// Dataset folder (default: the run's).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The user's history, oldest first: titles or item ids (repeat the flag, or comma-separate ids).
    /// Without it, JSON lines `{"history": [...], "candidates": [...]}` are read from stdin.
    #[arg(long)]
    pub history: Vec<String>,
    /// Candidates (titles or ids); default: --n-candidates sampled from the items outside the history.
    #[arg(long)]
    pub candidate: Vec<String>,
    #[arg(long, default_value_t = 20)]
    pub n_candidates: usize,
    /// Seed of the sampled candidates.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// sum or mean of the answer tokens' log-probabilities.
    #[arg(long, default_value = "sum", value_parser = ["sum", "mean"])]
    pub score: String,
    #[arg(long, default_value_t = 0)]
    pub template: usize,
    /// Print JSON (one object per user) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dev: super::DeviceArgs,
}

#[derive(Deserialize)]
struct Query {
    history: Vec<serde_json::Value>,
    #[serde(default)]
    candidates: Vec<serde_json::Value>,
}

/// Resolves a title or an id to an item id; unknown titles suggest the closest ones.
fn resolve(item: &str, titles: &[String], what: &str) -> Result<u32> {
    let t = item.trim();
    if let Ok(id) = t.parse::<usize>() {
        if id < titles.len() {
            return Ok(id as u32);
        }
        bail!(
            "{what} {t}: no item with that id (the catalogue has {} items)",
            titles.len()
        );
    }
    if let Some(i) = titles.iter().position(|x| x == t) {
        return Ok(i as u32);
    }
    let lower = t.to_lowercase();
    if let Some(i) = titles.iter().position(|x| x.to_lowercase() == lower) {
        return Ok(i as u32);
    }
    let mut near: Vec<(f64, &String)> = titles
        .iter()
        .map(|x| (strsim::normalized_levenshtein(&x.to_lowercase(), &lower), x))
        .collect();
    near.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    let hints: Vec<String> = near.iter().take(3).map(|(_, x)| format!("{x:?}")).collect();
    bail!("{what} {t:?}: no such title; closest: {}", hints.join(", "))
}

fn value_str(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn run(a: RecommendArgs, comm: &dyn llara::comm::Communicator) -> Result<()> {
    let device = a.dev.start(2)?;
    // One query at a time, its candidates scored after the prompt.
    let workload = (1, super::eval::inference_tokens(super::eval::SCORED_TOKENS));
    let or = open_run(
        &a.run,
        a.data.as_deref(),
        None,
        &device,
        a.dev.dtype()?,
        workload,
    )?;
    let (parts, view) = (&or.parts, or.view);
    let titles = &parts.ds.titles;
    // Under mpirun only rank 0 has stdin: it reads the queries and every rank gets them.
    let queries: Vec<(Vec<String>, Vec<String>, String)> = if comm.rank() > 0 {
        vec![]
    } else if a.history.is_empty() {
        let stdin = std::io::stdin();
        let mut out = vec![];
        for (n, line) in stdin.lock().lines().enumerate() {
            let line = line.context("reading stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            let q: Query = serde_json::from_str(&line).with_context(|| {
                format!(
                    "stdin line {}: expected {{\"history\": [...], \"candidates\": [...]}}",
                    n + 1
                )
            })?;
            out.push((
                q.history.iter().map(value_str).collect(),
                q.candidates.iter().map(value_str).collect(),
                format!("stdin line {}", n + 1),
            ));
        }
        if out.is_empty() {
            bail!("no --history given and nothing on stdin");
        }
        out
    } else {
        let split = |v: &[String]| -> Vec<String> {
            v.iter()
                .flat_map(|s| {
                    if s.split(',').all(|p| p.trim().parse::<usize>().is_ok()) {
                        s.split(',').map(|p| p.trim().to_string()).collect()
                    } else {
                        vec![s.clone()]
                    }
                })
                .collect()
        };
        vec![(split(&a.history), split(&a.candidate), "--history".into())]
    };
    let queries = llara::comm::broadcast_json(comm, queries)?;
    let kit = or.kit();
    let behaviour = or.behaviour();
    let opts = EvalOptions {
        view,
        template: a.template,
        batch_size: 1,
        max_new_tokens: 0,
        constrained: false,
        shard: Default::default(),
    };
    let mode = ScoreMode::parse(&a.score)?;
    // Each rank answers its share of the queries (each on its own, so as one process would);
    // rank 0 prints every answer in the queries' order.
    let mine = llara::comm::shard(queries.len(), comm.rank(), comm.size());
    let mut answers: Vec<String> = vec![];
    for (qi, (hist, cands, origin)) in queries.iter().enumerate() {
        if !mine.contains(&qi) {
            continue;
        }
        let history: Vec<u32> = hist
            .iter()
            .map(|h| resolve(h, titles, &format!("{origin}: history item")))
            .collect::<Result<_>>()?;
        if history.is_empty() {
            bail!("{origin}: the history is empty");
        }
        let history = history[history.len().saturating_sub(parts.ds.meta.max_history)..].to_vec();
        let mut candidates: Vec<u32> = cands
            .iter()
            .map(|c| resolve(c, titles, &format!("{origin}: candidate")))
            .collect::<Result<_>>()?;
        if candidates.is_empty() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed.wrapping_add(qi as u64));
            let pool = titles.len()
                - history
                    .iter()
                    .collect::<std::collections::HashSet<_>>()
                    .len();
            let n = a.n_candidates.min(pool);
            while candidates.len() < n {
                let c = rng.random_range(0..titles.len() as u32);
                if !history.contains(&c) && !candidates.contains(&c) {
                    candidates.push(c);
                }
            }
        }
        if candidates.is_empty() {
            bail!("{origin}: no candidates (give --candidate, or --n-candidates of at least 1 with items outside the history)");
        }
        let ex = Example {
            history: history.clone(),
            target: candidates[0],
            candidates: candidates.clone(),
            template: a.template,
        };
        let scored = match &or.head {
            // A run with a scoring head ranks by it (what it was trained and evaluated with).
            Some(hd) => score_with_head(
                &parts.llm.model,
                &kit,
                behaviour.as_ref(),
                hd,
                &[(0, ex)],
                &opts,
                |_| {},
            )?,
            None => score_candidates(
                &parts.llm.model,
                &kit,
                behaviour.as_ref(),
                &[(0, ex)],
                &opts,
                ScoreOptions::new(mode),
                |_| {},
            )?,
        };
        let mut ranked: Vec<(u32, f32)> = candidates
            .iter()
            .copied()
            .zip(scored[0].scores.iter().copied())
            .collect();
        ranked.sort_by(|x, y| y.1.partial_cmp(&x.1).unwrap_or(std::cmp::Ordering::Equal));
        let mut text = String::new();
        if a.json {
            let v = serde_json::json!({
                "history": history.iter().map(|&i| serde_json::json!({"id": i, "title": titles[i as usize]})).collect::<Vec<_>>(),
                "ranking": ranked.iter().map(|&(i, s)| serde_json::json!({"id": i, "title": titles[i as usize], "score": s})).collect::<Vec<_>>(),
            });
            text.push_str(&serde_json::to_string(&v)?);
            text.push('\n');
        } else {
            if queries.len() > 1 {
                text.push_str(&format!("# {origin}\n"));
            }
            text.push_str("rank  score      id     title\n");
            for (r, (i, s)) in ranked.iter().enumerate() {
                text.push_str(&format!(
                    "{:<5} {:<10.4} {:<6} {}\n",
                    r + 1,
                    s,
                    i,
                    titles[*i as usize]
                ));
            }
        }
        if comm.size() == 1 {
            // One process prints as it goes.
            print!("{text}");
        } else {
            answers.push(text);
        }
    }
    for text in llara::comm::gather_rows(comm, answers)? {
        print!("{text}");
    }
    Ok(())
}
