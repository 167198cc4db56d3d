//! Frozen representation encoders (DINOv2 with/without registers, SigLIP2,
//! MAE) loaded from Hugging Face directories with HF key names.
//! (Interface fixed here; bodies being written.)

use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// What a loaded encoder produces and needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncoderSpec {
    /// `dinov2-reg`, `dinov2`, `siglip2`, `mae`.
    pub kind: String,
    /// Where it came from (HF repo id or directory) and its revision if known.
    pub id: String,
    pub revision: Option<String>,
    /// sha256 of config.json, recorded in shard metadata.
    pub config_hash: String,
    /// The crop size fed to `encode` (256) and the encoder's own input size.
    pub crop_size: usize,
    pub input_size: usize,
    pub patch_size: usize,
    pub tokens: usize,
    pub channels: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("{path}: {reason}")]
    Config { path: std::path::PathBuf, reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
}

pub trait Encoder: Send + Sync {
    fn spec(&self) -> &EncoderSpec;
    /// `crops`: [B, 3, crop, crop] floats in [0, 1] on the encoder's device.
    /// Resizes to the input size (torch bicubic), normalises, encodes.
    /// Returns the raw latent [B, tokens, C] in f32.
    fn encode(&self, crops: &Tensor) -> Result<Tensor, EncoderError>;
}

/// Load any supported encoder from a Hugging Face model directory.
pub fn load_encoder(dir: &Path, device: &Device, dtype: DType) -> Result<Box<dyn Encoder>, EncoderError> {
    let _ = (dir, device, dtype);
    unimplemented!("being written")
}

/// RGB8 crops -> [B, 3, H, W] f32 in [0, 1] (optionally flipped left-right).
pub fn crops_to_tensor(crops: &[&image::RgbImage], flip: bool, device: &Device) -> Result<Tensor, EncoderError> {
    let _ = (crops, flip, device);
    unimplemented!("being written")
}
