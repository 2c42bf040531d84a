//! Generation-based evaluation as in the paper: greedy decoding of the answer, then the candidate
//! titles found in it decide validity (exactly one) and correctness (that one is the target).

use super::prompts::ItemView;
use super::{embed_batch, Behaviour, Example, PromptKit};
use crate::llm::generate::{generate, GenOptions};
use crate::llm::Llama;
use candle_core::Result;
use serde::Serialize;

/// The verdict on one generated answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub valid: bool,
    pub correct: bool,
    /// Candidates (distinct items) whose lower-cased titles occur in the lower-cased output.
    pub matched: Vec<u32>,
}

/// LLaRA's rule: the output (lower-cased, stripped) is valid when exactly one candidate's
/// lower-cased title occurs in it as a substring, correct when that candidate is the target.
/// Two candidates sharing a title both match (so neither is valid).
pub fn judge(output: &str, candidates: &[u32], titles: &[String], target: u32) -> Verdict {
    let out = output.trim().to_lowercase();
    let mut matched: Vec<u32> = vec![];
    for &c in candidates {
        let t = titles[c as usize].trim().to_lowercase();
        if !t.is_empty() && out.contains(&t) && !matched.contains(&c) {
            matched.push(c);
        }
    }
    let valid = matched.len() == 1;
    Verdict {
        valid,
        correct: valid && matched[0] == target,
        matched,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub row: usize,
    pub prompt: String,
    pub output: String,
    pub target: u32,
    pub target_title: String,
    pub candidates: Vec<u32>,
    pub valid: bool,
    pub correct: bool,
    pub matched: Vec<u32>,
}

/// `valid_ratio`, `hr@1` (correct / all rows, the paper's convention) and `hr@1_of_valid`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct GenMetrics {
    pub valid_ratio: f64,
    #[serde(rename = "hr@1")]
    pub hr1: f64,
    #[serde(rename = "hr@1_of_valid")]
    pub hr1_of_valid: f64,
    pub rows: usize,
}

impl GenMetrics {
    pub fn of(preds: &[Prediction]) -> Self {
        let n = preds.len();
        let valid = preds.iter().filter(|p| p.valid).count();
        let correct = preds.iter().filter(|p| p.correct).count();
        let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        GenMetrics {
            valid_ratio: div(valid, n),
            hr1: div(correct, n),
            hr1_of_valid: div(correct, valid),
            rows: n,
        }
    }
}

pub struct EvalOptions {
    pub view: ItemView,
    pub template: usize,
    pub batch_size: usize,
    pub max_new_tokens: usize,
}

/// Generates an answer for every `(row index, example)` and judges it. Deterministic: greedy,
/// fixed template, batches in row order.
pub fn evaluate(
    model: &Llama,
    kit: &PromptKit,
    behaviour: Option<&Behaviour>,
    rows: &[(usize, Example)],
    opts: &EvalOptions,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Prediction>> {
    let gen = GenOptions {
        max_new_tokens: opts.max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        stop: vec!["\n".into()],
        seed: 0,
    };
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(opts.batch_size.max(1)) {
        let toks = chunk
            .iter()
            .map(|(_, ex)| {
                let ex = Example {
                    template: opts.template,
                    ..ex.clone()
                };
                kit.tokenize(&ex, opts.view, false)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(candle_core::Error::Msg)?;
        let refs: Vec<_> = toks.iter().collect();
        let (x, lengths) = embed_batch(model, &refs, |t| t.answer_start, behaviour)?;
        let outputs = generate(model, kit.tok, &x, &lengths, &gen)?;
        for (((row, ex), t), g) in chunk.iter().zip(&toks).zip(outputs) {
            let v = judge(&g.text, &ex.candidates, kit.titles, ex.target);
            out.push(Prediction {
                row: *row,
                prompt: t.prompt.clone(),
                output: g.text,
                target: ex.target,
                target_title: kit.titles[ex.target as usize].clone(),
                candidates: ex.candidates.clone(),
                valid: v.valid,
                correct: v.correct,
                matched: v.matched,
            });
        }
        progress(chunk.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn titles() -> Vec<String> {
        ["Alien", "Aliens", "Heat", "Up", "Heat"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn substring_rules() {
        let t = titles();
        // One match, the target.
        assert_eq!(
            judge(" Heat\n", &[2, 3], &t, 2),
            Verdict {
                valid: true,
                correct: true,
                matched: vec![2]
            }
        );
        // Case and surrounding text do not matter.
        assert!(judge("I think HEAT (1995).", &[2, 0], &t, 2).correct);
        // One match, not the target: valid, wrong.
        let v = judge("Alien", &[0, 2], &t, 2);
        assert!(v.valid && !v.correct);
        // "Aliens" contains "Alien": two matches, invalid.
        assert_eq!(judge("Aliens", &[0, 1], &t, 1).matched, vec![0, 1]);
        assert!(!judge("Aliens", &[0, 1], &t, 1).valid);
        // No match.
        assert!(!judge("Titanic", &[0, 2], &t, 0).valid);
        // Two candidates with the same title both match: invalid.
        assert!(!judge("Heat", &[2, 4], &t, 2).valid);
        // A candidate listed twice counts once.
        assert!(judge("Heat", &[2, 2, 0], &t, 2).correct);
    }

    #[test]
    fn metrics_count_rows_valid_and_correct() {
        let p = |valid, correct| Prediction {
            row: 0,
            prompt: String::new(),
            output: String::new(),
            target: 0,
            target_title: String::new(),
            candidates: vec![],
            valid,
            correct,
            matched: vec![],
        };
        let m = GenMetrics::of(&[
            p(true, true),
            p(true, false),
            p(false, false),
            p(true, true),
        ]);
        assert_eq!(m.rows, 4);
        assert!((m.valid_ratio - 0.75).abs() < 1e-12);
        assert!((m.hr1 - 0.5).abs() < 1e-12);
        assert!((m.hr1_of_valid - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(GenMetrics::of(&[]).hr1, 0.0);
    }
}
