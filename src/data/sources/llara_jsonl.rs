//! LLaRA's own processed splits as JSONL (the layout of `../shared/datasets/{movielens,lastfm,steam}`):
//! `items.tsv` plus `{train,valid,test}.jsonl`, rows unfiltered and in the original order.

use crate::data::folder::{parse_items_tsv, parse_rows_jsonl};
use crate::data::text::{content_hash, read_bytes};
use crate::data::{Prepared, Result, Splits};
use std::path::Path;

pub fn load(src: &Path, name: &str, domain: &str) -> Result<Prepared> {
    let items_path = src.join("items.tsv");
    let items_bytes = read_bytes(&items_path)?;
    let items = parse_items_tsv(&items_path, &items_bytes)?;
    let n = items.len();
    let mut empty = Vec::new();
    let titles: Vec<String> = items
        .into_iter()
        .enumerate()
        .map(|(i, (_, t))| {
            if t.trim().is_empty() {
                // LLaRA's MovieLens split has one ("unknown" with its 7-character year suffix cut).
                empty.push(i as u32);
            }
            t
        })
        .collect();
    let mut parts = vec![items_bytes];
    let mut load = |split: &str| -> Result<_> {
        let p = src.join(format!("{split}.jsonl"));
        let bytes = read_bytes(&p)?;
        let rows = parse_rows_jsonl(&p, &bytes, n)?;
        parts.push(bytes);
        Ok(rows)
    };
    let splits = Splits {
        train: load("train")?,
        valid: load("valid")?,
        test: load("test")?,
    };
    Ok(Prepared {
        name: name.to_string(),
        domain: domain.to_string(),
        source: "llara-jsonl".into(),
        split: "llara".into(),
        titles,
        original_ids: None,
        splits,
        users: None,
        interactions: None,
        content_hash: content_hash(parts.iter().map(Vec::as_slice)),
        empty_title_items: empty,
    })
}
