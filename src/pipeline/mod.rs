//! The build pipeline: image folder -> Parquet latent shards + manifest +
//! statistics, crash-safe and resumable, deterministic whatever the thread
//! count. `rae-cache build` is a thin layer over [`run_build`].
//!
//! Directory layout of a cache:
//! ```text
//! CACHE/manifest.json            public manifest (schemas/manifest.schema.json)
//! CACHE/build-state.json         the builder's record: plan, settings, progress, timings
//! CACHE/stats.safetensors        mean, var f32 [C,16,16], count
//! CACHE/shards/part-NNNNN.parquet  NNNNN = global shard index
//! CACHE/state/stats-NNNNN.safetensors  exact f64 per-shard accumulators
//! CACHE/parts/I/{manifest.json,build-state.json,state/}  part I of `--num-parts N --part I`
//! ```
//! Statistics: each shard's rows (read back after writing, so quantisation
//! included) are accumulated in f64 in row order into their own accumulator;
//! the cache's statistics are the left fold of those in shard order. A whole
//! build, a resumed build and a merge of parts perform the same operations in
//! the same order, so their `stats.safetensors` are byte-identical.
//! ```text
//! ```
//! Parts write their shards straight into `CACHE/shards/` (global shard
//! numbers never collide), so `merge` moves no data.

pub mod lock;
pub mod manifest;
pub mod merge;
pub mod plan;
mod sink;
mod stages;
pub mod verify;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::Digest;

use crate::encoders::{EncoderError, EncoderSpec};
use crate::images::{DecodeOptions, ImageEntry, ImageError, Skipped};
use crate::shards::{LatentDType, ShardError, WriterOptions};

pub use manifest::{BuildManifest, HFlip};
pub use plan::{PartSpec, ShardPlan};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("encoder: {0}")]
    Encoder(#[from] EncoderError),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{path} is not empty; use --resume to continue the build that is there, or choose another --out directory"
    )]
    NotEmpty { path: PathBuf },
    #[error("cannot resume: {path} has no manifest.json (not a rae-cache build directory)")]
    NoManifest { path: PathBuf },
    #[error("cannot resume {path}: it was built with different arguments:\n  {}", .differences.join("\n  "))]
    ResumeMismatch {
        path: PathBuf,
        differences: Vec<String>,
    },
    #[error(
        "cannot resume: shard {path} does not match the manifest ({reason}); the cache is damaged, rebuild it"
    )]
    DamagedShard { path: PathBuf, reason: String },
    #[error("no images found under {path}")]
    NoImages { path: PathBuf },
}

impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        PipelineError::Encoder(EncoderError::Candle(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PipelineError + '_ {
    move |source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct BuildConfig {
    pub images: PathBuf,
    pub out: PathBuf,
    /// Local directory or Hugging Face repo id.
    pub encoder: String,
    pub allow_download: bool,
    pub dtype: LatentDType,
    pub hflip: HFlip,
    /// Images per encoder batch (each contributes one crop per flip).
    pub batch_size: usize,
    /// Rows per shard; `None`: 1024 images' rows. Must be a multiple of the
    /// number of flips.
    pub rows_per_shard: Option<usize>,
    pub rows_per_group: usize,
    pub zstd_level: i32,
    /// Decode threads; 0 = all cores.
    pub threads: usize,
    /// Shards written (compressed) at once; 0 = half the cores, 2 to 16.
    pub writers: usize,
    pub device: String,
    /// Encoder compute dtype (`auto`: bf16 on CUDA, f32 on the CPU). The
    /// latents leave the encoder as f32 whatever it is.
    pub precision: crate::precision::Precision,
    /// Allow TF32 f32 matrix products on CUDA (process-wide; no-op on CPU).
    pub tf32: bool,
    pub part: Option<PartSpec>,
    pub limit: Option<usize>,
    pub max_pixels: u64,
    pub resume: bool,
    pub progress: bool,
}

impl BuildConfig {
    pub fn new(images: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            images: images.into(),
            out: out.into(),
            encoder: "facebook/dinov2-with-registers-base".into(),
            allow_download: false,
            dtype: LatentDType::F16,
            hflip: HFlip::Both,
            batch_size: 0,
            rows_per_shard: None,
            rows_per_group: 32,
            zstd_level: 3,
            threads: 0,
            writers: 0,
            device: "auto".into(),
            precision: crate::precision::Precision::Auto,
            tf32: false,
            part: None,
            limit: None,
            max_pixels: DecodeOptions::default().max_pixels,
            resume: false,
            progress: true,
        }
    }
}

/// What a build did, for the CLI's report and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildSummary {
    pub cache_dir: PathBuf,
    pub manifest: PathBuf,
    pub stats: Option<PathBuf>,
    pub complete: bool,
    pub part: Option<PartSpec>,
    pub resumed_from_shard: Option<usize>,
    pub shards: usize,
    pub images_encoded: u64,
    pub images_rejected: u64,
    pub rows: u64,
    pub bytes: u64,
    pub raw_f32_bytes: u64,
    pub compression_ratio: f64,
    /// This run only.
    pub images_this_run: u64,
    pub seconds_this_run: f64,
    pub images_per_second: f64,
    pub rejected: Vec<Skipped>,
}

