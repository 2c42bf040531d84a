//! The dataset folder: the format every later stage reads.
//!
//! ```text
//! DIR/items.tsv                id<TAB>title, dense ids 0..N-1
//! DIR/item_ids.tsv             id<TAB>original id (when the source had its own ids)
//! DIR/meta.json                see [`Meta`]
//! DIR/config.toml              the exact options of the `llara data` run that wrote it
//! DIR/{train,valid,test}.jsonl {"history":[ids oldest first, <= 10],"next":id}
//! DIR/candidates/{valid,test}.jsonl  {"candidates":[ids]}, one line per row of the split
//! ```

use super::candidates::sample_split;
use super::text::{check_title, read_bytes, utf8_lines};
use super::{DataError, Prepared, Result, Row, SplitCounts, Splits, MAX_HISTORY};
use crate::fsutil::StagedDir;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Version of the folder layout, bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// Options applied when writing a dataset folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareOptions {
    /// Rows whose history is shorter are dropped from every split.
    pub min_history: usize,
    /// Candidates per valid/test row (the target included).
    pub candidates: usize,
    /// Seed of the candidate sets.
    pub seed: u64,
}

/// Items that share a title with another item.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateTitles {
    /// Number of distinct titles that more than one item carries.
    pub titles: usize,
    /// Number of items involved.
    pub items: usize,
    /// The item ids of each such title.
    pub groups: Vec<Vec<u32>>,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format_version: u32,
    pub name: String,
    pub source: String,
    pub split: String,
    pub n_items: usize,
    /// The noun prompts use for an item (movie, game, music artist, item).
    pub domain: String,
    pub max_history: usize,
    pub min_history: usize,
    pub seed: u64,
    pub candidates: usize,
    pub content_hash: String,
    /// Rows per split after the `min_history` filter.
    pub rows: SplitCounts,
    /// Rows per split before it.
    pub rows_before_filter: SplitCounts,
    /// Users per split, where the source knows users.
    pub users: Option<SplitCounts>,
    /// Interactions used, where the source knows them.
    pub interactions: Option<u64>,
    pub duplicate_titles: DuplicateTitles,
    pub empty_title_items: Vec<u32>,
    /// `item_ids.tsv` when the source had its own item ids.
    pub original_ids_file: Option<String>,
}

/// Groups of item ids that share a title.
pub fn duplicate_titles(titles: &[String]) -> DuplicateTitles {
    let mut by_title: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (i, t) in titles.iter().enumerate() {
        by_title.entry(t.as_str()).or_default().push(i as u32);
    }
    let mut groups: Vec<Vec<u32>> = by_title.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    DuplicateTitles {
        titles: groups.len(),
        items: groups.iter().map(Vec::len).sum(),
        groups,
    }
}

fn rows_jsonl(rows: &[Row]) -> String {
    let mut s = String::with_capacity(rows.len() * 48);
    for r in rows {
        s.push_str(&serde_json::to_string(r).expect("rows serialize"));
        s.push('\n');
    }
    s
}

fn write_file(dir: &Path, name: &str, contents: &str) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, contents).map_err(|e| DataError::io(p, e))
}

