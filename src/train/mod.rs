//! Training machinery for DiT / DiT-DH on cached latents: optimizer (AdamW,
//! clipping, accumulation), learning-rate schedules, EMA, seeded weight
//! init, run-dir checkpoints, the shard loader, the flow-matching step
//! (`state`) and the training loop (`trainer`).

pub mod cadence;
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod init;
mod inplace;
pub mod loader;
pub mod lr;
pub mod optim;
pub mod params;
pub mod state;
pub mod trainer;

pub use config::TrainConfig;
pub use ema::Ema;
pub use lr::{LrSchedule, ScheduleKind};
pub use optim::{AdamW, AdamWConfig, GradAccumulator, Gradients, ParamGroup};
pub use params::OptimizedParams;
pub use state::{FlowBatch, StepMetrics, TrainState, TrainStateConfig};

use std::path::PathBuf;

/// Errors of the training machinery.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written, or its content is wrong.
    #[error(transparent)]
    File(#[from] crate::error::FileError),
    /// Reading a latent shard failed.
    #[error(transparent)]
    Shard(#[from] crate::shards::ShardError),
    /// A distributed (multi-rank) operation failed.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// Settings that are invalid or inconsistent with each other.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Training state that does not fit (missing or mismatched tensors, a
    /// stopped loader, an unserialisable log line).
    #[error("{0}")]
    State(String),
    /// A cache in an object store could not be brought into the read-through cache.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A loss or gradient norm became NaN/inf; training stops rather than
    /// writing a poisoned checkpoint.
    #[error("non-finite {what} at step {step}; last good checkpoint: {last_good}")]
    NonFinite {
        /// The optimizer step it happened at.
        step: u64,
        /// The quantity and its value (e.g. `loss NaN`).
        what: String,
        /// Path of the last checkpoint written, or a note that none was.
        last_good: String,
    },
}

/// Result with a [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// A non-finite `what` at `step`, naming the last checkpoint written.
    pub fn non_finite(step: u64, what: String, last_ckpt: Option<&std::path::Path>) -> Self {
        Self::NonFinite {
            step,
            what,
            last_good: last_ckpt
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none (no checkpoint written yet)".into()),
        }
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| crate::error::FileError::io(path, source).into()
}
