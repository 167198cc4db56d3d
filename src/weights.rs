//! Resolve model weights: a local directory, or a Hugging Face repo id
//! through the HF cache (offline unless a download is asked for).
//! (Interface fixed here; bodies being written.)

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("model {id:?} not found; looked in: {looked}. {hint}")]
    NotFound { id: String, looked: String, hint: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A resolved model directory (local or inside the HF cache snapshot).
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    pub id: String,
    pub revision: Option<String>,
}

pub fn resolve_model(id_or_dir: &str, allow_download: bool) -> Result<ResolvedModel, WeightsError> {
    let _ = (id_or_dir, allow_download);
    unimplemented!("being written")
}
