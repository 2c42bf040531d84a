//! Generation-based evaluation as in the paper: greedy decoding of the answer, then the candidate
//! titles found in it decide validity (exactly one) and correctness (that one is the target).

use super::prompts::{AnswerFormat, ItemView};
use super::{embed_batch, Behaviour, Example, PromptKit};
use crate::llm::generate::{generate, GenOptions};
use crate::llm::Llama;
use candle_core::{Result, Tensor};
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

/// The verdict on a letter answer: valid when it starts with one of the list's labels (see
/// [`super::prompts::letter_index`]), correct when that label is the target's.
pub fn judge_letter(output: &str, candidates: &[u32], target: u32) -> Verdict {
    let matched: Vec<u32> = super::prompts::letter_index(output, candidates.len())
        .map(|i| candidates[i])
        .into_iter()
        .collect();
    Verdict {
        valid: matched.len() == 1,
        correct: matched.first() == Some(&target),
        matched,
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
    /// From a ranking's 0-based target ranks: every row answers a candidate (valid ratio 1),
    /// correct when ranked first.
    pub fn of_ranks(ranks: impl Iterator<Item = usize>) -> Self {
        let (mut n, mut hits) = (0, 0);
        for r in ranks {
            n += 1;
            hits += usize::from(r == 0);
        }
        let hr1 = if n == 0 { 0.0 } else { hits as f64 / n as f64 };
        GenMetrics {
            valid_ratio: if n == 0 { 0.0 } else { 1.0 },
            hr1,
            hr1_of_valid: hr1,
            rows: n,
        }
    }

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
    /// Generation may only produce one of the row's candidate answers (a token trie).
    pub constrained: bool,
    /// The part of the rows this process computes (data-parallel evaluation).
    pub shard: Shard,
}

/// Which batches of an evaluation's plan this process computes: the rows are sorted and batched
/// as one process does it, and rank `rank` of `size` takes a contiguous share of those batches
/// ([`crate::comm::shard`]), so every row is computed exactly as one process computes it. The
/// functions return only this shard's rows (in the rows' order); [`gather_in_row_order`] puts the
/// shards back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
}

impl Default for Shard {
    /// One process: every row.
    fn default() -> Self {
        Shard { rank: 0, size: 1 }
    }
}

impl Shard {
    /// This process's shard of a run spanning `comm`.
    pub fn of(comm: &dyn crate::comm::Communicator) -> Self {
        Shard {
            rank: comm.rank(),
            size: comm.size(),
        }
    }

    /// Whether batch `b` of `n_batches` is this shard's.
    fn owns(&self, b: usize, n_batches: usize) -> bool {
        crate::comm::shard(n_batches, self.rank, self.size).contains(&b)
    }
}

/// Every rank's shard of the results for `rows`, in the rows' order, on rank 0 (the others get an
/// empty list). `row_of` names the row a result is for.
pub fn gather_in_row_order<T: Serialize + serde::de::DeserializeOwned>(
    comm: &dyn crate::comm::Communicator,
    rows: &[(usize, Example)],
    local: Vec<T>,
    row_of: impl Fn(&T) -> usize,
) -> std::result::Result<Vec<T>, crate::comm::CommError> {
    if comm.size() == 1 {
        return Ok(local);
    }
    let mut all = crate::comm::gather_rows(comm, local)?;
    let pos: std::collections::HashMap<usize, usize> =
        rows.iter().enumerate().map(|(i, (r, _))| (*r, i)).collect();
    all.sort_by_key(|t| pos.get(&row_of(t)).copied().unwrap_or(usize::MAX));
    Ok(all)
}

