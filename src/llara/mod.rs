//! LLaRA itself: hybrid prompts, the recommender → LLM projector, curriculum prompt tuning and
//! generation-based evaluation, on top of [`crate::llm`] and [`crate::sr`].

pub mod batch;
pub mod checkpoint;
pub mod evaluate;
pub mod head;
pub mod listwise;
pub mod optim;
pub mod projector;
pub mod prompts;
pub mod tune;

use crate::llm::{Llama, LlmTokenizer};
use candle_core::{Result, Tensor};
use projector::Projector;
use prompts::{AnswerFormat, ItemView, PromptError, Templates};

/// Which prompt each optimizer step uses.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Curriculum {
    /// The paper: hybrid with probability τ/T at step τ of T.
    Linear,
    /// Always text-only (a TALLRec-like baseline).
    TextOnly,
    /// Always hybrid (the paper's "direct").
    HybridOnly,
    /// Always `[HistoryEmb]`/`[CansEmb]` without titles.
    IdOnly,
    /// Text-only for the first K epochs, then hybrid.
    TwoStage(usize),
    /// Hybrid with constant probability P.
    Mixed(f64),
}

/// An option whose value LLaRA does not accept: the flag, the value given and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag} {value}: {expected}")]
pub struct OptionError {
    pub flag: &'static str,
    pub value: String,
    pub expected: String,
}

impl OptionError {
    pub fn new(flag: &'static str, value: &str, expected: impl Into<String>) -> Self {
        OptionError {
            flag,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

impl Curriculum {
    pub fn parse(s: &str) -> std::result::Result<Self, OptionError> {
        let err = || {
            OptionError::new(
                "curriculum",
                s,
                "expected linear, text-only, hybrid-only, id-only, two-stage:K or mixed:P",
            )
        };
        Ok(match s.trim() {
            "linear" => Curriculum::Linear,
            "text-only" => Curriculum::TextOnly,
            "hybrid-only" | "direct" => Curriculum::HybridOnly,
            "id-only" => Curriculum::IdOnly,
            other => {
                if let Some(k) = other.strip_prefix("two-stage:") {
                    Curriculum::TwoStage(k.parse().map_err(|_| err())?)
                } else if let Some(p) = other.strip_prefix("mixed:") {
                    let p: f64 = p.parse().map_err(|_| err())?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err(OptionError::new(
                            "curriculum",
                            s,
                            "P must be within 0 and 1",
                        ));
                    }
                    Curriculum::Mixed(p)
                } else {
                    return Err(err());
                }
            }
        })
    }

    pub fn name(&self) -> String {
        match self {
            Curriculum::Linear => "linear".into(),
            Curriculum::TextOnly => "text-only".into(),
            Curriculum::HybridOnly => "hybrid-only".into(),
            Curriculum::IdOnly => "id-only".into(),
            Curriculum::TwoStage(k) => format!("two-stage:{k}"),
            Curriculum::Mixed(p) => format!("mixed:{p}"),
        }
    }

    /// Probability that step `step` (0-based) of `total`, in epoch `epoch`, is hard.
    pub fn p_hard(&self, step: usize, total: usize, epoch: usize) -> f64 {
        match self {
            Curriculum::Linear => step as f64 / total.max(1) as f64,
            Curriculum::TextOnly => 0.0,
            Curriculum::HybridOnly | Curriculum::IdOnly => 1.0,
            Curriculum::TwoStage(k) => f64::from(u8::from(epoch >= *k)),
            Curriculum::Mixed(p) => *p,
        }
    }

    /// The hard prompt of this curriculum (hybrid, or id-only for the id-only ablation).
    pub fn hard_view(&self) -> ItemView {
        match self {
            Curriculum::IdOnly => ItemView::IdOnly,
            _ => ItemView::Hybrid,
        }
    }

    /// The prompt kind evaluation uses: the hard one, or text for a text-only run.
    pub fn eval_view(&self) -> ItemView {
        match self {
            Curriculum::TextOnly => ItemView::Text,
            other => other.hard_view(),
        }
    }
}

/// One prompt instance: a history, its candidates (the target among them) and a template.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub history: Vec<u32>,
    pub candidates: Vec<u32>,
    pub target: u32,
    pub template: usize,
}

/// A tokenized example with the items its placeholders stand for, in order of appearance.
#[derive(Debug, Clone)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub answer_start: usize,
    /// The items of the `[HistoryEmb]` / `[CansEmb]` slots, in prompt order.
    pub slot_items: Vec<u32>,
    /// Where each candidate's marker token (`[CansEmb]`, or `[PH]` in a text prompt) is, in
    /// candidate order: the positions a scoring head reads.
    pub cand_positions: Vec<usize>,
    /// Where the `[UserEmb]` slot is, when the prompt has one (the head reads the user there).
    pub user_position: Option<usize>,
    /// The history (for the `[UserEmb]` slot's recommender state and the head's prior).
    pub history: Vec<u32>,
    pub candidates: Vec<u32>,
    pub prompt: String,
}

