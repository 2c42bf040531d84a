//! LLaRA's prompts: templates per domain (`configs/prompts/*.txt`, embedded), item renderings
//! (text-only, hybrid, id-only) and tokenization with the answer span located.

use crate::llm::LlmTokenizer;
use std::path::Path;

/// Why a prompt could not be made: a template file that does not read or parse, or an example
/// that does not fit its template and tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{origin}: the template starting at line {line} has {slot} {count} times (expected once)"
    )]
    Slot {
        origin: String,
        line: usize,
        slot: &'static str,
        count: usize,
    },
    #[error("{0}: no templates")]
    NoTemplates(String),
    #[error(transparent)]
    Tokenizer(#[from] crate::llm::tokenizer::TokenizerError),
    #[error("the answer {0:?} produced no tokens")]
    EmptyAnswer(String),
    /// The rendered prompt's placeholders, template choice, or answers do not match the example.
    #[error("{0}")]
    Mismatch(String),
}

/// How items appear in a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemView {
    /// `title [PH]`: the easy, text-only prompt.
    Text,
    /// `title [HistoryEmb]` / `title [CansEmb]`: the hard prompt carrying behaviour tokens.
    Hybrid,
    /// `[HistoryEmb]` / `[CansEmb]` without titles (ablation).
    IdOnly,
}

impl ItemView {
    pub fn name(self) -> &'static str {
        match self {
            ItemView::Text => "text",
            ItemView::Hybrid => "hybrid",
            ItemView::IdOnly => "id-only",
        }
    }

    /// Whether the prompt carries projected recommender embeddings.
    pub fn uses_embeddings(self) -> bool {
        self != ItemView::Text
    }
}

/// What the model answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AnswerFormat {
    /// The target's title (LLaRA).
    #[default]
    Title,
    /// The letter the candidate list labels the target with (`(A) title`, …): a one-token
    /// verbalizer (LlamaRec); at most 26 candidates.
    Letter,
}

impl AnswerFormat {
    pub fn parse(s: &str) -> Result<Self, super::OptionError> {
        match s {
            "title" => Ok(AnswerFormat::Title),
            "letter" => Ok(AnswerFormat::Letter),
            o => Err(super::OptionError::new(
                "answer",
                o,
                "expected title or letter",
            )),
        }
    }
}

/// The label of the `i`-th candidate in a lettered list (`A`, `B`, …).
pub fn letter(i: usize) -> Option<char> {
    (i < 26).then(|| (b'A' + i as u8) as char)
}

/// The candidate index a generated letter answer names: its first non-space character, an
/// upper-case label within the list (optionally in parentheses), not followed by a letter or digit.
pub fn letter_index(output: &str, candidates: usize) -> Option<usize> {
    let t = output.trim_start().trim_start_matches('(');
    let mut chars = t.chars();
    let c = chars.next()?;
    if chars.next().is_some_and(|n| n.is_alphanumeric()) || !c.is_ascii_uppercase() {
        return None;
    }
    let i = (c as u8 - b'A') as usize;
    (i < candidates).then_some(i)
}

pub const HISTORY_SLOT: &str = "[HistoryHere]";
pub const CANDIDATES_SLOT: &str = "[CansHere]";
pub const COUNT_SLOT: &str = "[N]";

const EMBEDDED: [(&str, &str); 4] = [
    ("movie", include_str!("../../configs/prompts/movie.txt")),
    ("game", include_str!("../../configs/prompts/game.txt")),
    ("artist", include_str!("../../configs/prompts/artist.txt")),
    ("item", include_str!("../../configs/prompts/item.txt")),
];

/// The templates of one domain.
#[derive(Debug, Clone)]
pub struct Templates {
    /// Where they came from (`embedded:movie` or a path).
    pub source: String,
    pub list: Vec<String>,
}

impl Templates {
    /// The embedded templates for a dataset's domain noun (`movie`, `game`, `music artist`, …;
    /// the last word picks the file, `item` when none matches).
    pub fn for_domain(domain: &str) -> Templates {
        let noun = domain
            .split_whitespace()
            .last()
            .unwrap_or("item")
            .to_ascii_lowercase();
        let noun = noun.trim_end_matches('s');
        let (name, text) = EMBEDDED
            .iter()
            .find(|(n, _)| *n == noun)
            .copied()
            .unwrap_or(EMBEDDED[3]);
        Self::parse(text, &format!("embedded:{name}")).expect("embedded templates are valid")
    }

