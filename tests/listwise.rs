//! The listwise objective over answer log-likelihoods (one packed pass per row, with gradients)
//! and the letter verbalizer, on the built-in tiny random Llama.

mod common;

use candle_core::D;
use common::{fails, ok};
use llara::llara::head::listwise_loss;
use llara::llara::listwise::{answer_scores, candidate_answers};
use llara::llara::prompts::{AnswerFormat, ItemView, Templates};
use llara::llara::{Example, PromptKit};
use llara::llm::{self, LlmOptions, Step};

fn titles() -> Vec<String> {
    [
        "The Lost Canyon",
        "Heat",
        "Up",
        "A Quiet Place",
        "Alien",
        "Aliens",
        "The Iron Storm",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Each candidate's summed answer log-probability by hand: prompt + that answer in one plain
/// causal pass, the log-softmax at every answer position.
fn by_hand(l: &llm::Loaded, kit: &PromptKit, ex: &Example, answers: &[Vec<u32>]) -> Vec<f32> {
    let prompt = kit.tokenize(ex, ItemView::Text, false).unwrap();
    answers
        .iter()
        .map(|a| {
            let mut ids = prompt.ids.clone();
            ids.extend(a);
            let n = ids.len();
            let x = l.model.embed(&[ids.clone()], None).unwrap();
            let h = l.model.forward(&x, Step::padded(&[n], n), None).unwrap();
            let pos: Vec<usize> = (prompt.ids.len() - 1..n - 1).collect();
            let logp =
                candle_nn::ops::log_softmax(&l.model.logits_at(&h, &pos).unwrap(), D::Minus1)
                    .unwrap();
            let logp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
            logp.iter().zip(a).map(|(row, &t)| row[t as usize]).sum()
        })
        .collect()
}

#[test]
fn packed_answer_scores_and_loss_match_a_by_hand_computation() {
    let l = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
    let titles = titles();
    let templates =
        Templates::parse("Seen: [HistoryHere]. Pick from [CansHere]. Answer:", "t").unwrap();
    for answer in [AnswerFormat::Title, AnswerFormat::Letter] {
        let kit = PromptKit {
            tok: &l.tokenizer,
            templates: &templates,
            titles: &titles,
            user_token: false,
            answer,
        };
        let rows = [
            Example {
                history: vec![0, 1],
                candidates: vec![4, 2, 5, 3],
                target: 5,
                template: 0,
            },
            Example {
                history: vec![6],
                candidates: vec![1, 3, 0, 2],
                target: 1,
                template: 0,
            },
        ];
        let cands: Vec<_> = rows
            .iter()
            .map(|ex| candidate_answers(&kit, ex, ItemView::Text).unwrap())
            .collect();
        if answer == AnswerFormat::Letter {
            // Labels only: no answer keeps the newline every answer ends with, and they differ.
            let nl = l.tokenizer.encode("\n", false).unwrap();
            for c in &cands {
                assert!(
                    c.answers.iter().all(|a| !a.ends_with(&nl)),
                    "{:?}",
                    c.answers
                );
                assert_ne!(c.answers[0], c.answers[1]);
            }
        }
        let targets = [2u32, 0];
        let refs: Vec<_> = cands.iter().collect();
        let s = answer_scores(&l.model, &refs, &targets, None, None).unwrap();
        let got: Vec<Vec<f32>> = s.scores.to_vec2().unwrap();
        let mut want_loss = 0.0f64;
        for (b, ex) in rows.iter().enumerate() {
            let want = by_hand(&l, &kit, ex, &cands[b].answers);
            for (g, w) in got[b].iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-3,
                    "{answer:?} row {b}: packed {g} vs by hand {w}"
                );
            }
            // -log softmax(scores)[target], in f64.
            let m = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + want.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            want_loss += (lse - want[targets[b] as usize] as f64) / rows.len() as f64;
            // The generative term: the target answer's mean token log-probability.
            let tm: Vec<f32> = s.target_mean_logp.to_vec1().unwrap();
            let n = cands[b].answers[targets[b] as usize].len() as f32;
            assert!((tm[b] - want[targets[b] as usize] / n).abs() < 1e-3);
        }
        let loss = listwise_loss(&s.scores, &targets)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((loss - want_loss).abs() < 1e-3, "{loss} vs {want_loss}");
    }
}

