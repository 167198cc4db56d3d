//! `train-decoder --online-encoder`: the reference's data recipe
//! (`train_stage1.py`): each image resized so its shorter side is 1.5x the
//! crop (torchvision `Resize(384, BICUBIC)` on a PIL image: Pillow's
//! antialiased bicubic, the long side `int(384 * long / short)`), then a
//! random `crop` x `crop` window (`RandomCrop(256)`, no flip), then the
//! frozen encoder on that crop for the latent; the crop itself is the target.
//!
//! Deterministic from the seed: the order of epoch `e` is a permutation
//! drawn from (seed, e), the crop offsets of each sample from (seed, sample
//! id), so the loader cursor (epoch, step in epoch) is all a resumed run
//! needs. Whole steps only (`drop_last`): `steps_per_epoch = n / (B * W)`.
//! Rank `r` of `W` takes the `r`-th `B` of each global batch.

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::targets::TargetImages;
use super::{Result, Stage1Error};
use crate::encoders::Encoder;
use crate::images::resample::{Filter, resize_rgb8_window};
use crate::train::checkpoint::LoaderCursor;
use crate::train::loader::sample_seed;

/// `sample_seed` stream of the crop offsets (0-2 are the trainers' and the
/// noise's).
const CROP_STREAM: u64 = 3;
/// `sample_seed` stream of the epoch permutations (indexed by epoch).
const ORDER_STREAM: u64 = 4;

/// The size torchvision's `Resize(short)` gives a `w` x `h` image:
/// the shorter side becomes `short`, the longer `int(short * long / short_in)`
/// (truncated, Python float division).
pub fn resized_size(w: usize, h: usize, short: usize) -> (usize, usize) {
    let (s, l) = if w <= h { (w, h) } else { (h, w) };
    let long = ((short * l) as f64 / s.max(1) as f64) as usize;
    if w <= h { (short, long) } else { (long, short) }
}

/// The `crop` x `crop` window at (`top`, `left`) of `img` resized as
/// [`resized_size`] (Pillow bicubic; only the window is computed, the bytes
/// are those of cropping the full resize).
pub fn resized_crop(
    img: &RgbImage,
    short: usize,
    crop: usize,
    top: usize,
    left: usize,
) -> RgbImage {
    let (w, h) = resized_size(img.width() as usize, img.height() as usize, short);
    let buf = resize_rgb8_window(
        img,
        w,
        h,
        Filter::Bicubic,
        left..left + crop,
        top..top + crop,
    );
    RgbImage::from_raw(crop as u32, crop as u32, buf)
        .unwrap_or_else(|| RgbImage::new(crop as u32, crop as u32))
}

/// One sample's `(top, left)`, uniform over the valid offsets of a `w` x
/// `h` resized image, from its own stream.
pub fn crop_offsets(seed: u64, sample: u64, w: usize, h: usize, crop: usize) -> (usize, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(seed, sample, CROP_STREAM));
    let top = rng.random_range(0..=h.saturating_sub(crop));
    let left = rng.random_range(0..=w.saturating_sub(crop));
    (top, left)
}

/// The order of epoch `epoch` over `n` images (Fisher-Yates from its own
/// stream).
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(seed, epoch, ORDER_STREAM));
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// One batch of the online recipe.
#[derive(Debug)]
pub struct OnlineBatch {
    /// The crops `[B, 3, crop, crop]` in [0, 1] (the targets).
    pub images: Tensor,
    /// The encoder's raw latents of those crops `[B, T, C]`.
    pub z: Tensor,
    /// Image keys.
    pub keys: Vec<String>,
    /// `(top, left)` of each crop in the resized image.
    pub offsets: Vec<(usize, usize)>,
    /// Sample ids (seeds of the per-sample noise).
    pub sample_ids: Vec<u64>,
    /// The step this batch belongs to (resume from [`OnlineData::cursor`]).
    pub cursor: LoaderCursor,
}

/// Images, the frozen encoder and the position in the data.
pub struct OnlineData {
    images: TargetImages,
    keys: Vec<String>,
    encoder: Box<dyn Encoder>,
    crop: usize,
    short: usize,
    seed: u64,
    batch_size: usize,
    rank: usize,
    world_size: usize,
    cursor: LoaderCursor,
    order: Option<(u64, Vec<u32>)>,
}

/// Where and how an [`OnlineData`] reads.
#[derive(Debug, Clone, Copy)]
pub struct OnlineConfig {
    /// Seed of the order and the crops.
    pub seed: u64,
    /// Per-rank batch size.
    pub batch_size: usize,
    /// This process's rank.
    pub rank: usize,
    /// Ranks.
    pub world_size: usize,
}

impl OnlineData {
    /// The images of `images` (all of them, in its listing order) encoded
    /// by `encoder` on crops of its crop size, from `cursor`.
    pub fn new(
        images: TargetImages,
        encoder: Box<dyn Encoder>,
        cfg: OnlineConfig,
        cursor: LoaderCursor,
    ) -> Result<Self> {
        let keys = images.keys()?;
        let crop = encoder.spec().crop_size;
        let data = Self {
            images,
            keys,
            encoder,
            crop,
            // the reference: 384 for 256, else int(1.5 * size)
            short: crop * 3 / 2,
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            rank: cfg.rank,
            world_size: cfg.world_size.max(1),
            cursor,
            order: None,
        };
        if data.steps_per_epoch() == 0 {
            return Err(Stage1Error::Invalid(format!(
                "{}: {} images, fewer than one batch of {} x {} ranks",
                data.images.root().display(),
                data.keys.len(),
                cfg.batch_size,
                data.world_size
            )));
        }
        Ok(data)
    }

