//! Training batches from one or more cache directories: epoch-wise
//! shuffling close to a global permutation with mostly sequential reads
//! (see [`plan`]), per-epoch random choice of the stored flip, data-parallel
//! slicing, background reading with bounded prefetch (see [`pipeline`]),
//! normalisation with the cache statistics, `[B, C, H, W]` on a device.

pub mod pipeline;
pub mod plan;
// pub mod source; // until the shard reader is merged

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use pipeline::{HostBatch, RowGroupSource};
pub use plan::{DataIndex, Loc, SampleRows, Sharding};
// pub use source::CacheSet;

use super::checkpoint::LoaderCursor;
use super::{Result, TrainError};
use pipeline::{Pipeline, PipelineConfig};

/// Added to the variance before the square root, as the reference.
pub const NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    /// Per-rank micro-batch size.
    pub batch_size: usize,
    pub seed: u64,
    /// Row groups per shuffle window.
    pub shuffle_window: usize,
    /// Reader threads.
    pub workers: usize,
    /// Batches prepared ahead.
    pub prefetch: usize,
    pub rank: usize,
    pub world_size: usize,
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
        }
    }
}

/// A training batch on the device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised latents `[B, C, H, W]`, f32.
    pub x: Tensor,
    /// Labels `[B]`, i64 (-1 where the cache has none).
    pub y: Tensor,
    pub keys: Vec<String>,
    pub flips: Vec<bool>,
    /// The position of this batch; resume from [`Loader::cursor`] after it.
    pub cursor: LoaderCursor,
}

/// Per-element statistics of the latents, `[C, H, W]` each.
#[derive(Debug, Clone)]
pub struct Normalizer {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub channels: usize,
    pub height: usize,
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
    next: LoaderCursor,
}

impl Loader {
    // /// Open a stream over a cache set, starting at `start`.
    // pub fn new(set: &CacheSet, cfg: &LoaderConfig, start: LoaderCursor, device: &Device) -> Result<Self> {
    //     Self::from_parts(set.index(), set.source(), set.normalizer().clone(), cfg, start, device)
    // }

    /// The same over any row-group source (tests, other storage).
    pub fn from_parts(
        index: Arc<DataIndex>,
        source: Arc<dyn RowGroupSource>,
        norm: Normalizer,
        cfg: &LoaderConfig,
        start: LoaderCursor,
        device: &Device,
    ) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(TrainError::Config(format!(
                "batch size {} / rank {} of world size {} is not a valid layout",
                cfg.batch_size, cfg.rank, cfg.world_size
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
        };
        let steps_per_epoch = sharding.steps_per_epoch(index.samples.len());
        if start.step_in_epoch as usize >= steps_per_epoch.max(1) {
            return Err(TrainError::Config(format!(
                "cursor step {} is past the {steps_per_epoch} steps of an epoch (different batch size?)",
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
            next: start,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }

    /// The cursor of the next batch (what a checkpoint stores).
    pub fn cursor(&self) -> LoaderCursor {
        self.next
    }

    /// The next batch, normalised, on the device.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let hb = self.pipeline.next()?;
        let batch = self.to_device(hb)?;
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
        let x = z
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?
            .to_dtype(DType::F32)?;
        let y = Tensor::from_vec(hb.labels, b, &self.device)?;
        Ok(Batch {
            x,
            y,
            keys: hb.keys,
            flips: hb.flips,
            cursor: hb.cursor,
        })
    }
}
