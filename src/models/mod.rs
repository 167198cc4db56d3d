//! Diffusion transformers (LightningDiT, DiT-DH) and the RAE pixel decoder,
//! with reference (bytetriper/RAE) state-dict names.
//!
//! Models are built from a `VarBuilder`: from loaded tensors for inference
//! (`state_dict::var_builder`) or from a `VarMap` for training
//! (`VarBuilder::from_varmap`; missing entries are initialised as the
//! reference does). Frozen tensors (`state_dict::is_frozen`) are detached.

pub mod config;
pub mod decoder;
pub mod dit_block;
pub mod dit_dh;
pub mod embed;
pub mod layers;
pub mod lightning_dit;
pub mod ops;
pub mod state_dict;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::{DitConfig, DitDhConfig, LightningDitConfig};
pub use decoder::{DecoderConfig, RaeDecoder};
pub use dit_dh::DitDh;
pub use lightning_dit::LightningDit;
pub use state_dict::{WeightsKey, is_frozen, load_state_dict};

/// Errors loading or building a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A weights file that cannot be read or does not fit the model.
    #[error("{path}: {reason}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A model config that cannot be read or is invalid.
    #[error("config {path}: {reason}")]
    Config {
        /// The preset name or config file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A model that predicts the flow-matching velocity (noise - data).
pub trait VelocityModel {
    /// x: `[B,C,H,W]`, t: `[B]` (1 = noise), y: `[B]` integer labels.
    /// The velocity has x's dtype, whatever the model computes in.
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> candle_core::Result<Tensor>;
}

/// Either diffusion transformer, chosen by its config.
#[derive(Debug, Clone)]
pub enum DitModel {
    /// DiT-DH: DiT with a wide shallow denoising head.
    DitDh(DitDh),
    /// LightningDiT.
    Lightning(LightningDit),
}

impl DitModel {
    /// Build the model `cfg` describes from `vb`'s tensors.
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match cfg {
            DitConfig::DitDh(c) => Self::DitDh(DitDh::new(c, vb)?),
            DitConfig::Lightning(c) => Self::Lightning(LightningDit::new(c, vb)?),
        })
    }

    /// Use fused kernels (inference only: no gradients through them).
    pub fn set_fused(&mut self, fused: bool) {
        match self {
            Self::DitDh(m) => m.fused = fused,
            Self::Lightning(m) => m.fused = fused,
        }
    }

    /// Frozen buffers (pos_embed, rope tables) under reference names.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        match self {
            Self::DitDh(m) => m.buffers(),
            Self::Lightning(m) => m.buffers(),
        }
    }

    /// The compute dtype (weights and activations).
    pub fn dtype(&self) -> DType {
        match self {
            Self::DitDh(m) => m.dtype,
            Self::Lightning(m) => m.dtype,
        }
    }

    /// Number of class labels (the null class for guidance is this index).
    pub fn num_classes(&self) -> usize {
        match self {
            Self::DitDh(m) => m.config().num_classes,
            Self::Lightning(m) => m.config().num_classes,
        }
    }
}

impl VelocityModel for DitModel {
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::DitDh(m) => m.forward(x, t, y),
            Self::Lightning(m) => m.forward(x, t, y),
        }
    }
}

/// Load a DiT from a weights file and a config (preset name or JSON/TOML
/// path) for inference.
pub fn load_dit(
    weights: &Path,
    config: &str,
    key: &WeightsKey,
    dtype: DType,
    device: &Device,
) -> Result<DitModel, ModelError> {
    let cfg = DitConfig::load(config)?;
    let sd = load_state_dict(weights, key, device)?;
    let vb = state_dict::var_builder(sd, dtype, device);
    DitModel::new(&cfg, vb).map_err(|e| state_dict::with_file(weights, e))
}

/// Load the RAE decoder from a weights file and its config.
pub fn load_decoder(
    weights: &Path,
    cfg: &DecoderConfig,
    key: &WeightsKey,
    dtype: DType,
    device: &Device,
) -> Result<RaeDecoder, ModelError> {
    let sd = load_state_dict(weights, key, device)?;
    let vb = state_dict::var_builder(sd, dtype, device);
    RaeDecoder::new(cfg, vb).map_err(|e| state_dict::with_file(weights, e))
}
