//! A run folder's checkpoints: written whole or not at all, checked before they are read, and the
//! one before kept until the next is complete.
//!
//! `checkpoint/` is staged in a temporary sibling, its `SHA256SUMS` written last
//! ([`crate::fsutil::checksums`]), and renamed into place; the checkpoint it replaces becomes
//! `checkpoint.prev/`. [`latest`] takes the newest one whose checksums hold and says why it passed
//! over `checkpoint/` when it falls back to `checkpoint.prev/`; a folder with no intact checkpoint
//! is an error naming the damaged file, never a fresh start.

use crate::fsutil::checksums::{self, Damage};
use crate::fsutil::{self, StagedDir};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Where a tuning run keeps its files.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    /// The newest checkpoint.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
    /// The checkpoint before it (kept until a newer one is complete).
    pub fn previous(&self) -> PathBuf {
        self.dir.join("checkpoint.prev")
    }
    /// Where a damaged `checkpoint/` is moved when a resume falls back to the previous one.
    pub fn damaged(&self) -> PathBuf {
        self.dir.join("checkpoint.damaged")
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join("best")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("train_log.jsonl")
    }
}

/// The state file inside a checkpoint.
pub const STATE_FILE: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: no checkpoint to resume from (the run stopped before writing its first one: at a validation point, --checkpoint-every or --checkpoint-minutes); start it again with --force", .0.display())]
    None(PathBuf),
    /// Neither checkpoint is intact: the newest one's damage first.
    #[error("{newest}{}; refusing to resume from a damaged checkpoint (start the run again, or restore the file)", previous.as_ref().map_or(String::new(), |p| format!("; the previous checkpoint too: {p}")))]
    Damaged {
        newest: Box<Damage>,
        previous: Option<Box<Damage>>,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A checkpoint whose checksums hold.
#[derive(Debug)]
pub struct Found<S> {
    /// `checkpoint/` or `checkpoint.prev/`.
    pub dir: PathBuf,
    pub state: S,
    /// What was wrong with `checkpoint/` when this is the previous one.
    pub passed_over: Option<Damage>,
}

/// Reads a checkpoint folder's state after checking every file against its checksums.
fn open<S: DeserializeOwned>(dir: &Path) -> Result<S, Damage> {
    checksums::verify(dir)?;
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| Damage::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Damage::Io {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// The newest intact checkpoint of `run`. When `checkpoint/` is damaged and `checkpoint.prev/` is
/// not, the damaged one is moved to `checkpoint.damaged/` (for inspection) and the previous one
/// returned with the damage it passed over. Call it only while holding the run's lock.
pub fn latest<S: DeserializeOwned>(run: &RunDir) -> Result<Found<S>, CheckpointError> {
    let (newest, previous) = (run.checkpoint(), run.previous());
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    if !newest.is_dir() && !previous.is_dir() {
        return Err(CheckpointError::None(newest));
    }
    let damage = if newest.is_dir() {
        match open(&newest) {
            Ok(state) => {
                return Ok(Found {
                    dir: newest,
                    state,
                    passed_over: None,
                })
            }
            Err(d) => Some(d),
        }
    } else {
        // Cut between the rotation's two renames: the previous checkpoint is the newest.
        None
    };
    if !previous.is_dir() {
        return Err(CheckpointError::Damaged {
            newest: Box::new(damage.expect("checkpoint/ exists when checkpoint.prev/ does not")),
            previous: None,
        });
    }
    match open(&previous) {
        Ok(state) => {
            if damage.is_some() {
                let aside = run.damaged();
                if aside.exists() {
                    std::fs::remove_dir_all(&aside).map_err(io(&aside))?;
                }
                std::fs::rename(&newest, &aside).map_err(io(&newest))?;
            }
            Ok(Found {
                dir: previous,
                state,
                passed_over: damage,
            })
        }
        Err(p) => Err(match damage {
            Some(newest) => CheckpointError::Damaged {
                newest: Box::new(newest),
                previous: Some(Box::new(p)),
            },
            None => CheckpointError::Damaged {
                newest: Box::new(p),
                previous: None,
            },
        }),
    }
}

/// Writes a new `checkpoint/`: `fill` writes its files into a staged folder, the checksums are
/// written last, and the folder is renamed into place, the one it replaces becoming
/// `checkpoint.prev/`. At every moment `checkpoint/` or `checkpoint.prev/` is a complete checkpoint.
pub fn save<E: From<std::io::Error>>(
    run: &RunDir,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    staged(&run.checkpoint(), fill)?.commit_rotating(&run.previous())?;
    Ok(())
}

/// Writes a folder other than the checkpoint (`best/`) the same way, without keeping the old one.
pub fn save_dir<E: From<std::io::Error>>(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    staged(dest, fill)?.commit()?;
    Ok(())
}

/// A staged folder for `dest` that `fill` has written, its checksums last.
fn staged<E: From<std::io::Error>>(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<StagedDir, E> {
    let staged = StagedDir::new(dest, true)?;
    fill(staged.path())?;
    checksums::write(staged.path()).map_err(|d| std::io::Error::other(d.to_string()))?;
    Ok(staged)
}

/// Cleans up after writes that a crash or a kill cut short (see [`fsutil::recover_staged`]).
pub fn recover(run: &RunDir) -> std::io::Result<()> {
    for dest in [
        run.checkpoint(),
        run.previous(),
        run.best(),
        run.dir.join("adapter"),
    ] {
        fsutil::recover_staged(&dest)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(run: &RunDir, step: u32) {
        save::<std::io::Error>(run, |p| {
            fs::write(p.join(STATE_FILE), format!("{step}\n"))?;
            fs::write(p.join("w.bin"), vec![step as u8; 64])
        })
        .unwrap();
    }

    #[test]
    fn a_damaged_checkpoint_falls_back_to_the_previous_one_and_both_damaged_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir {
            dir: tmp.path().to_path_buf(),
        };
        assert!(matches!(latest::<u32>(&run), Err(CheckpointError::None(_))));
        write(&run, 1);
        assert!(!run.previous().exists());
        write(&run, 2);
        let f = latest::<u32>(&run).unwrap();
        assert_eq!((f.state, f.dir == run.checkpoint()), (2, true));
        assert_eq!(
            fs::read_to_string(run.previous().join(STATE_FILE)).unwrap(),
            "1\n"
        );
        // Truncate the newest checkpoint's weights: the previous one is used, the damage named.
        fs::write(run.checkpoint().join("w.bin"), vec![2u8; 10]).unwrap();
        let f = latest::<u32>(&run).unwrap();
        assert_eq!(f.state, 1);
        assert_eq!(f.dir, run.previous());
        let why = f.passed_over.unwrap().to_string();
        assert!(why.contains("w.bin") && why.contains("truncated"), "{why}");
        assert!(run.damaged().is_dir() && !run.checkpoint().exists());
        // The next save puts a complete checkpoint back in front.
        write(&run, 3);
        assert_eq!(latest::<u32>(&run).unwrap().state, 3);
        // Both damaged: an error naming the newest's file.
        write(&run, 4);
        fs::write(run.checkpoint().join(STATE_FILE), "40\n").unwrap();
        fs::remove_file(run.previous().join("w.bin")).unwrap();
        let e = latest::<u32>(&run).unwrap_err().to_string();
        assert!(
            e.contains("checkpoint/state.json") && e.contains("previous"),
            "{e}"
        );
        // A checkpoint without its list (cut short, or written by an older llara) is not trusted.
        fs::remove_file(run.previous().join(checksums::SUMS_FILE)).unwrap();
        fs::remove_dir_all(run.checkpoint()).unwrap();
        let e = latest::<u32>(&run).unwrap_err().to_string();
        assert!(e.contains("SHA256SUMS: missing"), "{e}");
    }

    #[test]
    fn a_cut_between_the_rotations_renames_resumes_from_the_previous_one() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir {
            dir: tmp.path().to_path_buf(),
        };
        write(&run, 1);
        write(&run, 2);
        // The first rename of a rotation done, the second not: only checkpoint.prev/ holds step 2.
        fs::remove_dir_all(run.previous()).unwrap();
        fs::rename(run.checkpoint(), run.previous()).unwrap();
        recover(&run).unwrap();
        let f = latest::<u32>(&run).unwrap();
        assert_eq!((f.state, f.passed_over.is_none()), (2, true));
    }
}
