//! FD-DINOv2 features as dgm-eval (Stein et al. 2023) and EDM2 compute
//! them: DINOv2 ViT-L/14 (`dinov2_vitl14`, HF `facebook/dinov2-large`),
//! each image resized to 224x224 with PIL's BICUBIC (antialiased, uint8
//! output; non-square images are squashed, not cropped), `ToTensor` (/255),
//! ImageNet mean/std, the hub's position-table resize, and the CLS token
//! after the final LayerNorm (`model(x)`, head = Identity), 1024-d.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::{FeatureError, check_images};
use crate::encoders::HubDinov2;
use crate::images::resample::{Filter, resize};

/// dgm-eval's input side.
pub const INPUT_SIZE: usize = 224;
/// torchvision `Normalize` constants dgm-eval uses.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The FD-DINOv2 feature extractor.
pub struct Dinov2Fd {
    net: HubDinov2,
    mean: Tensor,
    std: Tensor,
    device: Device,
}

impl Dinov2Fd {
    /// Load from a local HF directory or a repo id in the local Hugging
    /// Face cache (offline, as the encoders resolve).
    pub fn load(id_or_dir: &str, device: &Device) -> Result<Self, FeatureError> {
        let model = crate::weights::resolve_model(id_or_dir, false)
            .map_err(crate::encoders::EncoderError::from)?;
        let net = HubDinov2::load(&model, device)?;
        if net.spec().input_size != INPUT_SIZE {
            return Err(FeatureError::Input(format!(
                "{id_or_dir}: patch size {} gives input {} px; FD-DINOv2 needs a patch-14 model (224 px)",
                net.spec().patch_size,
                net.spec().input_size
            )));
        }
        let mean = Tensor::from_slice(&IMAGENET_MEAN, (1, 3, 1, 1), device)?;
        let std = Tensor::from_slice(&IMAGENET_STD, (1, 3, 1, 1), device)?;
        tracing::info!(id = id_or_dir, "FD-DINOv2 network loaded");
        Ok(Self {
            net,
            mean,
            std,
            device: device.clone(),
        })
    }

    /// Feature width (1024 for ViT-L).
    pub fn dim(&self) -> usize {
        self.net.spec().channels
    }

    /// Where the weights came from (id, revision, config hash).
    pub fn spec(&self) -> &crate::encoders::EncoderSpec {
        self.net.spec()
    }

    /// `images`: `[N, 3, H, W]` f32 RGB in [0, 255], uint8 values (they are
    /// rounded to uint8, as PIL's resize works on uint8 images). Returns
    /// `[N, hidden]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor, FeatureError> {
        let (_, h, w) = check_images(images)?;
        let pixels = if (h, w) == (INPUT_SIZE, INPUT_SIZE) {
            // PIL returns a copy at the same size; only the uint8 rounding.
            images.to_dtype(DType::F32)?.round()?.clamp(0f32, 255f32)?
        } else {
            pil_bicubic(images, INPUT_SIZE)?
        };
        let pixels = pixels.to_device(&self.device)?;
        // ToTensor divides (not multiplies by 1/255); Normalize subtracts
        // and divides, all in f32.
        let x = pixels
            .broadcast_div(&Tensor::new(255f32, &self.device)?)?
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?;
        Ok(self.net.cls(&x)?)
    }
}

/// PIL BICUBIC resize of each image to `size x size`, uint8 output, as f32
/// `[N, 3, size, size]` on the host.
pub fn pil_bicubic(images: &Tensor, size: usize) -> Result<Tensor, FeatureError> {
    let (n, h, w) = check_images(images)?;
    // HWC uint8 per image, as PIL holds it.
    let hwc = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let per = h * w * 3;
    let out: Vec<u8> = hwc
        .par_chunks(per)
        .flat_map_iter(|px| {
            let img = image::RgbImage::from_raw(w as u32, h as u32, px.to_vec())
                .unwrap_or_else(|| image::RgbImage::new(w as u32, h as u32));
            resize(&img, size as u32, size as u32, Filter::Bicubic).into_raw()
        })
        .collect();
    Ok(Tensor::from_vec(out, (n, size, size, 3), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .to_dtype(DType::F32)?)
}