/// Generates an answer for every `(row index, example)` and judges it. Deterministic: greedy,
/// fixed template, batches of similar prompt lengths in a fixed order.
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
    let toks = rows
        .iter()
        .map(|(_, ex)| {
            let ex = Example {
                template: opts.template,
                ..ex.clone()
            };
            kit.tokenize(&ex, opts.view, false)
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(candle_core::Error::wrap)?;
    // Batches of similar prompt lengths, so little of each batch is padding (padding is masked, so
    // it does not change a row's answer); the answers are reported in row order.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| toks[i].answer_start);
    let mut answers: Vec<Option<String>> = vec![None; rows.len()];
    let n_batches = order.len().div_ceil(opts.batch_size.max(1));
    for (b, chunk) in order.chunks(opts.batch_size.max(1)).enumerate() {
        if !opts.shard.owns(b, n_batches) {
            continue;
        }
        let refs: Vec<_> = chunk.iter().map(|&i| &toks[i]).collect();
        let (x, lengths) = embed_batch(model, &refs, |t| t.answer_start, behaviour)?;
        let outputs = if opts.constrained {
            // Each row's candidates' answer tokens as they tokenize after its prompt.
            let allowed = chunk
                .iter()
                .map(|&i| {
                    let (row, ex) = &rows[i];
                    prepare_row(kit, *row, ex, opts).map(|r| r.answers)
                })
                .collect::<Result<Vec<_>>>()?;
            crate::llm::generate::generate_constrained(
                model, kit.tok, &x, &lengths, &gen, &allowed,
            )?
        } else {
            generate(model, kit.tok, &x, &lengths, &gen)?
        };
        for (&i, g) in chunk.iter().zip(outputs) {
            answers[i] = Some(g.text);
        }
        progress(chunk.len());
    }
    let mut out = Vec::with_capacity(rows.len());
    for (((row, ex), t), answer) in rows.iter().zip(toks).zip(answers) {
        // Rows of other shards were not generated here.
        let Some(text) = answer else { continue };
        let v = match kit.answer {
            AnswerFormat::Title => judge(&text, &ex.candidates, kit.titles, ex.target),
            AnswerFormat::Letter => judge_letter(&text, &ex.candidates, ex.target),
        };
        out.push(Prediction {
            row: *row,
            prompt: t.prompt,
            output: text,
            target: ex.target,
            target_title: kit.titles[ex.target as usize].clone(),
            candidates: ex.candidates.clone(),
            valid: v.valid,
            correct: v.correct,
            matched: v.matched,
        });
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
    fn letter_answers_name_their_position() {
        assert!(judge_letter(" B\n", &[4, 2, 3], 2).correct);
        let v = judge_letter("C", &[4, 2, 3], 2);
        assert!(v.valid && !v.correct && v.matched == vec![3]);
        // Beyond the list, or not a label: invalid.
        assert!(!judge_letter("D", &[4, 2, 3], 2).valid);
        assert!(!judge_letter("Heat", &[4, 2, 3], 2).valid);
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

/// How a candidate's answer log-likelihood is turned into a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreMode {
    /// Sum of the answer tokens' log-probabilities.
    Sum,
    /// Their mean (length-normalised).
    Mean,
}

impl ScoreMode {
    pub fn parse(s: &str) -> std::result::Result<Self, super::OptionError> {
        match s {
            "sum" => Ok(ScoreMode::Sum),
            "mean" => Ok(ScoreMode::Mean),
            other => Err(super::OptionError::new(
                "score",
                other,
                "expected sum or mean",
            )),
        }
    }
}

/// One row scored: each candidate's score (in candidate order) and the target's 0-based rank.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RowScores {
    pub row: usize,
    pub target: u32,
    pub candidates: Vec<u32>,
    pub scores: Vec<f32>,
    pub rank: usize,
}

/// Log-softmax of one logits row, at `token`.
fn logprob(row: &[f32], token: u32) -> f32 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    row[token as usize] - lse
}

/// The log-probability of `targets[i]` at flat position `positions[i]` of `hidden`, computing the
/// logits a few dozen positions at a time (a full `[positions, vocabulary]` block would be
/// hundreds of MB of fresh pages per pass).
fn logprobs_at(
    model: &Llama,
    hidden: &Tensor,
    positions: &[usize],
    targets: &[u32],
) -> Result<Vec<f32>> {
    const CHUNK: usize = 64;
    let mut out = Vec::with_capacity(positions.len());
    for (p, t) in positions.chunks(CHUNK).zip(targets.chunks(CHUNK)) {
        let logits: Vec<Vec<f32>> = model
            .logits_at(hidden, p)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        out.extend(logits.iter().zip(t).map(|(row, &tok)| logprob(row, tok)));
    }
    Ok(out)
}

/// How candidates are scored.
#[derive(Debug, Clone, Copy)]
pub struct ScoreOptions {
    pub mode: ScoreMode,
    /// Candidates per forward pass (each row's candidates are split into groups of this size).
    pub chunk: usize,
    /// Run each prompt once and let every candidate read its KV cache (else every candidate runs
    /// the whole prompt again: the reference the cache is measured against).
    pub shared_prompt: bool,
}

impl ScoreOptions {
    pub fn new(mode: ScoreMode) -> Self {
        Self {
            mode,
            chunk: 20,
            shared_prompt: true,
        }
    }
}

/// One row ready for scoring: its example, prompt and each candidate's answer tokens.
struct ScoreRow {
    row: usize,
    ex: Example,
    prompt: super::Tokenized,
    full: Vec<super::Tokenized>,
    answers: Vec<Vec<u32>>,
}

fn prepare_row(kit: &PromptKit, row: usize, ex: &Example, opts: &EvalOptions) -> Result<ScoreRow> {
    let ex = Example {
        template: opts.template,
        ..ex.clone()
    };
    let c = super::listwise::candidate_answers(kit, &ex, opts.view)
        .map_err(candle_core::Error::wrap)?;
    Ok(ScoreRow {
        row,
        ex,
        prompt: c.prompt,
        full: c.full,
        answers: c.answers,
    })
}

/// A candidate's score from its answer tokens' summed log-probability.
fn finish_score(mode: ScoreMode, total: f32, tokens: usize) -> f32 {
    match mode {
        ScoreMode::Sum => total,
        ScoreMode::Mean => total / tokens as f32,
    }
}

/// Ranks each row's candidates by the log-likelihood of their answers (` title` and a newline)
/// after the prompt. With `shared_prompt`, the prompts of `opts.batch_size` rows run together once,
/// filling a KV cache; then each row's candidates (`chunk` at a time) are packed side by side into
/// one sequence whose tokens attend the cached prompt and their own candidate's earlier tokens
/// only, so every candidate costs just its own answer tokens (no padding, no copied cache).
pub fn score_candidates(
    model: &Llama,
    kit: &PromptKit,
    behaviour: Option<&Behaviour>,
    rows: &[(usize, Example)],
    opts: &EvalOptions,
    so: ScoreOptions,
    mut progress: impl FnMut(usize),
) -> Result<Vec<RowScores>> {
    let mut out = Vec::with_capacity(rows.len());
    if !so.shared_prompt {
        for (i, (row, ex)) in rows.iter().enumerate() {
            if !opts.shard.owns(i, rows.len()) {
                continue;
            }
            let r = prepare_row(kit, *row, ex, opts)?;
            let scores = score_without_cache(model, behaviour, &r, so)?;
            out.push(ranked(r.row, &r.ex, scores));
            progress(1);
        }
        return Ok(out);
    }
    let n_batches = rows.len().div_ceil(opts.batch_size.max(1));
    for (b, group) in rows.chunks(opts.batch_size.max(1)).enumerate() {
        if !opts.shard.owns(b, n_batches) {
            continue;
        }
        let prepared: Vec<ScoreRow> = group
            .iter()
            .map(|(row, ex)| prepare_row(kit, *row, ex, opts))
            .collect::<Result<_>>()?;
        for (r, scores) in prepared
            .iter()
            .zip(score_with_cache(model, behaviour, &prepared, so)?)
        {
            out.push(ranked(r.row, &r.ex, scores));
        }
        progress(prepared.len());
    }
    Ok(out)
}

/// The reference: every candidate runs prompt + answer in full, `chunk` candidates per pass.
fn score_without_cache(
    model: &Llama,
    behaviour: Option<&Behaviour>,
    r: &ScoreRow,
    so: ScoreOptions,
) -> Result<Vec<f32>> {
    use crate::llm::llama::Step;
    let mut scores = Vec::with_capacity(r.full.len());
    for group in r.full.chunks(so.chunk.max(1)) {
        let refs: Vec<&super::Tokenized> = group.iter().collect();
        let (x, lens) = embed_batch(model, &refs, |t| t.ids.len(), behaviour)?;
        let t = x.dim(1)?;
        let h = model.forward(&x, Step::padded(&lens, t), None)?;
        let (pos, targets) = super::batch::answer_targets(&refs, t);
        let lp = logprobs_at(model, &h, &pos, &targets)?;
        let mut k = 0;
        for w in group {
            let n = w.ids.len() - w.answer_start;
            let tot: f32 = lp[k..k + n].iter().sum();
            k += n;
            scores.push(finish_score(so.mode, tot, n));
        }
    }
    Ok(scores)
}

/// The shared-prompt path for a group of rows (see [`score_candidates`]).
fn score_with_cache(
    model: &Llama,
    behaviour: Option<&Behaviour>,
    rows: &[ScoreRow],
    so: ScoreOptions,
) -> Result<Vec<Vec<f32>>> {
    use crate::llm::llama::{KvCache, Step};
    let nrows = rows.len();
    let prompts: Vec<&super::Tokenized> = rows.iter().map(|r| &r.prompt).collect();
    if prompts.iter().any(|p| p.answer_start == 0) {
        candle_core::bail!("a prompt rendered to no tokens: nothing to score candidates after");
    }
    let (x, lengths) = embed_batch(model, &prompts, |t| t.answer_start, behaviour)?;
    let tmax = x.dim(1)?;
    let mut cache = KvCache::new(model.layers.len(), nrows);
    let h = model.forward(
        &x,
        Step::padded(&lengths, tmax).with_cache(&mut cache),
        None,
    )?;
    let last: Vec<usize> = lengths
        .iter()
        .enumerate()
        .map(|(i, &l)| i * tmax + l - 1)
        .collect();
    // Each prompt's next-token distribution scores every answer's first token.
    let first: Vec<Vec<f32>> = model
        .logits_at(&h, &last)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2()?;
    let mut totals: Vec<Vec<f32>> = rows
        .iter()
        .zip(&first)
        .map(|(r, f)| r.answers.iter().map(|a| logprob(f, a[0])).collect())
        .collect();
    let most = rows.iter().map(|r| r.answers.len()).max().unwrap_or(0);
    let chunk = so.chunk.max(1);
    for c0 in (0..most).step_by(chunk) {
        // Row b's candidates c0..c0+chunk, all but each answer's last token, side by side: the
        // token at offset j of candidate c sits at rotary position len_b + j, in segment c + 1,
        // and predicts that answer's token j + 1.
        let mut ids: Vec<Vec<u32>> = vec![Vec::new(); nrows];
        let mut segs: Vec<Vec<u32>> = vec![Vec::new(); nrows];
        let mut pos: Vec<Vec<usize>> = vec![Vec::new(); nrows];
        let mut predicts: Vec<Vec<(usize, u32)>> = vec![Vec::new(); nrows];
        for (b, r) in rows.iter().enumerate() {
            for (c, a) in r.answers.iter().enumerate().skip(c0).take(chunk) {
                for j in 0..a.len() - 1 {
                    ids[b].push(a[j]);
                    segs[b].push(c as u32 + 1);
                    pos[b].push(lengths[b] + j);
                    predicts[b].push((c, a[j + 1]));
                }
            }
        }
        let w = ids.iter().map(Vec::len).max().unwrap_or(0);
        if w == 0 {
            continue;
        }
        let valid: Vec<Vec<bool>> = ids
            .iter()
            .map(|r| (0..w).map(|j| j < r.len()).collect())
            .collect();
        for b in 0..nrows {
            let pad = w - ids[b].len();
            ids[b].extend(std::iter::repeat_n(0, pad));
            segs[b].extend(std::iter::repeat_n(0, pad));
            pos[b].extend(std::iter::repeat_n(lengths[b], pad));
        }
        let xe = model.embed(&ids, None)?;
        // The prompt cache stays as it is for the next group: the pass reads it and keeps none
        // of its own keys (each layer's extension is dropped with the layer).
        let mut c = cache.reader();
        let step = Step {
            positions: pos.concat(),
            valid,
            segments: Some(segs),
            cache: Some(&mut c),
        };
        let hc = model.forward(&xe, step, None)?;
        let at: Vec<usize> = predicts
            .iter()
            .enumerate()
            .flat_map(|(b, p)| (0..p.len()).map(move |j| b * w + j))
            .collect();
        let next: Vec<u32> = predicts.iter().flatten().map(|&(_, t)| t).collect();
        let lp = logprobs_at(model, &hc, &at, &next)?;
        for ((b, c), v) in predicts
            .iter()
            .enumerate()
            .flat_map(|(b, p)| p.iter().map(move |&(c, _)| (b, c)))
            .zip(lp)
        {
            totals[b][c] += v;
        }
    }
    Ok(rows
        .iter()
        .zip(totals)
        .map(|(r, t)| {
            t.iter()
                .zip(&r.answers)
                .map(|(&tot, a)| finish_score(so.mode, tot, a.len()))
                .collect()
        })
        .collect())
}

/// Ranks each row's candidates by the scoring head (one forward pass per prompt: no answer
/// tokens). Rows go in batches of `opts.batch_size` of similar prompt length; results in row order.
pub fn score_with_head(
    model: &Llama,
    kit: &PromptKit,
    behaviour: Option<&Behaviour>,
    head: &super::head::Head,
    rows: &[(usize, Example)],
    opts: &EvalOptions,
    mut progress: impl FnMut(usize),
) -> Result<Vec<RowScores>> {
    use crate::llm::llama::Step;
    let exs: Vec<Example> = rows
        .iter()
        .map(|(_, ex)| Example {
            template: opts.template,
            ..ex.clone()
        })
        .collect();
    let toks = exs
        .iter()
        .map(|ex| kit.tokenize(ex, opts.view, false))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(candle_core::Error::wrap)?;
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| (toks[i].answer_start, toks[i].cand_positions.len()));
    let mut out: Vec<Option<RowScores>> = vec![None; rows.len()];
    // The plan first (batches of up to batch_size rows with the same candidate count), then this
    // shard's batches of it.
    let mut plan: Vec<&[usize]> = vec![];
    let mut start = 0;
    while start < order.len() {
        // A batch: up to batch_size rows with the same candidate count.
        let k = toks[order[start]].cand_positions.len();
        let mut end = start;
        while end < order.len()
            && end - start < opts.batch_size.max(1)
            && toks[order[end]].cand_positions.len() == k
        {
            end += 1;
        }
        plan.push(&order[start..end]);
        start = end;
    }
    for (b, &chunk) in plan.iter().enumerate() {
        if !opts.shard.owns(b, plan.len()) {
            continue;
        }
        let refs: Vec<_> = chunk.iter().map(|&i| &toks[i]).collect();
        let (x, lengths) = embed_batch(model, &refs, |t| t.answer_start, behaviour)?;
        let tmax = x.dim(1)?;
        let h = model.forward(&x, Step::padded(&lengths, tmax), None)?;
        let prior = match behaviour {
            Some(b) => head.prior(b.rec, &refs, opts.view)?,
            None => None,
        };
        let scores: Vec<Vec<f32>> = head.scores(&h, &refs, prior.as_ref())?.detach().to_vec2()?;
        for (&i, s) in chunk.iter().zip(scores) {
            out[i] = Some(ranked(rows[i].0, &exs[i], s));
        }
        progress(chunk.len());
    }
    // Rows of other shards were not scored here.
    Ok(out.into_iter().flatten().collect())
}

/// The row's scores with the target's 0-based rank (ties count against the target).
fn ranked(row: usize, ex: &Example, scores: Vec<f32>) -> RowScores {
    let ti = ex
        .candidates
        .iter()
        .position(|&c| c == ex.target)
        .unwrap_or(0);
    let rank = crate::eval::metrics::rank_among(&scores, ti);
    RowScores {
        row,
        target: ex.target,
        candidates: ex.candidates.clone(),
        scores,
        rank,
    }
}

/// Generation-based evaluation of a model (used by `llara eval`).
pub fn evaluate_split(
    model: &Llama,
    kit: &PromptKit,
    behaviour: Option<&Behaviour>,
    rows: &[(usize, Example)],
    opts: &EvalOptions,
    progress: impl FnMut(usize),
) -> Result<(Vec<Prediction>, GenMetrics)> {
    let preds = evaluate(model, kit, behaviour, rows, opts, progress)?;
    let m = GenMetrics::of(&preds);
    Ok((preds, m))
}
