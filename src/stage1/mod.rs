//! Stage 1 of RAE: training the pixel decoder (reference
//! `bytetriper/RAE` `src/train_stage1.py`). The losses are the reference's:
//! L1 on [0,1] pixels, LPIPS (VGG16, v0.1 linear heads) on [-1,1] pixels
//! and an optional adversarial term plugged in through
//! [`generator::AdversarialLoss`] with the VQGAN adaptive weight; the
//! decoder sees the raw latent with the reference's per-sample noise
//! ([`noise`]). [`gan`] wires in the DINO discriminator of [`crate::disc`]:
//! its updates from `disc_start_epoch`, the adversarial term from
//! `gan_start_epoch`.

pub mod gan;
pub mod generator;
pub mod lpips;
pub mod noise;
pub mod online;
pub mod preview;
pub mod targets;
pub mod train_config;
pub mod trainer;
pub mod vgg;

pub use generator::{AdversarialLoss, GenBatch, GenLossConfig, GenLosses, GeneratorState};
pub use lpips::Lpips;
pub use noise::{NoiseAug, NoiseDraws};
pub use vgg::Vgg16Features;

use std::path::PathBuf;

/// Errors of stage-1 training.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A weights file that cannot be found.
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    /// A model or state dict that cannot be loaded.
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    /// The discriminator (weights, state, configuration).
    #[error(transparent)]
    Disc(#[from] crate::disc::DiscError),
    /// Optimizer / EMA machinery.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// A weights file whose tensors do not fit.
    #[error("{path}: {reason}")]
    BadWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A target image that cannot be read.
    #[error("{path}: {reason}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Inputs of the wrong shape or an invalid setting.
    #[error("{0}")]
    Invalid(String),
}

/// Result of stage-1 operations.
pub type Result<T> = std::result::Result<T, Stage1Error>;
