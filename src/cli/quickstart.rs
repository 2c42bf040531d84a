//! `llara quickstart`: the pipeline on the embedded default, no network and no files from elsewhere.
//! A synthetic dataset, a SASRec trained and scored on its fixed candidate sets, then LLaRA's
//! curriculum prompt tuning of the built-in tiny random backbone on it, and generation-based
//! evaluation (the whole pipeline, in about a minute; the numbers say nothing about real LLMs).

use anyhow::Result;
use clap::Args;
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct QuickstartArgs {
    /// Output folder (its `data/` and `sasrec/` are replaced).
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    /// Seed of the dataset and the model.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// SASRec training epochs.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Training rows for the LLaRA stage (a seeded subset).
    #[arg(long, default_value_t = 256)]
    pub tune_samples: usize,
}

fn step(args: &[OsString]) -> Result<()> {
    let mut argv: Vec<OsString> = vec!["llara".into()];
    argv.extend_from_slice(args);
    super::run(super::parse(argv)?)
}

pub fn run(a: QuickstartArgs) -> Result<()> {
    let data = a.out.join("data");
    let sasrec = a.out.join("sasrec");
    let seed = a.seed.to_string();
    println!("== 1/5  llara data synth --out {}", data.display());
    step(&[
        "data".into(),
        "synth".into(),
        "--out".into(),
        data.clone().into(),
        "--seed".into(),
        seed.clone().into(),
        "--force".into(),
    ])?;
    println!(
        "== 2/5  llara train-sr --model sasrec --data {} --out {}",
        data.display(),
        sasrec.display()
    );
    step(&[
        "train-sr".into(),
        "--data".into(),
        data.clone().into(),
        "--model".into(),
        "sasrec".into(),
        "--epochs".into(),
        a.epochs.to_string().into(),
        "--patience".into(),
        "5".into(),
        "--seed".into(),
        seed.clone().into(),
        "--out".into(),
        sasrec.clone().into(),
        "--force".into(),
    ])?;
    let run = a.out.join("llara");
    println!(
        "== 3/5  llara tune --llm builtin:tiny --curriculum linear --data {} --sr {} --out {}",
        data.display(),
        sasrec.display(),
        run.display()
    );
    let samples = a.tune_samples.to_string();
    step(&[
        "tune".into(),
        "--data".into(),
        data.clone().into(),
        "--sr".into(),
        sasrec.clone().into(),
        "--llm".into(),
        "builtin:tiny".into(),
        "--out".into(),
        run.clone().into(),
        "--epochs".into(),
        "1".into(),
        "--batch-size".into(),
        "4".into(),
        "--grad-accum".into(),
        "2".into(),
        "--lr".into(),
        "5e-3".into(),
        "--max-train-samples".into(),
        samples.into(),
        "--valid-samples".into(),
        "16".into(),
        "--max-new-tokens".into(),
        "32".into(),
        "--seed".into(),
        seed.into(),
        "--force".into(),
    ])?;
    println!(
        "== 4/5  llara eval --run {} --split test --limit 32",
        run.display()
    );
    step(&[
        "eval".into(),
        "--run".into(),
        run.clone().into(),
        "--split".into(),
        "test".into(),
        "--limit".into(),
        "32".into(),
        "--max-new-tokens".into(),
        "32".into(),
    ])?;
    step(&[
        "eval".into(),
        "--run".into(),
        run.clone().into(),
        "--split".into(),
        "test".into(),
        "--limit".into(),
        "32".into(),
        "--mode".into(),
        "score".into(),
    ])?;
    println!(
        "== 5/5  llara report {} {}",
        sasrec.display(),
        run.display()
    );
    step(&["report".into(), sasrec.into(), run.into()])?;
    println!(
        "The backbone here is a tiny random model, so its HR@1 means nothing; the same commands take a real one, e.g. `--llm ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf` (see README.md). Data: `llara data stats {}`.",
        data.display()
    );
    Ok(())
}
