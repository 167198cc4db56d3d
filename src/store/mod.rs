//! Object storage for build outputs and for the caches the readers open:
//! `s3://bucket/prefix` (and `gs://`, `az://`, `http(s)://` read-only,
//! `file://`) through the `object_store` crate, with credentials and
//! endpoint from each store's usual environment variables (for S3:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...).
//!
//! * [`Remote`]: one store prefix, with blocking calls (our pipeline and
//!   loader are synchronous threads; a small tokio runtime runs the I/O).
//! * [`upload`]: `rae-cache build --out s3://...`: shards are written as
//!   usual into a local staging directory and each finished file is
//!   uploaded under its final name (one PUT, or a multipart upload that is
//!   only completed once whole), the build state and manifest after the
//!   shards they list; a lock object created with a conditional PUT keeps
//!   a second build off the prefix; `--resume` continues from what the
//!   store holds.
//! * [`cache`]: a local read-through cache (`--cache-dir`, `--cache-size`)
//!   that downloads each shard of a cache once (temp file + rename) and
//!   evicts least-recently-used whole shards, so `train`, `inspect`,
//!   `verify` ... read a store URL like a local directory.

use std::path::{Path, PathBuf};

pub mod cache;
mod remote;
pub mod upload;

pub use remote::Remote;

/// What went wrong talking to a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store refused or failed a request: the URL and its answer.
    #[error("{url}: {op} failed: {answer}")]
    Store {
        /// The object (or prefix) asked for.
        url: String,
        /// The operation (get, put, list, ...).
        op: &'static str,
        /// The store's answer (status and body), as `object_store` reports it.
        answer: Box<object_store::Error>,
    },
    /// A URL that names no supported store.
    #[error("{url}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A local file of the staging or read-through cache directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another build holds the prefix's lock object.
    #[error(
        "{url} is locked by another build ({holder}); wait for it to finish, or if it is dead rerun with --break-lock"
    )]
    Locked {
        /// The lock object.
        url: String,
        /// Who holds it (host, pid, start time), as the lock records.
        holder: String,
    },
    /// A cache in the store that cannot be read as one.
    #[error("{url}: {reason}")]
    Invalid {
        /// The object or prefix.
        url: String,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Does `arg` name an object-store URL (`scheme://...`) rather than a local path?
pub fn is_url(arg: &Path) -> bool {
    let Some(s) = arg.to_str() else {
        return false;
    };
    match s.split_once("://") {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// A cache directory argument as a local directory: a local path is
/// returned as it is; a store URL is brought into the read-through cache
/// (see [`cache`]) and its local copy returned.
pub fn local_cache_dir(arg: &Path) -> Result<PathBuf, StoreError> {
    if !is_url(arg) {
        return Ok(arg.to_path_buf());
    }
    let url = arg.to_str().unwrap_or_default();
    cache::ReadCache::from_settings()?.open(&Remote::open(url)?)
}

/// [`local_cache_dir`] for each of `args`.
pub fn local_cache_dirs(args: &[PathBuf]) -> Result<Vec<PathBuf>, StoreError> {
    args.iter().map(|a| local_cache_dir(a)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        assert!(is_url(Path::new("s3://bucket/cache")));
        assert!(is_url(Path::new("gs://b/c")));
        assert!(is_url(Path::new("file:///tmp/x")));
        assert!(!is_url(Path::new("/data/cache")));
        assert!(!is_url(Path::new("cache/s3:/x")));
        assert!(!is_url(Path::new("a b://c")));
    }
}
