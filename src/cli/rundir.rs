//! The run folders' files, typed: what `llara tune`, `llara eval`, `llara train-sr` and
//! `llara eval-sr` write, and what `llara report` (and `llara eval`, `llara recommend`) read back
//! through the same types, so writers and readers cannot drift apart.

use anyhow::{Context, Result};
use llara::eval::metrics::RankMetrics;
use llara::llara::evaluate::GenMetrics;
use llara::llara::head::HeadConfig;
use llara::llara::prompts::AnswerFormat;
use llara::llara::tune::{Objective, Ranker};
use llara::llara::CandEmb;
use llara::sr::train::TrainOptions;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

/// `metrics.json` of `llara eval --mode generate` (`RUN/eval-SPLIT[-constrained]/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenReport {
    pub split: String,
    /// Always `generate`.
    pub mode: String,
    #[serde(default)]
    pub constrained: bool,
    pub template: usize,
    pub view: String,
    /// The frozen weights' dtype the evaluation ran with (empty in reports from before it was written).
    #[serde(default)]
    pub dtype: String,
    #[serde(flatten)]
    pub metrics: GenMetrics,
    pub seconds: f64,
}

/// `metrics.json` of `llara eval --mode score` (`RUN/eval-SPLIT-score/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreReport {
    pub split: String,
    /// Always `score`.
    pub mode: String,
    /// `sum` or `mean` of the answers' log-probabilities.
    pub score: String,
    /// `head` or `answer`.
    pub scorer: String,
    pub template: usize,
    pub view: String,
    /// The frozen weights' dtype the evaluation ran with (empty in reports from before it was written).
    #[serde(default)]
    pub dtype: String,
    #[serde(flatten)]
    pub metrics: RankMetrics,
    pub seconds: f64,
}

/// `metrics.json` of `llara eval-sr --out DIR`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SrEvalReport {
    pub split: String,
    /// What was scored: an architecture name or a count baseline.
    pub model: String,
    /// The run folder, weights file or baseline name given to `--model`.
    pub source: String,
    pub dataset: String,
    #[serde(flatten)]
    pub metrics: RankMetrics,
}

/// `metrics.json` of a `llara train-sr` run: the test metrics at the top level.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SrRunMetrics {
    #[serde(flatten)]
    pub test: RankMetrics,
    /// Always `test` (the top-level metrics' split).
    pub split: String,
    pub valid: RankMetrics,
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub train_seconds: f64,
}

/// `config.json` of a `llara train-sr` run: the model's own config (what `load_model` reads), the
/// training options and the dataset it was trained on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SrRunConfig {
    #[serde(flatten)]
    pub model: llara::sr::Config,
    pub training: TrainOptions,
    pub dataset: DatasetRef,
}

/// The dataset a recommender was trained on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetRef {
    pub dir: String,
    pub name: String,
    pub content_hash: String,
    pub seed: u64,
}

/// Reads a JSON file of the run-folder schema, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid {}", path.display(), short_type::<T>()))
}

fn short_type<T>() -> &'static str {
    let n = std::any::type_name::<T>();
    n.rsplit("::").next().unwrap_or(n)
}

/// Writes `value` as pretty JSON with a final newline.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
