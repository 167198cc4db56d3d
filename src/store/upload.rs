//! `rae-cache build --out s3://bucket/cache`: the build runs as usual in a
//! local staging directory, and a background thread mirrors it into the
//! store as the build state is saved:
//!
//! * each finished shard is uploaded under its final name by one PUT (or a
//!   multipart upload completed only when whole), with its statistics
//!   state; then `build-state.json` and `manifest.json` as they were saved
//!   with that shard, so the store's manifest only ever lists shards that
//!   are there; `stats.safetensors` goes up before the last manifest. An
//!   uploaded shard is removed from the staging directory.
//! * A lock object `.lock` is created with a conditional PUT (`If-None-Match:
//!   *` on S3) before anything else: a second build on the prefix is
//!   refused. A lock left by a killed build on this host (its process is
//!   gone) is taken over with a conditional replace (`If-Match` its etag);
//!   `--break-lock` removes any lock. While the build runs, a thread
//!   refreshes the lock's `heartbeat_unix` every `RAE_STORE_LOCK_HEARTBEAT`
//!   seconds (60); a lock whose heartbeat is older than
//!   `RAE_STORE_LOCK_STALE` seconds (600) is taken over from any host, with
//!   a warning naming its holder (a lock without a heartbeat, from an older
//!   version, never goes stale: `--break-lock` removes it).
//! * `--resume` continues from what the store holds: its build state and
//!   per-shard statistics states (and the last listed shard, whose sha256
//!   the resume checks) are pulled into a fresh staging directory, shards the
//!   store holds past its manifest are removed, and the local resume logic
//!   carries on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, unbounded};
use sha2::Digest;

use super::{Remote, StoreError};
use crate::pipeline::build_state::{
    self, BUILD_STATE_FILE, BuildManifest, LOCK_FILE, MANIFEST_FILE, STATE_DIR, STATS_FILE,
};
use crate::pipeline::{self, BuildConfig, BuildSummary, PipelineError, SaveHook};
use crate::progress::Progress;

/// Build `cfg` (whose `out` is a store URL) through a staging directory,
/// uploading as it goes. See the module documentation.
pub fn build_to_store(
    cfg: &BuildConfig,
    progress: &mut dyn Progress,
) -> Result<BuildSummary, PipelineError> {
    let url = cfg.out.to_str().unwrap_or_default().to_string();
    if cfg.part.is_some() {
        return Err(PipelineError::Invalid(format!(
            "{url}: a part of a --num-parts build cannot be written to a store yet; build the parts into a shared directory, merge, then upload"
        )));
    }
    let remote = Remote::open(&url)?;
    let lock = StoreLock::acquire(&remote, cfg.break_lock)?;
    let res = build_locked(cfg, &remote, progress);
    lock.release();
    let mut s = res?;
    s.cache_dir = PathBuf::from(&url);
    s.manifest = PathBuf::from(remote.url_of(MANIFEST_FILE));
    if s.stats.is_some() {
        s.stats = Some(PathBuf::from(remote.url_of(STATS_FILE)));
    }
    Ok(s)
}

/// [`build_to_store`] once the prefix is locked.
fn build_locked(
    cfg: &BuildConfig,
    remote: &Remote,
    progress: &mut dyn Progress,
) -> Result<BuildSummary, PipelineError> {
    let staging = staging_dir(cfg, remote.url())?;
    let already = prepare_prefix(remote, &staging, cfg.resume)?;
    let uploader = Uploader::start(remote.clone(), already);
    let mut local = cfg.clone();
    local.out = staging.clone();
    local.on_save = Some(uploader.hook());
    let built = pipeline::run_local_build(&local, progress);
    // The hook holds the queue's sender: drop it so the thread can end.
    drop(local);
    // Whatever happened, let the queued uploads finish: the store then
    // holds every shard its manifest lists, and `--resume` goes on from there.
    let uploaded = uploader.finish();
    let s = built?;
    uploaded?;
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        tracing::warn!(
            "cannot remove the staging directory {}: {e}",
            staging.display()
        );
    }
    Ok(s)
}

/// A fresh staging directory for a build of `url`: `--staging-dir` (or the
/// system's temp dir) / `rae-cache-staging-<hash of the URL>`.
fn staging_dir(cfg: &BuildConfig, url: &str) -> Result<PathBuf, PipelineError> {
    let base = cfg.staging_dir.clone().unwrap_or_else(std::env::temp_dir);
    let hash = crate::fsutil::hex(&sha2::Sha256::digest(url.as_bytes()));
    let dir = base.join(format!("rae-cache-staging-{}", &hash[..16]));
    // What a previous run left there is never trusted: the store is the record.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(StoreError::io(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
    Ok(dir)
}

