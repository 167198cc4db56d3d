//! Reconstruction metrics of a decoder (`eval-recon`), as RAE reports them
//! (`src/eval/__init__.py::compute_reconstruction_metrics`): originals and
//! reconstructions are both uint8 images (the reconstruction through the
//! pixel path of `decode`: clamp, `* 255`, truncation), then
//!
//! * PSNR and SSIM on `x / 255` ([`super::recon`]), per image, averaged;
//! * LPIPS with the decoder-training network ([`crate::stage1::Lpips`],
//!   VGG16 + v0.1 heads) on `x / 255 * 2 - 1`, per image, averaged;
//! * rFID: the FD of Inception `pool_3` statistics of the reconstructions
//!   against those of the originals (torch-fidelity's two-set FID).
//!
//! The pairs come from a round trip encode -> decode over an image folder
//! ([`round_trip_images`]) or from decoding a cache's latents against the
//! images it was built from ([`cache_pairs`]).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::features::{ImageBatch, ImageFeatures};
use super::recon::{SsimBorder, psnr_per_image, ssim_per_image};
use super::{EvalError, Moments, frechet_distance};
use crate::encoders::{Encoder, crops_to_u8, u8_to_input};
use crate::generate::decode_run::{StreamOptions, decode_stream, to_bytes};
use crate::generate::{Rounding, resolve_shards};
use crate::images::{DecodeOptions, load_crop};
use crate::models::RaeDecoder;
use crate::progress::Progress;
use crate::shards::Manifest;
use crate::shards::manifest::MANIFEST_FILE;
use crate::stage1::Lpips;

/// A reconstruction metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReconMetric {
    /// PSNR (dB), per image on [0, 1], averaged.
    Psnr,
    /// SSIM (torchmetrics defaults), per image, averaged.
    Ssim,
    /// LPIPS (VGG16, v0.1 heads), per image, averaged.
    Lpips,
    /// FID of the reconstructions against the originals.
    Rfid,
}

/// The networks the metrics may need.
#[derive(Default)]
pub struct ReconNets<'a> {
    /// Inception-v3 for rFID.
    pub inception: Option<&'a mut dyn ImageFeatures>,
    /// LPIPS and the device its inputs go to.
    pub lpips: Option<(&'a Lpips, Device)>,
}

/// The metrics of a set of pairs.
#[derive(Debug, Clone, Serialize)]
pub struct ReconReport {
    /// Image pairs.
    pub images: usize,
    /// Image side (height, width).
    pub size: (usize, usize),
    /// Mean PSNR (dB).
    pub psnr: Option<f64>,
    /// Mean SSIM.
    pub ssim: Option<f64>,
    /// Mean LPIPS.
    pub lpips: Option<f64>,
    /// FD of reconstructions vs originals (Inception pool_3).
    pub rfid: Option<f64>,
}

/// Per-pair values and feature statistics, accumulated batch by batch.
pub struct ReconAccumulator {
    metrics: Vec<ReconMetric>,
    psnr: Vec<f64>,
    ssim: Vec<f64>,
    lpips: Vec<f64>,
    originals: Option<Moments>,
    recons: Option<Moments>,
    size: Option<(usize, usize)>,
}

/// `[n, 3, H, W]` f32 `x / 255` from NHWC bytes (torchvision's `to_tensor`).
fn unit_nchw(b: &ImageBatch<'_>) -> Vec<f32> {
    let plane = b.height * b.width;
    let mut out = vec![0f32; b.pixels.len()];
    for (i, img) in b.pixels.chunks_exact(plane * 3).enumerate() {
        let o = &mut out[i * plane * 3..(i + 1) * plane * 3];
        for (p, px) in img.chunks_exact(3).enumerate() {
            for c in 0..3 {
                o[c * plane + p] = px[c] as f32 / 255.0;
            }
        }
    }
    out
}

fn pool_moments(
    m: &mut Option<Moments>,
    net: &mut dyn ImageFeatures,
    b: &ImageBatch<'_>,
) -> Result<(), EvalError> {
    let f = net.extract(b)?;
    let pool = f
        .pool
        .ok_or_else(|| EvalError::Invalid("the feature network gives no pool features".into()))?;
    m.get_or_insert_with(|| Moments::new(pool.len() / b.n.max(1)))
        .push("pool features", &pool)
}

fn lpips_values(
    lp: &Lpips,
    device: &Device,
    x: &[f32],
    y: &[f32],
    dims: (usize, usize, usize),
) -> Result<Vec<f64>, EvalError> {
    let err = |e: String| EvalError::Invalid(format!("LPIPS: {e}"));
    let (n, h, w) = dims;
    let t = |v: &[f32]| {
        Tensor::from_slice(v, (n, 3, h, w), device)
            .and_then(|t| (t * 2.0)? - 1.0)
            .map_err(|e| err(e.to_string()))
    };
    let d = lp
        .forward_per_sample(&t(x)?, &t(y)?)
        .map_err(|e| err(e.to_string()))?;
    let v: Vec<f32> = d.to_vec1().map_err(|e| err(e.to_string()))?;
    Ok(v.into_iter().map(f64::from).collect())
}

