//! What a build is asked to do ([`BuildConfig`], whose defaults are the
//! `DEFAULT_*` constants below, also used by `rae-cache build`'s flags) and
//! what that resolves to once every setting is checked and every default
//! filled in ([`BuildPlan`], from [`BuildConfig::resolve`]). Resolving
//! touches no file and loads nothing: a bad setting is refused before the
//! output directory is created.

use std::path::PathBuf;

use crate::images::DecodeOptions;
use crate::precision::Precision;
use crate::shards::LatentDType;
pub use crate::shards::writer::{DEFAULT_ROWS_PER_ROW_GROUP, DEFAULT_ZSTD_LEVEL};
use crate::sources::SourceOptions;

use super::build_state::{self, HFlip};
use super::{PartSpec, PipelineError};

/// The encoder: DINOv2-B with registers, RAE's default. A Hugging Face repo
/// id, looked up in the local HF cache.
pub const DEFAULT_ENCODER: &str = "facebook/dinov2-with-registers-base";
/// Storage type of the latents: LayerNorm outputs are bounded, so f16 (11
/// significant bits) holds them at half the bytes of f32.
pub const DEFAULT_DTYPE: LatentDType = LatentDType::F16;
/// Store both flips: the reference trains with random horizontal flips.
pub const DEFAULT_HFLIP: HFlip = HFlip::Both;
/// Images per shard when `rows_per_shard` is not given (its rows: this
/// times the flips per image).
pub const DEFAULT_IMAGES_PER_SHARD: usize = 1024;
/// Images per encoder call on a CUDA device when `batch_size` is 0: a GPU
/// wants large batches.
pub const DEFAULT_BATCH_SIZE_CUDA: usize = 256;
/// Images per encoder call on the CPU when `batch_size` is 0: a small batch
/// keeps memory low.
pub const DEFAULT_BATCH_SIZE_CPU: usize = 32;
/// `auto`: CUDA when built with it and a GPU answers, else the CPU.
pub const DEFAULT_DEVICE: &str = "auto";
/// `auto`: bf16 on a CUDA device, f32 on the CPU.
pub const DEFAULT_PRECISION: Precision = Precision::Auto;

/// What a build is asked to do: `rae-cache build`'s arguments.
/// [`BuildConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// The image folder, or the first tar / Parquet input.
    pub images: PathBuf,
    /// More tar or Parquet inputs (files, directories, `*` patterns).
    pub extra_inputs: Vec<PathBuf>,
    /// How the inputs are read (format, labels, Parquet columns).
    pub source: SourceOptions,
    /// The cache directory to create (or resume).
    pub out: PathBuf,
    /// Local directory or Hugging Face repo id.
    pub encoder: String,
    /// Fetch the encoder from the Hub when it is not cached.
    pub allow_download: bool,
    /// Storage type of the latents.
    pub dtype: LatentDType,
    /// Which crops of each image are stored.
    pub hflip: HFlip,
    /// Images per encoder batch (each contributes one crop per flip); 0:
    /// [`DEFAULT_BATCH_SIZE_CUDA`] on CUDA, [`DEFAULT_BATCH_SIZE_CPU`] on the CPU.
    pub batch_size: usize,
    /// Rows per shard; `None`: [`DEFAULT_IMAGES_PER_SHARD`] images' rows.
    /// Must be a multiple of the number of flips.
    pub rows_per_shard: Option<usize>,
    /// Rows per Parquet row group.
    pub rows_per_group: usize,
    /// zstd compression level of the shards.
    pub zstd_level: i32,
    /// Decode threads; 0 = all cores.
    pub threads: usize,
    /// Shards written (compressed) at once; 0 = half the cores, 2 to 16.
    pub writers: usize,
    /// `cpu`, `cuda:N` or `auto`.
    pub device: String,
    /// Encoder compute dtype (`auto`: bf16 on CUDA, f32 on the CPU). The
    /// latents leave the encoder as f32 whatever it is.
    pub precision: Precision,
    /// Allow TF32 f32 matrix products on CUDA (process-wide; no-op on CPU).
    pub tf32: bool,
    /// Build only this part of a multi-machine build.
    pub part: Option<PartSpec>,
    /// Only the first N images (sorted by key).
    pub limit: Option<usize>,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    pub max_pixels: u64,
    /// Continue the build already in `out`.
    pub resume: bool,
    /// `out` is a store URL: the local directory the shards are written to
    /// before their upload (default: a directory under the system's temp dir).
    pub staging_dir: Option<PathBuf>,
    /// `out` is a store URL: remove another build's lock object first.
    pub break_lock: bool,
    /// Called after every save of the build state (see [`SaveHook`]).
    pub on_save: Option<SaveHook>,
}

