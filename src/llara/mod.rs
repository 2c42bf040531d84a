//! LLaRA itself: hybrid prompts, the recommender → LLM projector, curriculum prompt tuning and
//! generation-based evaluation, on top of [`crate::llm`] and [`crate::sr`].

pub mod evaluate;
pub mod optim;
pub mod projector;
pub mod prompts;
pub mod tune;

use crate::llm::{Llama, LlmTokenizer};
use candle_core::{Result, Tensor};
use projector::Projector;
use prompts::{ItemView, Templates};

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

impl Curriculum {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let err = || {
            format!("--curriculum {s}: expected linear, text-only, hybrid-only, id-only, two-stage:K or mixed:P")
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
                        return Err(format!("--curriculum {s}: P must be within 0 and 1"));
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
    pub slot_items: Vec<u32>,
    pub prompt: String,
}

/// Everything needed to turn examples into model inputs.
pub struct PromptKit<'a> {
    pub tok: &'a LlmTokenizer,
    pub templates: &'a Templates,
    pub titles: &'a [String],
}

impl PromptKit<'_> {
    /// Renders and tokenizes `ex` (with its answer when `with_answer`).
    pub fn tokenize(
        &self,
        ex: &Example,
        view: ItemView,
        with_answer: bool,
    ) -> std::result::Result<Tokenized, String> {
        let template = self.templates.list.get(ex.template).ok_or_else(|| {
            format!(
                "template {} does not exist ({} templates)",
                ex.template,
                self.templates.list.len()
            )
        })?;
        let prompt = prompts::render(template, self.titles, &ex.history, &ex.candidates, view);
        let ans = prompts::answer(&self.titles[ex.target as usize]);
        let enc = prompts::encode(self.tok, &prompt, with_answer.then_some(ans.as_str()))?;
        prompts::check_slots(
            self.tok,
            &enc.ids[..enc.answer_start],
            ex.history.len(),
            ex.candidates.len(),
            view,
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
        Ok(Tokenized {
            ids: enc.ids,
            answer_start: enc.answer_start,
            slot_items,
            prompt,
        })
    }
}

/// The frozen recommender's item table and the projector: what fills the behaviour tokens.
pub struct Behaviour<'a> {
    /// `[N, d_sr]`: one row per item (the padding row removed).
    pub item_embeddings: &'a Tensor,
    pub projector: &'a Projector,
}

/// Input embeddings `[B, T, H]` of right-padded rows, with every placeholder position overwritten
/// by the projected embedding of its item (when `behaviour` is given); returns the lengths too.
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
    let Some(bh) = behaviour.filter(|_| rows.iter().any(|r| !r.slot_items.is_empty())) else {
        return Ok((model.embed(&ids, None)?, lengths));
    };
    let slot_ids = [
        model.cfg.vocab_size as u32 + 1, // [HistoryEmb]
        model.cfg.vocab_size as u32 + 2, // [CansEmb]
    ];
    let mut positions = vec![];
    let mut items = vec![];
    for (b, r) in rows.iter().enumerate() {
        let mut k = 0;
        for (p, id) in r.ids[..lengths[b]].iter().enumerate() {
            if slot_ids.contains(id) {
                positions.push(b * t + p);
                items.push(r.slot_items[k]);
                k += 1;
            }
        }
    }
    let idx = Tensor::from_vec(items, positions.len(), bh.item_embeddings.device())?;
    let vecs = bh
        .projector
        .forward(&bh.item_embeddings.index_select(&idx, 0)?)?;
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
