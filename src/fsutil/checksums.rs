//! Folders that know when they are damaged: `SHA256SUMS` (the format `sha256sum -c` reads) lists
//! every file of the folder with its digest, and is written last, so a folder whose list is
//! missing, or whose files are missing, truncated or altered, is detected before it is read.

use sha2::{Digest, Sha256};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The list's name inside the folder it covers.
pub const SUMS_FILE: &str = "SHA256SUMS";

/// What is wrong with a folder's contents.
#[derive(Debug, thiserror::Error)]
pub enum Damage {
    #[error("{}: missing (the folder was written before checksums, or its write was cut short)", .0.display())]
    NoList(PathBuf),
    #[error("{}: line {line}: expected `<64 hex digits>  <file>`", path.display())]
    BadList { path: PathBuf, line: usize },
    #[error("{}: listed in {SUMS_FILE} but missing", .0.display())]
    Missing(PathBuf),
    #[error("{}: its SHA-256 is {got}, {SUMS_FILE} says {want} (the file is truncated or altered)", path.display())]
    Mismatch {
        path: PathBuf,
        want: String,
        got: String,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl Damage {
    /// The file the damage is in.
    pub fn path(&self) -> &Path {
        match self {
            Damage::NoList(p) | Damage::Missing(p) => p,
            Damage::BadList { path, .. }
            | Damage::Mismatch { path, .. }
            | Damage::Io { path, .. } => path,
        }
    }
}

fn digest(path: &Path) -> Result<String, Damage> {
    let mut f = fs::File::open(path).map_err(|source| Damage::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|source| Damage::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!("{:x}", h.finalize()))
}

/// Every file under `dir` (relative, `/`-separated, sorted), the list itself left out.
fn files(dir: &Path) -> io::Result<Vec<String>> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> io::Result<()> {
        for e in fs::read_dir(root.join(rel))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type()?.is_dir() {
                walk(root, &r, out)?;
            } else if r != SUMS_FILE {
                out.push(r);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Writes `dir/SHA256SUMS` for every file now in `dir` (call it when the folder is complete).
pub fn write(dir: &Path) -> Result<(), Damage> {
    let list = dir.join(SUMS_FILE);
    let io_err = |source| Damage::Io {
        path: list.clone(),
        source,
    };
    let mut text = String::new();
    for f in files(dir).map_err(io_err)? {
        text += &format!("{}  {f}\n", digest(&dir.join(&f))?);
    }
    fs::write(&list, text).map_err(io_err)
}

/// Checks every file `dir/SHA256SUMS` lists against its digest.
pub fn verify(dir: &Path) -> Result<(), Damage> {
    let list = dir.join(SUMS_FILE);
    let text = match fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Damage::NoList(list)),
        Err(source) => return Err(Damage::Io { path: list, source }),
    };
    for (i, l) in text.lines().enumerate() {
        let bad = || Damage::BadList {
            path: list.clone(),
            line: i + 1,
        };
        let (want, name) = l.split_once("  ").ok_or_else(bad)?;
        if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) || name.is_empty() {
            return Err(bad());
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Damage::Missing(path));
        }
        let got = digest(&path)?;
        if got != want.to_ascii_lowercase() {
            return Err(Damage::Mismatch {
                path,
                want: want.into(),
                got,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_altered_and_missing_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::create_dir_all(d.join("adapter")).unwrap();
        fs::write(d.join("state.json"), "{\"step\": 3}\n").unwrap();
        fs::write(d.join("adapter/w.safetensors"), vec![7u8; 1000]).unwrap();
        assert!(matches!(verify(d), Err(Damage::NoList(_))));
        write(d).unwrap();
        let list = fs::read_to_string(d.join(SUMS_FILE)).unwrap();
        assert_eq!(list.lines().count(), 2);
        assert!(
            list.lines()
                .next()
                .unwrap()
                .ends_with("  adapter/w.safetensors"),
            "{list}"
        );
        verify(d).unwrap();
        // Truncated.
        fs::write(d.join("adapter/w.safetensors"), vec![7u8; 999]).unwrap();
        let e = verify(d).unwrap_err();
        assert!(matches!(e, Damage::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("w.safetensors"), "{e}");
        // One byte altered.
        let mut b = vec![7u8; 1000];
        b[500] = 8;
        fs::write(d.join("adapter/w.safetensors"), b).unwrap();
        assert!(matches!(verify(d), Err(Damage::Mismatch { .. })));
        fs::write(d.join("adapter/w.safetensors"), vec![7u8; 1000]).unwrap();
        verify(d).unwrap();
        // Missing.
        fs::remove_file(d.join("state.json")).unwrap();
        let e = verify(d).unwrap_err();
        assert!(
            matches!(e, Damage::Missing(_)) && e.path().ends_with("state.json"),
            "{e}"
        );
        // A garbled list.
        fs::write(d.join(SUMS_FILE), "not a checksum line\n").unwrap();
        assert!(matches!(verify(d), Err(Damage::BadList { line: 1, .. })));
    }
}