/// Filters, samples candidates and writes `prepared` to `out` atomically. `config_toml` is the exact
/// configuration of the run, written beside the data. Returns the meta data written.
pub fn write(
    prepared: &Prepared,
    opts: &PrepareOptions,
    out: &Path,
    force: bool,
    config_toml: &str,
) -> Result<Meta> {
    let n_items = prepared.titles.len();
    if n_items == 0 {
        return Err(DataError::Invalid("the source has no items".into()));
    }
    let before = SplitCounts {
        train: prepared.splits.train.len(),
        valid: prepared.splits.valid.len(),
        test: prepared.splits.test.len(),
    };
    let keep = |rows: &Vec<Row>| -> Vec<Row> {
        rows.iter()
            .filter(|r| r.history.len() >= opts.min_history)
            .cloned()
            .collect()
    };
    let splits = Splits {
        train: keep(&prepared.splits.train),
        valid: keep(&prepared.splits.valid),
        test: keep(&prepared.splits.test),
    };
    for (name, rows) in splits.iter() {
        if rows.is_empty() {
            let had = match name {
                "train" => before.train,
                "valid" => before.valid,
                _ => before.test,
            };
            return Err(DataError::Invalid(format!(
                "the {name} split is empty ({had} rows before the --min-history {} filter); \
                 expected at least one row",
                opts.min_history
            )));
        }
    }
    let cand_valid = sample_split(&splits.valid, "valid", n_items, opts.candidates, opts.seed)?;
    let cand_test = sample_split(&splits.test, "test", n_items, opts.candidates, opts.seed)?;

    let dups = duplicate_titles(&prepared.titles);
    if dups.titles > 0 {
        tracing::warn!(
            "{} titles are shared by {} items; a generated answer naming one of them is ambiguous \
             (listed in meta.json under duplicate_titles)",
            dups.titles,
            dups.items
        );
    }
    if !prepared.empty_title_items.is_empty() {
        tracing::warn!(
            "{} items have an empty title (ids {:?}), as in the source",
            prepared.empty_title_items.len(),
            prepared.empty_title_items
        );
    }
    let meta = Meta {
        format_version: FORMAT_VERSION,
        name: prepared.name.clone(),
        source: prepared.source.clone(),
        split: prepared.split.clone(),
        n_items,
        domain: prepared.domain.clone(),
        max_history: MAX_HISTORY,
        min_history: opts.min_history,
        seed: opts.seed,
        candidates: opts.candidates,
        content_hash: prepared.content_hash.clone(),
        rows: SplitCounts {
            train: splits.train.len(),
            valid: splits.valid.len(),
            test: splits.test.len(),
        },
        rows_before_filter: before,
        users: prepared.users,
        interactions: prepared.interactions,
        duplicate_titles: dups,
        empty_title_items: prepared.empty_title_items.clone(),
        original_ids_file: prepared
            .original_ids
            .as_ref()
            .map(|_| "item_ids.tsv".into()),
    };

    let staged = StagedDir::new_locked(out, force).map_err(|e| DataError::io(out, e))?;
    let dir = staged.path();
    let mut items = String::new();
    for (i, t) in prepared.titles.iter().enumerate() {
        writeln!(items, "{i}\t{t}").expect("string write");
    }
    write_file(dir, "items.tsv", &items)?;
    if let Some(ids) = &prepared.original_ids {
        let mut s = String::new();
        for (i, o) in ids.iter().enumerate() {
            writeln!(s, "{i}\t{o}").expect("string write");
        }
        write_file(dir, "item_ids.tsv", &s)?;
    }
    for (name, rows) in splits.iter() {
        write_file(dir, &format!("{name}.jsonl"), &rows_jsonl(rows))?;
    }
    let cdir = dir.join("candidates");
    std::fs::create_dir(&cdir).map_err(|e| DataError::io(&cdir, e))?;
    for (name, sets) in [("valid", &cand_valid), ("test", &cand_test)] {
        let mut s = String::new();
        for c in sets {
            s.push_str(&serde_json::json!({ "candidates": c }).to_string());
            s.push('\n');
        }
        write_file(&cdir, &format!("{name}.jsonl"), &s)?;
    }
    let meta_json = serde_json::to_string_pretty(&meta).expect("meta serializes") + "\n";
    write_file(dir, "meta.json", &meta_json)?;
    write_file(dir, "config.toml", config_toml)?;
    staged.commit().map_err(|e| DataError::io(out, e))?;
    Ok(meta)
}

/// A dataset folder loaded and validated.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub meta: Meta,
    pub titles: Vec<String>,
    pub splits: Splits,
    pub candidates_valid: Vec<Vec<u32>>,
    pub candidates_test: Vec<Vec<u32>>,
}

/// Parses `items.tsv`-style `id<TAB>title` lines, with ids dense from 0 in order.
pub fn parse_items_tsv(path: &Path, bytes: &[u8]) -> Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    for (no, line) in utf8_lines(path, bytes)? {
        let mut parts = line.split('\t');
        let (Some(id), Some(title), None) = (parts.next(), parts.next(), parts.next()) else {
            let cols = line.split('\t').count();
            return Err(DataError::line(
                path,
                no,
                format!("expected 2 tab-separated columns (id, title), found {cols}"),
            ));
        };
        let id: u64 = id.trim().parse().map_err(|_| {
            DataError::line(
                path,
                no,
                format!("item id {id:?} is not a non-negative integer"),
            )
        })?;
        let expected = out.len() as u64;
        if id != expected {
            let msg = if id < expected {
                format!("duplicate item id {id}; ids must be 0..N-1, each once, in order")
            } else {
                format!(
                    "item id {id} where {expected} was expected; ids must be dense 0..N-1 in order"
                )
            };
            return Err(DataError::line(path, no, msg));
        }
        check_title(title).map_err(|m| DataError::line(path, no, m.0))?;
        out.push((no, title.to_string()));
    }
    if out.is_empty() {
        return Err(DataError::file(
            path,
            "no items; expected lines id<TAB>title",
        ));
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    history: Vec<i64>,
    next: i64,
}

