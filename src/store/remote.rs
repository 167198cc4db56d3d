//! [`Remote`]: one prefix of an object store, with blocking calls run on a
//! small process-wide tokio runtime.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt,
    ObjectStoreScheme, PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion,
};

use super::StoreError;

/// Bytes per part of a multipart upload (and the size from which a file is
/// uploaded in parts rather than by one PUT).
const PART_BYTES: usize = 16 << 20;

/// The runtime every blocking call runs on: two I/O threads are plenty for
/// sequential uploads and downloads.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rae-store-io")
            .enable_all()
            .build()
            .expect("cannot start the object-store I/O runtime")
    })
}

/// Retries of failed requests (5xx, throttling, connection errors) with
/// exponential back-off; each retry is logged by `object_store` at info
/// level. `RAE_STORE_MAX_RETRIES` and `RAE_STORE_RETRY_TIMEOUT` (seconds)
/// override the defaults (10 retries within 3 minutes).
fn retry_config() -> RetryConfig {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    let mut r = RetryConfig {
        backoff: BackoffConfig::default(),
        ..RetryConfig::default()
    };
    if let Some(n) = env("RAE_STORE_MAX_RETRIES") {
        r.max_retries = n as usize;
    }
    if let Some(s) = env("RAE_STORE_RETRY_TIMEOUT") {
        r.retry_timeout = Duration::from_secs_f64(s);
    }
    r
}

/// A prefix of an object store (`s3://bucket/cache`): objects are named
/// relative to it (`shards/part-00000.parquet`).
#[derive(Debug, Clone)]
pub struct Remote {
    /// The URL, without a trailing slash.
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
}

