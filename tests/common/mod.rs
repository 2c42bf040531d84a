//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

/// `../shared` (or `$LLARA_SHARED`). `None` (with a printed reason) when it is missing outside CI;
/// under `CI=true` a missing folder fails the test.
pub fn shared() -> Option<PathBuf> {
    let dir = std::env::var_os("LLARA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("README.md").exists() {
        return Some(dir);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("CI=true but the shared folder {} is missing", dir.display());
    }
    eprintln!(
        "skipped: shared folder {} not found (set LLARA_SHARED)",
        dir.display()
    );
    None
}

/// Runs the llara binary.
pub fn llara(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
        .args(args)
        .env("LLARA_LOG", "warn")
        .output()
        .expect("llara runs")
}

/// Runs llara and asserts success, returning stdout.
pub fn ok(args: &[&str]) -> String {
    let out = llara(args);
    assert!(
        out.status.success(),
        "llara {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs llara and asserts failure, returning stderr.
pub fn fails(args: &[&str]) -> String {
    let out = llara(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "llara {args:?} should fail; stderr: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "llara {args:?} panicked instead of reporting an error: {err}"
    );
    err
}

/// A whole JSON file.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("json file")
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Rows of a split file as (history, next).
pub fn rows(path: &Path) -> Vec<(Vec<u32>, u32)> {
    read_jsonl(path)
        .into_iter()
        .map(|v| {
            let h = v["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            (h, v["next"].as_u64().unwrap() as u32)
        })
        .collect()
}

pub fn candidates(path: &Path) -> Vec<Vec<u32>> {
    read_jsonl(path)
        .into_iter()
        .map(|v| {
            v["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// The log without its wall-clock field (every other float to the bit).
pub fn log_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_second");
            v
        })
        .collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Every file under `dir` with its bytes (relative paths, sorted); `None` when `dir` is missing.
pub fn snapshot(dir: &Path) -> Option<Vec<(String, Vec<u8>)>> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                walk(root, &r, out);
            } else {
                let bytes = std::fs::read(root.join(&r)).unwrap();
                out.push((r.to_string_lossy().into_owned(), bytes));
            }
        }
    }
    if !dir.is_dir() {
        return None;
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out);
    out.sort();
    Some(out)
}

/// Kills `llara args` (which rewrites `out` with `--force`) with SIGKILL after growing delays
/// until a run completes, and checks after each kill that `out` — or, when the kill came between
/// the commit's two renames, the old output set aside beside it — is whole: the bytes of `old`
/// or of `new`, nothing in between. A final run then leaves no temporary folder beside `out`.
#[cfg(unix)]
pub fn cut_writes_leave_a_whole_output(
    args: &[&str],
    out: &Path,
    ignore: &[&str],
    old: &[(String, Vec<u8>)],
    new: &[(String, Vec<u8>)],
) -> usize {
    // Files that differ from run to run by nature (wall-clock times) are compared by name only.
    let norm = |s: Vec<(String, Vec<u8>)>| -> Vec<(String, Vec<u8>)> {
        s.into_iter()
            .map(|(f, b)| {
                if ignore.contains(&f.as_str()) {
                    (f, vec![])
                } else {
                    (f, b)
                }
            })
            .collect()
    };
    let (old, new) = (&norm(old.to_vec())[..], &norm(new.to_vec())[..]);
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let aside = out.with_file_name(format!(".{name}.tmp-old"));
    let mut kills = 0;
    for delay in (0..2000u64).step_by(7) {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
            .args(args)
            .env("LLARA_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let done = child.try_wait().unwrap().is_some();
        if !done {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        let now = norm(
            snapshot(out)
                .or_else(|| snapshot(&aside))
                .expect("an output"),
        );
        assert!(
            now == old || now == new,
            "after a kill at {delay} ms {} is neither the old nor the new output",
            out.display()
        );
        if done {
            break;
        }
    }
    ok(args);
    assert_eq!(norm(snapshot(out).unwrap()), new);
    let stray: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}")))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    kills
}