/// Check the prefix and, when resuming, pull the build it holds into
/// `staging`. Returns the number of shard entries the store already lists.
fn prepare_prefix(remote: &Remote, staging: &Path, resume: bool) -> Result<usize, PipelineError> {
    let objects: Vec<(String, u64)> = remote
        .list("")?
        .into_iter()
        .filter(|(name, _)| name != LOCK_FILE)
        .collect();
    if objects.is_empty() {
        return Ok(0);
    }
    if !resume {
        return Err(StoreError::Invalid {
            url: remote.url().into(),
            reason: format!(
                "is not empty ({} objects); use --resume to continue the build that is there, or choose another --out",
                objects.len()
            ),
        }
        .into());
    }
    let Some(state) = remote.get(BUILD_STATE_FILE)? else {
        return Err(StoreError::Invalid {
            url: remote.url().into(),
            reason: format!("cannot resume: no {BUILD_STATE_FILE} (not a rae-cache build)"),
        }
        .into());
    };
    write_file(&staging.join(BUILD_STATE_FILE), &state)?;
    if let Some(manifest) = remote.get(MANIFEST_FILE)? {
        write_file(&staging.join(MANIFEST_FILE), &manifest)?;
    }
    let m = BuildManifest::load(staging)?;
    std::fs::create_dir_all(staging.join(STATE_DIR)).map_err(StoreError::io(staging))?;
    for s in m.shards.iter().filter(|s| s.file.is_some()) {
        let rel = state_rel(s.index);
        if remote.download(&rel, &staging.join(&rel))?.is_none() {
            return Err(StoreError::Invalid {
                url: remote.url_of(&rel),
                reason: "missing: the build in the store is damaged, rebuild it".into(),
            }
            .into());
        }
    }
    // The resume checks the last listed shard's sha256: bring it here.
    if let Some(file) = m.shards.iter().rev().find_map(|s| s.file.clone()) {
        std::fs::create_dir_all(staging.join(build_state::SHARDS_DIR))
            .map_err(StoreError::io(staging))?;
        remote.download(&file, &staging.join(&file))?;
    }
    remove_strays(remote, &m, &objects)?;
    tracing::info!(
        "resuming {} from the store: {} shards listed",
        remote.url(),
        m.shards.len()
    );
    Ok(m.shards.len())
}

/// Shards (and their statistics states) of this build's range that the
/// store holds past its manifest: uploads of the interrupted run that its
/// manifest never listed. The resumed build writes them again.
fn remove_strays(
    remote: &Remote,
    m: &BuildManifest,
    objects: &[(String, u64)],
) -> Result<(), PipelineError> {
    let next = m.next_shard();
    let range = m.layout.first_shard..m.layout.end_shard;
    for (name, _) in objects {
        let base = name.rsplit('/').next().unwrap_or(name);
        let idx = if name.starts_with(&format!("{}/", build_state::SHARDS_DIR)) {
            pipeline::plan::parse_shard_file_name(base).map(|(i, _)| i)
        } else if name.starts_with(&format!("{STATE_DIR}/")) {
            base.strip_prefix("stats-")
                .and_then(|b| b.strip_suffix(".safetensors"))
                .and_then(|n| n.parse::<usize>().ok())
        } else {
            None
        };
        if let Some(i) = idx
            && i >= next
            && range.contains(&i)
        {
            tracing::info!(
                "removing {} (past the store's manifest)",
                remote.url_of(name)
            );
            remote.delete(name)?;
        }
    }
    Ok(())
}

fn state_rel(shard: usize) -> String {
    format!("{STATE_DIR}/stats-{shard:05}.safetensors")
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    crate::fsutil::write_atomic(path, bytes).map_err(StoreError::io(path))
}

/// What the save hook hands the upload thread: files in order, then the
/// build state and manifest as they were when saved.
struct Batch {
    /// (object name, local file, remove the local file once uploaded)
    files: Vec<(String, PathBuf, bool)>,
    /// (object name, bytes), uploaded after `files`.
    meta: Vec<(String, Bytes)>,
}

/// Which files of the staging directory are queued already.
#[derive(Default)]
struct Queued {
    shards: usize,
    stats: bool,
}

/// The background upload thread and the hook that feeds it.
struct Uploader {
    tx: Sender<Batch>,
    queued: Arc<Mutex<Queued>>,
    failed: Arc<Mutex<Option<String>>>,
    thread: JoinHandle<Result<(), StoreError>>,
}

