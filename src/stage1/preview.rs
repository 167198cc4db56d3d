//! A fixed batch of the cache reconstructed every N steps by the EMA
//! decoder (no noise, as the reference evaluates): a PNG of
//! original | reconstruction pairs and the mean PSNR on [0, 1] pixels (per
//! image `20 log10(1 / sqrt(MSE))`, MSE at least 1e-10, then the mean, as
//! the reference's `ref_iqa`). The batch comes from the training data: the
//! cache has no held-out split.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::targets::TargetImages;
use super::{Result, Stage1Error};
use crate::generate::pixels::{Rounding, chw_to_hwc_u8, grid};
use crate::models::{DecoderConfig, RaeDecoder};
use crate::train::loader::{CacheSet, Loader, LoaderConfig};

/// Where the previews go inside the run directory.
pub const PREVIEW_DIR: &str = "previews";

/// The fixed batch: raw latents and their target crops.
pub struct Preview {
    z: Tensor,
    images: Tensor,
    dir: PathBuf,
}

impl Preview {
    /// The first `count` samples of the data order for `seed` (epoch 0).
    pub fn new(
        set: &CacheSet,
        targets: &TargetImages,
        count: usize,
        seed: u64,
        run_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let count = count.min(set.num_images()).max(1);
        let cfg = LoaderConfig {
            batch_size: count,
            seed,
            workers: 1,
            prefetch: 1,
            raw: true,
            ..Default::default()
        };
        let mut loader = Loader::new(set, &cfg, Default::default(), device)?;
        let b = loader.next_batch()?;
        Ok(Self {
            z: b.x.flatten_from(2)?.transpose(1, 2)?.contiguous()?,
            images: targets.load(&b.keys, &b.flips, device)?,
            dir: run_dir.join(PREVIEW_DIR),
        })
    }

    /// A given batch: raw latents `[B, T, C]` and their target crops.
    pub fn from_batch(z: Tensor, images: Tensor, run_dir: &Path) -> Self {
        Self {
            z,
            images,
            dir: run_dir.join(PREVIEW_DIR),
        }
    }

    /// Reconstruct with `weights` (reference names), write
    /// `previews/step-NNNNNNNN.png`, return the mean PSNR.
    pub fn run(
        &self,
        cfg: &DecoderConfig,
        weights: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<f64> {
        let dev = self.z.device().clone();
        let map: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut dec = RaeDecoder::new(cfg, VarBuilder::from_tensors(map, DType::F32, &dev))?;
        dec.set_fused(true);
        let recon = dec.forward(&self.z)?.clamp(0f32, 1f32)?;
        let p = psnr(&recon, &self.images)?;
        let (n, _, h, w) = recon.dims4()?;
        let mut pairs = Vec::with_capacity(n);
        for i in 0..n {
            let a = self.images.get(i)?.flatten_all()?.to_vec1::<f32>()?;
            let r = recon.get(i)?.flatten_all()?.to_vec1::<f32>()?;
            let (a, r) = (
                chw_to_hwc_u8(&a, h, w, Rounding::Round),
                chw_to_hwc_u8(&r, h, w, Rounding::Round),
            );
            let mut pair = Vec::with_capacity(2 * a.len());
            for y in 0..h {
                pair.extend_from_slice(&a[y * w * 3..(y + 1) * w * 3]);
                pair.extend_from_slice(&r[y * w * 3..(y + 1) * w * 3]);
            }
            pairs.push(pair);
        }
        let (g, gw, gh) = grid(&pairs, h, 2 * w);
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Stage1Error::Invalid(format!("{}: {e}", self.dir.display())))?;
        let path = self.dir.join(format!("step-{step:08}.png"));
        let mut png = Vec::new();
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut png),
            &g,
            gw as u32,
            gh as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Stage1Error::Image {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::fsutil::write_atomic(&path, &png)
            .map_err(|e| Stage1Error::Invalid(format!("{}: {e}", path.display())))?;
        Ok(p)
    }
}

/// Mean over images of `20 log10(1 / sqrt(max(MSE, 1e-10)))` on [0, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let mse = (a - b)?.sqr()?.flatten_from(1)?.mean(1)?.to_vec1::<f32>()?;
    let sum: f64 = mse
        .iter()
        .map(|&m| -10.0 * (m as f64).max(1e-10).log10())
        .sum();
    Ok(sum / mse.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_of_known_errors() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3, 2, 2), DType::F32, &dev).unwrap();
        let b = Tensor::cat(
            &[
                Tensor::full(0.1f32, (1, 3, 2, 2), &dev).unwrap(),
                Tensor::full(0.01f32, (1, 3, 2, 2), &dev).unwrap(),
            ],
            0,
        )
        .unwrap();
        // MSE 1e-2 -> 20 dB, 1e-4 -> 40 dB
        assert!((psnr(&a, &b).unwrap() - 30.0).abs() < 1e-4);
    }
}
