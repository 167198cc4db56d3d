//! Training batches from one or more cache directories: epoch-wise
//! shuffling close to a global permutation with mostly sequential reads
//! (see [`plan`]), per-epoch random choice of the stored flip, data-parallel
//! slicing, background reading with bounded prefetch (see [`pipeline`]),
//! normalisation with the cache statistics, `[B, C, H, W]` on a device.

pub mod pipeline;
pub mod plan;
pub mod source;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use pipeline::{HostBatch, RowGroupSource};
pub use plan::{DataIndex, Loc, SampleRows, Sharding};
pub use source::CacheSet;

use super::checkpoint::LoaderCursor;
use super::{Result, TrainError};
use pipeline::{Pipeline, PipelineConfig};

/// Added to the variance before the square root, as the reference.
pub const NORM_EPS: f64 = 1e-5;

/// Settings of one rank's loader (see [`super::TrainConfig::loader`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    /// Per-rank micro-batch size.
    pub batch_size: usize,
    /// Seed of the shuffle, flip choice and noise (the run seed).
    pub seed: u64,
    /// Row groups per shuffle window.
    pub shuffle_window: usize,
    /// Reader threads.
    pub workers: usize,
    /// Batches prepared ahead.
    pub prefetch: usize,
    /// This process's data-parallel rank, `0..world_size`.
    pub rank: usize,
    /// Number of data-parallel processes; each rank reads a disjoint slice of each
    /// global batch.
    pub world_size: usize,
    /// Micro-batches per optimizer step (the global batch is
    /// `batch_size * world_size * accum`).
    pub accum: usize,
    /// Draw each sample's flow-matching noise in the loader's thread
    /// ([`Batch::noise`]), overlapping it with the training step.
    pub noise: bool,
    /// Hand out the stored latents as they are, without the statistics'
    /// normalisation (stage-1 decoder training decodes raw latents).
    pub raw: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            seed: 0,
            shuffle_window: 64,
            workers: 2,
            prefetch: 4,
            rank: 0,
            world_size: 1,
            accum: 1,
            noise: false,
            raw: false,
        }
    }
}

/// Derive the seed of one random stream of one sample; any change to any
/// input changes it. Stream 0: time and label dropout (drawn by the
/// trainer), stream 1: the noise.
pub fn sample_seed(seed: u64, sample: u64, stream: u64) -> u64 {
    let mut h = seed ^ 0x5851_F42D_4C95_7F2D;
    for x in [sample, stream] {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
    }
    h
}

/// `row` standard normals per sample (stream 1 of [`sample_seed`]),
/// samples in parallel, concatenated.
pub fn sample_noise(seed: u64, ids: &[u64], row: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; ids.len() * row];
    out.par_chunks_mut(row.max(1))
        .zip(ids.par_iter())
        .for_each(|(dst, &id)| {
            let mut r = crate::diffusion::NoiseRng::new(sample_seed(seed, id, 1));
            for v in dst.iter_mut() {
                *v = r.normal() as f32;
            }
        });
    out
}

/// A training batch on the device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised (raw with [`LoaderConfig::raw`]) latents `[B, C, H, W]`, f32.
    pub x: Tensor,
    /// Labels `[B]`, i64 (-1 where the cache has none).
    pub y: Tensor,
    /// The same labels on the host (reading `y` back would wait for the
    /// device).
    pub labels: Vec<i64>,
    /// Image keys (paths relative to the dataset root, as the shards store them).
    pub keys: Vec<String>,
    /// Whether each sample is the stored horizontally flipped latent.
    pub flips: Vec<bool>,
    /// Layout-independent sample names (seeds of per-sample noise).
    pub sample_ids: Vec<u64>,
    /// The samples' noise, shaped as `x`, when the loader draws it.
    pub noise: Option<Tensor>,
    /// The optimizer step of this micro-batch; resume from
    /// [`Loader::cursor`] after the step's last micro-batch.
    pub cursor: LoaderCursor,
    /// Which micro-batch of that step.
    pub micro: usize,
}

/// Per-element statistics of the latents, `[C, H, W]` each.
#[derive(Debug, Clone)]
pub struct Normalizer {
    /// Per-element mean `[C*H*W]`, channel-major.
    pub mean: Vec<f32>,
    /// Per-element variance `[C*H*W]`; the loader divides by `sqrt(var + NORM_EPS)`.
    pub var: Vec<f32>,
    /// C, the latent channels.
    pub channels: usize,
    /// H of the latent grid.
    pub height: usize,
    /// W of the latent grid.
    pub width: usize,
}

