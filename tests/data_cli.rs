//! The dataset stage through the command line: synth, interactions CSV, --config, candidate
//! determinism, and every kind of bad input.

mod common;
use common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The parent folder holds nothing but what the test put there (no output, no temporary leftovers).
fn assert_no_output(parent: &Path, out: &Path, inputs: &[&str]) {
    assert!(!out.exists(), "{} was left behind", out.display());
    let names: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !inputs.contains(&n.as_str()))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

#[test]
fn synth_dataset_is_deterministic_and_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let stdout = ok(&["data", "synth", "--out", s(&a), "--threads", "1"]);
    assert!(stdout.contains("wrote"), "{stdout}");
    ok(&["data", "synth", "--out", s(&b), "--threads", "2"]);
    for f in [
        "items.tsv",
        "train.jsonl",
        "valid.jsonl",
        "test.jsonl",
        "candidates/valid.jsonl",
        "candidates/test.jsonl",
        "meta.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs between runs/thread counts"
        );
    }
    let meta = json(&a.join("meta.json"));
    let n = meta["n_items"].as_u64().unwrap() as u32;
    assert_eq!(meta["max_history"], 10);
    assert_eq!(meta["min_history"], 3);
    assert_eq!(meta["seed"], 42);
    assert!(meta["content_hash"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    for split in ["valid", "test"] {
        let r = rows(&a.join(format!("{split}.jsonl")));
        let c = candidates(&a.join(format!("candidates/{split}.jsonl")));
        assert_eq!(r.len(), c.len());
        assert!(!r.is_empty());
        for ((h, next), c) in r.iter().zip(&c) {
            assert!(h.len() >= 3 && h.len() <= 10);
            assert_eq!(c.len(), 20);
            assert!(c.contains(next));
            assert_eq!(c.iter().collect::<HashSet<_>>().len(), 20);
            assert!(c.iter().all(|x| *x < n && !h.contains(x)));
        }
    }
    // Another seed gives other candidate sets.
    let c = tmp.path().join("c");
    ok(&["data", "synth", "--out", s(&c), "--seed", "7"]);
    assert_ne!(
        std::fs::read(a.join("candidates/test.jsonl")).unwrap(),
        std::fs::read(c.join("candidates/test.jsonl")).unwrap()
    );
    // The written config reproduces the run exactly.
    let d = tmp.path().join("d");
    ok(&[
        "data",
        "synth",
        "--config",
        s(&a.join("config.toml")),
        "--out",
        s(&d),
    ]);
    assert_eq!(
        std::fs::read(a.join("candidates/test.jsonl")).unwrap(),
        std::fs::read(d.join("candidates/test.jsonl")).unwrap()
    );
    let stats = ok(&["data", "stats", s(&a)]);
    assert!(stats.contains("popularity"), "{stats}");
}

#[test]
fn existing_output_is_kept_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    ok(&[
        "data",
        "synth",
        "--out",
        s(&out),
        "--users",
        "100",
        "--items",
        "60",
    ]);
    let before = std::fs::read(out.join("train.jsonl")).unwrap();
    let err = fails(&["data", "synth", "--out", s(&out), "--seed", "3"]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(out.join("train.jsonl")).unwrap(), before);
    ok(&["data", "synth", "--out", s(&out), "--seed", "3", "--force"]);
    assert_ne!(std::fs::read(out.join("train.jsonl")).unwrap(), before);
    let entries = std::fs::read_dir(tmp.path()).unwrap().count();
    assert_eq!(entries, 1, "temporary folders left behind");
}

const ITEMS_CSV: &str = "item,title\n10,Alpha\n20,Beta\n30,Gamma\n40,Delta\n50,Epsilon\n60,Zeta\n";

/// user,item,timestamp,rating: users 1..=10 each rate 6 items.
fn interactions_csv() -> String {
    let mut s = String::from("user,item,timestamp,rating\n");
    for u in 1..=10 {
        for k in 0..6 {
            let item = [10, 20, 30, 40, 50, 60][(u + k) % 6];
            let rating = if k == 2 { 1 } else { 4 };
            s.push_str(&format!("{u},{item},{},{rating}\n", 1000 * u + 10 * k));
        }
    }
    s
}