impl ReconAccumulator {
    /// An empty accumulator for `metrics`.
    pub fn new(metrics: &[ReconMetric]) -> Self {
        Self {
            metrics: metrics.to_vec(),
            psnr: Vec::new(),
            ssim: Vec::new(),
            lpips: Vec::new(),
            originals: None,
            recons: None,
            size: None,
        }
    }

    /// Add a batch of pairs (same count and size on both sides).
    pub fn push(
        &mut self,
        original: &ImageBatch<'_>,
        recon: &ImageBatch<'_>,
        nets: &mut ReconNets<'_>,
    ) -> Result<(), EvalError> {
        let dims = (original.n, original.height, original.width);
        if dims != (recon.n, recon.height, recon.width) {
            return Err(EvalError::Invalid(format!(
                "reconstructions are {}x{}x{}, the originals {}x{}x{} (n, height, width)",
                recon.n, recon.height, recon.width, dims.0, dims.1, dims.2
            )));
        }
        if *self.size.get_or_insert((dims.1, dims.2)) != (dims.1, dims.2) {
            return Err(EvalError::Invalid(
                "image sizes change between batches".into(),
            ));
        }
        let (x, y) = (unit_nchw(original), unit_nchw(recon));
        let has = |m| self.metrics.contains(&m);
        if has(ReconMetric::Psnr) {
            self.psnr.extend(psnr_per_image(&x, &y, dims.0)?);
        }
        if has(ReconMetric::Ssim) {
            let chw = (3, dims.1, dims.2);
            self.ssim
                .extend(ssim_per_image(&x, &y, dims.0, chw, SsimBorder::Full)?);
        }
        if has(ReconMetric::Lpips) {
            let (lp, dev) = nets.lpips.as_ref().ok_or_else(|| no_net("LPIPS"))?;
            self.lpips.extend(lpips_values(lp, dev, &x, &y, dims)?);
        }
        if has(ReconMetric::Rfid) {
            let net = nets
                .inception
                .as_deref_mut()
                .ok_or_else(|| no_net("Inception-v3"))?;
            pool_moments(&mut self.originals, net, original)?;
            pool_moments(&mut self.recons, net, recon)?;
        }
        Ok(())
    }

    /// The means and the rFID.
    pub fn finish(self) -> Result<ReconReport, EvalError> {
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let rfid = match (self.originals, self.recons) {
            (Some(a), Some(b)) => Some(frechet_distance(
                &b.finish("reconstructions")?,
                &a.finish("originals")?,
            )?),
            _ => None,
        };
        let images = self.psnr.len().max(self.ssim.len()).max(self.lpips.len());
        Ok(ReconReport {
            images,
            size: self.size.unwrap_or((0, 0)),
            psnr: mean(&self.psnr),
            ssim: mean(&self.ssim),
            lpips: mean(&self.lpips),
            rfid,
        })
    }
}

fn no_net(what: &str) -> EvalError {
    EvalError::Invalid(format!(
        "the {what} network is needed for the metrics asked"
    ))
}

/// The decoder side of a reconstruction: model, device, byte conversion.
pub struct Reconstructor<'a> {
    /// The RAE decoder.
    pub decoder: &'a RaeDecoder,
    /// Where the models run.
    pub device: &'a Device,
    /// Float -> byte (the reference truncates).
    pub rounding: Rounding,
}

fn size_check(decoder: &RaeDecoder, crop: usize, what: &str) -> Result<(), EvalError> {
    let side = decoder.config().image_size();
    if side != crop {
        return Err(EvalError::Invalid(format!(
            "the decoder makes {side}x{side} images, {what} {crop}x{crop} crops: they cannot be compared"
        )));
    }
    Ok(())
}

/// A batch of one size-`side` image per row: NHWC bytes.
fn batch(pixels: &[u8], side: usize) -> ImageBatch<'_> {
    ImageBatch {
        pixels,
        n: pixels.len() / (side * side * 3).max(1),
        height: side,
        width: side,
    }
}