#[test]
fn the_listwise_loss_reaches_the_adapter() {
    let mut l = llm::load("builtin:tiny", &LlmOptions::cpu()).unwrap();
    llara::llm::lora::add_adapters(
        &mut l.model,
        &llara::llm::LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: llara::llm::Target::parse_list("q_proj,v_proj").unwrap(),
            rslora: false,
        },
        3,
    )
    .unwrap();
    let titles = titles();
    let templates = Templates::parse("[HistoryHere] | [CansHere] ->", "t").unwrap();
    let kit = PromptKit {
        tok: &l.tokenizer,
        templates: &templates,
        titles: &titles,
        user_token: false,
        answer: AnswerFormat::Title,
    };
    let ex = Example {
        history: vec![0],
        candidates: vec![1, 2, 3],
        target: 2,
        template: 0,
    };
    let c = candidate_answers(&kit, &ex, ItemView::Text).unwrap();
    let s = answer_scores(&l.model, &[&c], &[1], None, None).unwrap();
    let loss = listwise_loss(&s.scores, &[1]).unwrap();
    let g = l.model.backward(&loss).unwrap();
    let vars = llara::llm::lora::adapter_vars(&l.model);
    let norm: f32 = vars
        .iter()
        .filter_map(|(_, v)| g.get(v.as_tensor()))
        .map(|t| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(norm > 0.0, "no gradient reached the LoRA weights");
}

fn synth() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llara-listwise-{}", std::process::id()));
    let data = dir.join("data");
    if !data.join("meta.json").exists() {
        ok(&[
            "data",
            "synth",
            "--users",
            "120",
            "--items",
            "40",
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
            dir.join("sr").to_str().unwrap(),
            "--force",
        ]);
    }
    dir
}

#[test]
fn letter_runs_train_score_and_generate_labels() {
    let dir = synth();
    let data = dir.join("data");
    let sr = dir.join("sr");
    let run = dir.join("letter");
    let base = [
        "tune",
        "--data",
        data.to_str().unwrap(),
        "--sr",
        sr.to_str().unwrap(),
        "--llm",
        "builtin:tiny",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--max-train-samples",
        "4",
        "--valid-samples",
        "4",
        "--max-new-tokens",
        "4",
        "--curriculum",
        "hybrid-only",
    ];
    let mut v: Vec<&str> = base.to_vec();
    v.extend([
        "--objective",
        "both",
        "--ranker",
        "answer",
        "--answer",
        "letter",
        "--out",
        run.to_str().unwrap(),
        "--force",
    ]);
    ok(&v);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["answer"], "letter");
    assert_eq!(info["ranker"], "answer");
    assert!(
        !run.join("head.safetensors").exists(),
        "an answer-ranking run has no head"
    );
    ok(&[
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--mode",
        "score",
        "--limit",
        "6",
    ]);
    ok(&[
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--constrained",
        "--limit",
        "6",
        "--max-new-tokens",
        "4",
    ]);
    // Constrained letter answers are labels of the row's list, so every one is valid.
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("eval-test-constrained").join("metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["valid_ratio"], 1.0);
    for line in std::fs::read_to_string(run.join("eval-test-constrained").join("predictions.jsonl"))
        .unwrap()
        .lines()
    {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        let out = p["output"].as_str().unwrap().trim().to_string();
        assert!(
            out.len() == 1 && ('A'..='T').contains(&out.chars().next().unwrap()),
            "{out:?}"
        );
    }
    // The prior belongs to the head: refused with the answer ranker, naming the flag.
    let mut bad: Vec<&str> = base.to_vec();
    bad.extend([
        "--objective",
        "listwise",
        "--ranker",
        "answer",
        "--head-prior",
        "--out",
        run.to_str().unwrap(),
        "--force",
    ]);
    let e = fails(&bad);
    assert!(e.contains("--head-prior"), "{e}");
    let mut bad: Vec<&str> = base.to_vec();
    bad.extend([
        "--ranker",
        "answer",
        "--out",
        run.to_str().unwrap(),
        "--force",
    ]);
    assert!(fails(&bad).contains("--ranker answer"));
    let mut bad: Vec<&str> = base.to_vec();
    bad.extend(["--answer", "number", "--out", run.to_str().unwrap()]);
    assert!(fails(&bad).contains("number"));
}
