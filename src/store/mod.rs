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

pub use remote::{RangeStream, Remote};

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

/// A file argument as a local file: a local path as it is; a store URL
/// naming one object (`s3://bucket/cache/stats.safetensors`, an `.npz`)
/// fetched into the read-through cache directory, under
/// `objects/<scheme>/<bucket>/<key>`, again only when the object's size or
/// etag changed.
pub fn local_file(arg: &Path) -> Result<PathBuf, StoreError> {
    if !is_url(arg) {
        return Ok(arg.to_path_buf());
    }
    let url = arg.to_str().unwrap_or_default().trim_end_matches('/');
    let Some((parent, name)) = url
        .rsplit_once('/')
        .filter(|(p, n)| !n.is_empty() && !p.ends_with(':') && !p.ends_with(":/"))
    else {
        return Err(StoreError::Url {
            url: url.to_string(),
            reason: "names no object (a file is expected here)".into(),
        });
    };
    let remote = Remote::open(parent)?;
    let Some(meta) = remote.head(name)? else {
        return Err(StoreError::Invalid {
            url: url.to_string(),
            reason: "no such object".into(),
        });
    };
    let rc = cache::ReadCache::from_settings()?;
    let objects = cache::ReadCache::new(cache::ReadCacheSettings {
        dir: rc.settings().dir.join("objects"),
        max_bytes: None,
    });
    let local = objects.local_dir(&remote).join(name);
    let dir = local.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
    let version = format!("{} {}", meta.size, meta.e_tag.as_deref().unwrap_or(""));
    let mut tag = local.clone().into_os_string();
    tag.push(".version");
    let tag = PathBuf::from(tag);
    let fresh = std::fs::read_to_string(&tag).is_ok_and(|v| v == version)
        && std::fs::metadata(&local).is_ok_and(|m| m.len() == meta.size);
    if !fresh {
        if remote.download(name, &local)?.is_none() {
            return Err(StoreError::Invalid {
                url: url.to_string(),
                reason: "no such object (removed while fetching it)".into(),
            });
        }
        crate::fsutil::write_atomic(&tag, version.as_bytes()).map_err(StoreError::io(&tag))?;
    }
    Ok(local)
}

/// An input that is a cache directory or a file (`eval`'s samples and
/// reference): a store URL whose last part has an extension (`.npz`,
/// `.safetensors`, `.parquet`) is one object ([`local_file`]), any other a
/// cache prefix ([`local_cache_dir`]); a local path is returned as it is.
pub fn local_input(arg: &Path) -> Result<PathBuf, StoreError> {
    if !is_url(arg) {
        return Ok(arg.to_path_buf());
    }
    let s = arg.to_str().unwrap_or_default();
    let last = s.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    if !s.ends_with('/') && last.contains('.') {
        local_file(arg)
    } else {
        local_cache_dir(arg)
    }
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