#[test]
fn interactions_csv_both_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let ints = write(tmp.path(), "ratings.csv", interactions_csv().as_bytes());
    let items = write(tmp.path(), "movies.csv", ITEMS_CSV.as_bytes());
    let out = tmp.path().join("ut");
    ok(&[
        "data",
        "prepare",
        "--from",
        "interactions",
        "--interactions",
        s(&ints),
        "--items",
        s(&items),
        "--split",
        "user-time",
        "--min-history",
        "2",
        "--candidates",
        "1",
        "--out",
        s(&out),
    ]);
    let meta = json(&out.join("meta.json"));
    assert_eq!(
        meta["users"],
        serde_json::json!({"train": 8, "valid": 1, "test": 1})
    );
    assert_eq!(meta["interactions"], 60);
    assert_eq!(meta["name"], "ratings");
    // Dense ids in the items file's order; the original ids are kept.
    assert_eq!(
        std::fs::read_to_string(out.join("items.tsv")).unwrap(),
        "0\tAlpha\n1\tBeta\n2\tGamma\n3\tDelta\n4\tEpsilon\n5\tZeta\n"
    );
    assert!(std::fs::read_to_string(out.join("item_ids.tsv"))
        .unwrap()
        .starts_with("0\t10\n1\t20\n"));
    // User 10 starts last: its items are ids 4,5,0,1,2,3 in time order; the last is the test target.
    assert_eq!(
        rows(&out.join("test.jsonl")),
        vec![(vec![4, 5, 0, 1, 2], 3)]
    );
    // 8 train users x 6 rows, minus histories shorter than 2.
    assert_eq!(meta["rows"]["train"], 8 * 4);

    // Leave-last-out with a rating filter and renamed columns, tab separated.
    let tsv = interactions_csv()
        .replace(',', "\t")
        .replace("user\titem\ttimestamp\trating", "uid\tiid\tts\tstars");
    let ints = write(tmp.path(), "r.tsv", tsv.as_bytes());
    let out = tmp.path().join("llo");
    ok(&[
        "data",
        "prepare",
        "--from",
        "interactions",
        "--interactions",
        s(&ints),
        "--items",
        s(&items),
        "--split",
        "leave-last-out",
        "--user-col",
        "uid",
        "--item-col",
        "iid",
        "--time-col",
        "ts",
        "--rating-col",
        "stars",
        "--min-rating",
        "3",
        "--min-history",
        "1",
        "--candidates",
        "2",
        "--out",
        s(&out),
    ]);
    let meta = json(&out.join("meta.json"));
    assert_eq!(meta["interactions"], 50);
    assert_eq!(meta["rows"]["test"], 10);
    assert_eq!(meta["rows"]["valid"], 10);
    // per user 5 kept: train rows at positions 1..=2 (position 0 has an empty history)
    assert_eq!(meta["rows"]["train"], 20);
    let test = rows(&out.join("test.jsonl"));
    assert_eq!(test[0].0.len(), 4);
}

/// Each bad input: one clear error naming the file (and line) and the problem, exit code != 0,
/// and no output folder (or temporary folder) left behind.
#[test]
fn bad_inputs_fail_cleanly() {
    struct Case {
        name: &'static str,
        items: &'static [u8],
        interactions: &'static [u8],
        extra: &'static [&'static str],
        expect: &'static [&'static str],
    }
    let good_ints =
        b"user,item,timestamp\n1,a,1\n1,b,2\n1,c,3\n1,d,4\n2,a,5\n2,b,6\n2,c,7\n2,d,8\n";
    let good_items = b"item,title\na,A\nb,B\nc,C\nd,D\n";
    let cases = [
        Case {
            name: "wrong column count",
            items: good_items,
            interactions: b"user,item,timestamp\n1,a,1\n1,b\n",
            extra: &[],
            expect: &["ints.csv:3", "columns"],
        },
        Case {
            name: "item id not in items",
            items: good_items,
            interactions: b"user,item,timestamp\n1,a,1\n1,zz,2\n",
            extra: &[],
            expect: &["ints.csv:3", "\"zz\""],
        },
        Case {
            name: "duplicate item id",
            items: b"item,title\na,A\nb,B\na,C\n",
            interactions: good_ints,
            extra: &[],
            expect: &["items.csv:4", "duplicate item id"],
        },
        Case {
            name: "empty title",
            items: b"item,title\na,A\nb,\n",
            interactions: good_ints,
            extra: &[],
            expect: &["items.csv:3", "empty title"],
        },
        Case {
            name: "tab in title",
            items: b"item,title\na,\"A\tB\"\nb,B\n",
            interactions: good_ints,
            extra: &[],
            expect: &["items.csv:2", "tab"],
        },
        Case {
            name: "newline in title",
            items: b"item,title\na,\"A\nB\"\nb,B\n",
            interactions: good_ints,
            extra: &[],
            expect: &["items.csv:2", "line break"],
        },
        Case {
            name: "non-UTF-8 items",
            items: b"item,title\na,Caf\xe9\n",
            interactions: good_ints,
            extra: &[],
            expect: &["items.csv:2", "UTF-8"],
        },
        Case {
            name: "non-UTF-8 interactions",
            items: good_items,
            interactions: b"user,item,timestamp\n1,a,1\n\xff,a,1\n",
            extra: &[],
            expect: &["ints.csv:3", "UTF-8"],
        },
        Case {
            name: "bad timestamp",
            items: good_items,
            interactions: b"user,item,timestamp\n1,a,yesterday\n",
            extra: &[],
            expect: &["ints.csv:2", "timestamp"],
        },
        Case {
            name: "missing column",
            items: good_items,
            interactions: b"uid,item,timestamp\n1,a,1\n",
            extra: &[],
            expect: &["ints.csv:1", "\"user\"", "--user-col"],
        },
        Case {
            name: "empty split",
            items: good_items,
            interactions: good_ints,
            extra: &["--min-history", "5"],
            expect: &["split is empty", "--min-history"],
        },
        Case {
            name: "too many candidates",
            items: good_items,
            interactions: good_ints,
            extra: &["--min-history", "1", "--candidates", "4"],
            expect: &["candidates", "row 1"],
        },
    ];
    for case in cases {
        let tmp = tempfile::tempdir().unwrap();
        let items = write(tmp.path(), "items.csv", case.items);
        let ints = write(tmp.path(), "ints.csv", case.interactions);
        let out = tmp.path().join("out");
        let mut args = vec![
            "data",
            "prepare",
            "--from",
            "interactions",
            "--interactions",
            s(&ints),
            "--items",
            s(&items),
            "--split",
            "leave-last-out",
            "--out",
            s(&out),
        ];
        args.extend_from_slice(case.extra);
        let err = fails(&args);
        for e in case.expect {
            assert!(err.contains(e), "{}: expected {e:?} in: {err}", case.name);
        }
        assert_eq!(
            err.trim()
                .lines()
                .filter(|l| l.starts_with("error"))
                .count(),
            1,
            "{}: {err}",
            case.name
        );
        assert_no_output(tmp.path(), &out, &["items.csv", "ints.csv"]);
    }
}

