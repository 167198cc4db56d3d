//! The build pipeline: image folder -> Parquet latent shards + manifest +
//! statistics, crash-safe and resumable, deterministic whatever the thread
//! count. `rae-cache build` is a thin layer over [`run_build`], which takes
//! a [`BuildConfig`] and reports its progress to a
//! [`Progress`](crate::progress::Progress).
//!
//! * [`config`]: the settings and their defaults, resolved and checked into
//!   a [`BuildPlan`] before anything is touched.
//! * `build`: [`run_build`], one named step after another.
//! * `stages` (decode, crop, encode) feed `sink` (one thread per shard
//!   being written); [`plan`] says which shard each image goes to.
//! * [`build_state`]: `build-state.json`, the record `--resume` continues.
//! * [`merge`] combines the parts of a multi-machine build; [`verify`]
//!   re-checks a cache.
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
//!
//! Statistics: each shard's rows, quantised and dequantised exactly as the
//! readers return them (the writer computes this from the rows it stores;
//! nothing is read back), are accumulated in f64 in row order into their own
//! accumulator; the cache's statistics are the left fold of those in shard
//! order. A whole build, a resumed build and a merge of parts perform the
//! same operations in the same order, so their `stats.safetensors` are
//! byte-identical.
//!
//! Parts write their shards straight into `CACHE/shards/` (global shard
//! numbers never collide), so `merge` moves no data.

mod build;
pub mod build_state;
pub mod config;
pub mod lock;
pub mod merge;
pub mod plan;
mod sink;
mod stages;
pub mod verify;

use std::path::{Path, PathBuf};

use crate::encoders::EncoderError;
use crate::images::ImageError;
use crate::shards::ShardError;

pub(crate) use build::run_local_build;
pub use build::{BuildSummary, run_build};
pub use build_state::{BuildManifest, HFlip};
pub use config::{
    BuildConfig, BuildPlan, DEFAULT_BATCH_SIZE_CPU, DEFAULT_BATCH_SIZE_CUDA, DEFAULT_DEVICE,
    DEFAULT_DTYPE, DEFAULT_ENCODER, DEFAULT_HFLIP, DEFAULT_IMAGES_PER_SHARD, DEFAULT_PRECISION,
    DEFAULT_ROWS_PER_ROW_GROUP, DEFAULT_ZSTD_LEVEL, SaveHook,
};
pub use plan::{Inputs, PartSpec, ShardPlan};

/// Errors of a build, merge or verify.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Listing the image folder failed (unreadable images are rejected, not errors).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Listing or reading a tar or Parquet source failed.
    #[error(transparent)]
    Source(#[from] crate::sources::SourceError),
    /// Loading or running the encoder failed.
    #[error("encoder: {0}")]
    Encoder(#[from] EncoderError),
    /// The encoder's directory cannot be found or used.
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    /// The `--device` cannot be used.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// Writing or reading a shard failed.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// The cache directory is locked by another process.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// `build-state.json` cannot be read or written.
    #[error(transparent)]
    Manifest(#[from] build_state::ManifestError),
    /// Invalid settings.
    #[error("{0}")]
    Invalid(String),
    /// Writing to or reading from an object store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// `--out` holds files and `--resume` was not given.
    #[error(
        "{path} is not empty; use --resume to continue the build that is there, or choose another --out directory"
    )]
    NotEmpty {
        /// The output directory.
        path: PathBuf,
    },
    /// `--resume` on a directory without a build.
    #[error("cannot resume: {path} has no manifest.json (not a rae-cache build directory)")]
    NoManifest {
        /// The output directory.
        path: PathBuf,
    },
    /// `--resume` with settings that differ from the build's.
    #[error("cannot resume {path}: it was built with different arguments:\n  {}", .differences.join("\n  "))]
    ResumeMismatch {
        /// The output directory.
        path: PathBuf,
        /// Each setting that differs, with both values.
        differences: Vec<String>,
    },
    /// A shard on disk does not match its build-state entry.
    #[error(
        "cannot resume: shard {path} does not match the manifest ({reason}); the cache is damaged, rebuild it"
    )]
    DamagedShard {
        /// The shard file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// The image folder holds no image.
    #[error("no images found under {path}")]
    NoImages {
        /// The image folder.
        path: PathBuf,
    },
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

/// Where a build writes its manifest, state and lock.
pub fn build_root(out: &Path, part: Option<PartSpec>) -> PathBuf {
    match part {
        None => out.to_path_buf(),
        Some(p) => out.join(build_state::PARTS_DIR).join(p.index.to_string()),
    }
}

/// The exact per-shard statistics accumulator of shard `shard` under a
/// build root: `state/stats-NNNNN.safetensors`.
pub fn state_file(root: &Path, shard: usize) -> PathBuf {
    root.join(build_state::STATE_DIR)
        .join(format!("stats-{shard:05}.safetensors"))
}