/// Called with the build root and the build state each time the state is
/// saved: every shard it lists is then complete on disk, with its
/// statistics state. The store upload uses it to mirror the build.
#[derive(Clone)]
pub struct SaveHook(pub std::sync::Arc<SaveFn>);

/// The function a [`SaveHook`] calls.
pub type SaveFn = dyn Fn(&std::path::Path, &build_state::BuildManifest) -> Result<(), PipelineError>
    + Send
    + Sync;

impl std::fmt::Debug for SaveHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaveHook")
    }
}

impl BuildConfig {
    /// A build of `images` into `out` with every other setting at its default.
    pub fn new(images: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            images: images.into(),
            extra_inputs: Vec::new(),
            source: SourceOptions::default(),
            out: out.into(),
            encoder: DEFAULT_ENCODER.into(),
            allow_download: false,
            dtype: DEFAULT_DTYPE,
            hflip: DEFAULT_HFLIP,
            batch_size: 0,
            rows_per_shard: None,
            rows_per_group: DEFAULT_ROWS_PER_ROW_GROUP,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            threads: 0,
            writers: 0,
            device: DEFAULT_DEVICE.into(),
            precision: DEFAULT_PRECISION,
            tf32: false,
            part: None,
            limit: None,
            max_pixels: DecodeOptions::default().max_pixels,
            resume: false,
            staging_dir: None,
            break_lock: false,
            on_save: None,
        }
    }

    /// Every input: `images` then `extra_inputs`.
    pub fn inputs(&self) -> Vec<PathBuf> {
        std::iter::once(self.images.clone())
            .chain(self.extra_inputs.iter().cloned())
            .collect()
    }

    /// Check the settings and fill in their defaults. Everything that needs
    /// no file and no device is decided here; the device-dependent batch
    /// size is [`BuildConfig::batch_size_on`]. (The zstd level is checked by
    /// the shard writer, and the part number by [`super::ShardPlan::new`].)
    pub fn resolve(&self) -> Result<BuildPlan, PipelineError> {
        if self.rows_per_group == 0 {
            return Err(PipelineError::Invalid(
                "--rows-per-group must be at least 1".into(),
            ));
        }
        let flips = self.hflip.flips();
        let rows_per_shard = self
            .rows_per_shard
            .unwrap_or(DEFAULT_IMAGES_PER_SHARD * flips.len());
        if rows_per_shard == 0 || !rows_per_shard.is_multiple_of(flips.len()) {
            return Err(PipelineError::Invalid(format!(
                "--rows-per-shard {rows_per_shard} must be a positive multiple of {} (one row per image and flip)",
                flips.len()
            )));
        }
        let threads = match self.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            t => t,
        };
        let writers = match self.writers {
            // Measured per core: decode + crop ~440 images/s, write (f16, both
            // flips, zstd 3, statistics) ~350 images/s: writing needs about as
            // many cores as decoding.
            0 => (threads / 2).clamp(2, 16),
            w => w,
        };
        Ok(BuildPlan {
            root: super::build_root(&self.out, self.part),
            shards_dir: self.out.join(build_state::SHARDS_DIR),
            flips,
            rows_per_shard,
            images_per_shard: rows_per_shard / flips.len(),
            threads,
            writers,
        })
    }

    /// Images per encoder call on `device`.
    pub fn batch_size_on(&self, device: &candle_core::Device) -> usize {
        match self.batch_size {
            0 if device.is_cuda() => DEFAULT_BATCH_SIZE_CUDA,
            0 => DEFAULT_BATCH_SIZE_CPU,
            b => b,
        }
    }
}

/// A [`BuildConfig`] checked, with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    /// Where this build's manifest, state and lock live: `out`, or
    /// `out/parts/I` for part `I`.
    pub root: PathBuf,
    /// `out/shards`: every part writes its shards there.
    pub shards_dir: PathBuf,
    /// The rows of one image, in order (`false`: the crop, `true`: its flip).
    pub flips: &'static [bool],
    /// Rows per shard (images per shard times flips).
    pub rows_per_shard: usize,
    /// Images per shard.
    pub images_per_shard: usize,
    /// Decode threads.
    pub threads: usize,
    /// Shards written at once.
    pub writers: usize,
}