impl Remote {
    /// Open `url`, with credentials and endpoint from the environment.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, &[])
    }

    /// Open `url` with these store options (e.g. `("aws_endpoint",
    /// "http://127.0.0.1:9000")`) on top of the environment's.
    pub fn open_with(url: &str, options: &[(&str, &str)]) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::Url {
            url: url.to_string(),
            reason,
        };
        let trimmed = url.trim_end_matches('/');
        let parsed = url::Url::parse(trimmed).map_err(|e| bad(format!("not a URL: {e}")))?;
        let (scheme, prefix) = ObjectStoreScheme::parse(&parsed)
            .map_err(|e| bad(format!("not a supported store URL: {e}")))?;
        let built = |r: object_store::Result<Arc<dyn ObjectStore>>| {
            r.map_err(|e| bad(format!("cannot configure the store: {e}")))
        };
        // The cloud builders share no trait: one macro configures each the
        // same way (environment, URL options, the URL, retries).
        macro_rules! cloud {
            ($builder:expr) => {
                built(
                    with_options(
                        $builder,
                        options,
                        |b, k, v| Ok(b.with_config(k.parse()?, v)),
                    )
                    .map_err(bad)?
                    .with_url(trimmed)
                    .with_retry(retry_config())
                    .build()
                    .map(|s| Arc::new(s) as _),
                )?
            };
        }
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 => cloud!(object_store::aws::AmazonS3Builder::from_env()),
            ObjectStoreScheme::GoogleCloudStorage => {
                cloud!(object_store::gcp::GoogleCloudStorageBuilder::from_env())
            }
            ObjectStoreScheme::MicrosoftAzure => {
                cloud!(object_store::azure::MicrosoftAzureBuilder::from_env())
            }
            ObjectStoreScheme::Http => {
                // The prefix is part of the server URL here.
                let s = built(
                    object_store::http::HttpBuilder::new()
                        .with_url(trimmed)
                        .with_retry(retry_config())
                        .build()
                        .map(|s| Arc::new(s) as _),
                )?;
                return Ok(Self {
                    url: trimmed.to_string(),
                    store: s,
                    prefix: ObjPath::default(),
                });
            }
            ObjectStoreScheme::Local => Arc::new(object_store::local::LocalFileSystem::new()),
            other => return Err(bad(format!("{other:?} stores are not supported"))),
        };
        Ok(Self {
            url: trimmed.to_string(),
            store,
            prefix,
        })
    }

    /// The prefix's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of object `rel`.
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    fn path(&self, rel: &str) -> ObjPath {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.clone().join(part))
    }

    fn err(&self, rel: &str, op: &'static str) -> impl FnOnce(object_store::Error) -> StoreError {
        let url = self.url_of(rel);
        move |e| StoreError::Store {
            url,
            op,
            answer: Box::new(e),
        }
    }

    /// The bytes of `rel`, or `None` when there is no such object.
    pub fn get(&self, rel: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(rel);
        let res = runtime().block_on(async {
            let r = self.store.get(&path).await?;
            r.bytes().await
        });
        match res {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, "get")(e)),
        }
    }

    /// The bytes of `rel`; a missing object (or bucket) is an error that
    /// carries the store's answer.
    pub fn get_required(&self, rel: &str) -> Result<Bytes, StoreError> {
        let path = self.path(rel);
        runtime()
            .block_on(async {
                let r = self.store.get(&path).await?;
                r.bytes().await
            })
            .map_err(self.err(rel, "get"))
    }

    /// The bytes of each of `rels`, requested concurrently; `None` for an
    /// object that does not exist.
    pub fn get_many(&self, rels: &[String]) -> Vec<Result<Option<Bytes>, StoreError>> {
        let gets = rels.iter().map(|rel| {
            let path = self.path(rel);
            async move {
                let r = self.store.get(&path).await?;
                r.bytes().await
            }
        });
        let got = runtime().block_on(futures::future::join_all(gets));
        got.into_iter()
            .zip(rels)
            .map(|(r, rel)| match r {
                Ok(b) => Ok(Some(b)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err(rel, "get")(e)),
            })
            .collect()
    }

    /// Bytes `range` of `rel` (one ranged GET). A range past the object's
    /// end is an error carrying the store's answer.
    pub fn get_range(&self, rel: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let path = self.path(rel);
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        runtime()
            .block_on(async {
                let r = self.store.get_opts(&path, opts).await?;
                r.bytes().await
            })
            .map_err(self.err(rel, "ranged get"))
    }

    /// Bytes `range` of `rel` as a blocking [`std::io::Read`] over one
    /// streamed GET: the body is read as it arrives (a chunk at a time in
    /// memory), never downloaded whole first.
    pub fn stream_range(&self, rel: &str, range: Range<u64>) -> Result<RangeStream, StoreError> {
        let path = self.path(rel);
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        let stream = runtime()
            .block_on(async { self.store.get_opts(&path, opts).await })
            .map_err(self.err(rel, "streamed get"))?
            .into_stream();
        Ok(RangeStream {
            url: self.url_of(rel),
            stream: Some(stream),
            chunk: Bytes::new(),
            pos: range.start,
        })
    }

    /// Size, etag and time of `rel`, or `None` when there is no such object.
    pub fn head(&self, rel: &str) -> Result<Option<ObjectMeta>, StoreError> {
        match runtime().block_on(self.store.head(&self.path(rel))) {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, "head")(e)),
        }
    }

    /// Write `rel` (replacing it) in one PUT: it appears whole or not at all.
    pub fn put(&self, rel: &str, bytes: Bytes) -> Result<(), StoreError> {
        runtime()
            .block_on(self.store.put(&self.path(rel), PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(self.err(rel, "put"))
    }

    /// Create `rel` only if no object has that name (a conditional PUT,
    /// `If-None-Match: *` on S3). `Ok(false)`: it exists already.
    pub fn create(&self, rel: &str, bytes: Bytes) -> Result<bool, StoreError> {
        self.put_mode(rel, bytes, PutMode::Create, "conditional put (create)")
    }

    /// Replace `rel` only if it is still the version with `e_tag`
    /// (`If-Match` on S3). `Ok(false)`: it changed or is gone.
    pub fn replace(&self, rel: &str, bytes: Bytes, e_tag: &str) -> Result<bool, StoreError> {
        let v = UpdateVersion {
            e_tag: Some(e_tag.to_string()),
            version: None,
        };
        self.put_mode(rel, bytes, PutMode::Update(v), "conditional put (update)")
    }

    fn put_mode(
        &self,
        rel: &str,
        bytes: Bytes,
        mode: PutMode,
        op: &'static str,
    ) -> Result<bool, StoreError> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        let create = matches!(opts.mode, PutMode::Create);
        let res = runtime().block_on(self.store.put_opts(&self.path(rel), bytes.into(), opts));
        match res {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            // An update of an object that is gone; for a create, a missing
            // bucket (which is an error).
            Err(object_store::Error::NotFound { .. }) if !create => Ok(false),
            Err(e) => Err(self.err(rel, op)(e)),
        }
    }

    /// Upload the local file `local` as `rel`: one PUT when small, else a
    /// multipart upload that is completed only once every part is in (an
    /// interrupted upload leaves no object under `rel`). Returns its size.
    pub fn upload_file(&self, rel: &str, local: &Path) -> Result<u64, StoreError> {
        let size = std::fs::metadata(local)
            .map_err(StoreError::io(local))?
            .len();
        if size <= PART_BYTES as u64 {
            let bytes = std::fs::read(local).map_err(StoreError::io(local))?;
            self.put(rel, Bytes::from(bytes))?;
            return Ok(size);
        }
        let mut f = std::fs::File::open(local).map_err(StoreError::io(local))?;
        let path = self.path(rel);
        let res = runtime().block_on(async {
            let upload = self.store.put_multipart(&path).await?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match std::io::Read::read(&mut f, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        // Never completed: no object appears under `rel`.
                        let _ = w.abort().await;
                        return Err(io_os(e));
                    }
                };
                if n == 0 {
                    break;
                }
                w.wait_for_capacity(4).await?;
                w.write(&buf[..n]);
            }
            w.finish().await
        });
        res.map(|_| size).map_err(self.err(rel, "multipart upload"))
    }

    /// Download `rel` to `local` atomically (a temp file in the same
    /// directory, fsynced, then renamed). Returns its size; `Ok(None)`
    /// when there is no such object.
    pub fn download(&self, rel: &str, local: &Path) -> Result<Option<u64>, StoreError> {
        let tmp = crate::fsutil::temp_path(local);
        let path = self.path(rel);
        let res: Result<u64, object_store::Error> = runtime().block_on(async {
            let r = self.store.get(&path).await?;
            let mut stream = r.into_stream();
            let mut f = std::fs::File::create(&tmp).map_err(io_os)?;
            let mut total = 0u64;
            while let Some(chunk) = stream.try_next().await? {
                std::io::Write::write_all(&mut f, &chunk).map_err(io_os)?;
                total += chunk.len() as u64;
            }
            f.sync_all().map_err(io_os)?;
            Ok(total)
        });
        match res {
            Ok(n) => {
                crate::fsutil::commit_temp(&tmp, local).map_err(StoreError::io(local))?;
                Ok(Some(n))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                match e {
                    object_store::Error::NotFound { .. } => Ok(None),
                    e => Err(self.err(rel, "download")(e)),
                }
            }
        }
    }

    /// Every object under `rel_dir` ("" for the whole prefix): its name
    /// relative to the prefix, and its size.
    pub fn list(&self, rel_dir: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let dir = self.path(rel_dir);
        let metas: Vec<ObjectMeta> = runtime()
            .block_on(self.store.list(Some(&dir)).try_collect())
            .map_err(self.err(rel_dir, "list"))?;
        let base = self.prefix.as_ref();
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| {
                let full = m.location.as_ref();
                let rel = full
                    .strip_prefix(base)
                    .unwrap_or(full)
                    .trim_start_matches('/');
                (rel.to_string(), m.size)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Delete `rel` (no error when it is already gone).
    pub fn delete(&self, rel: &str) -> Result<(), StoreError> {
        match runtime().block_on(self.store.delete(&self.path(rel))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(rel, "delete")(e)),
        }
    }
}

