//! The dataset stage: turns raw interactions into a dataset folder (see [`folder`]) that every later
//! stage reads. Sources live in [`sources`]; splitting interactions into rows in [`split`]; the fixed,
//! seeded candidate sets in [`candidates`]; summaries in [`stats`].

pub mod candidates;
pub mod error;
pub mod folder;
pub mod sources;
pub mod split;
pub mod stats;
pub mod text;

pub use error::{DataError, Result};
pub use folder::{Dataset, Meta, PrepareOptions};

use serde::{Deserialize, Serialize};

/// Longest history kept in a row (LLaRA's `state_size`).
pub const MAX_HISTORY: usize = 10;
/// LLaRA's loader keeps rows with at least this many history items (`len_seq >= 3`).
pub const DEFAULT_MIN_HISTORY: usize = 3;
/// Candidates per evaluation row: the target plus 19 items.
pub const DEFAULT_CANDIDATES: usize = 20;

/// One example: the items a user interacted with, oldest first (at most [`MAX_HISTORY`]), and the
/// item that came next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub history: Vec<u32>,
    pub next: u32,
}

/// The three splits of a dataset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Splits {
    pub train: Vec<Row>,
    pub valid: Vec<Row>,
    pub test: Vec<Row>,
}

impl Splits {
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Vec<Row>)> {
        [
            ("train", &self.train),
            ("valid", &self.valid),
            ("test", &self.test),
        ]
        .into_iter()
    }
}

/// Per-split counts (rows or users).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub train: usize,
    pub valid: usize,
    pub test: usize,
}

/// What a source produces before filtering, candidate sampling and writing.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Dataset name (e.g. `movielens`).
    pub name: String,
    /// The noun prompts use for an item: movie, game, music artist, item.
    pub domain: String,
    /// Which source built it (`llara-jsonl`, `movielens-100k`, `interactions`, `synth`).
    pub source: String,
    /// How the rows were split (`llara`, `user-time`, `leave-last-out`).
    pub split: String,
    /// Item titles; the index is the dense item id.
    pub titles: Vec<String>,
    /// Original item ids of the source, when it had its own (same order as `titles`).
    pub original_ids: Option<Vec<String>>,
    pub splits: Splits,
    /// Users per split, where the source knows users.
    pub users: Option<SplitCounts>,
    /// Interactions used, where the source knows them.
    pub interactions: Option<u64>,
    /// sha256 over the input files' bytes (and the source's own parameters).
    pub content_hash: String,
    /// Items whose title is empty in a source that is allowed to have them (LLaRA's ML-100K
    /// "unknown" movie).
    pub empty_title_items: Vec<u32>,
}
