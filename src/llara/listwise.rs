//! The listwise objective over the candidates' answers: every candidate's answer log-likelihood
//! given the shared prompt, from one differentiable pass per row, a softmax over them and the
//! cross-entropy on the target (S-DPO's multi-negative loss / LlamaRec's verbalizer loss).
//!
//! A row becomes one sequence: its prompt, then every candidate's answer tokens but the last, side
//! by side. A candidate's tokens sit at rotary positions `len + j` in their own segment, so each
//! attends the prompt and its own earlier tokens only — exactly what it would see after the prompt
//! alone — and the prompt runs once for all candidates. With letter answers every candidate's
//! answer is one token, read from the prompt's last position: nothing is packed.

use super::prompts::{AnswerFormat, PromptError};
use super::{embed_batch, Behaviour, Example, PromptKit, Tokenized};
use crate::kernels::dropout::Dropout;
use crate::llm::llama::Step;
use crate::llm::Llama;
use candle_core::{Result, Tensor, D};

/// A prompt and the answer tokens of each of its candidates (in candidate order).
pub struct CandidateAnswers {
    pub prompt: Tokenized,
    /// With the answer of each candidate, as they tokenize after the prompt.
    pub full: Vec<Tokenized>,
    /// Each candidate's answer tokens (with letter answers, the label's tokens: without the
    /// tokens every answer ends with).
    pub answers: Vec<Vec<u32>>,
}

/// Tokenizes `ex`'s prompt and every candidate's answer after it. Errors when an answer changes
/// the prompt's tokens, has none, or (letter answers) two labels share their first token.
pub fn candidate_answers(
    kit: &PromptKit,
    ex: &Example,
    view: super::prompts::ItemView,
) -> std::result::Result<CandidateAnswers, PromptError> {
    let prompt = kit.tokenize(ex, view, false)?;
    let full: Vec<Tokenized> = ex
        .candidates
        .iter()
        .map(|&c| {
            let with = kit.tokenize(
                &Example {
                    target: c,
                    ..ex.clone()
                },
                view,
                true,
            )?;
            if with.ids[..with.answer_start] != prompt.ids[..] {
                return Err(PromptError::Mismatch(
                    "the answer changed the prompt's tokens".into(),
                ));
            }
            if with.ids.len() <= with.answer_start {
                return Err(PromptError::Mismatch(
                    "a candidate's answer has no tokens".into(),
                ));
            }
            Ok(with)
        })
        .collect::<std::result::Result<_, _>>()?;
    let mut answers: Vec<Vec<u32>> = full
        .iter()
        .map(|w| w.ids[w.answer_start..].to_vec())
        .collect();
    if kit.answer == AnswerFormat::Letter {
        // The labels' tokens: the answers without the tokens they all end with (the newline), so
        // a tokenizer with one token per ` A` scores one position.
        let shortest = answers.iter().map(Vec::len).min().unwrap_or(0);
        let mut common = 0;
        while common + 1 < shortest
            && answers
                .iter()
                .all(|a| a[a.len() - 1 - common] == answers[0][answers[0].len() - 1 - common])
        {
            common += 1;
        }
        for a in &mut answers {
            a.truncate(a.len() - common);
        }
        let mut distinct = answers.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != answers.len() {
            return Err(PromptError::Mismatch(
                "--answer letter: two candidate labels tokenize the same for this tokenizer".into(),
            ));
        }
    }
    Ok(CandidateAnswers {
        prompt,
        full,
        answers,
    })
}

/// One packed batch: its model inputs and, per (row, candidate), which flat positions predict
/// which answer tokens.
struct Packed {
    rows: Vec<Tokenized>,
    lengths: Vec<usize>,
    positions: Vec<usize>,
    segments: Vec<Vec<u32>>,
    width: usize,
    /// `(flat position, predicted token, row, candidate)`.
    predicts: Vec<(usize, u32, usize, usize)>,
}

