//! The scoring head, behaviour tokens the head reads, and the count baselines, on tiny
//! configurations (synthetic data, the built-in tiny random Llama).

mod common;

use common::{fails, ok};
use llara::data::Dataset;
use llara::llara::head::{Head, HeadConfig};
use llara::llara::projector::Projector;
use llara::llara::prompts::AnswerFormat;
use llara::llara::prompts::{ItemView, Templates};
use llara::llara::{embed_batch, Behaviour, CandEmb, Example, PromptKit, Recommender};
use llara::llm::{self, LlmOptions, Step};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A synthetic dataset (20 candidates per row) and a SASRec trained on it, built once.
fn fixture() -> &'static (PathBuf, PathBuf) {
    static F: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("llara-head-fixture-{}", std::process::id()));
        let data = dir.join("data");
        let sr = dir.join("sr");
        ok(&[
            "data",
            "synth",
            "--users",
            "400",
            "--items",
            "60",
            "--out",
            data.to_str().unwrap(),
            "--force",
        ]);
        ok(&[
            "train-sr",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "20",
            "--hidden",
            "32",
            "--out",
            sr.to_str().unwrap(),
            "--force",
        ]);
        (data, sr)
    })
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tune(data: &str, sr: &str, out: &str, lr: &str, extra: &[&str]) {
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
        "1",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--lr",
        lr,
        "--min-lr",
        "0",
        "--max-train-samples",
        "8",
        "--valid-samples",
        "4",
        "--max-new-tokens",
        "8",
        "--seed",
        "3",
        "--force",
    ];
    v.extend_from_slice(extra);
    ok(&v);
}

