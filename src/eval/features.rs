//! The pixel side: the [`ImageFeatures`] trait the feature networks
//! (Inception-v3 for FID/sFID/IS/P&R, DINOv2-L for FD-DINOv2) plug into,
//! image sources (ADM `.npz`, image folders) streamed in batches, and the
//! per-set accumulation of their features.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::{EvalError, Moments, npz};
use crate::generate::{Rounding, StreamOptions, decode_stream};
use crate::models::RaeDecoder;
use crate::progress::Progress;
use crate::shards::LatentStats;

/// A batch of RGB8 images, NHWC, row-major.
#[derive(Debug, Clone, Copy)]
pub struct ImageBatch<'a> {
    /// `n * height * width * 3` bytes.
    pub pixels: &'a [u8],
    /// Images.
    pub n: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

/// Features of one batch, `n x dim` row-major each; which are present
/// depends on the network.
#[derive(Debug, Clone, Default)]
pub struct FeatureBatch {
    /// Global features: Inception `pool_3` (2048) or the DINOv2 CLS (1024).
    pub pool: Option<Vec<f32>>,
    /// Inception `mixed_6/conv` first 7 channels, (h, w, c) order (2023).
    pub spatial: Option<Vec<f32>>,
    /// Inception logits **without bias** (`pool_3 @ softmax/weights`, 1008),
    /// what ADM's IS takes the softmax of.
    pub logits: Option<Vec<f32>>,
}

/// A feature network as the evaluation sees it.
pub trait ImageFeatures {
    /// Extractor id recorded in reports, e.g. `inception-2015-12-05`.
    fn id(&self) -> String;
    /// Provenance recorded with the numbers: weights file and sha256,
    /// resize mode, normalisation, precision.
    fn provenance(&self) -> serde_json::Value;
    /// Features of a batch of uint8 images (any size: the network resizes
    /// as its protocol says).
    fn extract(&mut self, batch: &ImageBatch<'_>) -> Result<FeatureBatch, EvalError>;
}

/// Where images come from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// An ADM-style `.npz` (`arr_0` uint8 `[N,H,W,3]`).
    Npz(PathBuf),
    /// Image files (sorted), all of one size.
    Files(Vec<PathBuf>),
    /// Latent shards decoded in-process, through the pixel path of
    /// `decode` (no files written).
    Decoded {
        /// The shard files, in order.
        shards: Vec<PathBuf>,
        /// De-normalises shards written normalised.
        stats: Option<LatentStats>,
        /// The decoder and its byte conversion.
        decoder: Arc<SampleDecoder>,
    },
}

/// The decoder that turns sample shards into images for the pixel metrics.
#[derive(Debug)]
pub struct SampleDecoder {
    /// The RAE decoder.
    pub decoder: RaeDecoder,
    /// Where it runs.
    pub device: Device,
    /// Float -> byte (`decode --rounding`; the reference truncates).
    pub rounding: Rounding,
    /// Latent statistics that de-normalise shards `sample` wrote
    /// normalised, when the sample directory has none of its own.
    pub stats: Option<LatentStats>,
    /// Recorded in reports: checkpoint, config, rounding.
    pub provenance: serde_json::Value,
}

impl ImageSource {
    /// A `.npz` file or a folder of images (listed recursively, sorted).
    pub fn open(path: &Path) -> Result<Self, EvalError> {
        if path.is_file() {
            return Ok(ImageSource::Npz(path.to_path_buf()));
        }
        let d =
            crate::images::discover(path).map_err(|e| EvalError::format(path, e.to_string()))?;
        if d.entries.is_empty() {
            return Err(EvalError::format(path, "no images found"));
        }
        Ok(ImageSource::Files(
            d.entries.into_iter().map(|e| e.path).collect(),
        ))
    }

    /// A description for reports.
    pub fn describe(&self) -> serde_json::Value {
        match self {
            ImageSource::Npz(p) => {
                serde_json::json!({"kind": "npz", "path": p.display().to_string()})
            }
            ImageSource::Files(v) => serde_json::json!({"kind": "image-folder", "files": v.len()}),
            ImageSource::Decoded {
                shards, decoder, ..
            } => serde_json::json!({
                "kind": "decoded-shards", "shards": shards.len(), "decoder": decoder.provenance,
            }),
        }
    }

    /// Number of images (at most `limit`).
    pub fn len(&self, limit: Option<usize>) -> Result<usize, EvalError> {
        let n = match self {
            ImageSource::Npz(p) => npz::image_shape(p)?.0,
            ImageSource::Files(v) => v.len(),
            ImageSource::Decoded { shards, .. } => {
                crate::generate::decode_run::stream_rows(shards, None)?
            }
        };
        Ok(limit.map_or(n, |l| l.min(n)))
    }

