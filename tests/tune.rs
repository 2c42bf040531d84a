//! `llara tune` / `llara eval` on tiny configurations: synthetic data, the built-in tiny random
//! Llama, a recommender trained for a few epochs.

mod common;

use candle_core::Tensor;
use common::{fails, log_lines, ok};
use llara::data::Dataset;
use llara::llara::batch::answer_targets;
use llara::llara::projector::Projector;
use llara::llara::prompts::AnswerFormat;
use llara::llara::prompts::{ItemView, Templates};
use llara::llara::tune::{self, draw_step, RunDir, RunState, Setup, Start, TuneOptions};
use llara::llara::{embed_batch, Behaviour, CandEmb, Curriculum, Example, PromptKit, Recommender};
use llara::llm::{self, LlmOptions, LoraConfig, Target};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A synthetic dataset and a SASRec trained on it, built once per test binary.
fn fixture() -> &'static (PathBuf, PathBuf) {
    static F: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("llara-tune-fixture-{}", std::process::id()));
        let data = dir.join("data");
        let sr = dir.join("sr");
        ok(&[
            "data",
            "synth",
            "--users",
            "60",
            "--items",
            "40",
            "--candidates",
            "5",
            "--out",
            data.to_str().unwrap(),
            "--force",
        ]);
        ok(&[
            "train-sr",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "2",
            "--hidden",
            "16",
            "--out",
            sr.to_str().unwrap(),
            "--force",
        ]);
        (data, sr)
    })
}

fn short_templates() -> Templates {
    Templates::parse(
        "[HistoryHere] | [CansHere] ->\n---\nH [HistoryHere] C ([N]) [CansHere] ->",
        "test",
    )
    .unwrap()
}

fn recommender(sr: &Path) -> Recommender {
    let (m, cfg) = llara::sr::load_model(sr, &candle_core::Device::Cpu).unwrap();
    Recommender::new(m, cfg).unwrap()
}

#[test]
fn linear_curriculum_tracks_tau_over_t() {
    let total = 4000;
    let hard: Vec<bool> = (0..total)
        .map(|s| draw_step(Curriculum::Linear, 7, s, total, 0).1)
        .collect();
    for q in 0..4 {
        let part = &hard[q * 1000..(q + 1) * 1000];
        let frac = part.iter().filter(|&&h| h).count() as f64 / 1000.0;
        let mean_p = (q as f64 + 0.5) / 4.0;
        assert!(
            (frac - mean_p).abs() < 0.06,
            "quarter {q}: {frac} vs {mean_p}"
        );
    }
    assert!(!draw_step(Curriculum::Linear, 7, 0, total, 0).1, "p(0) = 0");
    let count = |c: Curriculum, epoch_of: &dyn Fn(usize) -> usize| {
        (0..1000)
            .filter(|&s| draw_step(c, 3, s, 1000, epoch_of(s)).1)
            .count()
    };
    assert_eq!(count(Curriculum::TextOnly, &|_| 0), 0);
    assert_eq!(count(Curriculum::HybridOnly, &|_| 0), 1000);
    assert_eq!(count(Curriculum::TwoStage(1), &|s| s / 250), 750);
    let mixed = count(Curriculum::Mixed(0.3), &|_| 0) as f64 / 1000.0;
    assert!((mixed - 0.3).abs() < 0.05, "{mixed}");
    // p(τ) = τ/T, and the linear schedule ignores the epoch.
    assert!((draw_step(Curriculum::Linear, 7, 1000, total, 0).0 - 0.25).abs() < 1e-12);
    assert_eq!(draw_step(Curriculum::Linear, 7, 123, total, 5).1, hard[123]);
    // The draw is keyed by the seed: another seed draws other steps with the same statistics.
    let other: Vec<bool> = (0..total)
        .map(|s| draw_step(Curriculum::Linear, 8, s, total, 0).1)
        .collect();
    let agree = hard.iter().zip(&other).filter(|(a, b)| a == b).count();
    assert!(
        agree < total * 9 / 10,
        "seeds 7 and 8 agree on {agree} of {total} steps"
    );
    let hard_other = other.iter().filter(|&&h| h).count() as f64 / total as f64;
    assert!((hard_other - 0.5).abs() < 0.05, "{hard_other}");
}

#[test]
fn loss_covers_the_answer_tokens_only() {
    let (data, _) = fixture();
    let ds = Dataset::open(data).unwrap();
    let l = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
    let templates = Templates::for_domain(&ds.meta.domain);
    let kit = PromptKit {
        tok: &l.tokenizer,
        templates: &templates,
        titles: &ds.titles,
        user_token: false,
        answer: AnswerFormat::Title,
    };
    let row = &ds.splits.train[0];
    let ex = Example {
        history: row.history.clone(),
        candidates: vec![row.next, 1, 2],
        target: row.next,
        template: 1,
    };
    let a = kit.tokenize(&ex, ItemView::Text, true).unwrap();
    let b = kit
        .tokenize(
            &Example {
                template: 2,
                ..ex.clone()
            },
            ItemView::Text,
            true,
        )
        .unwrap();
    let t = a.ids.len().max(b.ids.len());
    let (pos, targets) = answer_targets(&[&a, &b], t);
    // Targets are exactly the answer tokens (" title\n"), predicted from the position before each.
    let na = a.ids.len() - a.answer_start;
    assert_eq!(&targets[..na], &a.ids[a.answer_start..]);
    assert_eq!(&targets[na..], &b.ids[b.answer_start..]);
    assert_eq!(
        l.tokenizer.decode(&targets[..na]).unwrap(),
        format!(" {}\n", ds.titles[row.next as usize])
    );
    assert_eq!(pos[0], a.answer_start - 1);
    assert_eq!(pos[na], t + b.answer_start - 1);
    assert!(pos.iter().all(|&p| p % t < t - 1
        || p / t == 0 && a.ids.len() == t
        || p / t == 1 && b.ids.len() == t));
    // Changing a prompt token never changes what is scored.
    let mut c = a.clone();
    c.ids[3] = (c.ids[3] + 1) % 200;
    assert_eq!(
        answer_targets(&[&c], c.ids.len()).1,
        answer_targets(&[&a], a.ids.len()).1
    );
    // Without an answer the prompt tokenizes the same as the answer's prefix.
    let p = kit.tokenize(&ex, ItemView::Text, false).unwrap();
    assert_eq!(p.ids[..], a.ids[..a.answer_start]);
}