fn ranks(path: &Path) -> Vec<(usize, usize)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["row"].as_u64().unwrap() as usize,
                v["rank"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

/// With the recommender prior and no learning (lr 0: LoRA's B and the head's V stay zero, γ stays
/// 1), the head ranks exactly like the recommender: the same rank for every test row as
/// `llara eval-sr` on the same candidates. Without the prior it has nothing to rank by (all
/// scores tie, HR@1 0). After training with the prior it stays near the recommender.
#[test]
fn the_head_with_the_prior_starts_as_its_recommender() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let sr_eval = tmp.path().join("sasrec");
    ok(&[
        "eval-sr",
        "--model",
        s,
        "--data",
        d,
        "--out",
        sr_eval.to_str().unwrap(),
    ]);
    let want = ranks(&sr_eval.join("scores.jsonl"));
    assert_eq!(want.len(), Dataset::open(data).unwrap().splits.test.len());
    let hybrid = [
        "--curriculum",
        "hybrid-only",
        "--objective",
        "both",
        "--head-prior",
        "--user-token",
        "--cand-emb",
        "output",
    ];
    let frozen = tmp.path().join("frozen");
    tune(d, s, frozen.to_str().unwrap(), "0", &hybrid);
    let info = json(&frozen.join("run.json"));
    assert_eq!(info["head"]["prior"], true);
    assert_eq!(info["user_token"], true);
    ok(&["eval", "--run", frozen.to_str().unwrap(), "--mode", "score"]);
    let got = ranks(&frozen.join("eval-test-score/scores.jsonl"));
    assert_eq!(got, want, "head + prior at lr 0 = the recommender's ranks");
    let m = json(&frozen.join("eval-test-score/metrics.json"));
    assert_eq!(m["scorer"], "head");
    assert_eq!(
        m["hr@1"].as_f64().unwrap(),
        json(&sr_eval.join("metrics.json"))["hr@1"]
            .as_f64()
            .unwrap()
    );
    // --scorer answer ranks by answer log-likelihoods instead (a different ranking).
    let answer = tmp.path().join("answer");
    ok(&[
        "eval",
        "--run",
        frozen.to_str().unwrap(),
        "--mode",
        "score",
        "--scorer",
        "answer",
        "--limit",
        "4",
        "--out",
        answer.to_str().unwrap(),
    ]);
    assert_eq!(json(&answer.join("metrics.json"))["scorer"], "answer");
    // No prior, no learning: every candidate ties, so no row is ranked first.
    let flat = tmp.path().join("flat");
    tune(
        d,
        s,
        flat.to_str().unwrap(),
        "0",
        &["--curriculum", "text-only", "--objective", "listwise"],
    );
    ok(&["eval", "--run", flat.to_str().unwrap(), "--mode", "score"]);
    assert!(ranks(&flat.join("eval-test-score/scores.jsonl"))
        .iter()
        .all(|&(_, r)| r == 19));
    // Trained with the prior, the run keeps (about) its recommender's quality.
    let trained = tmp.path().join("trained");
    tune(d, s, trained.to_str().unwrap(), "5e-3", &hybrid);
    ok(&[
        "eval",
        "--run",
        trained.to_str().unwrap(),
        "--mode",
        "score",
    ]);
    let hr = |p: &Path| json(p)["hr@1"].as_f64().unwrap();
    let (t, r) = (
        hr(&trained.join("eval-test-score/metrics.json")),
        hr(&sr_eval.join("metrics.json")),
    );
    assert!(r > 0.2, "the fixture's SASRec learned something: {r}");
    assert!(t >= 0.8 * r, "trained head {t} vs its SASRec {r}");
    // Constrained generation names exactly one candidate in every row.
    ok(&[
        "eval",
        "--run",
        trained.to_str().unwrap(),
        "--constrained",
        "--limit",
        "6",
        "--max-new-tokens",
        "64",
    ]);
    let dir = trained.join("eval-test-constrained");
    assert_eq!(json(&dir.join("metrics.json"))["valid_ratio"], 1.0);
    let ds = Dataset::open(data).unwrap();
    let preds = std::fs::read_to_string(dir.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 6);
    for l in preds.lines() {
        let p: serde_json::Value = serde_json::from_str(l).unwrap();
        let out = p["output"].as_str().unwrap().trim();
        assert!(
            p["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| ds.titles[c.as_u64().unwrap() as usize] == out),
            "{out:?} is not a candidate's title"
        );
    }
    // The run answers one user with the head too.
    let out = ok(&[
        "recommend",
        "--run",
        trained.to_str().unwrap(),
        "--history",
        "1,2,3",
        "--candidate",
        "4,5,6",
    ]);
    assert_eq!(out.lines().count(), 4, "{out}");
}

#[test]
fn head_flags_are_checked() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let base = [
        "tune",
        "--data",
        data.to_str().unwrap(),
        "--sr",
        sr.to_str().unwrap(),
        "--llm",
        "builtin:tiny",
        "--out",
        out.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        fails(&v)
    };
    assert!(with(&["--head-prior"]).contains("--head-prior"));
    assert!(with(&["--objective", "both", "--head-rank", "0"]).contains("--head-rank"));
    assert!(with(&["--objective", "ranking"]).contains("--objective"));
    assert!(with(&["--cand-emb", "middle"]).contains("--cand-emb"));
    assert!(!out.exists(), "a refused run leaves nothing behind");
}