/// Everything needed to turn examples into model inputs.
pub struct PromptKit<'a> {
    pub tok: &'a LlmTokenizer,
    pub templates: &'a Templates,
    pub titles: &'a [String],
    /// Hybrid prompts follow the history with a `[UserEmb]` slot.
    pub user_token: bool,
    /// Titles, or lettered candidates answered by their letter.
    pub answer: AnswerFormat,
}

impl PromptKit<'_> {
    /// Renders and tokenizes `ex` (with its answer when `with_answer`).
    pub fn tokenize(
        &self,
        ex: &Example,
        view: ItemView,
        with_answer: bool,
    ) -> std::result::Result<Tokenized, PromptError> {
        let template = self.templates.list.get(ex.template).ok_or_else(|| {
            PromptError::Mismatch(format!(
                "template {} does not exist ({} templates)",
                ex.template,
                self.templates.list.len()
            ))
        })?;
        let prompt = prompts::render(
            template,
            self.titles,
            &ex.history,
            &ex.candidates,
            view,
            self.user_token,
            self.answer,
        );
        let ans = match self.answer {
            AnswerFormat::Title => prompts::answer(&self.titles[ex.target as usize]),
            AnswerFormat::Letter => {
                if ex.candidates.len() > 26 {
                    return Err(PromptError::Mismatch(format!(
                        "--answer letter labels at most 26 candidates, the row has {}",
                        ex.candidates.len()
                    )));
                }
                match ex.candidates.iter().position(|&c| c == ex.target) {
                    Some(i) => prompts::answer(&prompts::letter(i).expect("checked").to_string()),
                    None if !with_answer => String::new(),
                    None => {
                        return Err(PromptError::Mismatch(
                            "the target is not among the candidates".into(),
                        ))
                    }
                }
            }
        };
        let enc = prompts::encode(self.tok, &prompt, with_answer.then_some(ans.as_str()))?;
        prompts::check_slots(
            self.tok,
            &enc.ids[..enc.answer_start],
            ex.history.len(),
            ex.candidates.len(),
            view,
            self.user_token,
        )?;
        // Placeholder order in the prompt: history and candidate slots as they appear.
        let (h, c) = (
            self.tok.added_id("[HistoryEmb]").expect("added"),
            self.tok.added_id("[CansEmb]").expect("added"),
        );
        let (mut hi, mut ci) = (ex.history.iter(), ex.candidates.iter());
        let mut slot_items = vec![];
        for &id in &enc.ids[..enc.answer_start] {
            if id == h {
                slot_items.push(*hi.next().expect("checked count"));
            } else if id == c {
                slot_items.push(*ci.next().expect("checked count"));
            }
        }
        // Each candidate's marker: its [CansEmb], or in a text prompt its [PH] (the history's
        // come first when the template lists the history first).
        let marker = if view == ItemView::Text {
            self.tok.added_id("[PH]").expect("added")
        } else {
            c
        };
        let mut marks: Vec<usize> = enc.ids[..enc.answer_start]
            .iter()
            .enumerate()
            .filter(|&(_, &id)| id == marker)
            .map(|(p, _)| p)
            .collect();
        if view == ItemView::Text {
            let nh = ex.history.len();
            marks = if prompts::history_first(template) {
                marks[nh..].to_vec()
            } else {
                marks[..marks.len() - nh].to_vec()
            };
        }
        let user = self.tok.added_id("[UserEmb]").expect("added");
        let user_position = enc.ids[..enc.answer_start]
            .iter()
            .position(|&id| id == user);
        Ok(Tokenized {
            ids: enc.ids,
            answer_start: enc.answer_start,
            slot_items,
            cand_positions: marks,
            user_position,
            history: ex.history.clone(),
            candidates: ex.candidates.clone(),
            prompt,
        })
    }
}

