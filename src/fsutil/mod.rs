//! Atomic outputs: everything a command writes goes to a temporary sibling path first and is renamed
//! into place at the end, so an interrupted or failed run never leaves a half-written artifact.

pub mod checksums;
pub mod lock;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// A folder being written. Created as a hidden temporary sibling of `dest`; [`StagedDir::commit`]
/// renames it to `dest`. Dropping it without committing removes it.
pub struct StagedDir {
    tmp: Option<tempfile::TempDir>,
    dest: PathBuf,
    overwrite: bool,
    /// Held by [`StagedDir::new_locked`] until the write ends.
    _lock: Option<lock::DirLock>,
}

impl StagedDir {
    /// Prepares to write `dest`. Fails if `dest` exists and `overwrite` is false.
    pub fn new(dest: &Path, overwrite: bool) -> io::Result<Self> {
        if dest.exists() && !overwrite {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "output {} already exists (pass --force to replace it)",
                    dest.display()
                ),
            ));
        }
        let (parent, prefix) = temp_place(dest)?;
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(&parent)?;
        Ok(Self {
            tmp: Some(tmp),
            dest: dest.to_path_buf(),
            overwrite,
            _lock: None,
        })
    }

    /// [`StagedDir::new`] for a command's own output (`data prepare --out`, `train-sr --out`):
    /// holds a lock beside `dest` (`.NAME.lock`) until the write ends, so a second writer of the
    /// same output is refused naming the first one's PID, and, holding it, first cleans up what a
    /// killed earlier write left behind ([`recover_staged`]).
    pub fn new_locked(dest: &Path, overwrite: bool) -> io::Result<Self> {
        let (parent, _) = temp_place(dest)?;
        let l = lock::DirLock::acquire_file(parent.join(format!(".{}.lock", out_name(dest))))
            .map_err(io::Error::other)?;
        recover_staged(dest)?;
        let mut s = Self::new(dest, overwrite)?;
        s._lock = Some(l);
        Ok(s)
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        self.tmp
            .as_ref()
            .expect("staged dir used after commit")
            .path()
    }

    /// Renames the temporary folder to its destination (replacing an old one when allowed).
    pub fn commit(self) -> io::Result<PathBuf> {
        let overwrite = self.overwrite;
        self.rename_in(|tmp, dest| {
            if !dest.exists() {
                return fs::rename(tmp, dest);
            }
            if !overwrite {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("output {} appeared while writing", dest.display()),
                ));
            }
            // Move the old output aside first, so that at every moment `dest` is either the old
            // complete output or the new complete output.
            let old = old_place(dest)?;
            if old.is_dir() {
                fs::remove_dir_all(&old)?;
            }
            fs::rename(dest, &old)?;
            fs::rename(tmp, dest)?;
            if old.is_dir() {
                fs::remove_dir_all(&old)
            } else {
                fs::remove_file(&old)
            }
        })
    }

    /// Renames the temporary folder to its destination, keeping the output it replaces as
    /// `previous` (replacing an older one there). At every moment `dest` or `previous` is a
    /// complete output: a cut between the two renames leaves `previous` only.
    pub fn commit_rotating(self, previous: &Path) -> io::Result<PathBuf> {
        self.rename_in(|tmp, dest| {
            if dest.exists() {
                if previous.is_dir() {
                    fs::remove_dir_all(previous)?;
                }
                fs::rename(dest, previous)?;
            }
            fs::rename(tmp, dest)
        })
    }

    /// Keeps the temporary folder and runs `swap(tmp, dest)`; on failure the folder is removed.
    fn rename_in(
        mut self,
        swap: impl FnOnce(&Path, &Path) -> io::Result<()>,
    ) -> io::Result<PathBuf> {
        let tmp_path = self.tmp.take().expect("staged dir committed twice").keep();
        let result = swap(&tmp_path, &self.dest);
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp_path);
        }
        result.map(|_| self.dest.clone())
    }
}

/// The folder a temporary sibling of `dest` goes in (created if needed) and its name prefix.
fn temp_place(dest: &Path) -> io::Result<(PathBuf, String)> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)?;
    Ok((parent, format!(".{}.tmp-", out_name(dest))))
}

/// `dest`'s last component (the name its temporaries and lock are named after).
fn out_name(dest: &Path) -> String {
    dest.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into())
}

/// Where [`StagedDir::commit`] moves the previous output while it renames the new one in.
fn old_place(dest: &Path) -> io::Result<PathBuf> {
    let (parent, prefix) = temp_place(dest)?;
    Ok(parent.join(format!("{prefix}old")))
}

/// Cleans up after a [`StagedDir`] write of `dest` that a crash or a kill cut short: restores the
/// previous output when the cut came between the commit's two renames, and removes abandoned
/// temporary folders. Call it only while no other process writes `dest`.
pub fn recover_staged(dest: &Path) -> io::Result<()> {
    let (parent, prefix) = temp_place(dest)?;
    let old = old_place(dest)?;
    if !dest.exists() && old.is_dir() {
        fs::rename(&old, dest)?;
    }
    for entry in fs::read_dir(&parent)? {
        let p = entry?.path();
        let stale = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix));
        if stale && p.is_dir() {
            fs::remove_dir_all(&p)?;
        } else if stale {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Writes one file atomically: `write` fills a temporary sibling of `dest`, which is then renamed
/// over `dest`. On error (or panic) the temporary file is removed and `dest` is untouched.
pub fn write_file_atomic<E: From<io::Error>>(
    dest: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let (parent, prefix) = temp_place(dest)?;
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .tempfile_in(&parent)?;
    write(tmp.path())?;
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_commit_is_recovered_and_stale_temporaries_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("checkpoint");
        let s = StagedDir::new(&dest, true).unwrap();
        fs::write(s.path().join("f"), "one").unwrap();
        s.commit().unwrap();
        // A kill between the commit's two renames: the old output is aside, a new one staged.
        let s = StagedDir::new(&dest, true).unwrap();
        fs::write(s.path().join("f"), "two").unwrap();
        let staged = s.path().to_path_buf();
        std::mem::forget(s);
        fs::rename(&dest, old_place(&dest).unwrap()).unwrap();
        recover_staged(&dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("f")).unwrap(), "one");
        assert!(!staged.exists());
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("checkpoint")]);
        // An intact output is left alone.
        recover_staged(&dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("f")).unwrap(), "one");
    }
}