impl Uploader {
    /// Start the thread; the store already lists `already` shard entries.
    fn start(remote: Remote, already: usize) -> Self {
        let (tx, rx) = unbounded();
        let failed = Arc::new(Mutex::new(None));
        let f = failed.clone();
        let thread = std::thread::Builder::new()
            .name("store-upload".into())
            .spawn(move || upload_loop(&remote, &rx, &f))
            .expect("cannot start the upload thread");
        Self {
            tx,
            queued: Arc::new(Mutex::new(Queued {
                shards: already,
                stats: false,
            })),
            failed,
            thread,
        }
    }

    /// The save hook: queue what the saved state lists that is not queued.
    fn hook(&self) -> SaveHook {
        let (tx, queued, failed) = (self.tx.clone(), self.queued.clone(), self.failed.clone());
        SaveHook(Arc::new(move |root: &Path, m: &BuildManifest| {
            if let Some(e) = failed.lock().map(|f| f.clone()).unwrap_or_default() {
                return Err(PipelineError::Invalid(format!("upload failed: {e}")));
            }
            let mut q = queued.lock().expect("upload queue poisoned");
            let mut files = Vec::new();
            for s in m.shards.iter().skip(q.shards) {
                if let Some(file) = &s.file {
                    let state = state_rel(s.index);
                    files.push((state.clone(), root.join(&state), false));
                    files.push((file.clone(), root.join(file), true));
                }
            }
            q.shards = m.shards.len();
            if m.stats.is_some() && !q.stats {
                files.push((STATS_FILE.into(), root.join(STATS_FILE), false));
                q.stats = true;
            }
            let mut meta = Vec::new();
            for name in [BUILD_STATE_FILE, MANIFEST_FILE] {
                let p = root.join(name);
                let bytes = std::fs::read(&p).map_err(|source| PipelineError::Io {
                    path: p.clone(),
                    source,
                })?;
                meta.push((name.to_string(), Bytes::from(bytes)));
            }
            tx.send(Batch { files, meta })
                .map_err(|_| PipelineError::Invalid("the upload thread stopped".into()))
        }))
    }

    /// Wait for every queued upload; the first error, if any.
    fn finish(self) -> Result<(), StoreError> {
        drop(self.tx);
        self.thread.join().unwrap_or_else(|_| {
            Err(StoreError::Invalid {
                url: String::new(),
                reason: "the upload thread panicked".into(),
            })
        })
    }
}