    /// Streams the images in order, `batch` at a time.
    pub fn for_each_batch(
        &self,
        batch: usize,
        limit: Option<usize>,
        f: &mut dyn FnMut(&ImageBatch<'_>) -> Result<(), EvalError>,
    ) -> Result<usize, EvalError> {
        match self {
            ImageSource::Npz(p) => npz::for_each_image_batch(p, batch, limit, |px, n, h, w| {
                f(&ImageBatch {
                    pixels: px,
                    n,
                    height: h,
                    width: w,
                })
            }),
            ImageSource::Files(files) => {
                let files = &files[..limit.map_or(files.len(), |l| l.min(files.len()))];
                let opts = crate::images::DecodeOptions::default();
                let mut size = None;
                for chunk in files.chunks(batch.max(1)) {
                    let mut px = Vec::new();
                    for p in chunk {
                        let img = crate::images::decode_rgb8(p, &opts)
                            .map_err(|e| EvalError::format(p, e.to_string()))?;
                        let s = (img.height() as usize, img.width() as usize);
                        if *size.get_or_insert(s) != s {
                            return Err(EvalError::format(
                                p,
                                format!(
                                    "image is {}x{}, the first was {}x{}: sizes must match",
                                    s.1,
                                    s.0,
                                    size.unwrap_or(s).1,
                                    size.unwrap_or(s).0
                                ),
                            ));
                        }
                        px.extend_from_slice(img.as_raw());
                    }
                    let (h, w) = size.unwrap_or((0, 0));
                    f(&ImageBatch {
                        pixels: &px,
                        n: chunk.len(),
                        height: h,
                        width: w,
                    })?;
                }
                Ok(files.len())
            }
            ImageSource::Decoded {
                shards,
                stats,
                decoder,
            } => {
                let opts = StreamOptions {
                    batch_size: batch.max(1),
                    limit,
                    rounding: decoder.rounding,
                    stats: stats.clone(),
                };
                decode_stream(&decoder.decoder, shards, &opts, &decoder.device, |d| {
                    f(&ImageBatch {
                        pixels: d.pixels,
                        n: d.keys.len(),
                        height: d.height,
                        width: d.width,
                    })
                })
            }
        }
    }
}

/// The features of one image set, accumulated.
pub struct FeatureSet {
    /// Statistics of `pool`.
    pub pool: Option<Moments>,
    /// Statistics of `spatial`.
    pub spatial: Option<Moments>,
    /// The `pool` rows (for precision/recall), when kept.
    pub pool_rows: Option<Vec<f32>>,
    /// The logits (for IS), when kept, with their width.
    pub logits: Option<(Vec<f32>, usize)>,
    /// Images seen.
    pub images: usize,
}

/// What to keep of each batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    /// `pool` statistics.
    pub pool_stats: bool,
    /// `spatial` statistics.
    pub spatial_stats: bool,
    /// `pool` rows.
    pub pool_rows: bool,
    /// logits.
    pub logits: bool,
}

fn need<'a>(what: &str, v: &'a Option<Vec<f32>>, n: usize) -> Result<&'a [f32], EvalError> {
    let v = v.as_deref().ok_or_else(|| {
        EvalError::Invalid(format!("the feature network gives no {what} features"))
    })?;
    if n == 0 || v.len() % n != 0 {
        return Err(EvalError::Invalid(format!(
            "{what}: {} values for {n} images",
            v.len()
        )));
    }
    Ok(v)
}

/// Runs `net` over `source` and accumulates what `keep` says.
pub fn extract(
    source: &ImageSource,
    net: &mut dyn ImageFeatures,
    keep: Keep,
    batch: usize,
    limit: Option<usize>,
    progress: &mut dyn Progress,
) -> Result<FeatureSet, EvalError> {
    progress.start(source.len(limit)? as u64);
    let mut set = FeatureSet {
        pool: None,
        spatial: None,
        pool_rows: None,
        logits: None,
        images: 0,
    };
    source.for_each_batch(batch, limit, &mut |b| {
        let f = net.extract(b)?;
        let n = b.n;
        if keep.pool_stats || keep.pool_rows {
            let pool = need("pool", &f.pool, n)?;
            if keep.pool_stats {
                set.pool
                    .get_or_insert_with(|| Moments::new(pool.len() / n))
                    .push("pool features", pool)?;
            }
            if keep.pool_rows {
                super::check_finite("pool features", pool, pool.len() / n)?;
                set.pool_rows
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(pool);
            }
        }
        if keep.spatial_stats {
            let sp = need("spatial", &f.spatial, n)?;
            set.spatial
                .get_or_insert_with(|| Moments::new(sp.len() / n))
                .push("spatial features", sp)?;
        }
        if keep.logits {
            let l = need("logits", &f.logits, n)?;
            set.logits
                .get_or_insert_with(|| (Vec::new(), l.len() / n))
                .0
                .extend_from_slice(l);
        }
        set.images += n;
        progress.advance(n as u64);
        Ok(())
    })?;
    progress.finish();
    Ok(set)
}