/// A blocking reader over a streamed ranged GET (see [`Remote::stream_range`]).
pub struct RangeStream {
    url: String,
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    /// The part of the last chunk not read yet.
    chunk: Bytes,
    /// Offset in the object of the next byte (for messages).
    pos: u64,
}

impl std::io::Read for RangeStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(0);
            };
            match runtime().block_on(stream.try_next()) {
                Ok(Some(c)) => self.chunk = c,
                Ok(None) => {
                    self.stream = None;
                    return Ok(0);
                }
                Err(e) => {
                    self.stream = None;
                    return Err(std::io::Error::other(format!(
                        "{}: reading the body at byte {} failed: {e}",
                        self.url, self.pos
                    )));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        bytes::Buf::advance(&mut self.chunk, n);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Drop for RangeStream {
    fn drop(&mut self) {
        // A body dropped part-way closes its connection: do it inside the
        // runtime, whose I/O driver owns the socket.
        if let Some(s) = self.stream.take() {
            let _guard = runtime().enter();
            drop(s);
        }
    }
}

/// Apply `options` to a store builder with `set`.
fn with_options<B>(
    mut builder: B,
    options: &[(&str, &str)],
    set: impl Fn(B, &str, &str) -> object_store::Result<B>,
) -> Result<B, String> {
    for (k, v) in options {
        builder = set(builder, k, v).map_err(|e| format!("store option {k}: {e}"))?;
    }
    Ok(builder)
}

/// A local I/O error in the shape `object_store` reports errors.
fn io_os(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "local file",
        source: Box::new(e),
    }
}
