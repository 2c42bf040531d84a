//! The `llara` command line: clap derive, `anyhow` at the boundary.

pub mod config;
pub mod data;
pub mod eval;
pub mod llm;
pub mod progress;
pub mod quickstart;
pub mod recommend;
pub mod report;
pub mod rundir;
pub mod sr;
pub mod tune;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use llara::kernels::weight::Precision;
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
    Eval(eval::EvalArgs),
    /// Rank candidates for one user (or many: JSON lines on stdin) with a tuned run.
    Recommend(recommend::RecommendArgs),
    /// One table of every metric for recommender and LLaRA runs on the same candidate sets.
    Report(report::ReportArgs),
    /// Load a Llama-family backbone: info, generation, logits for parity checks.
    #[command(subcommand)]
    Llm(llm::LlmCommand),
}

/// Where and how models run: `--device`, `--dtype`, `--threads`, flattened into every command that
/// runs a model.
#[derive(clap::Args, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Frozen weights' dtype: f32, bf16 or f16 (default f32 on CPU, bf16 on CUDA). bf16 on the
    /// CPU: the projections' weights in bf16, multiplied by the bf16 GEMM (AVX512-BF16 where the
    /// CPU has it) under f32 activations. A GGUF block format (q8_0, q6_k, q5_k, q4_k, q4_0, …)
    /// keeps the projections quantized (a 7B model in q4_k: ~3.8 GB), the rest in bf16; gguf
    /// keeps a GGUF file's own blocks. Adapters on blocks are not merged. The recommenders
    /// (train-sr, eval-sr) run in f32 only.
    #[arg(long)]
    pub dtype: Option<String>,
    /// CPU threads for tensor ops [default: 2; train-sr and eval-sr: 1, their models are small].
    #[arg(long)]
    pub threads: Option<usize>,
    /// auto: the fused CPU kernels for f32 activations on the CPU (f32 or bf16 weights); off: every
    /// op's composed version (the path a GPU takes), to check its results, gradients and memory on
    /// the CPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
    #[serde(skip)]
    pub fused: String,
}

impl DeviceArgs {
    /// Sizes the CPU thread pools (`--threads`, else `default`) before the first tensor op and
    /// returns the device.
    pub fn start(&self, default_threads: usize) -> Result<candle_core::Device> {
        set_threads(self.threads.unwrap_or(per_rank(default_threads)))?;
        llara::kernels::set_fused(self.fused != "off");
        Ok(llara::device::parse(&self.device)?)
    }

    /// `--dtype`, parsed.
    pub fn dtype(&self) -> Result<Option<Precision>> {
        self.dtype.as_deref().map(parse_dtype).transpose()
    }

    /// Refuses a `--dtype` other than f32 (the recommenders' commands).
    pub fn f32_only(&self) -> Result<()> {
        match self.dtype()? {
            None => Ok(()),
            Some(p) if p == candle_core::DType::F32.into() => Ok(()),
            Some(_) => anyhow::bail!(
                "--dtype {}: the recommenders run in f32 only",
                self.dtype.as_deref().unwrap_or_default()
            ),
        }
    }
}

fn parse_dtype(s: &str) -> Result<Precision> {
    Precision::parse(s).ok_or_else(|| {
        let blocks: Vec<&str> = llara::kernels::weight::quantized::FORMATS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        anyhow::anyhow!(
            "--dtype {s}: expected f32, bf16, f16, a block format ({}) or gguf (a GGUF file's own blocks)",
            blocks.join(", ")
        )
    })
}

/// Sets the size of candle's CPU thread pools; must run before the first tensor op.
/// A thread count meant for the machine, shared by the ranks a launcher started on this node.
pub fn per_rank(threads: usize) -> usize {
    let local = llara::comm::Launch::from_env().map_or(1, |l| l.local_size);
    (threads / local).max(1)
}

fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        anyhow::bail!("--threads must be at least 1");
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

/// A library enum with a fixed set of names (`ALL`, `name`), parsed from a flag with its names
/// listed in `--help` and in the error for an unknown one.
pub trait Named: Copy + Send + Sync + 'static {
    fn all() -> &'static [Self];
    fn name(self) -> &'static str;
}

/// clap's parser for a [`Named`] enum.
pub fn named<T: Named>() -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(T::all().iter().map(|v| v.name())).map(|s| {
        *T::all()
            .iter()
            .find(|v| v.name() == s)
            .expect("PossibleValuesParser accepts only these names")
    })
}

macro_rules! named {
    ($($t:ty),*) => {$(
        impl Named for $t {
            fn all() -> &'static [Self] {
                &<$t>::ALL
            }
            fn name(self) -> &'static str {
                <$t>::name(self)
            }
        }
    )*};
}
named!(
    llara::sr::Arch,
    llara::sr::train::Loss,
    llara::data::split::SplitMethod,
    llara::eval::metrics::Selection
);

/// Parses `args` (the program name first), applying `--config`. `--help`, `--version` and bad
/// flags come back as a [`clap::Error`] inside the error.
pub fn parse(args: Vec<OsString>) -> Result<Cli> {
    let cmd = config::command_with_config(Cli::command(), &args)?;
    // A clap error (including --help and --version) is returned as is, for the binary to print
    // and exit with clap's status.
    let matches = cmd.try_get_matches_from(args)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// Runs the command in this process, one of `comm`'s ranks. Only `tune`, `eval` and `recommend`
/// are data parallel; the others refuse to run under a launcher that started several processes
/// (N copies would write over each other).
pub fn run(cli: Cli, comm: &dyn llara::comm::Communicator) -> Result<()> {
    let parallel = matches!(
        cli.command,
        Command::Tune(_) | Command::Eval(_) | Command::Recommend(_)
    );
    if comm.size() > 1 && !parallel {
        anyhow::bail!(
            "this command runs in one process, and the launcher started {} (only tune, eval and \
             recommend run data parallel under mpirun/srun)",
            comm.size()
        );
    }
    match cli.command {
        Command::Quickstart(a) => quickstart::run(a),
        Command::Data(cmd) => data::run(cmd),
        Command::TrainSr(a) => sr::train_sr(*a),
        Command::EvalSr(a) => sr::eval_sr(a),
        Command::Llm(cmd) => llm::run(cmd),
        Command::Tune(a) => tune::run_tune(*a, cli.quiet, comm),
        Command::Eval(a) => eval::run_eval(a, cli.quiet, comm),
        Command::Recommend(a) => recommend::run(a, comm),
        Command::Report(a) => report::run(a),
    }
}
