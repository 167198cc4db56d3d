//! Evaluation metrics: the ADM evaluator's FID / sFID / Inception Score /
//! precision-recall (openai/guided-diffusion `evaluations/evaluator.py`),
//! FD-DINOv2, latent-space metrics straight from shards, and PSNR / SSIM
//! for reconstructions.
//!
//! * [`moments`]: streaming f64 mean and covariance (Chan merge of batches).
//! * [`frechet`]: the Fréchet distance of two Gaussians, f64 symmetric
//!   eigen-solver (faer).
//! * [`inception_score`]: ADM's IS (contiguous splits in file order).
//! * [`manifold`]: improved precision/recall (k-NN manifolds, k = 3) with
//!   ADM's float16 distance blocks.
//! * [`features`]: the [`ImageFeatures`](features::ImageFeatures) trait the
//!   feature networks plug into, and per-set accumulation.
//! * [`npz`]: reading `.npz` (ADM sample and reference batches).
//! * [`reference`]: the reference statistics file of `eval-ref`.
//! * [`latent`]: latent-space metrics of sample shards against a cache.
//! * [`recon`]: PSNR and SSIM.
//! * [`centroid`]: nearest-centroid class accuracy of generated latents.
//! * [`recon_run`]: a decoder's reconstruction metrics (PSNR, SSIM, LPIPS,
//!   rFID) over round-tripped images or a cache and its source images.
//! * [`probe`]: the latent probe of `train --eval-every`.
//! * [`run`]: one evaluation from inputs to a [`run::EvalReport`].

pub mod centroid;
pub mod features;
pub mod frechet;
pub mod inception_score;
pub mod latent;
pub mod manifold;
pub mod moments;
pub mod networks;
pub mod npz;
pub mod probe;
pub mod recon;
pub mod recon_run;
pub mod reference;
pub mod run;

pub use frechet::{Gaussian, frechet_distance};
pub use inception_score::{InceptionScore, inception_score};
pub use manifold::{Distance, PrOptions, PrResult, precision_recall};
pub use moments::Moments;

/// Errors of the evaluation code.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read or written, or its content is wrong.
    #[error(transparent)]
    File(#[from] crate::error::FileError),
    /// Reading a shard failed.
    #[error(transparent)]
    Shard(#[from] crate::shards::ShardError),
    /// Decoding sample shards failed.
    #[error(transparent)]
    Decode(#[from] crate::generate::GenerateError),
    /// Bad inputs (too few rows, NaN features, mismatched dimensions, ...).
    #[error("{0}")]
    Invalid(String),
    /// The eigen-solver did not converge.
    #[error("eigendecomposition failed: {0}")]
    Linalg(String),
}

impl EvalError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        crate::error::FileError::io(path, source).into()
    }
    pub(crate) fn format(path: &std::path::Path, reason: impl Into<String>) -> Self {
        crate::error::FileError::format(path, reason).into()
    }
}

/// The first non-finite value of `rows x dim` features, as an error naming
/// `what`, the row and the column.
pub(crate) fn check_finite(what: &str, data: &[f32], dim: usize) -> Result<(), EvalError> {
    match data.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(EvalError::Invalid(format!(
            "{what}: non-finite feature {} at row {}, column {}",
            data[i],
            i / dim.max(1),
            i % dim.max(1)
        ))),
    }
}
