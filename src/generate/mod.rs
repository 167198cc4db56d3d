//! Generation: sampling latents with a DiT into shards (`sample`) and
//! decoding latent shards to images with the RAE decoder (`decode`).
//!
//! * [`labels`]: class labels for N samples (`all`, `equal`, a list).
//! * [`noise`]: per-sample initial noise derived from (seed, index).
//! * [`sample_run`]: the sampling loop -> shards + manifest.
//! * [`pixels`]: decoder output -> u8 (reference truncation), file names.
//! * [`npz`]: `.npy` headers and the ADM-evaluator `.npz` (stored zip).
//! * [`decode_run`]: shards -> PNG / npz / safetensors, pipelined.

pub mod decode_run;
pub mod labels;
pub mod noise;
pub mod npz;
pub mod pixels;
pub mod sample_run;

use std::path::PathBuf;

pub use decode_run::{
    DecodeFormat, DecodeOptions, DecodeSummary, DecodedImages, StreamOptions, decode_shards,
    decode_stream, resolve_shards,
};
pub use labels::LabelSpec;
pub use pixels::Rounding;
pub use sample_run::{
    SampleOptions, SampleSummary, run_sampling, run_sampling_job, write_sample_manifest,
};

/// Errors of sampling and decoding.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading or writing a shard failed.
    #[error(transparent)]
    Shard(#[from] crate::shards::ShardError),
    /// Loading a model failed.
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A collective of a multi-process run failed.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// Invalid options or inputs.
    #[error("{0}")]
    Invalid(String),
}

impl GenerateError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        GenerateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
