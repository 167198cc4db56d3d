//! The local read-through cache of caches kept in a store.
//!
//! [`ReadCache::open`] makes a local copy of a store cache under
//! `--cache-dir` (`<dir>/<scheme>/<bucket>/<prefix>/`) and returns its
//! path, which every reader then opens like a local directory:
//!
//! * `manifest.json` is fetched each time (it is the record of what the
//!   cache holds); `stats.safetensors` when the manifest changed or it is
//!   missing;
//! * each shard is downloaded once (temp file + rename, sha256 checked
//!   against the manifest) and then read locally: a multi-epoch run, or the
//!   next run on the same node, reads no shard from the store again;
//! * with `--cache-size`, least-recently-used whole shards of *other*
//!   cached caches are evicted to make room (a shard's last use is its
//!   file's modification time, touched on every open); a cache that alone
//!   exceeds the size is refused, naming both sizes.
//!
//! Several processes on one node (the ranks of a job) share the cache: a
//! file lock on `<dir>/.lock` makes the first download and the others wait.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use super::{Remote, StoreError};
use crate::shards::Manifest;
use crate::shards::manifest::{MANIFEST_FILE, STATS_FILE};

/// Where the read-through cache lives and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadCacheSettings {
    /// The cache directory.
    pub dir: PathBuf,
    /// Most bytes of shards kept; `None`: no bound.
    pub max_bytes: Option<u64>,
}

static SETTINGS: OnceLock<ReadCacheSettings> = OnceLock::new();

/// Set the process's read-through cache (the CLI's `--cache-dir` and
/// `--cache-size`); the first call wins. Without it, `RAE_CACHE_DIR`
/// / `RAE_CACHE_SIZE` or the defaults apply.
pub fn configure(settings: ReadCacheSettings) {
    let _ = SETTINGS.set(settings);
}

/// `~/.cache/rae-cache/store` (or under `$XDG_CACHE_HOME`), else the temp dir.
pub fn default_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("rae-cache").join("store");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h)
            .join(".cache")
            .join("rae-cache")
            .join("store"),
        None => std::env::temp_dir().join("rae-cache-store"),
    }
}

/// Parse a size: bytes, or with a `K`, `M`, `G`, `T` suffix (powers of
/// 1000; `KiB`, `MiB`, `GiB`, `TiB`: powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 500G, 2TiB, 1000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        u => return Err(format!("{s:?}: unknown size unit {u:?}")),
    };
    Ok((n * mult) as u64)
}

/// What one [`ReadCache::open`] did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpenReport {
    /// Shards downloaded from the store.
    pub downloaded: usize,
    /// Their bytes.
    pub downloaded_bytes: u64,
    /// Shards that were already in the cache.
    pub hits: usize,
    /// Shards of other caches evicted to make room.
    pub evicted: usize,
}

/// The read-through cache.
#[derive(Debug, Clone)]
pub struct ReadCache {
    settings: ReadCacheSettings,
}

impl ReadCache {
    /// A cache with these settings.
    pub fn new(settings: ReadCacheSettings) -> Self {
        Self { settings }
    }

