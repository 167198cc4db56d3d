//! The feature networks of [`crate::features`] as [`ImageFeatures`]: the
//! FID Inception-v3 (pool_3, mixed_6/conv, unbiased logits) and the
//! FD-DINOv2 extractor, with the provenance a report records.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use super::EvalError;
use super::features::{FeatureBatch, ImageBatch, ImageFeatures};
use crate::features::dinov2_fd::Dinov2Fd;
use crate::features::inception::InceptionV3;

/// `[N, 3, H, W]` f32 in [0, 255] from NHWC bytes.
fn to_nchw(b: &ImageBatch<'_>, device: &Device) -> Result<Tensor, EvalError> {
    let v: Vec<f32> = b.pixels.iter().map(|&p| p as f32).collect();
    let t = Tensor::from_vec(v, (b.n, b.height, b.width, 3), &Device::Cpu)
        .and_then(|t| t.permute((0, 3, 1, 2))?.contiguous()?.to_device(device))
        .map_err(|e| EvalError::Invalid(format!("image batch: {e}")))?;
    Ok(t)
}

fn rows(t: &Tensor) -> Result<Vec<f32>, EvalError> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| EvalError::Invalid(format!("features: {e}")))
}

fn feature_err(path: &Path, e: crate::features::FeatureError) -> EvalError {
    EvalError::format(path, e.to_string())
}

/// pytorch-fid's FID Inception weights on the ADM evaluator's input path.
pub struct InceptionFeatures {
    net: InceptionV3,
    path: PathBuf,
    sha256: String,
    device: Device,
}

impl InceptionFeatures {
    /// Load `pt_inception-2015-12-05-6726825d.pth` (or a `.safetensors`
    /// with its names); the sha256 goes into the report.
    pub fn load(path: &Path, device: &Device) -> Result<Self, EvalError> {
        let net = InceptionV3::load(path, device).map_err(|e| feature_err(path, e))?;
        let sha256 = crate::fsutil::sha256_file(path).map_err(|e| EvalError::io(path, e))?;
        Ok(Self {
            net,
            path: path.to_path_buf(),
            sha256,
            device: device.clone(),
        })
    }
}

impl ImageFeatures for InceptionFeatures {
    fn id(&self) -> String {
        "inception-v3-2015-12-05".into()
    }

    fn provenance(&self) -> serde_json::Value {
        json!({
            "weights": self.path,
            "sha256": self.sha256,
            "resize": "TF1 resize_bilinear to 299 (align_corners=False, half_pixel_centers=False)",
            "normalisation": "(x - 128) / 128",
            "pool": "pool_3 (2048)",
            "spatial": "mixed_6/conv, first 7 channels, (h, w, c) order (2023)",
            "logits": "pool_3 @ fc.weight^T without bias (1008)",
            "precision": "f32",
            "tf32": false,
        })
    }

    fn extract(&mut self, batch: &ImageBatch<'_>) -> Result<FeatureBatch, EvalError> {
        let x = to_nchw(batch, &self.device)?;
        let o = self
            .net
            .forward(&x)
            .map_err(|e| feature_err(&self.path, e))?;
        Ok(FeatureBatch {
            pool: Some(rows(&o.pool)?),
            spatial: Some(rows(&o.spatial)?),
            logits: Some(rows(&o.logits)?),
        })
    }
}

/// DINOv2 CLS after the final LayerNorm, as dgm-eval / EDM2 (224 px PIL
/// bicubic, ImageNet normalisation, hub-style position-table resize).
pub struct Dinov2Features {
    net: Dinov2Fd,
    id: String,
    dir: Option<PathBuf>,
    /// sha256 of `model.safetensors`, hashed once at load (over 1 GB for ViT-L).
    sha256: Option<String>,
    device: Device,
}

impl Dinov2Features {
    /// A local `facebook/dinov2-large` directory or that id in the local
    /// Hugging Face cache (offline).
    pub fn load(id_or_dir: &str, device: &Device) -> Result<Self, EvalError> {
        let net =
            Dinov2Fd::load(id_or_dir, device).map_err(|e| feature_err(Path::new(id_or_dir), e))?;
        let dir = crate::weights::resolve_model(id_or_dir, false)
            .ok()
            .map(|m| m.dir);
        let sha256 = dir
            .as_ref()
            .and_then(|d| crate::fsutil::sha256_file(&d.join("model.safetensors")).ok());
        Ok(Self {
            net,
            id: id_or_dir.to_string(),
            dir,
            sha256,
            device: device.clone(),
        })
    }
}

impl ImageFeatures for Dinov2Features {
    fn id(&self) -> String {
        format!("dinov2-cls:{}", self.id)
    }

    fn provenance(&self) -> serde_json::Value {
        json!({
            "model": self.id,
            "dir": self.dir,
            "model_safetensors_sha256": self.sha256,
            "resize": "PIL bicubic to 224x224 (uint8), /255, ImageNet mean/std",
            "position_table": "torch.hub resize, scale_factor (16 + 0.1) / 37",
            "feature": "CLS after the final LayerNorm",
            "precision": "f32",
        })
    }

    fn extract(&mut self, batch: &ImageBatch<'_>) -> Result<FeatureBatch, EvalError> {
        let x = to_nchw(batch, &self.device)?;
        let f = self
            .net
            .forward(&x)
            .map_err(|e| feature_err(Path::new(&self.id), e))?;
        Ok(FeatureBatch {
            pool: Some(rows(&f)?),
            ..FeatureBatch::default()
        })
    }
}