/// The frozen recommender with the tables behaviour tokens are filled from.
pub struct Recommender {
    pub model: crate::sr::SeqRec,
    pub cfg: crate::sr::Config,
    /// `[N, d_sr]`: the input item embeddings (the padding row removed): LLaRA's behaviour tokens.
    pub item_embeddings: Tensor,
    /// `[N, d_state]`: the output rows `s_fc` (the vectors the recommender scores its state
    /// against; `d_state` differs from `d_sr` for Caser).
    pub output_embeddings: Tensor,
}

impl Recommender {
    /// The size of the recommender's state (and of its `s_fc` rows).
    pub fn state_dim(&self) -> usize {
        self.output_embeddings.dim(1).unwrap_or(0)
    }

    pub fn new(model: crate::sr::SeqRec, cfg: crate::sr::Config) -> Result<Self> {
        let n = cfg.item_num;
        let item_embeddings = model.item_embeddings().narrow(0, 0, n)?.detach();
        let output_embeddings = model.head().weight.detach();
        Ok(Self {
            model,
            cfg,
            item_embeddings,
            output_embeddings,
        })
    }

    /// The recommender's state of each history `[B, d_sr]` (evaluation mode).
    pub fn states(&self, histories: &[&[u32]]) -> Result<Tensor> {
        let dev = self.item_embeddings.device();
        let batch = crate::sr::Batch::new(histories, &self.cfg, dev).map_err(sr_err)?;
        Ok(self.model.state(&batch, None).map_err(sr_err)?.detach())
    }

    /// The recommender's own scores of each row's candidates `[B, K]` (all rows with K candidates).
    pub fn candidate_scores(&self, histories: &[&[u32]], candidates: &[&[u32]]) -> Result<Tensor> {
        let k = candidates.first().map_or(0, |c| c.len());
        if candidates.iter().any(|c| c.len() != k) {
            candle_core::bail!("rows of one batch must have the same number of candidates");
        }
        let state = self.states(histories)?;
        let flat: Vec<u32> = candidates.iter().flat_map(|c| c.iter().copied()).collect();
        let items = Tensor::from_vec(flat, (candidates.len(), k), state.device())?;
        Ok(self
            .model
            .score_items(&state, &items)
            .map_err(sr_err)?
            .detach())
    }
}

fn sr_err(e: crate::sr::SrError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Which recommender rows fill the candidates' `[CansEmb]` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CandEmb {
    /// The input item embeddings (LLaRA).
    #[default]
    Input,
    /// The output rows `s_fc`, the vectors the recommender's state is scored against.
    Output,
}

impl CandEmb {
    pub fn parse(s: &str) -> std::result::Result<Self, OptionError> {
        match s {
            "input" => Ok(CandEmb::Input),
            "output" => Ok(CandEmb::Output),
            o => Err(OptionError::new("cand-emb", o, "expected input or output")),
        }
    }
}

