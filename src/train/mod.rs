//! Training machinery for DiT / DiT-DH on cached latents: optimizer (AdamW,
//! clipping, accumulation), learning-rate schedules, EMA, run-dir
//! checkpoints, the shard loader and the training loop.

pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod init;
pub mod loader;
pub mod lr;
pub mod optim;
pub mod state;
pub mod trainer;

pub use config::TrainConfig;
pub use ema::Ema;
pub use lr::{LrSchedule, ScheduleKind};
pub use optim::{AdamW, AdamWConfig, GradAccumulator, Gradients, ParamGroup};
pub use state::{FlowBatch, StepMetrics, TrainState, TrainStateConfig};

use std::path::PathBuf;

/// Errors of the training machinery.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Shard(#[from] crate::shards::ShardError),
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    State(String),
    #[error("non-finite {what} at step {step}; last good checkpoint: {last_good}")]
    NonFinite {
        step: u64,
        what: String,
        last_good: String,
    },
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
