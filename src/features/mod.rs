//! Feature networks of the evaluation metrics (issue 13): the FID
//! Inception-v3 (pool_3 for FID/P&R, `mixed_6/conv` for sFID, logits for
//! IS) and DINOv2-L/14 for FD-DINOv2. Inference only, f32.

use std::path::PathBuf;

mod conv_ops;
pub mod dinov2_fd;
pub mod inception;
mod legacy_pth;

pub use dinov2_fd::Dinov2Fd;
pub use inception::{InceptionOutputs, InceptionV3, read_weights, tf1_resize_bilinear};

/// Errors loading or running a feature network.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// A weights file that cannot be read or does not hold the network.
    #[error("{path}: {reason}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Images of the wrong shape or an empty batch.
    #[error("invalid feature-network input: {0}")]
    Input(String),
    /// Loading the DINOv2 encoder failed.
    #[error(transparent)]
    Encoder(#[from] crate::encoders::EncoderError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Check a `[N, 3, H, W]` image batch; returns `(N, H, W)`.
fn check_images(images: &candle_core::Tensor) -> Result<(usize, usize, usize), FeatureError> {
    match images.dims() {
        &[n, 3, h, w] if n > 0 && h > 0 && w > 0 => Ok((n, h, w)),
        d => Err(FeatureError::Input(format!(
            "want images [N>0, 3, H>0, W>0] (f32 in [0, 255]), got shape {d:?}"
        ))),
    }
}