/// Upload batches in order until the channel closes. After a failure
/// nothing more is uploaded (a later manifest could list a shard that is
/// not there); the error is kept for the hook and returned.
fn upload_loop(
    remote: &Remote,
    rx: &Receiver<Batch>,
    failed: &Mutex<Option<String>>,
) -> Result<(), StoreError> {
    let mut first_error = None;
    for batch in rx.iter() {
        if first_error.is_some() {
            continue;
        }
        if let Err(e) = upload_batch(remote, &batch) {
            tracing::error!("{e}");
            if let Ok(mut f) = failed.lock() {
                *f = Some(e.to_string());
            }
            first_error = Some(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn upload_batch(remote: &Remote, batch: &Batch) -> Result<(), StoreError> {
    for (name, local, remove) in &batch.files {
        let t = Instant::now();
        let bytes = remote.upload_file(name, local)?;
        tracing::info!(
            "uploaded {} ({:.1} MB in {:.2} s)",
            remote.url_of(name),
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        if *remove {
            let _ = std::fs::remove_file(local);
        }
    }
    for (name, bytes) in &batch.meta {
        remote.put(name, bytes.clone())?;
    }
    Ok(())
}

/// The prefix's lock object, refreshed by a heartbeat thread and deleted
/// by [`StoreLock::release`].
struct StoreLock {
    remote: Remote,
    /// Set to stop the heartbeat (with its condition variable).
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    heartbeat: Option<JoinHandle<()>>,
}

/// What a lock object records about its holder.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    started_unix: u64,
    /// Last refresh by the holder; `None` in locks of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heartbeat_unix: Option<u64>,
}

/// Seconds from `var`, else `default`.
fn secs_env(var: &str, default: f64) -> std::time::Duration {
    let s = std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    std::time::Duration::from_secs_f64(s)
}

impl Holder {
    fn me() -> Self {
        let now = build_state::unix_now();
        Self {
            host: hostname(),
            pid: std::process::id(),
            started_unix: now,
            heartbeat_unix: Some(now),
        }
    }

    fn same_holder(&self, other: &Holder) -> bool {
        self.host == other.host && self.pid == other.pid && self.started_unix == other.started_unix
    }

    /// Seconds since the last heartbeat, when the lock has one.
    fn silent_for(&self) -> Option<u64> {
        self.heartbeat_unix
            .map(|h| build_state::unix_now().saturating_sub(h))
    }

    fn describe(&self) -> String {
        format!(
            "host {}, pid {}, started at unix time {}",
            self.host, self.pid, self.started_unix
        )
    }

    /// A holder on this host whose process is gone (Linux: no /proc/PID).
    fn is_dead_here(&self) -> bool {
        self.host == hostname()
            && Path::new("/proc/self").exists()
            && !Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown-host".into())
}

impl StoreLock {
    fn acquire(remote: &Remote, break_lock: bool) -> Result<Self, StoreError> {
        let holder_me = Holder::me();
        let me = Bytes::from(serde_json::to_vec(&holder_me).unwrap_or_default());
        if break_lock {
            tracing::warn!("--break-lock: removing {}", remote.url_of(LOCK_FILE));
            remote.delete(LOCK_FILE)?;
        }
        if remote.create(LOCK_FILE, me.clone())? {
            return Ok(Self::held(remote, holder_me));
        }
        let url = remote.url_of(LOCK_FILE);
        let meta = remote.head(LOCK_FILE)?;
        let holder = remote
            .get(LOCK_FILE)?
            .and_then(|b| serde_json::from_slice::<Holder>(&b).ok());
        let Some(holder) = holder else {
            return Err(StoreError::Locked {
                url,
                holder: "unreadable lock object".into(),
            });
        };
        let stale_after = secs_env("RAE_STORE_LOCK_STALE", 600.0).as_secs();
        let why = if holder.is_dead_here() {
            Some("is no longer running".to_string())
        } else {
            holder.silent_for().filter(|s| *s > stale_after).map(|s| {
                format!("last refreshed it {s} s ago (a lock is stale after {stale_after} s, RAE_STORE_LOCK_STALE)")
            })
        };
        if let Some(why) = why
            && let Some(e_tag) = meta.and_then(|m| m.e_tag)
            && remote.replace(LOCK_FILE, me, &e_tag)?
        {
            tracing::warn!("took over {url}: its holder ({}) {why}", holder.describe());
            return Ok(Self::held(remote, holder_me));
        }
        Err(StoreError::Locked {
            url,
            holder: holder.describe(),
        })
    }

    /// The lock, held by `me`: start its heartbeat.
    fn held(remote: &Remote, me: Holder) -> Self {
        let stop: Arc<(Mutex<bool>, std::sync::Condvar)> = Arc::default();
        let every = secs_env("RAE_STORE_LOCK_HEARTBEAT", 60.0);
        let heartbeat = {
            let (remote, stop) = (remote.clone(), stop.clone());
            std::thread::Builder::new()
                .name("rae-lock-heartbeat".into())
                .spawn(move || heartbeat(&remote, me, &stop, every))
                .ok()
        };
        Self {
            remote: remote.clone(),
            stop,
            heartbeat,
        }
    }

    fn release(mut self) {
        {
            let (flag, cv) = &*self.stop;
            *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        if let Err(e) = self.remote.delete(LOCK_FILE) {
            tracing::warn!("cannot remove the lock object: {e}");
        }
    }
}

/// Refresh the lock's heartbeat at once (which also shows at the start of
/// a build, not a minute in, whether the store takes conditional replaces)
/// and then every `every` until `stop`: a conditional replace of the object
/// while it is still ours (a failure is logged; a lock taken over by
/// another build is left to it).
fn heartbeat(
    remote: &Remote,
    mut me: Holder,
    stop: &(Mutex<bool>, std::sync::Condvar),
    every: std::time::Duration,
) {
    let (flag, cv) = stop;
    let mut stopped = flag.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        me.heartbeat_unix = Some(build_state::unix_now());
        let url = remote.url_of(LOCK_FILE);
        let refresh = || -> Result<bool, StoreError> {
            let Some(e_tag) = remote.head(LOCK_FILE)?.and_then(|m| m.e_tag) else {
                return Ok(false);
            };
            let ours = remote
                .get(LOCK_FILE)?
                .and_then(|b| serde_json::from_slice::<Holder>(&b).ok())
                .is_some_and(|h| h.same_holder(&me));
            let body = Bytes::from(serde_json::to_vec(&me).unwrap_or_default());
            Ok(ours && remote.replace(LOCK_FILE, body, &e_tag)?)
        };
        match refresh() {
            Ok(true) => tracing::debug!("refreshed {url}"),
            Ok(false) => tracing::warn!(
                "{url} is no longer this build's lock (taken over or removed); not refreshing it"
            ),
            Err(e) => tracing::warn!("cannot refresh the lock: {e}"),
        }
        let (guard, _) = cv
            .wait_timeout_while(stopped, every, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        stopped = guard;
        if *stopped {
            return;
        }
    }
}