/// Parses and validates `{"history":[...],"next":id}` lines.
pub fn parse_rows_jsonl(path: &Path, bytes: &[u8], n_items: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (no, line) in utf8_lines(path, bytes)? {
        if line.trim().is_empty() {
            return Err(DataError::line(
                path,
                no,
                "empty line; expected one JSON object a line",
            ));
        }
        let raw: RawRow = serde_json::from_str(line).map_err(|e| {
            DataError::line(
                path,
                no,
                format!("expected {{\"history\": [item ids], \"next\": item id}}: {e}"),
            )
        })?;
        if raw.history.len() > MAX_HISTORY {
            return Err(DataError::line(
                path,
                no,
                format!(
                    "history has {} items; at most {MAX_HISTORY} expected",
                    raw.history.len()
                ),
            ));
        }
        let check = |id: i64, what: &str| -> Result<u32> {
            if id < 0 || id as u64 >= n_items as u64 {
                Err(DataError::line(
                    path,
                    no,
                    format!(
                        "{what} item id {id} is out of range; expected 0..{}",
                        n_items - 1
                    ),
                ))
            } else {
                Ok(id as u32)
            }
        };
        let history = raw
            .history
            .iter()
            .map(|&h| check(h, "history"))
            .collect::<Result<Vec<u32>>>()?;
        let next = check(raw.next, "next")?;
        rows.push(Row { history, next });
    }
    Ok(rows)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCandidates {
    candidates: Vec<i64>,
}

fn parse_candidates(
    path: &Path,
    rows: &[Row],
    n_items: usize,
    count: usize,
) -> Result<Vec<Vec<u32>>> {
    let bytes = read_bytes(path)?;
    let lines = utf8_lines(path, &bytes)?;
    if lines.len() != rows.len() {
        return Err(DataError::file(
            path,
            format!(
                "{} lines, expected one per split row ({})",
                lines.len(),
                rows.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(rows.len());
    for ((no, line), row) in lines.into_iter().zip(rows) {
        let raw: RawCandidates = serde_json::from_str(line).map_err(|e| {
            DataError::line(
                path,
                no,
                format!("expected {{\"candidates\": [item ids]}}: {e}"),
            )
        })?;
        if raw.candidates.len() != count {
            return Err(DataError::line(
                path,
                no,
                format!("{} candidates, expected {count}", raw.candidates.len()),
            ));
        }
        let mut c = Vec::with_capacity(count);
        for id in raw.candidates {
            if id < 0 || id as u64 >= n_items as u64 {
                return Err(DataError::line(
                    path,
                    no,
                    format!("candidate id {id} out of range"),
                ));
            }
            c.push(id as u32);
        }
        if !c.contains(&row.next) {
            return Err(DataError::line(
                path,
                no,
                format!("the row's target {} is not among the candidates", row.next),
            ));
        }
        out.push(c);
    }
    Ok(out)
}

impl Dataset {
    /// Loads and validates a dataset folder written by `llara data`.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let meta_bytes = read_bytes(&meta_path)?;
        let meta: Meta = serde_json::from_slice(&meta_bytes).map_err(|e| {
            DataError::file(
                &meta_path,
                format!(
                    "not a llara meta.json ({e}); prepare the folder with `llara data prepare`"
                ),
            )
        })?;
        if meta.format_version != FORMAT_VERSION {
            return Err(DataError::file(
                &meta_path,
                format!(
                    "format_version {} but this llara reads {FORMAT_VERSION}; prepare the folder again",
                    meta.format_version
                ),
            ));
        }
        let items_path = dir.join("items.tsv");
        let items = parse_items_tsv(&items_path, &read_bytes(&items_path)?)?;
        if items.len() != meta.n_items {
            return Err(DataError::file(
                &items_path,
                format!("{} items but meta.json says {}", items.len(), meta.n_items),
            ));
        }
        let titles: Vec<String> = items.into_iter().map(|(_, t)| t).collect();
        let load = |name: &str| -> Result<Vec<Row>> {
            let p = dir.join(format!("{name}.jsonl"));
            parse_rows_jsonl(&p, &read_bytes(&p)?, meta.n_items)
        };
        let splits = Splits {
            train: load("train")?,
            valid: load("valid")?,
            test: load("test")?,
        };
        let candidates_valid = parse_candidates(
            &dir.join("candidates/valid.jsonl"),
            &splits.valid,
            meta.n_items,
            meta.candidates,
        )?;
        let candidates_test = parse_candidates(
            &dir.join("candidates/test.jsonl"),
            &splits.test,
            meta.n_items,
            meta.candidates,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            titles,
            splits,
            candidates_valid,
            candidates_test,
        })
    }

    pub fn n_items(&self) -> usize {
        self.titles.len()
    }
}