#[test]
fn bad_llara_jsonl_inputs_fail_cleanly() {
    let items = b"0\tA\n1\tB\n2\tC\n3\tD\n4\tE\n";
    let good = b"{\"history\": [0, 1, 2], \"next\": 3}\n";
    type Case<'a> = (&'a str, &'a [u8], &'a [u8], &'a [&'a str]);
    let cases: [Case; 7] = [
        (
            "malformed json",
            items,
            b"{\"history\": [0, 1, 2], \"next\": 3}\n{\"history\": [0,\n",
            &["train.jsonl:2", "expected"],
        ),
        (
            "id out of range",
            items,
            b"{\"history\": [0, 1, 9], \"next\": 3}\n",
            &["train.jsonl:1", "9", "out of range"],
        ),
        (
            "history too long",
            items,
            b"{\"history\": [0,1,2,0,1,2,0,1,2,0,1], \"next\": 3}\n",
            &["train.jsonl:1", "at most 10"],
        ),
        (
            "non-utf8 rows",
            items,
            b"{\"history\": [0, 1, 2], \"next\": 3}\n\xc3\x28\n",
            &["train.jsonl:2", "UTF-8"],
        ),
        (
            "duplicate item id",
            b"0\tA\n1\tB\n1\tC\n",
            good,
            &["items.tsv:3", "duplicate item id 1"],
        ),
        (
            "tab in title",
            b"0\tA\n1\tB\tx\n2\tC\n3\tD\n",
            good,
            &["items.tsv:2", "2 tab-separated columns"],
        ),
        (
            "non-utf8 title",
            b"0\tA\n1\tB\xe9\n2\tC\n3\tD\n",
            good,
            &["items.tsv:2", "UTF-8"],
        ),
    ];
    for (name, items, train, expect) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        write(&src, "items.tsv", items);
        write(&src, "train.jsonl", train);
        write(&src, "valid.jsonl", good);
        write(&src, "test.jsonl", good);
        let out = tmp.path().join("out");
        let err = fails(&[
            "data",
            "prepare",
            "--from",
            "llara-jsonl",
            s(&src),
            "--out",
            s(&out),
            "--candidates",
            "2",
        ]);
        for e in expect {
            assert!(err.contains(e), "{name}: expected {e:?} in: {err}");
        }
        assert_no_output(tmp.path(), &out, &["src"]);
    }
}

