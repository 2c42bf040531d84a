//! The `llara` command line: clap derive, `anyhow` at the boundary.

pub mod config;
pub mod data;
pub mod llm;
pub mod quickstart;
pub mod recommend;
pub mod report;
pub mod sr;
pub mod tune;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "llara",
    version,
    about = "LLaRA end to end: datasets, sequential recommenders, LLM prompt tuning, evaluation",
    propagate_version = true
)]
pub struct Cli {
    /// TOML file whose keys mirror the command's flags; flags on the command line win.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only print warnings and errors.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the pipeline on the embedded synthetic default (no network, no downloads).
    Quickstart(quickstart::QuickstartArgs),
    /// Build, generate and inspect dataset folders.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a sequential recommender (SASRec, GRU4Rec, Caser) and score it on the fixed candidates.
    TrainSr(Box<sr::TrainSrArgs>),
    /// Score a trained recommender (a train-sr run or LLaRA's released weights) on a dataset's candidates.
    EvalSr(sr::EvalSrArgs),
    /// LLaRA curriculum prompt tuning: LoRA + projector on a backbone, with a frozen recommender.
    Tune(Box<tune::TuneArgs>),
    /// Generation-based evaluation of a tune run (ValidRatio, HitRatio@1).
    Eval(tune::EvalArgs),
    /// Rank candidates for one user (or many: JSON lines on stdin) with a tuned run.
    Recommend(recommend::RecommendArgs),
    /// One table of every metric for recommender and LLaRA runs on the same candidate sets.
    Report(report::ReportArgs),
    /// Load a Llama-family backbone: info, generation, logits for parity checks.
    #[command(subcommand)]
    Llm(llm::LlmCommand),
}

/// Parses `args` (the program name first), applying `--config`.
pub fn parse(args: Vec<OsString>) -> Result<Cli> {
    let cmd = config::command_with_config(Cli::command(), &args)?;
    let matches = match cmd.try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => e.exit(),
    };
    Ok(Cli::from_arg_matches(&matches)?)
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Quickstart(a) => quickstart::run(a),
        Command::Data(cmd) => data::run(cmd),
        Command::TrainSr(a) => sr::train_sr(*a),
        Command::EvalSr(a) => sr::eval_sr(a),
        Command::Llm(cmd) => llm::run(cmd),
        Command::Tune(a) => tune::run_tune(*a, cli.quiet),
        Command::Eval(a) => tune::run_eval(a, cli.quiet),
        Command::Recommend(a) => recommend::run(a),
        Command::Report(a) => report::run(a),
    }
}