    /// The settings [`configure`]d, else from `RAE_CACHE_DIR` /
    /// `RAE_CACHE_SIZE`, else the default directory without a bound.
    pub fn from_settings() -> Result<Self, StoreError> {
        if let Some(s) = SETTINGS.get() {
            return Ok(Self::new(s.clone()));
        }
        let dir = std::env::var_os("RAE_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(default_dir);
        let max_bytes = match std::env::var("RAE_CACHE_SIZE") {
            Ok(v) => Some(parse_size(&v).map_err(|reason| StoreError::Invalid {
                url: "RAE_CACHE_SIZE".into(),
                reason,
            })?),
            Err(_) => None,
        };
        Ok(Self::new(ReadCacheSettings { dir, max_bytes }))
    }

    /// Where it lives and how large it may grow.
    pub fn settings(&self) -> &ReadCacheSettings {
        &self.settings
    }

    /// The local directory that mirrors `remote`.
    pub fn local_dir(&self, remote: &Remote) -> PathBuf {
        let tail = remote.url().replace("://", "/");
        let safe: PathBuf = tail
            .split('/')
            .filter(|p| !p.is_empty() && *p != "." && *p != "..")
            .collect();
        self.settings.dir.join(safe)
    }

    /// Bring `remote`'s manifest, statistics and shards into the cache;
    /// the local directory to read.
    pub fn open(&self, remote: &Remote) -> Result<PathBuf, StoreError> {
        self.open_with_report(remote).map(|(d, _)| d)
    }

    /// [`ReadCache::open`], with what it did.
    pub fn open_with_report(&self, remote: &Remote) -> Result<(PathBuf, OpenReport), StoreError> {
        let root = &self.settings.dir;
        std::fs::create_dir_all(root).map_err(StoreError::io(root))?;
        let lock_path = root.join(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(StoreError::io(&lock_path))?;
        fs4::FileExt::lock(&lock).map_err(StoreError::io(&lock_path))?;
        let res = self.fill(remote);
        let _ = fs4::FileExt::unlock(&lock);
        res
    }

    fn fill(&self, remote: &Remote) -> Result<(PathBuf, OpenReport), StoreError> {
        let t = Instant::now();
        let dir = self.local_dir(remote);
        std::fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        // A missing manifest: the store's answer says whether the bucket or
        // the object is missing.
        let manifest_bytes = remote.get_required(MANIFEST_FILE)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let unchanged = std::fs::read(&manifest_path).ok().as_deref() == Some(&manifest_bytes[..]);
        crate::fsutil::write_atomic(&manifest_path, &manifest_bytes)
            .map_err(StoreError::io(&manifest_path))?;
        let manifest = Manifest::load(&manifest_path).map_err(|e| StoreError::Invalid {
            url: remote.url_of(MANIFEST_FILE),
            reason: e.to_string(),
        })?;
        let stats_path = dir.join(STATS_FILE);
        if (!unchanged || !stats_path.exists())
            && remote.download(STATS_FILE, &stats_path)?.is_none()
        {
            return Err(StoreError::Invalid {
                url: remote.url_of(STATS_FILE),
                reason: "no such object: the cache has no statistics (its build is not finished)"
                    .into(),
            });
        }
        let mut report = OpenReport::default();
        let mut missing = Vec::new();
        let mut wanted = 0u64;
        for info in &manifest.shards {
            wanted += info.bytes;
            // A changed manifest may list other bytes under the same name:
            // then a local shard is kept only if its sha256 still matches.
            let same = |local: &Path| {
                std::fs::metadata(local).is_ok_and(|md| md.len() == info.bytes)
                    && (unchanged
                        || crate::fsutil::sha256_file(local).ok().as_deref()
                            == Some(info.sha256.as_str()))
            };
            match candidates(&info.file)
                .into_iter()
                .find(|rel| same(&dir.join(rel)))
            {
                Some(rel) => {
                    touch(&dir.join(rel));
                    report.hits += 1;
                }
                None => missing.push(info),
            }
        }
        let need: u64 = missing.iter().map(|i| i.bytes).sum();
        report.evicted = self.make_room(&dir, wanted, need)?;
        for info in missing {
            let (rel, local, got) = download_shard(remote, &dir, &info.file)?;
            let Some(got) = got else {
                return Err(StoreError::Invalid {
                    url: remote.url_of(&rel),
                    reason: "no such object, but the manifest lists it".into(),
                });
            };
            let sha = crate::fsutil::sha256_file(&local).map_err(StoreError::io(&local))?;
            if got != info.bytes || sha != info.sha256 {
                let _ = std::fs::remove_file(&local);
                return Err(StoreError::Invalid {
                    url: remote.url_of(&rel),
                    reason: format!(
                        "{got} bytes with sha256 {sha}, the manifest lists {} bytes with sha256 {}",
                        info.bytes, info.sha256
                    ),
                });
            }
            report.downloaded += 1;
            report.downloaded_bytes += info.bytes;
        }
        tracing::info!(
            "read-through cache {}: {} shards downloaded ({:.1} MB), {} already here, {} evicted, {:.2} s",
            dir.display(),
            report.downloaded,
            report.downloaded_bytes as f64 / 1e6,
            report.hits,
            report.evicted,
            t.elapsed().as_secs_f64()
        );
        Ok((dir, report))
    }

    /// Evict least-recently-used shards outside `keep` until `need` more
    /// bytes fit under the bound; refuse a cache of `wanted` bytes that
    /// cannot fit at all. Returns the number evicted.
    fn make_room(&self, keep: &Path, wanted: u64, need: u64) -> Result<usize, StoreError> {
        let Some(max) = self.settings.max_bytes else {
            return Ok(0);
        };
        if wanted > max {
            return Err(StoreError::Invalid {
                url: keep.display().to_string(),
                reason: format!(
                    "the cache's shards take {wanted} bytes, more than the read-through cache's size {max} (--cache-size)"
                ),
            });
        }
        let mut files = Vec::new();
        collect_shards(&self.settings.dir, &mut files);
        let used: u64 = files.iter().map(|f| f.2).sum();
        if used + need <= max {
            return Ok(0);
        }
        let mut others: Vec<_> = files
            .into_iter()
            .filter(|f| !f.0.starts_with(keep))
            .collect();
        others.sort_by_key(|f| f.1);
        let mut used = used;
        let mut evicted = 0;
        for (path, _, size) in others {
            if used + need <= max {
                break;
            }
            tracing::info!("read-through cache: evicting {}", path.display());
            std::fs::remove_file(&path).map_err(StoreError::io(&path))?;
            used -= size;
            evicted += 1;
        }
        Ok(evicted)
    }
}

/// Where a manifest's shard `file` may be: as named, or under `shards/`
/// (the readers accept both).
fn candidates(file: &str) -> Vec<String> {
    let mut c = vec![file.to_string()];
    if !file.contains('/') {
        c.push(format!("{}/{file}", crate::shards::manifest::SHARDS_DIR));
    }
    c
}

/// Download shard `file` (trying each of its [`candidates`]) into `dir`:
/// its object name, local path and size (`None`: no such object).
fn download_shard(
    remote: &Remote,
    dir: &Path,
    file: &str,
) -> Result<(String, PathBuf, Option<u64>), StoreError> {
    let all = candidates(file);
    for rel in &all {
        let local = dir.join(rel);
        if let Some(parent) = local.parent() {
            std::fs::create_dir_all(parent).map_err(StoreError::io(parent))?;
        }
        if let Some(n) = remote.download(rel, &local)? {
            return Ok((rel.clone(), local, Some(n)));
        }
    }
    Ok((all[0].clone(), dir.join(&all[0]), None))
}

/// Mark a shard as just used (its modification time orders the eviction).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Every `.parquet` file under `dir`: (path, last use, bytes).
fn collect_shards(dir: &Path, out: &mut Vec<(PathBuf, SystemTime, u64)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            collect_shards(&p, out);
        } else if p.extension().is_some_and(|x| x == "parquet") {
            let used = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((p, used, md.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("2K").unwrap(), 2000);
        assert_eq!(parse_size("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn least_recently_used_shards_of_other_caches_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let write = |rel: &str, n: usize, age_s: u64| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![0u8; n]).unwrap();
            let f = std::fs::File::options().append(true).open(&p).unwrap();
            f.set_modified(SystemTime::now() - std::time::Duration::from_secs(age_s))
                .unwrap();
            p
        };
        let old = write("s3/b/a/shards/part-00000.parquet", 100, 300);
        let newer = write("s3/b/a/shards/part-00001.parquet", 100, 100);
        let mine = write("s3/b/c/shards/part-00000.parquet", 100, 1000);
        let cache = ReadCache::new(ReadCacheSettings {
            dir: root.to_path_buf(),
            max_bytes: Some(350),
        });
        // 300 used; 100 more needs one eviction: the oldest of the others,
        // never a shard of the cache being opened.
        let evicted = cache.make_room(&root.join("s3/b/c"), 200, 100).unwrap();
        assert_eq!(evicted, 1);
        assert!(!old.exists());
        assert!(newer.exists() && mine.exists());
        // A cache larger than the bound is refused.
        let err = cache.make_room(&root.join("s3/b/c"), 400, 0).unwrap_err();
        assert!(err.to_string().contains("--cache-size"), "{err}");
    }
}
