//! `llara data …`: prepare, synth, stats.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use llara::data::sources::{self, interactions, synth::SynthOptions};
use llara::data::split::SplitMethod;
use llara::data::{
    folder, stats, Dataset, PrepareOptions, DEFAULT_CANDIDATES, DEFAULT_MIN_HISTORY,
};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Turn a source (LLaRA's JSONL splits, raw MovieLens-100K, any interactions CSV) into a dataset folder.
    Prepare(Box<PrepareArgs>),
    /// Generate a synthetic dataset with sequential structure (no download needed).
    Synth(SynthArgs),
    /// Summarise a dataset folder.
    Stats(StatsArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// LLaRA's processed splits: SRC/items.tsv and SRC/{train,valid,test}.jsonl.
    LlaraJsonl,
    /// Raw GroupLens MovieLens-100K: SRC/u.data and SRC/u.item, split by LLaRA's recipe.
    #[value(name = "movielens-100k")]
    #[serde(rename = "movielens-100k")]
    Movielens100k,
    /// Any interactions CSV/TSV (--interactions) with an items CSV/TSV (--items).
    Interactions,
}

/// Options every dataset writer shares.
#[derive(Args, Debug, Clone, Serialize)]
pub struct WriteArgs {
    /// Output dataset folder (written to a temporary folder and renamed at the end).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Drop rows whose history has fewer items, in every split (LLaRA: 3).
    #[arg(long, default_value_t = DEFAULT_MIN_HISTORY)]
    pub min_history: usize,
    /// Candidates per valid/test row, the target included.
    #[arg(long, default_value_t = DEFAULT_CANDIDATES)]
    pub candidates: usize,
    /// Seed of the candidate sets (and of the generator for `synth`).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Replace the output folder if it exists.
    #[arg(long)]
    #[serde(skip)]
    pub force: bool,
    /// Worker threads (the output does not depend on it).
    #[arg(long)]
    #[serde(skip)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct PrepareArgs {
    /// Kind of source.
    #[arg(long, value_enum)]
    pub from: Source,
    /// Source folder (llara-jsonl, movielens-100k).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<PathBuf>,
    /// Interactions CSV/TSV with columns user,item,timestamp[,rating] (--from interactions).
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interactions: Option<PathBuf>,
    /// Items CSV/TSV with columns item,title (--from interactions).
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<PathBuf>,
    /// How to split users' sequences (--from interactions).
    #[arg(long, value_parser = super::named::<SplitMethod>(), default_value = "user-time")]
    pub split: SplitMethod,
    /// Keep interactions rated at least this (movielens-100k: 3; interactions: no filter).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_rating: Option<f64>,
    /// Column of the user id in --interactions.
    #[arg(long, default_value = "user")]
    pub user_col: String,
    /// Column of the item id in --interactions.
    #[arg(long, default_value = "item")]
    pub item_col: String,
    /// Column of the unix timestamp in --interactions.
    #[arg(long, default_value = "timestamp")]
    pub time_col: String,
    /// Column of the rating in --interactions (read only with --min-rating).
    #[arg(long, default_value = "rating")]
    pub rating_col: String,
    /// Column of the item id in --items.
    #[arg(long, default_value = "item")]
    pub item_id_col: String,
    /// Column of the title in --items.
    #[arg(long, default_value = "title")]
    pub title_col: String,
    /// Field delimiter of the CSV files (default: tab for .tsv, else comma).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<char>,
    /// Dataset name (default: the source folder's or file's name).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The noun prompts use for an item (default: from the name: movie, game, music artist, item).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct SynthArgs {
    /// Users to simulate.
    #[arg(long, default_value_t = SynthOptions::default().users)]
    pub users: usize,
    /// Items in the catalogue.
    #[arg(long, default_value_t = SynthOptions::default().items)]
    pub items: usize,
    /// Genres (1..=8).
    #[arg(long, default_value_t = SynthOptions::default().genres)]
    pub genres: usize,
    /// Fewest interactions per user.
    #[arg(long, default_value_t = SynthOptions::default().min_len)]
    pub min_len: usize,
    /// Most interactions per user.
    #[arg(long, default_value_t = SynthOptions::default().max_len)]
    pub max_len: usize,
    /// Probability that a user's next item is a successor of the current one.
    #[arg(long, default_value_t = SynthOptions::default().follow)]
    pub follow: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StatsArgs {
    /// Dataset folder.
    pub dir: PathBuf,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T> {
    match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build()?;
            Ok(pool.install(f))
        }
        None => Ok(f()),
    }
}

fn config_toml<T: Serialize>(command: &str, args: &T) -> Result<String> {
    let body = toml::to_string(args).context("serializing the run's config")?;
    Ok(format!(
        "# The exact options of this run: `llara {command} --config config.toml` reproduces it.\n{body}"
    ))
}

fn write_prepared(prepared: &llara::data::Prepared, w: &WriteArgs, config: &str) -> Result<()> {
    let opts = PrepareOptions {
        min_history: w.min_history,
        candidates: w.candidates,
        seed: w.seed,
    };
    let meta = with_threads(w.threads, || {
        folder::write(prepared, &opts, &w.out, w.force, config)
    })??;
    println!(
        "wrote {}: {} {} items ({}), rows train {} / valid {} / test {} (min history {}), {} candidates per row",
        w.out.display(),
        meta.n_items,
        meta.domain,
        meta.name,
        meta.rows.train,
        meta.rows.valid,
        meta.rows.test,
        meta.min_history,
        meta.candidates
    );
    Ok(())
}

fn prepare(mut a: PrepareArgs) -> Result<()> {
    if a.from == Source::Movielens100k && a.min_rating.is_none() {
        a.min_rating = Some(3.0); // LLaRA's recipe
    }
    let need_src = |what: &str| -> Result<PathBuf> {
        a.src
            .clone()
            .with_context(|| format!("--from {what} needs the source folder SRC"))
    };
    let prepared = match a.from {
        Source::LlaraJsonl => {
            let src = need_src("llara-jsonl")?;
            let name = a.name.clone().unwrap_or_else(|| sources::name_of(&src));
            let domain = a
                .domain
                .clone()
                .unwrap_or_else(|| sources::domain_for(&name).to_string());
            sources::llara_jsonl::load(&src, &name, &domain)?
        }
        Source::Movielens100k => {
            let src = need_src("movielens-100k")?;
            let mut p = sources::movielens::load(&src, a.min_rating.unwrap_or(3.0))?;
            if let Some(n) = &a.name {
                p.name = n.clone();
            }
            if let Some(d) = &a.domain {
                p.domain = d.clone();
            }
            p
        }
        Source::Interactions => {
            if a.src.is_some() {
                bail!("--from interactions takes --interactions FILE and --items FILE, not SRC");
            }
            let ints = a
                .interactions
                .clone()
                .context("--from interactions needs --interactions FILE (columns user,item,timestamp[,rating])")?;
            let items = a
                .items
                .clone()
                .context("--from interactions needs --items FILE (columns item,title)")?;
            let delimiter = match a.delimiter {
                None => None,
                Some(c) if c.is_ascii() => Some(c as u8),
                Some(c) => bail!("--delimiter must be one ASCII character, got {c:?}"),
            };
            let name = a.name.clone().unwrap_or_else(|| {
                ints.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "dataset".into())
            });
            let domain = a
                .domain
                .clone()
                .unwrap_or_else(|| sources::domain_for(&name).to_string());
            let opts = interactions::Options {
                columns: interactions::Columns {
                    user: a.user_col.clone(),
                    item: a.item_col.clone(),
                    time: a.time_col.clone(),
                    rating: a.rating_col.clone(),
                    item_id: a.item_id_col.clone(),
                    title: a.title_col.clone(),
                    delimiter,
                },
                split: a.split,
                min_rating: a.min_rating,
                name,
                domain,
            };
            interactions::load(&ints, &items, &opts)?
        }
    };
    let config = config_toml("data prepare", &a)?;
    write_prepared(&prepared, &a.write, &config)
}

fn synth(a: SynthArgs) -> Result<()> {
    let o = SynthOptions {
        users: a.users,
        items: a.items,
        genres: a.genres,
        min_len: a.min_len,
        max_len: a.max_len,
        follow: a.follow,
        seed: a.write.seed,
    };
    let prepared = llara::data::sources::synth::generate(&o)?;
    let config = config_toml("data synth", &a)?;
    write_prepared(&prepared, &a.write, &config)
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare(a) => prepare(*a),
        DataCommand::Synth(a) => synth(a),
        DataCommand::Stats(a) => {
            let ds = Dataset::open(&a.dir)?;
            let s = stats::compute(&ds);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.render());
            }
            Ok(())
        }
    }
}