fn pack(rows: &[&CandidateAnswers]) -> Result<Packed> {
    let k = rows.first().map_or(0, |r| r.answers.len());
    if k == 0 || rows.iter().any(|r| r.answers.len() != k) {
        candle_core::bail!("listwise scoring needs rows with the same number (> 0) of candidates");
    }
    let mut packed_rows = Vec::with_capacity(rows.len());
    let mut segs = Vec::with_capacity(rows.len());
    let mut pos = Vec::with_capacity(rows.len());
    let mut local: Vec<Vec<(usize, u32, usize)>> = Vec::with_capacity(rows.len());
    for r in rows {
        let len = r.prompt.answer_start;
        if len == 0 {
            candle_core::bail!("a prompt rendered to no tokens: nothing to score candidates after");
        }
        let mut ids = r.prompt.ids[..len].to_vec();
        let mut seg = vec![0u32; len];
        let mut p: Vec<usize> = (0..len).collect();
        let mut pred = vec![];
        for (c, a) in r.answers.iter().enumerate() {
            // The first answer token is predicted by the prompt's last position.
            pred.push((len - 1, a[0], c));
            for j in 0..a.len() - 1 {
                pred.push((ids.len(), a[j + 1], c));
                ids.push(a[j]);
                seg.push(c as u32 + 1);
                p.push(len + j);
            }
        }
        let mut t = r.prompt.clone();
        t.answer_start = ids.len();
        t.ids = ids;
        packed_rows.push(t);
        segs.push(seg);
        pos.push(p);
        local.push(pred);
    }
    let width = packed_rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let lengths: Vec<usize> = packed_rows.iter().map(|r| r.ids.len()).collect();
    for (b, r) in packed_rows.iter().enumerate() {
        let pad = width - r.ids.len();
        segs[b].extend(std::iter::repeat_n(0, pad));
        pos[b].extend(std::iter::repeat_n(0, pad));
    }
    let predicts = local
        .into_iter()
        .enumerate()
        .flat_map(|(b, p)| {
            p.into_iter()
                .map(move |(at, tok, c)| (b * width + at, tok, b, c))
        })
        .collect();
    Ok(Packed {
        rows: packed_rows,
        lengths,
        positions: pos.concat(),
        segments: segs,
        width,
        predicts,
    })
}

/// What one differentiable pass gives: each candidate's summed answer log-probability `[B, K]`
/// and each row's target answer tokens' mean log-probability `[B]` (the generative loss's terms).
pub struct AnswerScores {
    pub scores: Tensor,
    pub target_mean_logp: Tensor,
    pub tokens: usize,
}

/// Scores every candidate of `rows` by its answer's log-likelihood after the row's prompt, with
/// gradients (see the module doc). `targets[b]` is row b's target index among its candidates.
pub fn answer_scores(
    model: &Llama,
    rows: &[&CandidateAnswers],
    targets: &[u32],
    behaviour: Option<&Behaviour>,
    dropout: Option<&mut Dropout>,
) -> Result<AnswerScores> {
    let p = pack(rows)?;
    let (b, k) = (rows.len(), rows[0].answers.len());
    if targets.len() != b || targets.iter().any(|&t| t as usize >= k) {
        candle_core::bail!("listwise scoring: one target index within the candidates per row");
    }
    let refs: Vec<&Tokenized> = p.rows.iter().collect();
    let (x, lengths) = embed_batch(model, &refs, |t| t.ids.len(), behaviour)?;
    debug_assert_eq!(lengths, p.lengths);
    let valid: Vec<Vec<bool>> = p
        .lengths
        .iter()
        .map(|&l| (0..p.width).map(|j| j < l).collect())
        .collect();
    let step = Step {
        positions: p.positions.clone(),
        valid,
        segments: Some(p.segments.clone()),
        cache: None,
    };
    let h = model.forward(&x, step, dropout)?;
    let at: Vec<usize> = p.predicts.iter().map(|q| q.0).collect();
    let tok: Vec<u32> = p.predicts.iter().map(|q| q.1).collect();
    let logits = model
        .logits_at(&h, &at)?
        .to_dtype(candle_core::DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let n = tok.len();
    let tg = Tensor::from_vec(tok, (n, 1), h.device())?;
    let lp = logp.gather(&tg, 1)?; // [N, 1]
                                   // Sums per (row, candidate) and the target's mean, as products with 0/1 (and 1/len) matrices.
    let mut sum_m = vec![0f32; b * k * n];
    let mut tgt_m = vec![0f32; b * n];
    let mut count = vec![0usize; b];
    for (i, &(_, _, r, c)) in p.predicts.iter().enumerate() {
        sum_m[(r * k + c) * n + i] = 1.0;
        if c == targets[r] as usize {
            count[r] += 1;
        }
    }
    for (i, &(_, _, r, c)) in p.predicts.iter().enumerate() {
        if c == targets[r] as usize {
            tgt_m[r * n + i] = 1.0 / count[r] as f32;
        }
    }
    let dev = h.device();
    let scores = Tensor::from_vec(sum_m, (b * k, n), dev)?
        .matmul(&lp)?
        .reshape((b, k))?;
    let target_mean_logp = Tensor::from_vec(tgt_m, (b, n), dev)?
        .matmul(&lp)?
        .reshape(b)?;
    Ok(AnswerScores {
        scores,
        target_mean_logp,
        tokens: p.lengths.iter().sum(),
    })
}