/// The frozen recommender and the projector: what fills the behaviour tokens.
pub struct Behaviour<'a> {
    pub rec: &'a Recommender,
    pub cand_emb: CandEmb,
    pub projector: &'a Projector,
}

/// Input embeddings `[B, T, H]` of right-padded rows, with every placeholder position overwritten
/// by the projected recommender vector of its item (history items: input embeddings; candidates:
/// the `cand_emb` table; `[UserEmb]`: the recommender's state of the row's history) when
/// `behaviour` is given; returns the lengths too.
pub fn embed_batch(
    model: &Llama,
    rows: &[&Tokenized],
    take: impl Fn(&Tokenized) -> usize,
    behaviour: Option<&Behaviour>,
) -> Result<(Tensor, Vec<usize>)> {
    let lengths: Vec<usize> = rows.iter().map(|r| take(r)).collect();
    let t = lengths.iter().copied().max().unwrap_or(0);
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .zip(&lengths)
        .map(|(r, &l)| r.ids[..l].to_vec())
        .collect();
    let v = model.cfg.vocab_size as u32;
    let (hist_id, cand_id, user_id) = (v + 1, v + 2, v + 4);
    let has_slots = ids
        .iter()
        .flatten()
        .any(|&i| i == hist_id || i == cand_id || i == user_id);
    let Some(bh) = behaviour.filter(|_| has_slots) else {
        return Ok((model.embed(&ids, None)?, lengths));
    };
    let (mut hpos, mut hitems, mut cpos, mut citems, mut upos, mut uhist) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (b, r) in rows.iter().enumerate() {
        let mut k = 0;
        for (p, &id) in r.ids[..lengths[b]].iter().enumerate() {
            if id == hist_id || id == cand_id {
                let item = *r
                    .slot_items
                    .get(k)
                    .ok_or_else(|| candle_core::Error::Msg("more slots than slot items".into()))?;
                k += 1;
                if id == hist_id {
                    hpos.push(b * t + p);
                    hitems.push(item);
                } else {
                    cpos.push(b * t + p);
                    citems.push(item);
                }
            } else if id == user_id {
                upos.push(b * t + p);
                uhist.push(r.history.as_slice());
            }
        }
    }
    let dev = bh.rec.item_embeddings.device();
    // (vectors, whether they live in the recommender's state space) in position order.
    let mut parts: Vec<(Tensor, bool)> = vec![];
    if !hitems.is_empty() {
        let idx = Tensor::from_vec(hitems, hpos.len(), dev)?;
        parts.push((bh.rec.item_embeddings.index_select(&idx, 0)?, false));
    }
    if !citems.is_empty() {
        let (table, state) = match bh.cand_emb {
            CandEmb::Input => (&bh.rec.item_embeddings, false),
            CandEmb::Output => (&bh.rec.output_embeddings, true),
        };
        let idx = Tensor::from_vec(citems, cpos.len(), dev)?;
        parts.push((table.index_select(&idx, 0)?, state));
    }
    if !uhist.is_empty() {
        parts.push((bh.rec.states(&uhist)?, true));
    }
    let positions: Vec<usize> = hpos.into_iter().chain(cpos).chain(upos).collect();
    let vecs = if bh.projector.ws.is_none() {
        // One space (SASRec, GRU4Rec): one projector pass over all slots.
        let all: Vec<Tensor> = parts.into_iter().map(|(t, _)| t).collect();
        bh.projector.forward(&Tensor::cat(&all, 0)?)?
    } else {
        let projected = parts
            .iter()
            .map(|(t, state)| {
                if *state {
                    bh.projector.forward_state(t)
                } else {
                    bh.projector.forward(t)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&projected, 0)?
    };
    Ok((model.embed(&ids, Some((&positions, &vecs)))?, lengths))
}

/// A 64-bit key for a derived random stream (`seed`, a purpose, an index).
pub fn stream_seed(seed: u64, purpose: &str, index: u64) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(purpose.as_bytes());
    h.update(index.to_le_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}