/// The infinite, resumable batch stream of one rank.
pub struct Loader {
    pipeline: Pipeline,
    mean: Tensor,
    std: Tensor,
    device: Device,
    dims: (usize, usize, usize),
    tokens: usize,
    steps_per_epoch: usize,
    accum: usize,
    next: LoaderCursor,
    raw: bool,
}

impl Loader {
    /// Open a stream over a cache set, starting at `start`.
    pub fn new(
        set: &CacheSet,
        cfg: &LoaderConfig,
        start: LoaderCursor,
        device: &Device,
    ) -> Result<Self> {
        Self::from_parts(
            set.index(),
            set.source(),
            set.normalizer().clone(),
            cfg,
            start,
            device,
        )
    }

    /// The same over any row-group source (tests, other storage).
    pub fn from_parts(
        index: Arc<DataIndex>,
        source: Arc<dyn RowGroupSource>,
        norm: Normalizer,
        cfg: &LoaderConfig,
        start: LoaderCursor,
        device: &Device,
    ) -> Result<Self> {
        if cfg.batch_size == 0
            || cfg.accum == 0
            || cfg.world_size == 0
            || cfg.rank >= cfg.world_size
        {
            return Err(TrainError::Config(format!(
                "batch size {} x accum {} / rank {} of world size {} is not a valid layout",
                cfg.batch_size, cfg.accum, cfg.rank, cfg.world_size
            )));
        }
        let (c, h, w) = (norm.channels, norm.height, norm.width);
        let n = c * h * w;
        if norm.mean.len() != n || norm.var.len() != n {
            return Err(TrainError::Config(format!(
                "statistics hold {} values, [C,H,W] = {n}",
                norm.mean.len()
            )));
        }
        let sharding = Sharding {
            batch: cfg.batch_size,
            rank: cfg.rank,
            world_size: cfg.world_size,
            accum: cfg.accum,
        };
        let steps_per_epoch = sharding.steps_per_epoch(index.samples.len());
        if start.step_in_epoch as usize >= steps_per_epoch.max(1) {
            return Err(TrainError::Config(format!(
                "cursor step {} is past the {steps_per_epoch} steps of an epoch (different global batch?)",
                start.step_in_epoch
            )));
        }
        let mean = Tensor::from_vec(norm.mean.clone(), (1, c, h, w), device)?;
        // f32 arithmetic, as the reference's torch.sqrt(var + 1e-5)
        let std: Vec<f32> = norm
            .var
            .iter()
            .map(|v| (v + NORM_EPS as f32).sqrt())
            .collect();
        let std = Tensor::from_vec(std, (1, c, h, w), device)?;
        let pcfg = PipelineConfig {
            seed: cfg.seed,
            sharding,
            window: cfg.shuffle_window.max(1),
            workers: cfg.workers.max(1),
            prefetch: cfg.prefetch.max(1),
            row_len: n,
            noise_seed: cfg.noise.then_some(cfg.seed),
        };
        let pipeline = Pipeline::start(index, source, pcfg, start)?;
        Ok(Self {
            pipeline,
            mean,
            std,
            device: device.clone(),
            dims: (c, h, w),
            tokens: h * w,
            steps_per_epoch,
            accum: cfg.accum,
            next: start,
            raw: cfg.raw,
        })
    }

    /// Optimizer steps (global batches) per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }

    /// The first optimizer step not yet fully read (what a checkpoint
    /// stores; checkpoints fall between optimizer steps).
    pub fn cursor(&self) -> LoaderCursor {
        self.next
    }

