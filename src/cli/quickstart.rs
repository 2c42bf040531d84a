//! `llara quickstart`: the pipeline on the embedded default, no network and no files from elsewhere.
//! A synthetic dataset, a SASRec trained and scored on its fixed candidate sets, then two tunings of
//! the built-in tiny random backbone: the recommended hybrid setting (behaviour tokens, a scoring
//! head that starts from the recommender's scores) and text-only tuning (titles only), both
//! evaluated by candidate scoring on the same candidates, next to SASRec and popularity.

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
    /// Training rows for each LLaRA run (a seeded subset).
    #[arg(long, default_value_t = 128)]
    pub tune_samples: usize,
}

fn step(args: &[OsString]) -> Result<()> {
    let mut argv: Vec<OsString> = vec!["llara".into()];
    argv.extend_from_slice(args);
    super::run(super::parse(argv)?, &llara::comm::single::Single)
}

pub fn run(a: QuickstartArgs) -> Result<()> {
    let data = a.out.join("data");
    let sasrec = a.out.join("sasrec");
    let seed = a.seed.to_string();
    println!("== 1/6  llara data synth --out {}", data.display());
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
        "== 2/6  llara train-sr --model sasrec --data {} --out {}",
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
    let samples = a.tune_samples.to_string();
    let common: Vec<OsString> = [
        "--data".into(),
        data.clone().into_os_string(),
        "--sr".into(),
        sasrec.clone().into_os_string(),
        "--llm".into(),
        "builtin:tiny".into(),
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
    ]
    .into();
    // The recommended setting (see README.md), and text-only tuning with the same head and loss.
    let hybrid = a.out.join("llara-hybrid");
    let text = a.out.join("llara-text-only");
    let runs: [(&str, &PathBuf, &[&str]); 2] = [
        (
            "3/6",
            &hybrid,
            &[
                "--curriculum",
                "hybrid-only",
                "--objective",
                "both",
                "--head-prior",
                "--user-token",
                "--cand-emb",
                "output",
            ],
        ),
        (
            "4/6",
            &text,
            &["--curriculum", "text-only", "--objective", "both"],
        ),
    ];
    for (n, run, flags) in runs {
        println!(
            "== {n}  llara tune --llm builtin:tiny {} --out {}",
            flags.join(" "),
            run.display()
        );
        let mut argv: Vec<OsString> = vec!["tune".into()];
        argv.extend(common.iter().cloned());
        argv.extend(flags.iter().map(OsString::from));
        argv.extend(["--out".into(), run.clone().into_os_string()]);
        step(&argv)?;
    }
    println!(
        "== 5/6  llara eval --mode score (both runs, all test rows); generation for the hybrid run"
    );
    for run in [&hybrid, &text] {
        step(&[
            "eval".into(),
            "--run".into(),
            run.clone().into(),
            "--split".into(),
            "test".into(),
            "--mode".into(),
            "score".into(),
        ])?;
    }
    step(&[
        "eval".into(),
        "--run".into(),
        hybrid.clone().into(),
        "--split".into(),
        "test".into(),
        "--limit".into(),
        "32".into(),
        "--max-new-tokens".into(),
        "32".into(),
    ])?;
    let popularity = a.out.join("popularity");
    step(&[
        "eval-sr".into(),
        "--model".into(),
        "popularity".into(),
        "--data".into(),
        data.clone().into(),
        "--out".into(),
        popularity.clone().into(),
    ])?;
    println!(
        "== 6/6  llara report {} {} {} {}",
        sasrec.display(),
        popularity.display(),
        hybrid.display(),
        text.display()
    );
    step(&[
        "report".into(),
        sasrec.clone().into(),
        popularity.into(),
        hybrid.clone().into(),
        text.clone().into(),
    ])?;
    let hr1 = |p: PathBuf| -> Option<f64> {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v.get("test").unwrap_or(&v).get("hr@1")?.as_f64()
    };
    let (h, t, s) = (
        hr1(hybrid.join("eval-test-score/metrics.json")),
        hr1(text.join("eval-test-score/metrics.json")),
        hr1(sasrec.join("metrics.json")),
    );
    let k = llara::data::Dataset::open(&data)
        .map(|d| d.meta.candidates)
        .unwrap_or(20);
    if let (Some(h), Some(t), Some(s)) = (h, t, s) {
        println!(
            "LLaRA hybrid HR@1 {h:.2} ({:.0}% of its SASRec's {s:.2}) vs text-only {t:.2}; chance is {:.2}.",
            100.0 * h / s.max(1e-9),
            1.0 / k.max(1) as f64
        );
    }
    println!(
        "The backbone here is a tiny random model: the hybrid run ranks by what the behaviour tokens and the recommender prior carry, text-only by titles alone. The same commands take a real LLM, e.g. `--llm ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf` (see README.md). Data: `llara data stats {}`.",
        data.display()
    );
    Ok(())
}
