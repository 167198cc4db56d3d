//! Frozen representation encoders (DINOv2 with/without registers, SigLIP2,
//! MAE) loaded from Hugging Face directories with HF key names.
//!
//! All three are pre-LN ViTs (`vit_layers`); each family module maps its
//! config and parameter names onto the shared `vit::VitEncoder`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub mod activation;
mod config;
mod dinov2;
mod fused;
mod mae;
pub mod preprocess;
mod resample;
mod siglip2;
mod vit;
mod vit_layers;

pub use activation::Activation;
pub use dinov2::HubDinov2;
pub use preprocess::{Preprocessor, crops_to_u8, u8_to_input};

/// RAE's crop side: images are ADM-cropped to this before encoding.
pub const CROP_SIZE: usize = 256;
/// RAE's latent grid side: every encoder yields 16x16 = 256 tokens, so its
/// input size is `LATENT_GRID * patch_size` (224 for p14, 256 for p16).
pub const LATENT_GRID: usize = 16;

/// What a loaded encoder produces and needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncoderSpec {
    /// `dinov2-reg`, `dinov2`, `siglip2`, `mae`.
    pub kind: String,
    /// Where it came from (HF repo id or directory) and its revision if known.
    pub id: String,
    /// The HF cache snapshot (commit), when it came from there.
    pub revision: Option<String>,
    /// sha256 of config.json, recorded in shard metadata.
    pub config_hash: String,
    /// The crop size fed to `encode` (256) and the encoder's own input size.
    pub crop_size: usize,
    /// Side the encoder takes (224 for patch 14, 256 for patch 16).
    pub input_size: usize,
    /// Patch size in pixels.
    pub patch_size: usize,
    /// Patch tokens per image (special tokens dropped).
    pub tokens: usize,
    /// Channels per token (the hidden size).
    pub channels: usize,
    /// Per-channel normalisation mean (preprocessor_config.json).
    pub image_mean: [f32; 3],
    /// Per-channel normalisation std.
    pub image_std: [f32; 3],
}

/// Errors loading or running an encoder.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// A config file that cannot be read or is not supported.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model directory cannot be found or used.
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    /// Crops of the wrong shape or an empty batch.
    #[error("invalid encoder input: {0}")]
    Input(String),
}

/// A frozen representation encoder: crops in, patch-token latents out.
pub trait Encoder: Send + Sync {
    /// What it produces and needs.
    fn spec(&self) -> &EncoderSpec;
    /// The compute dtype of weights and activations (the latent is f32).
    fn dtype(&self) -> DType;
    /// `crops`: [B, 3, crop, crop] floats in [0, 1] on the encoder's device.
    /// Resizes to the input size (torch bicubic, f32), normalises, encodes
    /// in the compute dtype. Returns the raw latent [B, tokens, C] in f32
    /// (the final LayerNorm runs in f32).
    fn encode(&self, crops: &Tensor) -> Result<Tensor, EncoderError>;
}

/// The encoder families `load_encoder` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Dinov2 { registers: bool },
    Siglip,
    Mae,
}

fn family_of(probe: &config::ModelTypeProbe, path: &Path) -> Result<Family, EncoderError> {
    let by_type = match probe.model_type.as_deref() {
        Some("dinov2_with_registers") => Some(Family::Dinov2 { registers: true }),
        Some("dinov2") => Some(Family::Dinov2 { registers: false }),
        Some("siglip") | Some("siglip_vision_model") => Some(Family::Siglip),
        Some("vit_mae") => Some(Family::Mae),
        _ => None,
    };
    let by_arch = || {
        probe.architectures.iter().find_map(|a| match a.as_str() {
            "Dinov2WithRegistersModel" | "Dinov2WithRegistersBackbone" => {
                Some(Family::Dinov2 { registers: true })
            }
            "Dinov2Model" | "Dinov2Backbone" => Some(Family::Dinov2 { registers: false }),
            "SiglipModel" | "SiglipVisionModel" => Some(Family::Siglip),
            "ViTMAEForPreTraining" | "ViTMAEModel" => Some(Family::Mae),
            _ => None,
        })
    };
    by_type.or_else(by_arch).ok_or_else(|| {
        config::config_err(
            path,
            format!(
                "unsupported encoder (model_type {:?}, architectures {:?}); supported: dinov2_with_registers, \
                 dinov2, siglip (SigLIP2 fixed-resolution checkpoints), vit_mae",
                probe.model_type, probe.architectures
            ),
        )
    })
}

/// Load any supported encoder from a Hugging Face model directory.
pub fn load_encoder(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn Encoder>, EncoderError> {
    load_encoder_as(dir, &dir.display().to_string(), None, device, dtype)
}

/// `load_encoder` for a model found by `weights::resolve_model`, recording
/// its id and revision in the spec.
pub fn load_resolved(
    model: &crate::weights::ResolvedModel,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn Encoder>, EncoderError> {
    load_encoder_as(&model.dir, &model.id, model.revision.clone(), device, dtype)
}

fn load_encoder_as(
    dir: &Path,
    id: &str,
    revision: Option<String>,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn Encoder>, EncoderError> {
    let files = config::ModelFiles::open(dir)?;
    let probe = files.probe()?;
    let family = family_of(&probe, &files.config_path)?;
    let mut enc = match family {
        Family::Dinov2 { registers } => dinov2::load(&files, registers, device, dtype)?,
        Family::Siglip => siglip2::load(&files, &probe, device, dtype)?,
        Family::Mae => mae::load(&files, device, dtype)?,
    };
    enc.set_origin(id, revision);
    tracing::info!(kind = %enc.spec().kind, id, dtype = ?dtype, "encoder loaded");
    Ok(Box::new(enc))
}

/// RGB8 crops -> [B, 3, H, W] f32 in [0, 1] (optionally flipped left-right).
pub fn crops_to_tensor(
    crops: &[&image::RgbImage],
    flip: bool,
    device: &Device,
) -> Result<Tensor, EncoderError> {
    preprocess::crops_to_tensor(crops, flip, device)
}