#[test]
fn bad_movielens_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ml");
    std::fs::create_dir(&src).unwrap();
    write(
        &src,
        "u.item",
        b"1|Toy Story (1995)|x\n2|Caf\xe9 au Lait (1994)|x\n",
    );
    write(&src, "u.data", b"1\t1\t5\t10\n1\t3\t5\t11\n");
    let out = tmp.path().join("out");
    let err = fails(&[
        "data",
        "prepare",
        "--from",
        "movielens-100k",
        s(&src),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("u.data:2") && err.contains("out of range"),
        "{err}"
    );
    write(&src, "u.data", b"1\t1\t5\n");
    let err = fails(&[
        "data",
        "prepare",
        "--from",
        "movielens-100k",
        s(&src),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("u.data:1") && err.contains("4 tab-separated columns"),
        "{err}"
    );
    assert_no_output(tmp.path(), &out, &["ml"]);

    let err = fails(&["data", "prepare", "--from", "llara-jsonl", "--out", s(&out)]);
    assert!(err.contains("SRC"), "{err}");
    let err = fails(&[
        "data",
        "prepare",
        "--from",
        "interactions",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("--interactions"), "{err}");
    let err = fails(&[
        "data",
        "prepare",
        "--from",
        "llara-jsonl",
        s(&tmp.path().join("missing")),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("missing") && err.contains("items.tsv"),
        "{err}"
    );
    let err = fails(&["data", "synth", "--out", s(&out), "--candidates", "500"]);
    assert!(err.contains("candidates"), "{err}");
    let err = fails(&["data", "stats", s(&tmp.path().join("nothing"))]);
    assert!(err.contains("meta.json"), "{err}");
    // An unknown key in --config names the file and the key.
    let cfg = write(tmp.path(), "c.toml", b"seed = 1\nfrobnicate = 2\n");
    let err = fails(&["data", "synth", "--config", s(&cfg), "--out", s(&out)]);
    assert!(
        err.contains("c.toml") && err.contains("frobnicate"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn config_values_are_defaults_and_flags_win() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(
        tmp.path(),
        "c.toml",
        b"users = 120\nitems = 50\nseed = 5\nmin-history = 2\n",
    );
    let a = tmp.path().join("a");
    ok(&[
        "data",
        "synth",
        "--config",
        s(&cfg),
        "--out",
        s(&a),
        "--seed",
        "6",
    ]);
    let meta = json(&a.join("meta.json"));
    assert_eq!(meta["n_items"], 50);
    assert_eq!(meta["seed"], 6);
    assert_eq!(meta["min_history"], 2);
    let written = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(
        written.contains("seed = 6") && written.contains("users = 120"),
        "{written}"
    );
}

#[test]
fn committed_configs_and_demo_data_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let books = tmp.path().join("books");
    let cfg = root.join("configs/data-books.toml");
    let stdout = std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
        .current_dir(root)
        .args(["data", "prepare", "--config", s(&cfg), "--out", s(&books)])
        .output()
        .unwrap();
    assert!(
        stdout.status.success(),
        "{}",
        String::from_utf8_lossy(&stdout.stderr)
    );
    let meta = json(&books.join("meta.json"));
    assert_eq!(meta["domain"], "book");
    assert_eq!(meta["n_items"], 30);
    assert_eq!(meta["split"], "leave-last-out");
    assert!(std::fs::read_to_string(books.join("item_ids.tsv"))
        .unwrap()
        .starts_with("0\tb100\n"));
    let synth = tmp.path().join("synth");
    ok(&[
        "data",
        "synth",
        "--config",
        s(&root.join("configs/data-synth.toml")),
        "--out",
        s(&synth),
    ]);
    let default = tmp.path().join("default");
    ok(&["data", "synth", "--out", s(&default)]);
    assert_eq!(
        std::fs::read(synth.join("test.jsonl")).unwrap(),
        std::fs::read(default.join("test.jsonl")).unwrap(),
        "configs/data-synth.toml should mirror the defaults"
    );
}

/// `data synth` (the same writer as `data prepare`) killed at many points while replacing an
/// output leaves the old output or the new one, whole; the next run cleans up after the kills.
#[cfg(unix)]
#[test]
fn a_cut_write_leaves_the_old_or_the_new_dataset_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let o = out.to_str().unwrap();
    let args = |seed: &'static str| {
        vec![
            "data", "synth", "--users", "800", "--items", "400", "--seed", seed, "--out", o,
            "--force",
        ]
    };
    common::ok(&args("2"));
    let new = common::snapshot(&out).unwrap();
    common::ok(&args("1"));
    let old = common::snapshot(&out).unwrap();
    assert_ne!(old, new);
    let kills = common::cut_writes_leave_a_whole_output(&args("2"), &out, &[], &old, &new);
    assert!(
        kills >= 3,
        "only {kills} kills landed before the run finished"
    );
}