/// The head reads the injected behaviour tokens: two rows whose prompts have the same token ids
/// (id-only view) differ only in the vectors their slots carry, and the head scores them
/// differently; with the behaviour switched off (the slots' fixed rows) they score the same.
#[test]
fn injected_behaviour_tokens_reach_the_head() {
    let (data, sr) = fixture();
    let ds = Dataset::open(data).unwrap();
    let l = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
    let (m, cfg) = llara::sr::load_model(sr, &candle_core::Device::Cpu).unwrap();
    let rec = Recommender::new(m, cfg).unwrap();
    let dev = candle_core::Device::Cpu;
    let projector = Projector::new(32, 64, 1, candle_core::DType::F32, &dev).unwrap();
    let head = Head::new(
        64,
        HeadConfig {
            rank: 8,
            prior: false,
        },
        1,
        &dev,
    )
    .unwrap();
    let v: Vec<f32> = (0..64 * 8).map(|i| ((i as f32) * 0.7).sin()).collect();
    head.v
        .set(&candle_core::Tensor::from_vec(v, (64, 8), &dev).unwrap())
        .unwrap();
    let templates = Templates::parse("[HistoryHere] | [CansHere] ->", "t").unwrap();
    let kit = PromptKit {
        tok: &l.tokenizer,
        templates: &templates,
        titles: &ds.titles,
        user_token: true,
        answer: AnswerFormat::Title,
    };
    let a = Example {
        history: vec![1, 2, 3],
        candidates: vec![4, 5, 6],
        target: 4,
        template: 0,
    };
    let b = Example {
        history: vec![7, 8, 9],
        ..a.clone()
    };
    let ta = kit.tokenize(&a, ItemView::IdOnly, false).unwrap();
    let tb = kit.tokenize(&b, ItemView::IdOnly, false).unwrap();
    assert_eq!(
        ta.ids, tb.ids,
        "same tokens: only the injected vectors differ"
    );
    assert!(ta.user_position.is_some());
    assert_eq!(ta.cand_positions.len(), 3);
    for cand_emb in [CandEmb::Input, CandEmb::Output] {
        let bh = Behaviour {
            rec: &rec,
            cand_emb,
            projector: &projector,
        };
        let score = |t: &llara::llara::Tokenized, with: bool| -> Vec<f32> {
            let (x, lens) =
                embed_batch(&l.model, &[t], |t| t.answer_start, with.then_some(&bh)).unwrap();
            let h = l
                .model
                .forward(&x, Step::padded(&lens, lens[0]), None)
                .unwrap();
            head.scores(&h, &[t], None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (sa, sb) = (score(&ta, true), score(&tb, true));
        assert_eq!(sa.len(), 3);
        let diff: f32 = sa.iter().zip(&sb).map(|(x, y)| (x - y).abs()).sum();
        assert!(
            diff > 1e-3,
            "{cand_emb:?}: histories must change the scores"
        );
        assert_eq!(score(&ta, false), score(&tb, false));
    }
}

#[test]
fn count_baselines_score_and_report() {
    let (data, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let ds = Dataset::open(data).unwrap();
    let mut dirs = vec![];
    for b in ["popularity", "markov", "cooccurrence"] {
        let out = tmp.path().join(b);
        let line = ok(&[
            "eval-sr",
            "--model",
            b,
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        let m: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        let rows = ranks(&out.join("scores.jsonl"));
        assert_eq!(rows.len(), ds.splits.test.len());
        let hits = rows.iter().filter(|&&(_, r)| r == 0).count() as f64;
        assert!((m["hr@1"].as_f64().unwrap() - hits / rows.len() as f64).abs() < 1e-12);
        dirs.push(out);
    }
    // Popularity by hand: the count of each item as a training row's next item.
    let mut pop = vec![0usize; ds.n_items()];
    for r in &ds.splits.train {
        pop[r.next as usize] += 1;
    }
    let first = std::fs::read_to_string(dirs[0].join("scores.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    for (c, s) in v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["scores"].as_array().unwrap())
    {
        assert_eq!(
            s.as_f64().unwrap(),
            pop[c.as_u64().unwrap() as usize] as f64
        );
    }
    let table = ok(&[
        "report",
        dirs[0].to_str().unwrap(),
        dirs[1].to_str().unwrap(),
        dirs[2].to_str().unwrap(),
    ]);
    for b in ["popularity", "markov", "cooccurrence"] {
        assert!(table.contains(&format!("| {b} | synth |")), "{table}");
    }
    assert!(fails(&[
        "eval-sr",
        "--model",
        "nosuch",
        "--data",
        data.to_str().unwrap()
    ])
    .contains("nosuch"));
}

/// `--projector-warmup N`: the first N steps move only the projector and the head; LoRA's B
/// matrices (zero at the start) stay zero until then.
#[test]
fn projector_warmup_freezes_the_adapters() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let lora_b_max = |run: &Path| -> f32 {
        let t = candle_core::safetensors::load(
            run.join("adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut m = 0f32;
        let mut n = 0;
        for (name, x) in t {
            if name.contains("lora_B") {
                n += 1;
                let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                m = v.iter().fold(m, |a, b| a.max(b.abs()));
            }
        }
        assert!(n > 0);
        m
    };
    let flags = [
        "--curriculum",
        "hybrid-only",
        "--objective",
        "both",
        "--user-token",
    ];
    let warm = tmp.path().join("warm");
    let mut f = flags.to_vec();
    f.extend(["--projector-warmup", "10"]);
    tune(d, s, warm.to_str().unwrap(), "5e-3", &f);
    assert_eq!(lora_b_max(&warm), 0.0);
    let cold = tmp.path().join("cold");
    tune(d, s, cold.to_str().unwrap(), "5e-3", &flags);
    assert!(lora_b_max(&cold) > 0.0);
    // The projector moved during the warm-up (against its initial weights: a run at lr 0).
    let zero = tmp.path().join("zero");
    tune(d, s, zero.to_str().unwrap(), "0", &flags);
    let p = |run: &Path| -> Vec<f32> {
        candle_core::safetensors::load(run.join("projector.safetensors"), &candle_core::Device::Cpu)
            .unwrap()["0.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_ne!(p(&warm), p(&zero));
    assert_eq!(lora_b_max(&zero), 0.0);
}

/// `--head-lr`: the head's own peak learning rate. At 0 the head stays as it started (V zero)
/// while the adapters move; at 100× the run's lr it moves further than at the run's lr.
#[test]
fn head_lr_sets_the_heads_own_rate() {
    let (data, sr) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (d, s) = (data.to_str().unwrap(), sr.to_str().unwrap());
    let v_max = |run: &Path| -> f32 {
        let t =
            candle_core::safetensors::load(run.join("head.safetensors"), &candle_core::Device::Cpu)
                .unwrap();
        let v: Vec<f32> = t["head.v"].flatten_all().unwrap().to_vec1().unwrap();
        v.iter().fold(0f32, |a, b| a.max(b.abs()))
    };
    let flags = [
        "--curriculum",
        "hybrid-only",
        "--objective",
        "both",
        "--user-token",
    ];
    let mut still = flags.to_vec();
    still.extend(["--head-lr", "0"]);
    let frozen = tmp.path().join("frozen-head");
    tune(d, s, frozen.to_str().unwrap(), "5e-3", &still);
    assert_eq!(v_max(&frozen), 0.0);
    let same = tmp.path().join("same");
    tune(d, s, same.to_str().unwrap(), "5e-3", &flags);
    let mut fast = flags.to_vec();
    fast.extend(["--head-lr", "0.5"]);
    let quick = tmp.path().join("quick");
    tune(d, s, quick.to_str().unwrap(), "5e-3", &fast);
    assert!(
        v_max(&quick) > 10.0 * v_max(&same),
        "{} vs {}",
        v_max(&quick),
        v_max(&same)
    );
    let e = fails(&[
        "tune",
        "--data",
        d,
        "--sr",
        s,
        "--llm",
        "builtin:tiny",
        "--head-lr",
        "1e-2",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(e.contains("--head-lr"), "{e}");
}

/// Caser's state (and `s_fc` rows) is wider than its item embeddings: `[UserEmb]` and `s_fc`
/// candidates go through the projector's own state-space first layer (`state.0.weight`), and the
/// run with the prior still starts as its recommender (lr 0: the same rank on every test row).
#[test]
fn caser_state_tokens_have_their_own_projector_input() {
    let (data, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let d = data.to_str().unwrap();
    let caser = tmp.path().join("caser");
    ok(&[
        "train-sr",
        "--data",
        d,
        "--model",
        "caser",
        "--epochs",
        "3",
        "--hidden",
        "32",
        "--out",
        caser.to_str().unwrap(),
        "--force",
    ]);
    let s = caser.to_str().unwrap();
    let sr_eval = tmp.path().join("caser-eval");
    ok(&[
        "eval-sr",
        "--model",
        s,
        "--data",
        d,
        "--out",
        sr_eval.to_str().unwrap(),
    ]);
    let run = tmp.path().join("run");
    let flags = [
        "--curriculum",
        "hybrid-only",
        "--objective",
        "both",
        "--head-prior",
        "--user-token",
        "--cand-emb",
        "output",
    ];
    tune(d, s, run.to_str().unwrap(), "0", &flags);
    let p = candle_core::safetensors::load(
        run.join("projector.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (w1, ws) = (
        p["0.weight"].dims().to_vec(),
        p["state.0.weight"].dims().to_vec(),
    );
    assert_eq!(w1[1], 32);
    assert!(ws[1] > 32, "{ws:?}");
    ok(&["eval", "--run", run.to_str().unwrap(), "--mode", "score"]);
    assert_eq!(
        ranks(&run.join("eval-test-score/scores.jsonl")),
        ranks(&sr_eval.join("scores.jsonl"))
    );
    // Trained, it still loads and ranks.
    let moved = tmp.path().join("moved");
    tune(d, s, moved.to_str().unwrap(), "5e-3", &flags);
    ok(&["eval", "--run", moved.to_str().unwrap(), "--mode", "score"]);
}
