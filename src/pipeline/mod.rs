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

pub use build::{BuildSummary, run_build};
pub use build_state::{BuildManifest, HFlip};
pub use config::{
    BuildConfig, BuildPlan, DEFAULT_BATCH_SIZE_CPU, DEFAULT_BATCH_SIZE_CUDA, DEFAULT_DEVICE,
    DEFAULT_DTYPE, DEFAULT_ENCODER, DEFAULT_HFLIP, DEFAULT_IMAGES_PER_SHARD, DEFAULT_PRECISION,
    DEFAULT_ROWS_PER_ROW_GROUP, DEFAULT_ZSTD_LEVEL,
};
pub use plan::{Inputs, PartSpec, ShardPlan};

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
    Manifest(#[from] build_state::ManifestError),
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

/// Where a build writes its manifest, state and lock.
pub fn build_root(out: &Path, part: Option<PartSpec>) -> PathBuf {
    match part {
        None => out.to_path_buf(),
        Some(p) => out.join(build_state::PARTS_DIR).join(p.index.to_string()),
    }
}

pub fn state_file(root: &Path, shard: usize) -> PathBuf {
    root.join(build_state::STATE_DIR)
        .join(format!("stats-{shard:05}.safetensors"))
}