/// Where a build writes its manifest, state and lock.
pub fn build_root(out: &Path, part: Option<PartSpec>) -> PathBuf {
    match part {
        None => out.to_path_buf(),
        Some(p) => out.join(manifest::PARTS_DIR).join(p.index.to_string()),
    }
}

pub fn state_file(root: &Path, shard: usize) -> PathBuf {
    root.join(manifest::STATE_DIR)
        .join(format!("stats-{shard:05}.safetensors"))
}

/// sha256 of a file, lowercase hex, streamed.
pub fn sha256_file(path: &Path) -> Result<String, PipelineError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn image_list_sha256(entries: &[ImageEntry]) -> String {
    let mut h = sha2::Sha256::new();
    for e in entries {
        h.update(e.key.as_bytes());
        h.update(b"\t");
        h.update(e.label.to_string().as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Anything in `dir` besides the lock file?
fn has_content(dir: &Path) -> Result<bool, PipelineError> {
    if !dir.exists() {
        return Ok(false);
    }
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        if e.file_name() != manifest::LOCK_FILE {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Footer metadata every shard carries (no paths or times: shards must be
/// byte-identical across machines, resumes and parts).
fn shard_metadata(spec: &EncoderSpec, pre: &manifest::Preprocessing) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "rae_cache.encoder".into(),
        serde_json::to_string(spec).unwrap_or_default(),
    );
    m.insert(
        "rae_cache.preprocessing".into(),
        serde_json::to_string(pre).unwrap_or_default(),
    );
    m.insert(
        "rae_cache.tool_version".into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    m
}

/// Run (or resume) a build. Holds the directory lock throughout.
pub fn run_build(cfg: &BuildConfig) -> Result<BuildSummary, PipelineError> {
    let t0 = Instant::now();
    if cfg.rows_per_group == 0 {
        return Err(PipelineError::Invalid(
            "--rows-per-group must be at least 1".into(),
        ));
    }
    let flips = cfg.hflip.flips();
    let rows_per_shard = cfg.rows_per_shard.unwrap_or(1024 * flips.len());
    if rows_per_shard == 0 || rows_per_shard % flips.len() != 0 {
        return Err(PipelineError::Invalid(format!(
            "--rows-per-shard {rows_per_shard} must be a positive multiple of {} (one row per image and flip)",
            flips.len()
        )));
    }
    let images_per_shard = rows_per_shard / flips.len();

    // Directory, lock, emptiness.
    let root = build_root(&cfg.out, cfg.part);
    std::fs::create_dir_all(&root).map_err(io_err(&root))?;
    let _lock = lock::lock_dir(&root, manifest::LOCK_FILE)?;
    let manifest_path = root.join(manifest::MANIFEST_FILE);
    let state_path = root.join(manifest::BUILD_STATE_FILE);
    if cfg.part.is_some() && cfg.out.join(manifest::MANIFEST_FILE).exists() {
        return Err(PipelineError::Invalid(format!(
            "{} already holds a whole (or merged) build; parts must go to a fresh directory",
            cfg.out.display()
        )));
    }
    let resuming = cfg.resume && state_path.exists();
    if !resuming && has_content(&root)? {
        return Err(if cfg.resume {
            PipelineError::NoManifest { path: root.clone() }
        } else {
            PipelineError::NotEmpty { path: root.clone() }
        });
    }

    // Inputs.
    let discovery = crate::images::discover(&cfg.images)?;
    let mut entries = discovery.entries;
    if let Some(n) = cfg.limit {
        entries.truncate(n);
    }
    if entries.is_empty() {
        return Err(PipelineError::NoImages {
            path: cfg.images.clone(),
        });
    }
    let plan = ShardPlan::new(entries.len(), images_per_shard, cfg.part)
        .map_err(PipelineError::Invalid)?;

    // Encoder.
    let resolved = crate::weights::resolve_model(&cfg.encoder, cfg.allow_download)?;
    let device = crate::device::parse_device(&cfg.device)?;
    let compute_dtype = cfg.precision.resolve(&device);
    if cfg.tf32 {
        crate::precision::set_tf32(true);
    }
    let encoder = crate::encoders::load_encoder(&resolved.dir, &device, compute_dtype)?;
    // A GPU wants large batches; on the CPU a small one keeps memory low.
    let batch_size = match cfg.batch_size {
        0 if device.is_cuda() => 256,
        0 => 32,
        b => b,
    };
    let mut spec = encoder.spec().clone();
    spec.id = resolved.id.clone();
    spec.revision = resolved.revision.clone();
    let (tokens, channels) = (spec.tokens, spec.channels);

    let settings = manifest::BuildSettings {
        encoder_id: spec.id.clone(),
        encoder_kind: spec.kind.clone(),
        encoder_config_sha256: spec.config_hash.clone(),
        dtype: cfg.dtype,
        hflip: cfg.hflip,
        crop_size: spec.crop_size,
        rows_per_shard,
        rows_per_group: cfg.rows_per_group,
        zstd_level: cfg.zstd_level,
        max_pixels: cfg.max_pixels,
        limit: cfg.limit,
        num_parts: cfg.part.map(|p| p.count),
        part: cfg.part.map(|p| p.index),
        image_list_sha256: image_list_sha256(&entries),
        num_images: entries.len(),
    };
    let preprocessing = manifest::Preprocessing {
        crop: "adm_center_crop (PIL BOX halving, BICUBIC to the short side, center crop), RGB8".into(),
        crop_size: spec.crop_size,
        encoder_input_size: spec.input_size,
        hflip: cfg.hflip,
        notes: match cfg.hflip {
            HFlip::Both => "the reference trains with random horizontal flips; both the crop (flip=false) and its \
                            left-right flip (flip=true) are stored, so sampling a flip at random reproduces it exactly"
                .into(),
            HFlip::None => "only the unflipped crop is stored; the reference's random flips are not reproduced".into(),
        },
    };
    let threads = if cfg.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        cfg.threads
    };
    let shards_dir = cfg.out.join(manifest::SHARDS_DIR);
    std::fs::create_dir_all(&shards_dir).map_err(io_err(&shards_dir))?;
    std::fs::create_dir_all(root.join(manifest::STATE_DIR)).map_err(io_err(&root))?;

    let mut m = if resuming {
        let m = BuildManifest::load(&root)?;
        let diffs = m.settings.differences(&settings);
        if !diffs.is_empty() {
            return Err(PipelineError::ResumeMismatch {
                path: cfg.out.clone(),
                differences: diffs,
            });
        }
        prepare_resume(&m, &shards_dir, &cfg.out, &root)?;
        m
    } else {
        BuildManifest {
            format: "rae-cache".into(),
            schema_version: crate::shards::SCHEMA_VERSION.into(),
            complete: false,
            dataset: manifest::Dataset {
                root: std::fs::canonicalize(&cfg.images)
                    .unwrap_or(cfg.images.clone())
                    .display()
                    .to_string(),
                classes: discovery.classes.clone(),
                images: entries.len(),
            },
            encoder: spec.clone(),
            preprocessing: preprocessing.clone(),
            dtype: cfg.dtype,
            latent_shape: [tokens, channels],
            layout: manifest::Layout {
                rows_per_shard,
                images_per_shard,
                rows_per_group: cfg.rows_per_group,
                zstd_level: cfg.zstd_level,
                first_shard: plan.shards.start,
                end_shard: plan.shards.end,
                total_shards: plan.total_shards(),
            },
            part: cfg.part,
            settings: settings.clone(),
            shards: Vec::new(),
            totals: Default::default(),
            rejected: Vec::new(),
            skipped: discovery.skipped.clone(),
            stats: None,
            build_log: manifest::BuildLog {
                tool_version: env!("CARGO_PKG_VERSION").into(),
                started_unix: manifest::unix_now(),
                ..Default::default()
            },
        }
    };
    let resumed_from_shard = resuming.then(|| m.next_shard());
    let seconds_before = m.build_log.seconds;
    m.build_log.runs += 1;
    m.build_log.threads = threads;
    m.build_log.batch_size = batch_size;
    m.build_log.device = crate::device::device_name(&device);
    let precision = compute_dtype.as_str().to_string();
    if resuming && !m.build_log.precision.is_empty() && m.build_log.precision != precision {
        // Not refused (like a device change), but the cache then mixes
        // latents computed at two precisions.
        tracing::warn!(
            "resuming a build encoded in {} with precision {precision}: earlier shards differ in precision",
            m.build_log.precision
        );
    }
    m.build_log.precision = precision;
    m.build_log.tf32 = crate::precision::tf32_enabled();
    m.refresh_totals();
    m.save(&root)?;

    let todo = plan.images_from_shard(m.next_shard());
    let images_this_run = todo.len() as u64;
    tracing::info!(
        images = entries.len(),
        todo = todo.len(),
        shards = ?plan.shards,
        encoder = %spec.id,
        device = %m.build_log.device,
        precision = %m.build_log.precision,
        "building {}",
        cfg.out.display()
    );
    let bar = progress_bar(cfg.progress, todo.len() as u64);
    let writer_opts = WriterOptions {
        dtype: cfg.dtype,
        tokens,
        channels,
        zstd_level: cfg.zstd_level,
        rows_per_row_group: cfg.rows_per_group,
        metadata: shard_metadata(&spec, &preprocessing),
    };
    let stage_opts = stages::StageOptions {
        f16_transfer: cfg.dtype == LatentDType::F16,
        threads,
        batch_size,
        crop_size: spec.crop_size as u32,
        decode: DecodeOptions {
            max_pixels: cfg.max_pixels,
        },
        flips,
        device: &device,
    };
    let run_start = Instant::now();
    let writers = if cfg.writers == 0 {
        // Measured per core: decode + crop ~440 images/s, write (f16, both
        // flips, zstd 3, statistics) ~350 images/s: writing needs about as
        // many cores as decoding.
        (threads / 2).clamp(2, 16)
    } else {
        cfg.writers
    };
    let mut writer = sink::ShardSink::new(
        &plan,
        &entries,
        flips,
        writer_opts,
        &shards_dir,
        &root,
        &mut m,
        writers,
        seconds_before,
        run_start,
        &bar,
    );
    stages::run(
        &entries,
        todo.clone(),
        encoder.as_ref(),
        &stage_opts,
        |msg| writer.accept(msg),
    )?;
    writer.finish()?;
    bar.finish_and_clear();

    if m.next_shard() != plan.shards.end {
        return Err(PipelineError::Invalid(format!(
            "build stopped at shard {} of {}..{}",
            m.next_shard(),
            plan.shards.start,
            plan.shards.end
        )));
    }
    // Whole build: fold per-shard statistics in shard order. A part leaves
    // that to `merge`, which folds the same per-shard states the same way.
    let stats_path = cfg.out.join(manifest::STATS_FILE);
    if cfg.part.is_none() {
        let acc = merge::fold_states(&[(&root, &m)])?;
        if acc.count > 0 {
            acc.save_stats(&stats_path)?;
            m.stats = Some(manifest::STATS_FILE.into());
        } else {
            tracing::warn!("no image could be encoded: no statistics written");
        }
    }
    m.complete = true;
    m.build_log.updated_unix = manifest::unix_now();
    m.build_log.seconds = seconds_before + run_start.elapsed().as_secs_f64();
    m.save(&root)?;

    let secs = t0.elapsed().as_secs_f64();
    let t = &m.totals;
    Ok(BuildSummary {
        cache_dir: cfg.out.clone(),
        manifest: manifest_path,
        stats: m.stats.is_some().then_some(stats_path),
        complete: true,
        part: cfg.part,
        resumed_from_shard,
        shards: m.shards.iter().filter(|s| s.file.is_some()).count(),
        images_encoded: t.images_encoded,
        images_rejected: t.images_rejected,
        rows: t.rows,
        bytes: t.bytes,
        raw_f32_bytes: t.raw_f32_bytes,
        compression_ratio: if t.bytes > 0 {
            t.raw_f32_bytes as f64 / t.bytes as f64
        } else {
            0.0
        },
        images_this_run,
        seconds_this_run: secs,
        images_per_second: images_this_run as f64 / run_start.elapsed().as_secs_f64().max(1e-9),
        rejected: m.rejected.clone(),
    })
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Before resuming: the last complete shard must hash as listed; shard and
/// temp files of this build's range past the manifest's end are leftovers
/// of the interrupted run and are removed.
fn prepare_resume(
    m: &BuildManifest,
    shards_dir: &Path,
    out: &Path,
    root: &Path,
) -> Result<(), PipelineError> {
    if let Some(last) = m.shards.iter().rev().find(|s| s.file.is_some()) {
        let file = last.file.as_deref().unwrap_or_default();
        let path = out.join(file);
        if !path.exists() {
            return Err(PipelineError::DamagedShard {
                path,
                reason: "file missing".into(),
            });
        }
        let got = sha256_file(&path)?;
        if Some(&got) != last.sha256.as_ref() {
            return Err(PipelineError::DamagedShard {
                path,
                reason: format!(
                    "sha256 {got}, manifest {}",
                    last.sha256.clone().unwrap_or_default()
                ),
            });
        }
    }
    let next = m.next_shard();
    let end = m.layout.end_shard;
    for e in std::fs::read_dir(shards_dir).map_err(io_err(shards_dir))? {
        let e = e.map_err(io_err(shards_dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((idx, temp)) = plan::parse_shard_file_name(&name) {
            let ours = idx >= m.layout.first_shard && idx < end;
            if ours && (temp || idx >= next) {
                tracing::info!("removing leftover {}", e.path().display());
                std::fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
            }
        }
    }
    // Leftover atomic-write temp files of the manifest / stats states.
    for dir in [root.to_path_buf(), root.join(manifest::STATE_DIR)] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}
