//! The dependency rules of ARCHITECTURE.md, checked from the source: which top-level modules of the
//! library may name which (`crate::NAME` outside comments), that no file cycle exists inside a
//! module (`super::NAME` / `crate::MODULE::NAME` between sibling files), and that the command-line
//! crates (clap, anyhow) stay out of the library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each library module and the modules it may import. Stages point one way: kernels at the
/// bottom; data; the recommenders and the LLM engine (siblings: neither names the other); LLaRA.
const RULES: &[(&str, &[&str])] = &[
    ("kernels", &[]),
    ("fsutil", &[]),
    ("interrupt", &[]),
    ("device", &[]),
    ("comm", &[]),
    ("eval", &[]),
    ("data", &["fsutil"]),
    ("sr", &["kernels", "data", "eval", "fsutil", "interrupt"]),
    ("llm", &["kernels", "fsutil", "device"]),
    (
        "llara",
        &[
            "kernels",
            "data",
            "eval",
            "fsutil",
            "interrupt",
            "device",
            "llm",
            "sr",
            "comm",
        ],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(p: &Path) -> Vec<PathBuf> {
    if p.is_file() {
        return vec![p.to_path_buf()];
    }
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The code of a file without its comments (line comments and doc comments).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every identifier that directly follows `prefix` in `text` (`crate::` → `data`, `sr`, …).
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

fn module_path(m: &str) -> PathBuf {
    let dir = src().join(m);
    if dir.is_dir() {
        dir
    } else {
        src().join(format!("{m}.rs"))
    }
}

#[test]
fn every_library_module_imports_only_what_the_architecture_allows() {
    let known: BTreeSet<&str> = RULES.iter().map(|(m, _)| *m).collect();
    let mut broken = vec![];
    for (m, allowed) in RULES {
        let files = rust_files(&module_path(m));
        assert!(!files.is_empty(), "module {m} has no source");
        for f in files {
            for used in names_after(&code(&f), "crate::") {
                if used == *m || !known.contains(used.as_str()) {
                    continue;
                }
                if !allowed.contains(&used.as_str()) {
                    broken.push(format!("{} uses crate::{used}", f.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
    // Every module of the library has a rule.
    let lib = code(&src().join("lib.rs"));
    for m in names_after(&lib, "pub mod ") {
        assert!(
            known.contains(m.as_str()),
            "lib.rs declares {m}, which has no rule here"
        );
    }
}

/// The sibling files of a module directory that each file names.
fn file_graph(m: &str) -> BTreeMap<String, BTreeSet<String>> {
    let dir = src().join(m);
    let stem = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let files: Vec<PathBuf> = rust_files(&dir)
        .into_iter()
        .filter(|p| p.parent() == Some(dir.as_path()) && stem(p) != "mod")
        .collect();
    let names: BTreeSet<String> = files.iter().map(|p| stem(p)).collect();
    let mut g = BTreeMap::new();
    for f in &files {
        let text = code(f);
        let mut used: BTreeSet<String> = names_after(&text, "super::");
        used.extend(names_after(&text, &format!("crate::{m}::")));
        used.retain(|n| names.contains(n) && *n != stem(f));
        g.insert(stem(f), used);
    }
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let i = stack.iter().position(|s| s == n).unwrap();
                let mut c = stack[i..].to_vec();
                c.push(n.to_string());
                return Some(c);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut state, &mut vec![]) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_file_cycles_inside_a_module() {
    for (m, _) in RULES {
        if !src().join(m).is_dir() {
            continue;
        }
        let g = file_graph(m);
        if let Some(c) = find_cycle(&g) {
            panic!("import cycle in src/{m}: {}", c.join(" → "));
        }
    }
    // The check itself finds a cycle.
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert!(find_cycle(&g).is_some());
}

/// Public functions whose error type is a bare `String` (a signature up to its body's `{`).
fn string_errors(text: &str) -> Vec<String> {
    let mut out = vec![];
    let mut rest = text;
    while let Some(i) = rest.find("pub fn ") {
        rest = &rest[i..];
        let sig_end = rest.find('{').unwrap_or(rest.len());
        let sig: String = rest[..sig_end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if sig.contains("Result<") && sig.trim_end().ends_with(", String>") {
            out.push(sig);
        }
        rest = &rest["pub fn ".len()..];
    }
    out
}

#[test]
fn public_library_functions_return_typed_errors() {
    let mut found = vec![];
    for (m, _) in RULES {
        for f in rust_files(&module_path(m)) {
            for sig in string_errors(&code(&f)) {
                found.push(format!("{}: {sig}", f.display()));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
    // The check itself sees one.
    assert_eq!(
        string_errors("pub fn parse(s: &str)\n    -> Result<u32, String> {\n}").len(),
        1
    );
}

#[test]
fn the_library_has_no_command_line_crates() {
    let mut found = vec![];
    for (m, _) in RULES {
        for f in rust_files(&module_path(m)) {
            let text = code(&f);
            for krate in ["clap", "anyhow"] {
                if !names_after(&text, &format!("{krate}::")).is_empty()
                    || text.contains(&format!("use {krate}"))
                {
                    found.push(format!("{} uses {krate}", f.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
    assert!(
        !code(&src().join("lib.rs")).contains("mod cli"),
        "the command line belongs to the binary"
    );
}
