//! Exclusive directory lock: one writer per cache (or per part) directory.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "{path} is locked by another rae-cache process (a build or merge is running on this directory); wait for it or stop it first"
    )]
    Held {
        /// The lock file.
        path: PathBuf,
    },
    /// Creating or locking the lock file failed.
    #[error("{path}: cannot lock: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Held for as long as it lives; the OS drops the lock with the file handle
/// (also when the process is killed).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    /// The lock file.
    pub path: PathBuf,
}

/// Take the exclusive lock on `dir/name` without waiting: fails with
/// [`LockError::Held`] when another process has it.
pub fn lock_dir(dir: &Path, name: &str) -> Result<DirLock, LockError> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
    // fs4's trait method, not std's inherent `File::try_lock`.
    match fs4::FileExt::try_lock(&file) {
        Ok(()) => Ok(DirLock { _file: file, path }),
        Err(fs4::TryLockError::WouldBlock) => Err(LockError::Held { path }),
        Err(fs4::TryLockError::Error(source)) => Err(LockError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = lock_dir(dir.path(), ".lock").unwrap();
        match lock_dir(dir.path(), ".lock") {
            Err(LockError::Held { path }) => assert!(path.ends_with(".lock")),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(a);
        lock_dir(dir.path(), ".lock").unwrap();
    }
}
