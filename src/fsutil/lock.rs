//! One writer per folder: an exclusive advisory lock (`flock`) on `DIR/run.lock`, held for the
//! life of the writing command, with the holder's PID in the file.
//!
//! The operating system releases the lock when its holder exits, however it exits, so a lock is
//! never left held by a dead process; the file it leaves behind (a kill, a crash) still names the
//! dead holder, and the next writer takes it over and says so. A clean exit removes the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

/// The lock file's name inside the folder it guards.
pub const LOCK_FILE: &str = "run.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock.
    #[error("{}: another llara process (PID {}) is writing this output; wait for it to finish or stop it first", path.display(), pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// A held lock on a folder; dropping it releases the lock and removes the file.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
    /// The PID a dead holder left in the file, when this lock took it over.
    pub took_over: Option<u32>,
}

impl DirLock {
    /// Takes the lock of `dir` (creating the folder if needed), or fails at once with
    /// [`LockError::Held`] naming the live holder's PID.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        fs::create_dir_all(dir).map_err(|source| LockError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Self::acquire_file(dir.join(LOCK_FILE))
    }

    /// Takes the lock held through the file at `path` (its folder must exist).
    pub fn acquire_file(path: PathBuf) -> Result<Self, LockError> {
        let err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(err)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(LockError::Held {
                        pid: read_pid(&mut file),
                        path,
                    })
                }
                Err(fs::TryLockError::Error(e)) => return Err(err(e)),
            }
            // The holder before us may have removed the file between our open and our lock: the
            // lock is then on a file no one else will see. Start again on the path's file.
            if !same_file(&file, &path) {
                continue;
            }
            let took_over = read_pid(&mut file);
            file.set_len(0).map_err(err)?;
            file.rewind().map_err(err)?;
            writeln!(file, "{}", std::process::id()).map_err(err)?;
            file.sync_all().map_err(err)?;
            return Ok(Self {
                file,
                path,
                took_over,
            });
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Removed while still held: a process waiting on the old file sees it is gone (above).
        let _ = fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid_and_a_stale_file_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let a = DirLock::acquire(&dir).unwrap();
        assert_eq!(a.took_over, None);
        // A second open file description is refused, as another process would be.
        match DirLock::acquire(&dir) {
            Err(e @ LockError::Held { pid: Some(p), .. }) => {
                assert_eq!(p, std::process::id());
                let msg = e.to_string();
                assert!(
                    msg.contains("run.lock") && msg.contains(&format!("PID {p}")),
                    "{msg}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        drop(a);
        assert!(
            !dir.join(LOCK_FILE).exists(),
            "a clean release removes the file"
        );
        // A holder killed without releasing leaves its PID in an unlocked file.
        fs::write(dir.join(LOCK_FILE), "4194999\n").unwrap();
        let b = DirLock::acquire(&dir).unwrap();
        assert_eq!(b.took_over, Some(4194999));
        let pid = fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
    }
}