    /// Images in the source.
    pub fn num_images(&self) -> usize {
        self.keys.len()
    }

    /// Whole global batches per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.keys.len() / (self.batch_size * self.world_size).max(1)
    }

    /// Where the next batch starts.
    pub fn cursor(&self) -> LoaderCursor {
        self.cursor
    }

    /// The encoder.
    pub fn encoder(&self) -> &dyn Encoder {
        self.encoder.as_ref()
    }

    /// Crop side (the encoder's crop size, the decoder's output size).
    pub fn crop_size(&self) -> usize {
        self.crop
    }

    /// The next batch of this rank; the cursor moves to the next step.
    pub fn next_batch(&mut self, device: &Device) -> Result<OnlineBatch> {
        let cursor = self.cursor;
        let n = self.keys.len();
        if self.order.as_ref().is_none_or(|(e, _)| *e != cursor.epoch) {
            self.order = Some((cursor.epoch, epoch_order(self.seed, cursor.epoch, n)));
        }
        let order = &self.order.as_ref().expect("set above").1;
        let first = (cursor.step_in_epoch as usize * self.world_size + self.rank) * self.batch_size;
        let picks: Vec<(usize, u64)> = (first..first + self.batch_size)
            .map(|p| (order[p] as usize, cursor.epoch * n as u64 + p as u64))
            .collect();
        let crops: Vec<(RgbImage, (usize, usize))> = picks
            .par_iter()
            .map(|&(i, id)| self.sample(&self.keys[i], id))
            .collect::<Result<_>>()?;
        let refs: Vec<&RgbImage> = crops.iter().map(|(c, _)| c).collect();
        let images = crate::encoders::crops_to_tensor(&refs, false, device).map_err(enc_err)?;
        let z = self.encoder.encode(&images).map_err(enc_err)?.detach();
        let mut next = cursor;
        next.step_in_epoch += 1;
        if next.step_in_epoch as usize >= self.steps_per_epoch() {
            next = LoaderCursor {
                epoch: cursor.epoch + 1,
                step_in_epoch: 0,
            };
        }
        self.cursor = next;
        Ok(OnlineBatch {
            images,
            z,
            keys: picks.iter().map(|&(i, _)| self.keys[i].clone()).collect(),
            offsets: crops.iter().map(|(_, o)| *o).collect(),
            sample_ids: picks.iter().map(|&(_, id)| id).collect(),
            cursor,
        })
    }

    /// Decode, resize, crop one sample.
    fn sample(&self, key: &str, id: u64) -> Result<(RgbImage, (usize, usize))> {
        let img = self.images.decode(key)?;
        let (w, h) = resized_size(img.width() as usize, img.height() as usize, self.short);
        let (top, left) = crop_offsets(self.seed, id, w, h, self.crop);
        Ok((
            resized_crop(&img, self.short, self.crop, top, left),
            (top, left),
        ))
    }

    /// The ADM center crops of the first `count` images and their latents
    /// (the previews' fixed batch, as the reference evaluates).
    pub fn center_batch(&self, count: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let count = count.clamp(1, self.keys.len());
        let crops: Vec<RgbImage> = self.keys[..count]
            .par_iter()
            .map(|k| {
                Ok(crate::images::adm_center_crop(
                    &self.images.decode(k)?,
                    self.crop as u32,
                ))
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&RgbImage> = crops.iter().collect();
        let images = crate::encoders::crops_to_tensor(&refs, false, device).map_err(enc_err)?;
        let z = self.encoder.encode(&images).map_err(enc_err)?.detach();
        Ok((z, images))
    }
}

fn enc_err(e: crate::encoders::EncoderError) -> Stage1Error {
    Stage1Error::Invalid(format!("encoder: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision `Resize(384)`: shorter side 384, the other truncated.
    #[test]
    fn resized_size_is_torchvisions() {
        assert_eq!(resized_size(500, 375, 384), (512, 384));
        assert_eq!(resized_size(375, 500, 384), (384, 512));
        assert_eq!(resized_size(256, 256, 384), (384, 384));
        // 384 * 333 / 250 = 511.488 -> 511
        assert_eq!(resized_size(333, 250, 384), (511, 384));
    }

    #[test]
    fn offsets_cover_the_range_and_orders_are_permutations() {
        let mut seen_top = std::collections::BTreeSet::new();
        for id in 0..400 {
            let (t, l) = crop_offsets(1, id, 260, 258, 256);
            assert!(t <= 2 && l <= 4);
            seen_top.insert(t);
        }
        assert_eq!(seen_top.len(), 3);
        let o = epoch_order(3, 0, 50);
        let mut s = o.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<u32>>());
        assert_ne!(o, epoch_order(3, 1, 50));
        assert_eq!(o, epoch_order(3, 0, 50));
    }
}
