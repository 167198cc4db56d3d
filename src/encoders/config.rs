//! The parts of Hugging Face `config.json` / `preprocessor_config.json`
//! that the encoders read.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EncoderError;
use super::activation::Activation;

/// Which model a `config.json` describes (top-level fields only).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelTypeProbe {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Present in a full `SiglipModel` (vision + text) config.
    #[serde(default)]
    pub vision_config: Option<serde_json::Value>,
}

fn default_true() -> bool {
    true
}
fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> Activation {
    Activation::GeluErf
}

/// The ViT hyper-parameters shared by DINOv2, SigLIP's vision tower and
/// ViT-MAE (same field names in all three HF configs).
#[derive(Debug, Clone, Deserialize)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// SigLIP / MAE width of the MLP.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// DINOv2 derives the MLP width from `mlp_ratio` (and ignores
    /// `intermediate_size`).
    #[serde(default)]
    pub mlp_ratio: Option<f64>,
    pub patch_size: usize,
    pub image_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub num_register_tokens: usize,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
}

/// Normalisation constants from `preprocessor_config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessorConfig {
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
}

impl PreprocessorConfig {
    pub fn mean_std(&self, path: &Path) -> Result<([f32; 3], [f32; 3]), EncoderError> {
        let three = |v: &[f32], what: &str| -> Result<[f32; 3], EncoderError> {
            match v {
                [a, b, c] => Ok([*a, *b, *c]),
                _ => Err(config_err(
                    path,
                    format!("{what} must have 3 entries, got {}", v.len()),
                )),
            }
        };
        let mean = three(&self.image_mean, "image_mean")?;
        let std = three(&self.image_std, "image_std")?;
        if std.iter().any(|s| !(*s > 0.0)) {
            return Err(config_err(
                path,
                format!("image_std must be positive, got {std:?}"),
            ));
        }
        Ok((mean, std))
    }
}

pub fn config_err(path: &Path, reason: impl Into<String>) -> EncoderError {
    EncoderError::Config {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Read a file, mapping I/O errors to `EncoderError::Config`.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, EncoderError> {
    std::fs::read(path).map_err(|e| config_err(path, e.to_string()))
}

/// Parse JSON bytes that came from `path`.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
) -> Result<T, EncoderError> {
    serde_json::from_slice(bytes).map_err(|e| config_err(path, e.to_string()))
}

/// Parse a JSON value (e.g. a nested `vision_config`) that came from `path`.
pub fn from_value<T: serde::de::DeserializeOwned>(
    path: &Path,
    v: serde_json::Value,
) -> Result<T, EncoderError> {
    serde_json::from_value(v).map_err(|e| config_err(path, e.to_string()))
}

/// The three files of a Hugging Face model directory, read once.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config_bytes: Vec<u8>,
    pub preprocessor: PreprocessorConfig,
    pub preprocessor_path: PathBuf,
    pub weights_path: PathBuf,
}

impl ModelFiles {
    pub fn open(dir: &Path) -> Result<Self, EncoderError> {
        let config_path = dir.join("config.json");
        let config_bytes = read_bytes(&config_path)?;
        let preprocessor_path = dir.join("preprocessor_config.json");
        let preprocessor = parse_json(&preprocessor_path, &read_bytes(&preprocessor_path)?)?;
        let weights_path = dir.join("model.safetensors");
        if !weights_path.is_file() {
            return Err(config_err(
                &weights_path,
                "missing (expected the model weights here)",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config_path,
            config_bytes,
            preprocessor,
            preprocessor_path,
            weights_path,
        })
    }

    pub fn probe(&self) -> Result<ModelTypeProbe, EncoderError> {
        parse_json(&self.config_path, &self.config_bytes)
    }

    /// sha256 of config.json, lowercase hex.
    pub fn config_hash(&self) -> String {
        use sha2::Digest;
        crate::fsutil::hex(&sha2::Sha256::digest(&self.config_bytes))
    }
}

impl VitConfig {
    /// Checks that make the model well-formed (HF would fail later, less
    /// clearly).
    pub fn validate(&self, path: &Path) -> Result<(), EncoderError> {
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(config_err(
                path,
                format!(
                    "hidden_size {} not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.patch_size == 0 || self.num_channels == 0 {
            return Err(config_err(
                path,
                "patch_size and num_channels must be positive",
            ));
        }
        Ok(())
    }
}