/// Round trip over image `files` (ADM center crop to the encoder's crop
/// size, as `build`): encode, decode, and hand each batch of (originals,
/// reconstructions) to `f`. Returns the images done.
pub fn round_trip_images(
    files: &[PathBuf],
    encoder: &dyn Encoder,
    rec: &Reconstructor<'_>,
    batch_size: usize,
    progress: &mut dyn Progress,
    f: &mut dyn FnMut(&ImageBatch<'_>, &ImageBatch<'_>) -> Result<(), EvalError>,
) -> Result<usize, EvalError> {
    let spec = encoder.spec();
    let dc = rec.decoder.config();
    if (spec.tokens, spec.channels) != (dc.num_patches, dc.latent_dim) {
        return Err(EvalError::Invalid(format!(
            "the encoder gives [{}, {}] latents, the decoder takes [{}, {}] (tokens, channels)",
            spec.tokens, spec.channels, dc.num_patches, dc.latent_dim
        )));
    }
    let side = spec.crop_size;
    size_check(rec.decoder, side, "the encoder takes")?;
    let cerr = |e: candle_core::Error| EvalError::Invalid(format!("round trip: {e}"));
    progress.start(files.len() as u64);
    for chunk in files.chunks(batch_size.max(1)) {
        let crops = chunk
            .iter()
            .map(|p| {
                load_crop(p, side as u32, &DecodeOptions::default())
                    .map_err(|e| EvalError::format(p, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&image::RgbImage> = crops.iter().collect();
        let enc = |e: crate::encoders::EncoderError| EvalError::Invalid(format!("encoder: {e}"));
        let input =
            u8_to_input(&crops_to_u8(&refs, rec.device).map_err(enc)?, &[false]).map_err(enc)?;
        let z = encoder.encode(&input).map_err(enc)?;
        let px = rec
            .decoder
            .forward(&z)
            .and_then(|p| {
                p.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()
            })
            .map_err(cerr)?;
        let recon = to_bytes(&px, side, side, rec.rounding).concat();
        let orig: Vec<u8> = crops
            .iter()
            .flat_map(|c| c.as_raw().iter().copied())
            .collect();
        f(&batch(&orig, side), &batch(&recon, side))?;
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    Ok(files.len())
}

/// Decode the latents of `cache` (through `decode`'s pixel path) and pair
/// each row with its source image under `images` (default: the manifest's
/// dataset root), ADM center-cropped to the cache's crop size and mirrored
/// for flipped rows. Returns the pairs done.
pub fn cache_pairs(
    cache: &Path,
    images: Option<&Path>,
    rec: &Reconstructor<'_>,
    opts: (usize, Option<usize>),
    progress: &mut dyn Progress,
    f: &mut dyn FnMut(&ImageBatch<'_>, &ImageBatch<'_>) -> Result<(), EvalError>,
) -> Result<usize, EvalError> {
    let mpath = cache.join(MANIFEST_FILE);
    let manifest = Manifest::load(&mpath)?;
    let root = images.map_or_else(|| PathBuf::from(&manifest.dataset_root), Path::to_path_buf);
    let side = manifest.encoder.crop_size;
    size_check(rec.decoder, side, "the cache was built from")?;
    let shards = resolve_shards(cache)?;
    let (batch_size, limit) = opts;
    let so = StreamOptions {
        batch_size,
        limit,
        rounding: rec.rounding,
        stats: None,
    };
    progress.start(crate::generate::decode_run::stream_rows(&shards, limit)? as u64);
    let n = decode_stream(rec.decoder, &shards, &so, rec.device, |d| {
        let mut orig = Vec::with_capacity(d.pixels.len());
        for (key, &flip) in d.keys.iter().zip(d.flips) {
            let p = root.join(key);
            let mut c = load_crop(&p, side as u32, &DecodeOptions::default()).map_err(|e| {
                EvalError::format(
                    &p,
                    format!("{e} (the cache's source image; --images DIR to point elsewhere)"),
                )
            })?;
            if flip {
                c = image::imageops::flip_horizontal(&c);
            }
            orig.extend_from_slice(c.as_raw());
        }
        f(&batch(&orig, side), &batch(d.pixels, side))?;
        progress.advance(d.keys.len() as u64);
        Ok::<(), EvalError>(())
    })?;
    progress.finish();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_nchw_is_planar_over_255() {
        let px = [0u8, 255, 51, 102, 0, 255];
        let b = ImageBatch {
            pixels: &px,
            n: 1,
            height: 1,
            width: 2,
        };
        assert_eq!(unit_nchw(&b), vec![0.0, 0.4, 1.0, 0.0, 0.2, 1.0]);
    }

    #[test]
    fn identical_pairs_hit_the_psnr_clamp_and_ssim_one() {
        let px: Vec<u8> = (0..2 * 12 * 12 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let b = ImageBatch {
            pixels: &px,
            n: 2,
            height: 12,
            width: 12,
        };
        let mut acc = ReconAccumulator::new(&[ReconMetric::Psnr, ReconMetric::Ssim]);
        acc.push(&b, &b, &mut ReconNets::default()).unwrap();
        let r = acc.finish().unwrap();
        assert!((r.psnr.unwrap() - 100.0).abs() < 1e-9);
        assert!((r.ssim.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(r.images, 2);
        // LPIPS without its network is an error, not a silent skip
        let mut acc = ReconAccumulator::new(&[ReconMetric::Lpips]);
        assert!(acc.push(&b, &b, &mut ReconNets::default()).is_err());
    }
}