    pub fn from_file(path: &Path) -> Result<Templates, PromptError> {
        let text = std::fs::read_to_string(path).map_err(|source| PromptError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Templates separated by `---` lines; `#` lines are comments. Each must hold `[HistoryHere]`
    /// and `[CansHere]` exactly once.
    pub fn parse(text: &str, source: &str) -> Result<Templates, PromptError> {
        let mut list = vec![];
        let mut cur: Vec<&str> = vec![];
        let mut start_line = 1;
        let mut flush = |cur: &mut Vec<&str>, line: usize| -> Result<(), PromptError> {
            let t = cur.join("\n").trim().to_string();
            cur.clear();
            if t.is_empty() {
                return Ok(());
            }
            for slot in [HISTORY_SLOT, CANDIDATES_SLOT] {
                let n = t.matches(slot).count();
                if n != 1 {
                    return Err(PromptError::Slot {
                        origin: source.to_string(),
                        line,
                        slot,
                        count: n,
                    });
                }
            }
            list.push(t);
            Ok(())
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim() == "---" {
                flush(&mut cur, start_line)?;
                start_line = i + 2;
            } else if !line.trim_start().starts_with('#') {
                cur.push(line);
            }
        }
        flush(&mut cur, start_line)?;
        if list.is_empty() {
            return Err(PromptError::NoTemplates(source.to_string()));
        }
        Ok(Templates {
            source: source.to_string(),
            list,
        })
    }
}

/// One item as it appears in a list.
fn item_text(title: &str, view: ItemView, slot: &str) -> String {
    match view {
        ItemView::Text => format!("{title} [PH]"),
        ItemView::Hybrid => format!("{title} {slot}"),
        ItemView::IdOnly => slot.to_string(),
    }
}

/// The prompt text for a history and candidate list. With `user`, a view that carries embeddings
/// follows the history with one `[UserEmb]` slot (the recommender's state of that history). With
/// [`AnswerFormat::Letter`] each candidate is prefixed by its label, `(A) `, `(B) `, …
pub fn render(
    template: &str,
    titles: &[String],
    history: &[u32],
    candidates: &[u32],
    view: ItemView,
    user: bool,
    answer: AnswerFormat,
) -> String {
    let text = |i: u32, slot: &str| item_text(&titles[i as usize], view, slot);
    let mut hist = history
        .iter()
        .map(|&i| text(i, "[HistoryEmb]"))
        .collect::<Vec<_>>()
        .join(", ");
    if user && view.uses_embeddings() {
        hist.push_str(" [UserEmb]");
    }
    let cands = candidates
        .iter()
        .enumerate()
        .map(|(k, &i)| match (answer, letter(k)) {
            (AnswerFormat::Letter, Some(l)) => format!("({l}) {}", text(i, "[CansEmb]")),
            _ => text(i, "[CansEmb]"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    template
        .replace(HISTORY_SLOT, &hist)
        .replace(CANDIDATES_SLOT, &cands)
        .replace(COUNT_SLOT, &candidates.len().to_string())
}

/// Whether a template lists the history before the candidates.
pub fn history_first(template: &str) -> bool {
    template.find(HISTORY_SLOT) < template.find(CANDIDATES_SLOT)
}

/// The answer the model is trained to produce: a space, the title (or the letter), a newline.
pub fn answer(title_or_letter: &str) -> String {
    format!(" {title_or_letter}\n")
}

/// A tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Prompt then answer (model ids; added tokens at `vocab_size + k`).
    pub ids: Vec<u32>,
    /// Index of the first answer token (`ids.len()` when there is no answer).
    pub answer_start: usize,
}

/// Tokenizes `prompt` (with the tokenizer's specials, e.g. BOS) followed by `answer`, as one text
/// so the boundary tokenizes as it would in a continuation; the answer span starts at the first
/// token that begins inside the answer.
pub fn encode(
    tok: &LlmTokenizer,
    prompt: &str,
    answer: Option<&str>,
) -> Result<Encoded, PromptError> {
    let Some(ans) = answer else {
        let ids = tok.encode(prompt, true)?;
        return Ok(Encoded {
            answer_start: ids.len(),
            ids,
        });
    };
    let text = format!("{prompt}{ans}");
    let (ids, offsets) = tok.encode_with_offsets(&text, true)?;
    let boundary = prompt.len();
    let start = offsets
        .iter()
        .position(|&(s, e)| e > s && e > boundary)
        .ok_or_else(|| PromptError::EmptyAnswer(ans.to_string()))?;
    Ok(Encoded {
        ids,
        answer_start: start,
    })
}

/// Checks that the placeholders of `ids` match the items: as many `[HistoryEmb]` as history items
/// and `[CansEmb]` as candidates (for views that carry embeddings; none otherwise).
pub fn check_slots(
    tok: &LlmTokenizer,
    ids: &[u32],
    history: usize,
    candidates: usize,
    view: ItemView,
    user: bool,
) -> Result<(), PromptError> {
    let count = |name: &str| {
        let id = tok.added_id(name).expect("added token");
        ids.iter().filter(|&&i| i == id).count()
    };
    let (nh, nc, nu, np) = (
        count("[HistoryEmb]"),
        count("[CansEmb]"),
        count("[UserEmb]"),
        count("[PH]"),
    );
    let emb = view.uses_embeddings();
    let (eh, ec, eu) = if emb {
        (history, candidates, usize::from(user))
    } else {
        (0, 0, 0)
    };
    let ep = if view == ItemView::Text {
        history + candidates
    } else {
        0
    };
    if nh != eh || nc != ec || nu != eu || np != ep {
        return Err(PromptError::Mismatch(format!(
            "the prompt holds {nh} [HistoryEmb], {nc} [CansEmb], {nu} [UserEmb] and {np} [PH] placeholders for {eh}, {ec}, {eu} and {ep} expected ({history} history items, {candidates} candidates; a title containing a placeholder, or a template that repeats them?)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_templates_parse_and_pick_by_domain() {
        assert_eq!(Templates::for_domain("movie").source, "embedded:movie");
        assert_eq!(
            Templates::for_domain("music artist").source,
            "embedded:artist"
        );
        assert_eq!(Templates::for_domain("games").source, "embedded:game");
        assert_eq!(Templates::for_domain("book").source, "embedded:item");
        for (name, _) in EMBEDDED {
            assert!(Templates::for_domain(name).list.len() >= 4);
        }
        let e = Templates::parse("only [HistoryHere]\n---\n", "x.txt")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.txt") && e.contains("[CansHere] 0 times"),
            "{e}"
        );
    }

    #[test]
    fn renders_the_three_views_with_the_true_count() {
        let titles: Vec<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
        let t = "H: [HistoryHere]. C ([N]): [CansHere].";
        assert_eq!(
            render(
                t,
                &titles,
                &[0, 1],
                &[2, 0],
                ItemView::Text,
                true,
                AnswerFormat::Title
            ),
            "H: A [PH], B [PH]. C (2): C [PH], A [PH]."
        );
        assert_eq!(
            render(
                t,
                &titles,
                &[0],
                &[2],
                ItemView::Hybrid,
                false,
                AnswerFormat::Title
            ),
            "H: A [HistoryEmb]. C (1): C [CansEmb]."
        );
        assert_eq!(
            render(
                t,
                &titles,
                &[0],
                &[2],
                ItemView::Hybrid,
                true,
                AnswerFormat::Title
            ),
            "H: A [HistoryEmb] [UserEmb]. C (1): C [CansEmb]."
        );
        assert_eq!(
            render(
                t,
                &titles,
                &[0],
                &[2, 1, 0],
                ItemView::IdOnly,
                false,
                AnswerFormat::Title
            ),
            "H: [HistoryEmb]. C (3): [CansEmb], [CansEmb], [CansEmb]."
        );
    }

    #[test]
    fn letters_label_candidates_and_parse_back() {
        let titles: Vec<String> = ["Alien", "Heat", "Up"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let t = "H: [HistoryHere]. C: [CansHere].";
        assert_eq!(
            render(
                t,
                &titles,
                &[0],
                &[2, 1],
                ItemView::Hybrid,
                false,
                AnswerFormat::Letter
            ),
            "H: Alien [HistoryEmb]. C: (A) Up [CansEmb], (B) Heat [CansEmb]."
        );
        assert_eq!(letter(0), Some('A'));
        assert_eq!(letter(19), Some('T'));
        assert_eq!(letter(26), None);
        assert_eq!(letter_index(" B\n", 20), Some(1));
        assert_eq!(letter_index("(C) Heat", 20), Some(2));
        assert_eq!(letter_index("T.", 20), Some(19));
        // Outside the list, a word, lower case, nothing: no answer.
        assert_eq!(letter_index("U", 20), None);
        assert_eq!(letter_index("Alien", 20), None);
        assert_eq!(letter_index("a", 20), None);
        assert_eq!(letter_index("  ", 20), None);
        assert_eq!(AnswerFormat::parse("letter"), Ok(AnswerFormat::Letter));
        assert!(AnswerFormat::parse("number")
            .unwrap_err()
            .to_string()
            .contains("--answer number"));
    }
}
