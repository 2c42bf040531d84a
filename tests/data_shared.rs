//! The dataset stage on the real data in `../shared`: LLaRA's splits and raw MovieLens-100K.

mod common;
use common::*;
use std::collections::{HashMap, HashSet};
use std::path::Path;

#[test]
fn movielens_100k_reproduces_llara_counts_and_train_rows() {
    let Some(shared) = shared() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ml");
    ok(&[
        "data",
        "prepare",
        "--from",
        "movielens-100k",
        s(&shared.join("datasets/raw/ml-100k")),
        "--out",
        s(&out),
    ]);
    let m = json(&out.join("meta.json"));
    assert_eq!(m["n_items"], 1682);
    assert_eq!(m["interactions"], 82520);
    assert_eq!(m["users"]["train"], 754);
    assert_eq!(m["users"]["valid"], 94);
    assert_eq!(m["users"]["test"], 95);
    assert_eq!(m["rows_before_filter"]["train"], 68389);
    assert_eq!(m["rows"]["train"], 66127);
    assert_eq!(m["rows"]["valid"], 94);
    assert_eq!(m["rows"]["test"], 95);
    assert_eq!(m["domain"], "movie");
    assert_eq!(m["empty_title_items"], serde_json::json!([266]));
    assert!(m["duplicate_titles"]["titles"].as_u64().unwrap() > 0);

    // Titles are LLaRA's, character for character.
    let mine = std::fs::read_to_string(out.join("items.tsv")).unwrap();
    let llara = std::fs::read_to_string(shared.join("datasets/movielens/items.tsv")).unwrap();
    assert_eq!(mine, llara);
    assert!(mine.contains("\tThe Usual Suspects\n"));

    // Train rows: identical to LLaRA's (rebuilt) split after the len >= 3 filter.
    let reference: Vec<_> = rows(&shared.join("datasets/movielens/train.jsonl"))
        .into_iter()
        .filter(|(h, _)| h.len() >= 3)
        .collect();
    assert_eq!(rows(&out.join("train.jsonl")), reference);

    // Valid/test: same users and same target timestamps as LLaRA's originals (tie order of
    // same-second ratings is unknown, so items may differ within a second).
    let users = RawMl::load(&shared.join("datasets/raw/ml-100k/u.data"));
    for split in ["valid", "test"] {
        let ours = users.match_rows(&rows(&out.join(format!("{split}.jsonl"))));
        let theirs = users.match_rows(&rows(
            &shared.join(format!("datasets/movielens/{split}.jsonl")),
        ));
        let ours: HashMap<u32, i64> = ours.into_iter().collect();
        let theirs: HashMap<u32, i64> = theirs.into_iter().collect();
        assert_eq!(ours, theirs, "{split}: users and target timestamps differ");
    }
}

/// Raw ML-100K kept ratings per user, for matching rows back to users.
struct RawMl {
    /// user -> (item -> timestamp) of ratings >= 3
    kept: HashMap<u32, HashMap<u32, i64>>,
}

impl RawMl {
    fn load(path: &Path) -> Self {
        let mut kept: HashMap<u32, HashMap<u32, i64>> = HashMap::new();
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let f: Vec<i64> = line.split('\t').map(|x| x.parse().unwrap()).collect();
            if f[2] >= 3 {
                kept.entry(f[0] as u32)
                    .or_default()
                    .insert(f[1] as u32 - 1, f[3]);
            }
        }
        Self { kept }
    }

    /// For each row, the one user whose kept ratings contain the whole row and whose last rating
    /// time is the target's: (user, target timestamp).
    fn match_rows(&self, rows: &[(Vec<u32>, u32)]) -> Vec<(u32, i64)> {
        rows.iter()
            .map(|(h, next)| {
                let found: Vec<(u32, i64)> = self
                    .kept
                    .iter()
                    .filter(|(_, items)| {
                        let last = items.values().max().unwrap();
                        items.get(next) == Some(last) && h.iter().all(|i| items.contains_key(i))
                    })
                    .map(|(&u, items)| (u, items[next]))
                    .collect();
                assert_eq!(
                    found.len(),
                    1,
                    "row {h:?} -> {next} matches users {found:?}"
                );
                found[0]
            })
            .collect()
    }
}

#[test]
fn lastfm_round_trip() {
    let Some(shared) = shared() else { return };
    let src = shared.join("datasets/lastfm");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lastfm");
    ok(&[
        "data",
        "prepare",
        "--from",
        "llara-jsonl",
        s(&src),
        "--out",
        s(&out),
    ]);
    let m = json(&out.join("meta.json"));
    assert_eq!(m["rows_before_filter"]["train"], 50800);
    assert_eq!(m["rows"]["train"], 47872);
    assert_eq!(m["rows"]["valid"], 122);
    assert_eq!(m["rows"]["test"], 122);
    assert_eq!(m["n_items"], 4606);
    assert_eq!(m["domain"], "music artist");
    assert_eq!(m["name"], "lastfm");
    assert_eq!(
        std::fs::read_to_string(out.join("items.tsv")).unwrap(),
        std::fs::read_to_string(src.join("items.tsv")).unwrap()
    );
    for split in ["train", "valid", "test"] {
        let expect: Vec<_> = rows(&src.join(format!("{split}.jsonl")))
            .into_iter()
            .filter(|(h, _)| h.len() >= 3)
            .collect();
        assert_eq!(rows(&out.join(format!("{split}.jsonl"))), expect, "{split}");
    }
    // Candidate invariants on real data.
    let test_rows = rows(&out.join("test.jsonl"));
    let cands = candidates(&out.join("candidates/test.jsonl"));
    assert_eq!(cands.len(), test_rows.len());
    for ((h, next), c) in test_rows.iter().zip(&cands) {
        assert_eq!(c.len(), 20);
        assert!(c.contains(next));
        assert_eq!(c.iter().collect::<HashSet<_>>().len(), 20);
        assert!(c.iter().all(|x| !h.contains(x) && (*x as usize) < 4606));
    }
    // `llara data stats` reads it back.
    let stats = ok(&["data", "stats", s(&out), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["items"], 4606);
    assert_eq!(v["rows"]["train"], 47872);
}

#[test]
fn steam_and_movielens_splits_prepare() {
    let Some(shared) = shared() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (name, items, domain, test_rows) in [
        ("steam", 3581, "game", 1186),
        ("movielens", 1682, "movie", 95),
    ] {
        let out = tmp.path().join(name);
        ok(&[
            "data",
            "prepare",
            "--from",
            "llara-jsonl",
            s(&shared.join("datasets").join(name)),
            "--out",
            s(&out),
        ]);
        let m = json(&out.join("meta.json"));
        assert_eq!(m["n_items"], items);
        assert_eq!(m["domain"], domain);
        assert_eq!(m["rows"]["test"], test_rows);
        let text = ok(&["data", "stats", s(&out)]);
        assert!(text.contains("history length"), "{text}");
    }
}