    /// The next micro-batch, normalised, on the device.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let hb = self.pipeline.next()?;
        let batch = self.to_device(hb)?;
        if batch.micro + 1 < self.accum {
            return Ok(batch);
        }
        self.next = if batch.cursor.step_in_epoch + 1 >= self.steps_per_epoch as u64 {
            LoaderCursor {
                epoch: batch.cursor.epoch + 1,
                step_in_epoch: 0,
            }
        } else {
            LoaderCursor {
                epoch: batch.cursor.epoch,
                step_in_epoch: batch.cursor.step_in_epoch + 1,
            }
        };
        Ok(batch)
    }

    fn to_device(&self, hb: HostBatch) -> Result<Batch> {
        let (c, h, w) = self.dims;
        let b = hb.labels.len();
        // token-major [B, T, C] -> [B, C, T] -> [B, C, H, W] (tokens are the
        // row-major H x W grid)
        let z = Tensor::from_vec(hb.latents, (b, self.tokens, c), &self.device)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, c, h, w))?;
        let x = if self.raw {
            z
        } else {
            z.broadcast_sub(&self.mean)?
                .broadcast_div(&self.std)?
                .to_dtype(DType::F32)?
        };
        let y = Tensor::from_slice(&hb.labels, b, &self.device)?;
        let noise = if hb.noise.is_empty() {
            None
        } else {
            Some(Tensor::from_vec(hb.noise, (b, c, h, w), &self.device)?)
        };
        Ok(Batch {
            noise,
            labels: hb.labels,
            x,
            y,
            keys: hb.keys,
            flips: hb.flips,
            sample_ids: hb.sample_ids,
            cursor: hb.cursor,
            micro: hb.micro,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::LatentBatch;

    /// `images` images x 2 flips, `per_rg` rows per row group; latent values
    /// encode (image, flip, element) so batches can be checked exactly.
    struct Fake {
        images: usize,
        per_rg: usize,
        t: usize,
        c: usize,
    }

    impl RowGroupSource for Fake {
        fn read(&self, rg: usize) -> Result<LatentBatch> {
            let rows = (rg * self.per_rg..((rg + 1) * self.per_rg).min(2 * self.images))
                .collect::<Vec<_>>();
            let n = self.t * self.c;
            Ok(LatentBatch {
                keys: rows.iter().map(|r| format!("img{}", r / 2)).collect(),
                labels: rows.iter().map(|r| (r / 2 % 3) as i32).collect(),
                flips: rows.iter().map(|r| r % 2 == 1).collect(),
                latents: rows
                    .iter()
                    .flat_map(|&r| (0..n).map(move |e| (r * 1000 + e) as f32))
                    .collect(),
                tokens: self.t,
                channels: self.c,
            })
        }
    }

    fn setup(
        images: usize,
        per_rg: usize,
    ) -> (Arc<DataIndex>, Arc<dyn RowGroupSource>, Normalizer) {
        let index = plan::paired_index(images, per_rg);
        let (t, c) = (4, 3);
        let norm = Normalizer {
            mean: vec![0.0; t * c],
            var: vec![1.0 - 1e-5; t * c],
            channels: c,
            height: 2,
            width: 2,
        };
        (
            Arc::new(index),
            Arc::new(Fake {
                images,
                per_rg,
                t,
                c,
            }),
            norm,
        )
    }

    fn cfg(batch: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: batch,
            seed: 9,
            shuffle_window: 3,
            workers: 2,
            prefetch: 2,
            rank: 0,
            world_size: 1,
            accum: 1,
            noise: false,
            raw: false,
        }
    }

    #[test]
    fn batches_are_normalised_chw_and_resume_exactly() {
        let (index, src, norm) = setup(30, 4);
        let dev = Device::Cpu;
        let mut a = Loader::from_parts(
            index.clone(),
            src.clone(),
            norm.clone(),
            &cfg(4),
            LoaderCursor::default(),
            &dev,
        )
        .unwrap();
        assert_eq!(a.steps_per_epoch(), 7);
        let mut all = Vec::new();
        for _ in 0..17 {
            all.push(a.next_batch().unwrap());
        }
        // epoch 0 covers 28 distinct images, one flip each
        let mut keys: Vec<&String> = all[..7].iter().flat_map(|b| &b.keys).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 28);
        assert_eq!(
            all[7].cursor,
            LoaderCursor {
                epoch: 1,
                step_in_epoch: 0
            }
        );
        // [B, C, H, W] with x[b, c, h, w] = row*1000 + (h*W + w)*C + c
        let b0 = &all[0];
        assert_eq!(b0.x.dims(), &[4, 3, 2, 2]);
        let v = b0.x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let img: usize = b0.keys[0][3..].parse().unwrap();
        let row = 2 * img + b0.flips[0] as usize;
        for c in 0..3 {
            for tok in 0..4 {
                let want = (row * 1000 + tok * 3 + c) as f32;
                assert!(
                    (v[c * 4 + tok] - want).abs() <= want * 1e-6,
                    "c{c} t{tok}: {} vs {want}",
                    v[c * 4 + tok]
                );
            }
        }
        // resume from the cursor after batch 9
        let resume = all[9].cursor;
        let next = LoaderCursor {
            epoch: resume.epoch,
            step_in_epoch: resume.step_in_epoch + 1,
        };
        let mut b = Loader::from_parts(index, src, norm, &cfg(4), next, &dev).unwrap();
        for want in &all[10..] {
            let got = b.next_batch().unwrap();
            assert_eq!(got.keys, want.keys);
            assert_eq!(got.flips, want.flips);
            assert_eq!(got.cursor, want.cursor);
        }
    }

    #[test]
    fn dropping_a_loader_stops_its_threads() {
        let (index, src, norm) = setup(50, 5);
        let mut l = Loader::from_parts(
            index,
            src,
            norm,
            &cfg(2),
            LoaderCursor::default(),
            &Device::Cpu,
        )
        .unwrap();
        l.next_batch().unwrap();
        drop(l); // joins the producer; a hang here fails the test run
    }
}