#[test]
fn placeholders_carry_the_projected_recommender_rows() {
    let (data, sr) = fixture();
    let ds = Dataset::open(data).unwrap();
    let l = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
    let rec = recommender(sr);
    let table = rec.item_embeddings.clone();
    let projector = Projector::new(
        table.dim(1).unwrap(),
        64,
        1,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let templates = short_templates();
    let kit = PromptKit {
        tok: &l.tokenizer,
        templates: &templates,
        titles: &ds.titles,
        user_token: false,
        answer: AnswerFormat::Title,
    };
    let ex = Example {
        history: vec![3, 5, 7],
        candidates: vec![9, 3],
        target: 9,
        template: 0,
    };
    for view in [ItemView::Hybrid, ItemView::IdOnly] {
        let tk = kit.tokenize(&ex, view, true).unwrap();
        assert_eq!(tk.slot_items, vec![3, 5, 7, 9, 3]);
        let behaviour = Behaviour {
            rec: &rec,
            cand_emb: CandEmb::Input,
            projector: &projector,
        };
        let (x, _) = embed_batch(&l.model, &[&tk], |t| t.ids.len(), Some(&behaviour)).unwrap();
        let x = x.squeeze(0).unwrap();
        let slots: Vec<usize> = tk
            .ids
            .iter()
            .enumerate()
            .filter(|(_, &i)| i == 261 || i == 262)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(slots.len(), 5);
        let idx = Tensor::new(&[3u32, 5, 7, 9, 3], &candle_core::Device::Cpu).unwrap();
        let want = projector
            .forward(&table.index_select(&idx, 0).unwrap())
            .unwrap();
        for (k, &p) in slots.iter().enumerate() {
            let got: Vec<f32> = x.get(p).unwrap().to_vec1().unwrap();
            let w: Vec<f32> = want.get(k).unwrap().to_vec1().unwrap();
            assert_eq!(got, w, "slot {k}");
        }
    }
    // A title containing a placeholder would shift the items: an error, not a silent mismatch.
    let mut titles = ds.titles.clone();
    titles[3] = "Trick [CansEmb]".into();
    let kit = PromptKit {
        tok: &l.tokenizer,
        templates: &templates,
        titles: &titles,
        user_token: false,
        answer: AnswerFormat::Title,
    };
    let e = kit.tokenize(&ex, ItemView::Hybrid, true).unwrap_err();
    assert!(
        matches!(e, llara::llara::prompts::PromptError::Mismatch(_)),
        "{e}"
    );
    assert!(e.to_string().contains("placeholders"), "{e}");
}

fn tiny_opts(curriculum: Curriculum) -> TuneOptions {
    TuneOptions {
        curriculum,
        objective: tune::Objective::Generative,
        ranker: tune::Ranker::Head,
        answer: AnswerFormat::Title,
        head: None,
        user_token: false,
        cand_emb: CandEmb::Input,
        projector_warmup: 0,
        epochs: 1,
        batch_size: 4,
        grad_accum: 1,
        lr: 3e-3,
        head_lr: None,
        min_lr: 1e-4,
        projector_weight_decay: 1e-5,
        max_grad_norm: Some(1.0),
        lora: LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            rslora: false,
        },
        max_train_samples: Some(4),
        max_steps: None,
        stop_after: None,
        eval_every: None,
        valid_samples: Some(0),
        template: 0,
        eval_batch_size: 4,
        max_new_tokens: 40,
        seed: 5,
        checkpoint_layers: false,
        checkpoint_every: None,
        checkpoint_minutes: 0.0,
        max_bad_steps: 0,
    }
}

