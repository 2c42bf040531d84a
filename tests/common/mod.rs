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

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