#[test]
fn a_tiny_run_overfits_a_handful_of_examples() {
    let (data, sr) = fixture();
    let mut ds = Dataset::open(data).unwrap();
    // Short distinct titles: a byte-level random backbone this small cannot count repeated
    // letters ("Horror"), which is not what this test is about.
    const WORDS: [&str; 40] = [
        "ant", "bear", "cat", "dog", "eagle", "fox", "goat", "hawk", "ibis", "jay", "kiwi", "lion",
        "mole", "newt", "owl", "puma", "quail", "rat", "seal", "toad", "urial", "viper", "wolf",
        "yak", "zebra", "crab", "dingo", "elk", "frog", "gnu", "hare", "koala", "lynx", "mink",
        "orca", "panda", "raven", "sloth", "tiger", "whale",
    ];
    ds.titles = WORDS.iter().map(|w| w.to_string()).collect();
    let mut l = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
    let rec = recommender(sr);
    let table = rec.item_embeddings.clone();
    let templates = short_templates();
    let opts = TuneOptions {
        epochs: 100,
        lr: 1e-2,
        ..tiny_opts(Curriculum::Linear)
    };
    llm::lora::add_adapters(&mut l.model, &opts.lora, opts.seed).unwrap();
    let projector = Projector::new(
        table.dim(1).unwrap(),
        64,
        opts.seed,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir {
        dir: tmp.path().to_path_buf(),
    };
    let setup = Setup {
        model: &mut l.model,
        tok: &l.tokenizer,
        templates: &templates,
        ds: &ds,
        rec: &rec,
        llm_name: "builtin:tiny",
        comm: &llara::comm::single::Single,
    };
    let state = tune::tune(setup, Start::fresh(projector, None), &opts, &run, &mut ()).unwrap();
    assert!(state.finished);
    // The trained weights, scored by generation on the same rows with fixed candidates.
    let mut fresh = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
    let (projector, _) =
        tune::load_weights(&mut fresh.model, tmp.path(), table.dim(1).unwrap(), None).unwrap();
    let rows = tune::training_rows(&ds, &opts);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let examples: Vec<(usize, Example)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let candidates = tune::sample_candidates(r, ds.n_items(), 5, &mut rng);
            (
                i,
                Example {
                    history: r.history.clone(),
                    candidates,
                    target: r.next,
                    template: 0,
                },
            )
        })
        .collect();
    let kit = PromptKit {
        tok: &fresh.tokenizer,
        templates: &templates,
        titles: &ds.titles,
        user_token: false,
        answer: AnswerFormat::Title,
    };
    let behaviour = Behaviour {
        rec: &rec,
        cand_emb: CandEmb::Input,
        projector: &projector,
    };
    let eopts = llara::llara::evaluate::EvalOptions {
        view: ItemView::Hybrid,
        template: 0,
        batch_size: 4,
        max_new_tokens: 40,
        constrained: false,
        shard: Default::default(),
    };
    let (preds, m) = llara::llara::evaluate::evaluate_split(
        &fresh.model,
        &kit,
        Some(&behaviour),
        &examples,
        &eopts,
        |_| {},
    )
    .unwrap();
    assert_eq!(
        m.hr1,
        1.0,
        "{:#?}",
        preds
            .iter()
            .map(|p| (&p.output, &p.target_title))
            .collect::<Vec<_>>()
    );
    let log = std::fs::read_to_string(tmp.path().join("train_log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert!(losses.last().unwrap() < &(losses[0] / 10.0), "{losses:?}");
}

fn tune_args<'a>(data: &'a str, sr: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "tune",
        "--data",
        data,
        "--sr",
        sr,
        "--llm",
        "builtin:tiny",
        "--out",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "5e-3",
        "--max-train-samples",
        "12",
        "--valid-samples",
        "3",
        "--max-new-tokens",
        "8",
        "--lora-dropout",
        "0.1",
        "--seed",
        "9",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn resuming_continues_bit_for_bit() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let straight = tmp.path().join("straight");
    let parts = tmp.path().join("parts");
    ok(&tune_args(d, s, straight.to_str().unwrap(), &[]));
    // Stop after 2 of the 6 steps (mid-epoch), then twice more via --resume.
    let out = ok(&tune_args(
        d,
        s,
        parts.to_str().unwrap(),
        &["--stop-after", "2"],
    ));
    assert!(out.contains("--resume"), "{out}");
    ok(&[
        "tune",
        "--resume",
        parts.to_str().unwrap(),
        "--stop-after",
        "2",
    ]);
    ok(&["tune", "--resume", parts.to_str().unwrap()]);
    for f in [
        "adapter/adapter_model.safetensors",
        "projector.safetensors",
        "checkpoint/optimizer.safetensors",
    ] {
        assert_eq!(
            std::fs::read(straight.join(f)).unwrap(),
            std::fs::read(parts.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(log_lines(&straight), log_lines(&parts));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(parts.join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(m["steps"], 6);
    assert_eq!(m["finished"], true);
    // A finished run has nothing left to do.
    assert!(ok(&["tune", "--resume", parts.to_str().unwrap()]).contains("finished"));
    // The run folder records what it was built from.
    let toml = std::fs::read_to_string(parts.join("tune.toml")).unwrap();
    assert!(
        toml.contains("curriculum = \"linear\"") && toml.contains("seed = 9"),
        "{toml}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(parts.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["llm"], "builtin:tiny");
    assert_eq!(info["sr_sha256"].as_str().unwrap().len(), 64);
}

/// `--dtype bf16` on the CPU: a short run follows the f32 run's losses within 2% at every step,
/// and repeats itself byte for byte from the same seed.
#[test]
fn a_bf16_run_follows_the_f32_losses_and_repeats_bit_for_bit() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        ok(&tune_args(d, s, out.to_str().unwrap(), extra));
        out
    };
    let f32_run = run("f32", &[]);
    let a = run("bf16-a", &["--dtype", "bf16"]);
    let b = run("bf16-b", &["--dtype", "bf16"]);
    for f in ["adapter/adapter_model.safetensors", "projector.safetensors"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    let loss = |run: &Path| -> Vec<f64> {
        log_lines(run)
            .iter()
            .map(|v| v["loss"].as_f64().unwrap())
            .collect()
    };
    let (x, y) = (loss(&f32_run), loss(&a));
    assert_eq!(x.len(), y.len());
    assert!(x.len() >= 6);
    for (p, q) in x.iter().zip(&y) {
        assert!((p - q).abs() <= 0.02 * p.abs(), "f32 {x:?}\nbf16 {y:?}");
    }
    let toml = std::fs::read_to_string(a.join("tune.toml")).unwrap();
    assert!(toml.contains("dtype = \"bf16\""), "{toml}");
    // Evaluation runs in the run's own dtype unless told otherwise, and says which.
    let eval = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["eval", "--run", a.to_str().unwrap(), "--split", "test"];
        args.extend_from_slice(&["--limit", "2", "--mode", "score", "--json"]);
        args.extend_from_slice(extra);
        serde_json::from_str(ok(&args).lines().last().unwrap()).unwrap()
    };
    assert_eq!(eval(&[])["dtype"], "bf16");
    assert_eq!(eval(&["--dtype", "f32"])["dtype"], "f32");
}

/// `--dtype q8_0` / `q4_0`: the projections kept in GGUF blocks (the rest in bf16), the adapters
/// trained through the tiles' input gradient: the losses follow the f32 run's, two runs write the
/// same bytes, and evaluation (both modes: the adapters stay unmerged) names the format. `gguf`
/// on a backbone that is not a GGUF file is refused by flag.
#[test]
fn a_block_format_run_follows_the_f32_losses_and_repeats_bit_for_bit() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        ok(&tune_args(d, s, out.to_str().unwrap(), extra));
        out
    };
    let loss = |run: &Path| -> Vec<f64> {
        log_lines(run)
            .iter()
            .map(|v| v["loss"].as_f64().unwrap())
            .collect()
    };
    let x = loss(&run("f32", &[]));
    for (fmt, tol) in [("q8_0", 0.03), ("q4_0", 0.10)] {
        let a = run(&format!("{fmt}-a"), &["--dtype", fmt]);
        let b = run(&format!("{fmt}-b"), &["--dtype", fmt]);
        for f in ["adapter/adapter_model.safetensors", "projector.safetensors"] {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
                "{fmt}: {f}"
            );
        }
        assert_eq!(log_lines(&a), log_lines(&b), "{fmt}: logs");
        let y = loss(&a);
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(&y) {
            assert!(
                (p - q).abs() <= tol * p.abs(),
                "{fmt}: f32 {x:?}\n{fmt} {y:?}"
            );
        }
        for mode in ["score", "generate"] {
            let args = [
                "eval",
                "--run",
                a.to_str().unwrap(),
                "--split",
                "test",
                "--limit",
                "2",
                "--mode",
                mode,
                "--json",
            ];
            let v: serde_json::Value =
                serde_json::from_str(ok(&args).lines().last().unwrap()).unwrap();
            assert_eq!(v["dtype"], fmt, "{mode}: {v}");
        }
    }
    let out = tmp.path().join("gguf");
    let e = fails(&tune_args(
        d,
        s,
        out.to_str().unwrap(),
        &["--dtype", "gguf"],
    ));
    assert!(
        e.contains("--dtype gguf") && e.contains("not a GGUF file"),
        "{e}"
    );
    let out = tmp.path().join("bad");
    let e = fails(&tune_args(d, s, out.to_str().unwrap(), &["--dtype", "q3"]));
    assert!(e.contains("--dtype q3") && e.contains("q4_k"), "{e}");
}

#[test]
fn eval_writes_predictions_and_metrics() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (d, s, r) = (
        data.to_str().unwrap(),
        sr.to_str().unwrap(),
        run.to_str().unwrap(),
    );
    let dump = tmp.path().join("batches.jsonl");
    ok(&tune_args(
        d,
        s,
        r,
        &[
            "--curriculum",
            "two-stage:1",
            "--dump-batches",
            dump.to_str().unwrap(),
        ],
    ));
    let log = log_lines(&run);
    // The dumped micro-batches are exactly what trained: 2 per step, hybrid as logged, the
    // logged token count, an answer after the prompt, recommender items behind hybrid slots.
    let batches: Vec<serde_json::Value> = std::fs::read_to_string(&dump)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(batches.len(), 2 * log.len());
    for (i, l) in log.iter().enumerate() {
        let mine: Vec<_> = batches.iter().filter(|b| b["step"] == i).collect();
        assert_eq!(mine.len(), 2, "step {i}");
        let mut tokens = 0;
        for b in mine {
            assert_eq!(b["hybrid"], l["hybrid"]);
            for row in b["rows"].as_array().unwrap() {
                let n = row["ids"].as_array().unwrap().len();
                assert!(row["answer_start"].as_u64().unwrap() < n as u64);
                if b["hybrid"] == true {
                    assert!(!row["slot_items"].as_array().unwrap().is_empty());
                }
                tokens += n;
            }
        }
        assert_eq!(l["tokens"], tokens, "step {i}");
    }
    assert!(
        log.iter().take(3).all(|l| l["hybrid"] == false),
        "first epoch is text-only"
    );
    assert!(
        log.iter().skip(3).all(|l| l["hybrid"] == true),
        "second epoch is hybrid"
    );
    let out = ok(&[
        "eval",
        "--run",
        r,
        "--split",
        "test",
        "--limit",
        "4",
        "--json",
        "--max-new-tokens",
        "8",
    ]);
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in ["valid_ratio", "hr@1", "hr@1_of_valid", "rows"] {
        assert!(m.get(k).is_some(), "{k} missing: {m}");
    }
    assert_eq!(m["rows"], 4);
    let preds = std::fs::read_to_string(run.join("eval-test/predictions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(preds.lines().next().unwrap()).unwrap();
    for k in [
        "prompt",
        "output",
        "target",
        "candidates",
        "valid",
        "correct",
    ] {
        assert!(first.get(k).is_some(), "{k} missing");
    }
    assert!(first["prompt"].as_str().unwrap().contains("[CansEmb]"));
    // Candidate scoring: every ranking metric, valid ratio 1, one score per candidate.
    let out = ok(&[
        "eval", "--run", r, "--split", "test", "--limit", "3", "--json", "--mode", "score",
    ]);
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in ["hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"] {
        assert!(m[k].as_f64().is_some(), "{k} missing: {m}");
    }
    let scores = std::fs::read_to_string(run.join("eval-test-score/scores.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = scores
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(m["rows"], 3);
    // HR@1 is the share of rows whose target scores above every other candidate.
    let top = rows
        .iter()
        .filter(|r| {
            let cands = r["candidates"].as_array().unwrap();
            let s: Vec<f64> = r["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let t = cands.iter().position(|c| *c == r["target"]).unwrap();
            s.iter().enumerate().all(|(i, &v)| i == t || v < s[t])
        })
        .count();
    assert!(
        (m["hr@1"].as_f64().unwrap() - top as f64 / 3.0).abs() < 1e-9,
        "{m} vs {top} of 3"
    );
    let first = &rows[0];
    assert_eq!(
        first["scores"].as_array().unwrap().len(),
        first["candidates"].as_array().unwrap().len()
    );
    let e = fails(&["eval", "--run", r, "--metric", "ndcg@5"]);
    assert!(e.contains("--mode score"), "{e}");
    // The report: table, CSV and the run's training curves.
    let rep = tmp.path().join("report");
    let table = ok(&["report", r, "--out", rep.to_str().unwrap()]);
    assert!(
        table.contains("| generation |") && table.contains("scoring (sum)"),
        "{table}"
    );
    let csv = std::fs::read_to_string(rep.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let svg = std::fs::read_to_string(rep.join("curves-1-run.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() >= 3);
    // Deterministic: the same command gives the same predictions.
    ok(&[
        "eval",
        "--run",
        r,
        "--split",
        "test",
        "--limit",
        "4",
        "--json",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(
        preds,
        std::fs::read_to_string(run.join("eval-test/predictions.jsonl")).unwrap()
    );
    // The memory guard runs for eval and recommend too, before the backbone loads: a 7B backbone
    // in bf16 with 8 rows' prompt caches does not fit in 8 GiB; 4-bit blocks and fewer rows would.
    let seven = format!(
        "builtin:random:{}/configs/llama2-7b.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let guarded = |limit: &str, extra: &[&str]| {
        let mut args = vec!["eval", "--run", r, "--mode", "score", "--llm", &seven];
        args.extend(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
            .args(&args)
            .env("LLARA_MEMORY_LIMIT", limit)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = guarded("8G", &["--dtype", "bf16", "--batch-size", "8"]);
    assert!(err.contains("estimated peak memory"), "{err}");
    assert!(err.contains("LLARA_MEMORY_LIMIT=8G"), "{err}");
    assert!(
        err.contains("--dtype q4_k --batch-size 2 would fit"),
        "{err}"
    );
    let err = guarded("6G", &["--dtype", "q4_k", "--batch-size", "8"]);
    assert!(err.contains("--batch-size 1 would fit"), "{err}");
    // Named once, not once per layer of the error chain.
    assert_eq!(err.matches("estimated peak memory").count(), 1, "{err}");
}

#[test]
fn bad_inputs_are_reported_by_name() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    // A recommender trained on another catalogue.
    let other = tmp.path().join("other");
    ok(&[
        "data",
        "synth",
        "--users",
        "30",
        "--items",
        "25",
        "--candidates",
        "5",
        "--out",
        other.to_str().unwrap(),
    ]);
    let out = tmp.path().join("run");
    let e = fails(&tune_args(
        other.to_str().unwrap(),
        s,
        out.to_str().unwrap(),
        &[],
    ));
    assert!(
        e.contains("--sr") && e.contains("40 items") && e.contains("25"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written on a refused start");
    // An existing output folder is not replaced silently.
    std::fs::create_dir_all(&out).unwrap();
    let e = fails(&tune_args(d, s, out.to_str().unwrap(), &[]));
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    let e = fails(&tune_args(
        d,
        s,
        out.to_str().unwrap(),
        &["--force", "--curriculum", "sometimes"],
    ));
    assert!(e.contains("--curriculum sometimes"), "{e}");
    let e = fails(&tune_args(
        d,
        s,
        out.to_str().unwrap(),
        &["--force", "--min-lr=-0.001"],
    ));
    assert!(
        e.contains("--min-lr -0.001") && e.contains("at least 0"),
        "{e}"
    );
    let e = fails(&["tune", "--resume", tmp.path().to_str().unwrap()]);
    assert!(e.contains("tune.toml"), "{e}");
    let e = fails(&["eval", "--run", tmp.path().to_str().unwrap()]);
    assert!(e.contains("run.json"), "{e}");
    let e = fails(&[
        "eval",
        "--run",
        tmp.path().to_str().unwrap(),
        "--batch-size",
        "0",
    ]);
    assert!(e.contains("--batch-size"), "{e}");
    let e = fails(&["report", tmp.path().to_str().unwrap()]);
    assert!(e.contains("neither a tune run"), "{e}");
}

#[test]
fn candidate_scoring_with_a_shared_prompt_cache_equals_full_recomputation() {
    use llara::llara::evaluate::{score_candidates, EvalOptions, ScoreMode, ScoreOptions};
    let (data, sr) = fixture();
    let ds = Dataset::open(data).unwrap();
    let l = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
    let rec = recommender(sr);
    let table = rec.item_embeddings.clone();
    let projector = Projector::new(
        table.dim(1).unwrap(),
        64,
        2,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let templates = short_templates();
    let kit = PromptKit {
        tok: &l.tokenizer,
        templates: &templates,
        titles: &ds.titles,
        user_token: false,
        answer: AnswerFormat::Title,
    };
    let behaviour = Behaviour {
        rec: &rec,
        cand_emb: CandEmb::Input,
        projector: &projector,
    };
    let rows = llara::llara::batch::split_rows(&ds, "test", 0, Some(3), 1);
    // Prompts of several rows share a batch (right-padded to the longest) when batch_size > 1.
    for (view, batch_size) in [
        (ItemView::Hybrid, 1),
        (ItemView::Text, 1),
        (ItemView::Hybrid, 2),
        (ItemView::Text, 3),
    ] {
        let opts = EvalOptions {
            view,
            template: 0,
            batch_size,
            max_new_tokens: 8,
            constrained: false,
            shard: Default::default(),
        };
        let so = |mode, chunk, shared_prompt| ScoreOptions {
            mode,
            chunk,
            shared_prompt,
        };
        let got = score_candidates(
            &l.model,
            &kit,
            Some(&behaviour),
            &rows,
            &opts,
            so(ScoreMode::Sum, 3, true),
            |_| {},
        )
        .unwrap();
        let mean = score_candidates(
            &l.model,
            &kit,
            Some(&behaviour),
            &rows,
            &opts,
            so(ScoreMode::Mean, 5, true),
            |_| {},
        )
        .unwrap();
        let full = score_candidates(
            &l.model,
            &kit,
            Some(&behaviour),
            &rows,
            &opts,
            so(ScoreMode::Sum, 4, false),
            |_| {},
        )
        .unwrap();
        assert_eq!(got.len(), rows.len());
        assert_eq!(full.len(), rows.len());
        assert_eq!(mean.len(), rows.len());
        for (a, b) in got.iter().zip(&full) {
            assert_eq!(a.scores.len(), b.scores.len());
            assert!(!a.scores.is_empty());
            for (x, y) in a.scores.iter().zip(&b.scores) {
                assert!(
                    (x - y).abs() < 1e-3 * (1.0 + y.abs()),
                    "cache {x} vs no cache {y}"
                );
            }
        }
        for ((_, ex), (g, m)) in rows.iter().zip(got.iter().zip(&mean)) {
            assert_eq!(g.candidates, ex.candidates);
            for (i, &c) in ex.candidates.iter().enumerate() {
                // The answer's log-likelihood from one full forward pass, without any cache.
                let tk = kit
                    .tokenize(
                        &Example {
                            target: c,
                            ..ex.clone()
                        },
                        view,
                        true,
                    )
                    .unwrap();
                let (x, lens) =
                    embed_batch(&l.model, &[&tk], |t| t.ids.len(), Some(&behaviour)).unwrap();
                let h = l
                    .model
                    .forward(&x, llm::Step::padded(&lens, lens[0]), None)
                    .unwrap();
                let (pos, targets) = answer_targets(&[&tk], lens[0]);
                let nll = l
                    .model
                    .loss_at(&h, &pos, &targets)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let want = -nll * targets.len() as f32;
                assert!(
                    (g.scores[i] - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{view:?} {c}: {} vs {want}",
                    g.scores[i]
                );
                assert!(
                    (m.scores[i] - want / targets.len() as f32).abs() < 1e-3,
                    "mean"
                );
            }
            let ti = ex.candidates.iter().position(|&c| c == ex.target).unwrap();
            let better = g
                .scores
                .iter()
                .enumerate()
                .filter(|&(i, s)| i != ti && *s >= g.scores[ti])
                .count();
            assert_eq!(g.rank, better);
        }
    }
}

#[test]
fn recommend_ranks_candidates_for_one_user_or_many() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (d, s, r) = (
        data.to_str().unwrap(),
        sr.to_str().unwrap(),
        run.to_str().unwrap(),
    );
    ok(&tune_args(d, s, r, &[]));
    let ds = Dataset::open(data).unwrap();
    let t0 = ds.titles[0].clone();
    let t3 = ds.titles[3].to_uppercase();
    let out = ok(&[
        "recommend",
        "--run",
        r,
        "--history",
        &t0,
        "--history",
        "1,2",
        "--candidate",
        &t3,
        "--candidate",
        "5",
        "--candidate",
        "7",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids: Vec<u64> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![0, 1, 2]);
    let ranking = v["ranking"].as_array().unwrap();
    let mut got: Vec<u64> = ranking.iter().map(|x| x["id"].as_u64().unwrap()).collect();
    got.sort();
    assert_eq!(got, vec![3, 5, 7], "a title matches case-insensitively");
    let scores: Vec<f64> = ranking
        .iter()
        .map(|x| x["score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "sorted by score: {scores:?}"
    );
    // Unknown titles suggest the closest ones.
    let partial = &ds.titles[0][4..];
    let e = fails(&["recommend", "--run", r, "--history", partial]);
    assert!(
        e.contains("no such title") && e.contains(&ds.titles[0]),
        "{e}"
    );
    // Many users as JSON lines on stdin; candidates sampled when omitted.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
        .args(["recommend", "--run", r, "--json", "--n-candidates", "4"])
        .env("LLARA_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"history\": [1, 2, 3]}\n{\"history\": [4], \"candidates\": [8, 9]}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["ranking"].as_array().unwrap().len(), 4);
    assert_eq!(lines[1]["ranking"].as_array().unwrap().len(), 2);
}

/// A run long enough to be interrupted: `steps` optimizer steps of one epoch (`extra` may
/// replace a default flag; `--quiet` has no value and stays).
fn long_args(data: &str, sr: &str, out: &str, steps: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "tune",
        "--data",
        data,
        "--sr",
        sr,
        "--llm",
        "builtin:tiny",
        "--out",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "5e-3",
        "--max-steps",
        steps,
        "--valid-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--seed",
        "11",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A flag in `extra` replaces the default's (flag, value) pair.
    for f in extra.iter().filter(|f| f.starts_with("--")) {
        if let Some(i) = v.iter().position(|a| a == f) {
            v.drain(i..i + 2);
        }
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The uninterrupted 60-step run the interruption tests compare against, built once per binary.
fn straight_60() -> &'static Path {
    static S: OnceLock<PathBuf> = OnceLock::new();
    S.get_or_init(|| {
        let (data, sr) = fixture();
        let dir = std::env::temp_dir().join(format!("llara-tune-straight-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
        ok(&strs(&long_args(d, s, dir.to_str().unwrap(), "60", &[])));
        dir
    })
}

fn spawn(args: &[String]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
        .args(args)
        .env("LLARA_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("llara starts")
}

/// Waits until `cond` holds (polling), panicking after a minute.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed().as_secs() < 60, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn logged_steps(run: &Path) -> usize {
    std::fs::read_to_string(run.join("train_log.jsonl")).map_or(0, |s| s.lines().count())
}

fn checkpoint_step(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("checkpoint/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

fn same_files(a: &Path, b: &Path, files: &[&str]) {
    for f in files {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

const RESULT_FILES: [&str; 3] = [
    "adapter/adapter_model.safetensors",
    "projector.safetensors",
    "checkpoint/optimizer.safetensors",
];

#[cfg(unix)]
fn signal(child: &std::process::Child, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run() {
    use std::os::unix::process::ExitStatusExt;
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let straight = straight_60();
    let cut = tmp.path().join("cut");

    let child = spawn(&long_args(d, s, cut.to_str().unwrap(), "60", &[]));
    wait_for("a few steps", || logged_steps(&cut) >= 3);
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{err} {:?}",
        out.status.signal()
    );
    assert!(err.contains("SIGINT") && err.contains("--resume"), "{err}");
    let at = checkpoint_step(&cut).expect("a checkpoint after the signal");
    assert!(at > 0 && at < 60, "checkpoint at step {at}");
    assert_eq!(
        logged_steps(&cut) as u64,
        at,
        "the log ends at the checkpoint"
    );
    ok(&["tune", "--resume", cut.to_str().unwrap()]);
    same_files(straight, &cut, &RESULT_FILES);
    assert_eq!(log_lines(straight), log_lines(&cut));
}

#[cfg(unix)]
#[test]
fn sigkill_after_a_time_based_checkpoint_loses_only_the_steps_since() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let straight = straight_60();
    let cut = tmp.path().join("cut");
    // A checkpoint whenever 0.6 s have passed since the last one.
    let mut child = spawn(&long_args(
        d,
        s,
        cut.to_str().unwrap(),
        "60",
        &["--checkpoint-minutes", "0.01"],
    ));
    wait_for("a time-based checkpoint", || {
        checkpoint_step(&cut).is_some_and(|s| s > 0)
    });
    signal(&child, "-KILL");
    child.wait().unwrap();
    let at = checkpoint_step(&cut).unwrap();
    let logged = logged_steps(&cut) as u64;
    assert!(
        at > 0 && at < 60 && logged >= at,
        "checkpoint {at}, logged {logged}"
    );
    // The resumed run starts from the checkpoint: it redoes only the steps after it.
    let mut resumed = spawn(&[
        "tune".into(),
        "--resume".into(),
        cut.to_str().unwrap().into(),
        "--stop-after".into(),
        "1".into(),
    ]);
    assert!(resumed.wait().unwrap().success());
    assert_eq!(checkpoint_step(&cut), Some(at + 1));
    ok(&["tune", "--resume", cut.to_str().unwrap()]);
    same_files(straight, &cut, &RESULT_FILES);
    assert_eq!(log_lines(straight), log_lines(&cut));
    // No temporary folder of a cut write is left behind.
    let stray: Vec<_> = std::fs::read_dir(&cut)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// A copy of the fixture's recommender whose item embeddings are NaN: every hybrid step's loss
/// is NaN, text-only steps are fine.
fn nan_recommender(dir: &Path) -> PathBuf {
    let (_, sr) = fixture();
    let out = dir.join("sr-nan");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(sr).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    let path = out.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let w = &t["item_embeddings.weight"];
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    t.insert("item_embeddings.weight".into(), nan);
    candle_core::safetensors::save(&t, &path).unwrap();
    out
}

#[test]
fn a_nan_loss_stops_the_run_and_leaves_the_last_checkpoint_and_best_untouched() {
    let (data, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let sr = nan_recommender(tmp.path());
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let bad = tmp.path().join("bad");
    let every = ["--checkpoint-every", "1", "--eval-every", "1"];
    let args = long_args(d, s, bad.to_str().unwrap(), "30", &every);
    let args = strs(&args);
    let err = fails(&args);
    // The step that diverged is the log's last line (the first hybrid step).
    let log = common::read_jsonl(&bad.join("train_log.jsonl"));
    let last = log.last().unwrap();
    let step = last["step"].as_u64().unwrap();
    assert!(
        step > 0 && last["hybrid"] == true && last["skipped"] == true,
        "{last}"
    );
    assert!(
        err.contains(&format!("diverged at step {step}")) && err.contains("--lr"),
        "{err}"
    );
    assert!(err.contains(&format!("checkpoint/ (step {step})")), "{err}");
    // The same run stopped just before that step wrote exactly what the failed run left.
    let good = tmp.path().join("good");
    let stop = step.to_string();
    let mut extra = every.to_vec();
    extra.extend(["--stop-after", &stop]);
    let args = long_args(d, s, good.to_str().unwrap(), "30", &extra);
    let args = strs(&args);
    ok(&args);
    assert_eq!(checkpoint_step(&bad), Some(step));
    same_files(
        &good,
        &bad,
        &[
            "checkpoint/adapter/adapter_model.safetensors",
            "checkpoint/projector.safetensors",
            "checkpoint/optimizer.safetensors",
            "checkpoint/state.json",
            "best/adapter/adapter_model.safetensors",
            "best/projector.safetensors",
        ],
    );
    // With --max-bad-steps the NaN steps are skipped (no update) and counted.
    let skip = tmp.path().join("skip");
    let args = long_args(
        d,
        s,
        skip.to_str().unwrap(),
        "12",
        &["--max-bad-steps", "100", "--valid-samples", "0"],
    );
    let args = strs(&args);
    ok(&args);
    let log = common::read_jsonl(&skip.join("train_log.jsonl"));
    let hybrid = log.iter().filter(|l| l["hybrid"] == true).count();
    let skipped = log.iter().filter(|l| l["skipped"] == true).count();
    assert!(
        hybrid > 0 && skipped == hybrid,
        "{hybrid} hybrid, {skipped} skipped"
    );
    let m = common::json(&skip.join("metrics.json"));
    assert_eq!(m["bad_steps"].as_u64().unwrap() as usize, skipped);
    assert_eq!(m["finished"], true);
}

#[test]
fn an_absurd_learning_rate_is_an_error_naming_the_step() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = long_args(
        data.to_str().unwrap(),
        sr.to_str().unwrap(),
        run.to_str().unwrap(),
        "10",
        &["--lr", "1e38"],
    );
    let args = strs(&args);
    let err = fails(&args);
    assert!(
        err.contains("diverged at step 0") && err.contains("learning rate"),
        "{err}"
    );
    assert!(!run.join("best").exists() && !run.join("checkpoint").exists());
}

#[test]
fn a_stalled_gradient_is_warned_about() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = long_args(
        data.to_str().unwrap(),
        sr.to_str().unwrap(),
        run.to_str().unwrap(),
        "30",
        &["--lr", "1e4", "--valid-samples", "0"],
    );
    let args = strs(&args);
    let out = common::llara(&args);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stalled"), "{err}");
    let m = common::json(&run.join("metrics.json"));
    assert!(m["warnings"].to_string().contains("stalled"), "{m}");
}

#[cfg(unix)]
#[test]
fn a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let straight = tmp.path().join("straight");
    let run = tmp.path().join("run");
    let args = long_args(d, s, straight.to_str().unwrap(), "8", &[]);
    let args = strs(&args);
    ok(&args);
    let args = long_args(d, s, run.to_str().unwrap(), "8", &["--stop-after", "3"]);
    let args = strs(&args);
    ok(&args);
    let before = std::fs::read(run.join("checkpoint/optimizer.safetensors")).unwrap();
    let others = std::fs::read(run.join("checkpoint/adapter/adapter_model.safetensors"))
        .unwrap()
        .len();
    // Files may not grow past a size between the adapter's and the optimizer state's (a full
    // disk, as far as the writer can tell): the next checkpoint cannot be written.
    let limit_kib = (others + before.len()) / 2 / 1024;
    assert!(limit_kib * 1024 > others && limit_kib * 1024 < before.len());
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            &format!("ulimit -f {limit_kib}; trap '' XFSZ; exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_llara"),
            "tune",
            "--resume",
            run.to_str().unwrap(),
            "--checkpoint-every",
            "1",
        ])
        .env("LLARA_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains(&run.join("checkpoint").display().to_string())
            && err.contains("previous checkpoint/ is unchanged"),
        "{err}"
    );
    assert_eq!(checkpoint_step(&run), Some(3));
    assert_eq!(
        std::fs::read(run.join("checkpoint/optimizer.safetensors")).unwrap(),
        before
    );
    // Once there is room again the run continues from it and ends as if nothing happened.
    ok(&["tune", "--resume", run.to_str().unwrap()]);
    same_files(&straight, &run, &RESULT_FILES);
}

/// Stops the run right after the checkpoint of step `at` (before that step's validation).
struct StopAfterCheckpoint {
    at: usize,
    hit: bool,
}

impl tune::Hooks for StopAfterCheckpoint {
    fn on_checkpoint(&mut self, step: usize) {
        self.hit |= step == self.at;
    }
    fn should_stop(&mut self) -> bool {
        self.hit
    }
}

#[test]
fn a_run_stopped_before_validating_validates_first_when_resumed() {
    let (data, sr) = fixture();
    let ds = Dataset::open(data).unwrap();
    let rec = recommender(sr);
    let d_sr = rec.item_embeddings.dim(1).unwrap();
    let templates = short_templates();
    let opts = TuneOptions {
        epochs: 2,
        valid_samples: Some(2),
        ..tiny_opts(Curriculum::Linear)
    };
    let (per_epoch, total) = tune::schedule(tune::training_rows(&ds, &opts).len(), &opts, 1);
    assert!(total > per_epoch, "two epochs");
    let run_to = |dir: &Path, resume: bool, hooks: &mut dyn tune::Hooks| {
        let mut l = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
        let run = RunDir {
            dir: dir.to_path_buf(),
        };
        let start = if !resume {
            llm::lora::add_adapters(&mut l.model, &opts.lora, opts.seed).unwrap();
            let p = Projector::new(
                d_sr,
                64,
                opts.seed,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            Start::fresh(p, None)
        } else {
            let found = tune::resume_point(&run).unwrap();
            Start::resume(&mut l.model, found, d_sr, None).unwrap()
        };
        let setup = Setup {
            model: &mut l.model,
            tok: &l.tokenizer,
            templates: &templates,
            ds: &ds,
            rec: &rec,
            llm_name: "builtin:tiny",
            comm: &llara::comm::single::Single,
        };
        tune::tune(setup, start, &opts, &run, hooks).unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let done = run_to(&straight, false, &mut ());
    assert!(done.finished && done.evals.len() == 2);
    // Stopped at the end of epoch 1, after its checkpoint, before its validation.
    let cut = tmp.path().join("cut");
    let mut hooks = StopAfterCheckpoint {
        at: per_epoch,
        hit: false,
    };
    let stopped = run_to(&cut, false, &mut hooks);
    assert_eq!(stopped.step, per_epoch);
    assert!(stopped.pending_eval && stopped.evals.is_empty() && !stopped.finished);
    let on_disk = tune::resume_point(&RunDir { dir: cut.clone() })
        .unwrap()
        .state;
    assert!(on_disk.pending_eval && on_disk.step == per_epoch);
    let resumed = run_to(&cut, true, &mut ());
    assert!(resumed.finished && !resumed.pending_eval);
    let steps = |s: &RunState| s.evals.iter().map(|e| e.step).collect::<Vec<_>>();
    assert_eq!(steps(&resumed), steps(&done));
    assert_eq!(
        serde_json::to_value(&resumed.evals).unwrap(),
        serde_json::to_value(&done.evals).unwrap()
    );
    same_files(&straight, &cut, &RESULT_FILES);
    same_files(&straight, &cut, &["best/adapter/adapter_model.safetensors"]);
}

/// Every file under `dir` (relative paths, sorted).
fn tree(dir: &Path) -> Vec<String> {
    common::snapshot(dir)
        .unwrap()
        .into_iter()
        .map(|(f, _)| f)
        .collect()
}

/// The two run folders hold the same files with the same bytes (`tune.toml` records its own
/// `--out`: compared with that path replaced), and the same log, every float to the bit but the
/// wall-clock `tokens_per_second`.
fn same_run(a: &Path, b: &Path) {
    assert_eq!(tree(a), tree(b), "{} and {}", a.display(), b.display());
    for f in tree(a) {
        let (x, y) = (
            std::fs::read(a.join(&f)).unwrap(),
            std::fs::read(b.join(&f)).unwrap(),
        );
        if f == "tune.toml" {
            let norm = |bytes: &[u8], dir: &Path| {
                String::from_utf8_lossy(bytes).replace(&dir.display().to_string(), "RUN")
            };
            assert_eq!(norm(&x, a), norm(&y, b), "{f}");
        } else if f == "train_log.jsonl" {
            assert_eq!(log_lines(a), log_lines(b), "{f}");
        } else {
            assert!(
                x == y,
                "{f} differs between {} and {}",
                a.display(),
                b.display()
            );
        }
    }
}

/// The gradient-norm bound of the clipped runs: most of the tiny model's steps' norms are above
/// it, some below (checked by `three_processes_give_the_same_bytes`).
const CLIP: &str = "2.8";
const CLIPPED_STEPS: &str = "300";

/// A 300-step run (one row per step, two epochs, a validation after each) whose gradients are
/// clipped for most of it, one thread.
fn clipped_args(data: &str, sr: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let mut e = vec![
        "--epochs",
        "30",
        "--batch-size",
        "1",
        "--grad-accum",
        "1",
        "--max-grad-norm",
        CLIP,
        "--threads",
        "1",
        "--checkpoint-minutes",
        "0",
    ];
    e.extend_from_slice(extra);
    long_args(data, sr, out, CLIPPED_STEPS, &e)
}

/// The uninterrupted clipped run, built once per test binary.
fn straight_clipped() -> &'static Path {
    static S: OnceLock<PathBuf> = OnceLock::new();
    S.get_or_init(|| {
        let (data, sr) = fixture();
        let dir = std::env::temp_dir().join(format!("llara-tune-clipped-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
        ok(&strs(&clipped_args(d, s, dir.to_str().unwrap(), &[])));
        dir
    })
}

/// The steps of a run whose gradient norm was above the clipping bound.
fn clipped_steps(run: &Path) -> Vec<u64> {
    let clip: f64 = CLIP.parse().unwrap();
    std::fs::read_to_string(run.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["grad_norm"].as_f64().unwrap() > clip)
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn three_processes_give_the_same_bytes() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let others: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(format!("p{i}"))).collect();
    let children: Vec<_> = others
        .iter()
        .map(|o| spawn(&clipped_args(d, s, o.to_str().unwrap(), &[])))
        .collect();
    let straight = straight_clipped();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Clipping was active for part of the run, not all of it.
    let clipped = clipped_steps(straight);
    assert!(
        !clipped.is_empty() && clipped.len() < 300,
        "clipped at {} of 300 steps",
        clipped.len()
    );
    assert_eq!(logged_steps(straight), 300);
    for o in &others {
        same_run(straight, o);
    }
}

/// The fast case of `scripts/soak_resume.sh`: cut by SIGINT twice at steps where the gradient is
/// clipped, resumed each time, the run ends byte-identical to the uninterrupted one.
#[cfg(unix)]
#[test]
fn sigint_at_clipped_steps_and_resume_give_the_uninterrupted_bytes() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let cut = tmp.path().join("cut");
    let straight = straight_clipped();
    let clipped = clipped_steps(straight);
    // Cut until a cut has come at a step whose gradient was clipped (most are), twice at least.
    let mut cuts: Vec<u64> = Vec::new();
    while cuts.len() < 2 || !cuts.iter().any(|at| clipped.contains(&(at - 1))) {
        assert!(
            cuts.len() < 8,
            "no cut at a clipped step: {cuts:?}; clipped {clipped:?}"
        );
        let args = if cuts.is_empty() {
            clipped_args(d, s, cut.to_str().unwrap(), &[])
        } else {
            vec![
                "tune".into(),
                "--resume".into(),
                cut.to_str().unwrap().into(),
                "--quiet".into(),
            ]
        };
        let after = logged_steps(&cut) + 3;
        let child = spawn(&args);
        wait_for("steps to cut after", || logged_steps(&cut) >= after);
        signal(&child, "-INT");
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(130),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let at = checkpoint_step(&cut).unwrap();
        assert!(
            at > 0 && at < 300 && !cuts.contains(&at),
            "{at} after {cuts:?}"
        );
        cuts.push(at);
    }
    ok(&["tune", "--resume", cut.to_str().unwrap()]);
    same_run(straight, &cut);
}

#[cfg(unix)]
#[test]
fn one_writer_per_run_and_a_killed_writers_lock_is_taken_over() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let mut child = spawn(&long_args(
        d,
        s,
        r,
        "300",
        &["--epochs", "30", "--checkpoint-every", "1"],
    ));
    wait_for("the first checkpoints", || {
        checkpoint_step(&run).is_some_and(|s| s >= 2)
    });
    let pid = child.id().to_string();
    let lock = std::fs::read_to_string(run.join("run.lock")).unwrap();
    assert_eq!(lock.trim(), pid);
    // A second writer, resuming or replacing, is refused naming the holder.
    for args in [
        vec!["tune", "--resume", r],
        strs(&long_args(d, s, r, "300", &["--force"])),
    ] {
        let e = fails(&args);
        assert!(
            e.contains(&format!("PID {pid}")) && e.contains("run.lock"),
            "{e}"
        );
    }
    assert!(
        run.join("tune.toml").is_file(),
        "--force did not remove a live run"
    );
    // Killed: the lock file is left with its PID, and the next writer takes it over.
    signal(&child, "-KILL");
    child.wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(run.join("run.lock"))
            .unwrap()
            .trim(),
        pid
    );
    let out = common::llara(&["tune", "--resume", r, "--stop-after", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("lock left by PID {pid}")), "{err}");
    assert!(
        !run.join("run.lock").exists(),
        "a clean exit releases the lock"
    );
}

#[test]
fn a_damaged_checkpoint_is_refused_and_the_previous_one_used() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let straight = tmp.path().join("straight");
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    ok(&strs(&long_args(
        d,
        s,
        straight.to_str().unwrap(),
        "8",
        &[],
    )));
    ok(&strs(&long_args(
        d,
        s,
        r,
        "8",
        &["--stop-after", "3", "--checkpoint-every", "1"],
    )));
    assert_eq!(checkpoint_step(&run), Some(3));
    let prev = |f: &str| run.join("checkpoint.prev").join(f);
    assert!(prev("state.json").is_file() && run.join("checkpoint/SHA256SUMS").is_file());
    // The newest checkpoint's optimizer state truncated: the resume uses the previous one (step 2).
    let opt = run.join("checkpoint/optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let out = common::llara(&["tune", "--resume", r, "--stop-after", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("optimizer.safetensors")
            && err.contains("truncated")
            && err.contains("checkpoint.prev"),
        "{err}"
    );
    assert_eq!(checkpoint_step(&run), Some(3));
    assert!(run
        .join("checkpoint.damaged/optimizer.safetensors")
        .is_file());
    // Both damaged: refused, naming the file, nothing changed.
    let adapter = run.join("checkpoint/adapter/adapter_model.safetensors");
    let mut a = std::fs::read(&adapter).unwrap();
    let n = a.len();
    a[n - 1] ^= 1;
    std::fs::write(&adapter, &a).unwrap();
    std::fs::write(prev("state.json"), "{\"step\": 1}").unwrap();
    let e = fails(&["tune", "--resume", r]);
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("checkpoint.prev/state.json"),
        "{e}"
    );
    assert_eq!(std::fs::read(&adapter).unwrap(), a);
    // Repaired, the run ends as the uninterrupted one (the fallback lost one step, redone).
    a[n - 1] ^= 1;
    std::fs::write(&adapter, &a).unwrap();
    ok(&["tune", "--resume", r]);
    same_files(&straight, &run, &RESULT_FILES);
    assert_eq!(log_lines(&straight), log_lines(&run));
}
