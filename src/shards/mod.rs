//! The shard contract (schemas/ holds the normative copy): Parquet files of
//! (key, label, flip, latent[, scale]) rows, plus manifest.json and
//! stats.safetensors. (Interface fixed here; bodies being written.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bumped on any incompatible change to the shard layout.
pub const SCHEMA_VERSION: &str = "1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentDType {
    F16,
    Bf16,
    F32,
    Int8,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: parquet: {source}")]
    Parquet { path: PathBuf, source: parquet::errors::ParquetError },
}

#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub dtype: LatentDType,
    pub tokens: usize,
    pub channels: usize,
    pub zstd_level: i32,
    pub rows_per_row_group: usize,
    /// Extra footer key-value metadata (encoder id, preprocessing, ...).
    pub metadata: BTreeMap<String, String>,
}

/// One row to write; `latent` is tokens*C raw f32 values, token-major.
pub struct LatentRow<'a> {
    pub key: &'a str,
    pub label: i32,
    pub flip: bool,
    pub latent: &'a [f32],
}

/// A finished shard, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// Writes one shard to a temp name; `finish` fsyncs and renames it.
pub struct ShardWriter {
    _private: (),
}

impl ShardWriter {
    pub fn create(path: &Path, opts: WriterOptions) -> Result<Self, ShardError> {
        let _ = (path, opts);
        unimplemented!("being written")
    }
    pub fn write_rows(&mut self, rows: &[LatentRow<'_>]) -> Result<(), ShardError> {
        let _ = rows;
        unimplemented!("being written")
    }
    pub fn finish(self) -> Result<ShardInfo, ShardError> {
        unimplemented!("being written")
    }
}

/// A decoded row group: `latents` holds rows*tokens*C f32 (dequantised).
#[derive(Debug, Clone)]
pub struct LatentBatch {
    pub keys: Vec<String>,
    pub labels: Vec<i32>,
    pub flips: Vec<bool>,
    pub latents: Vec<f32>,
    pub tokens: usize,
    pub channels: usize,
}

pub struct ShardReader {
    _private: (),
}

impl ShardReader {
    pub fn open(path: &Path) -> Result<Self, ShardError> {
        let _ = path;
        unimplemented!("being written")
    }
    pub fn num_rows(&self) -> u64 {
        unimplemented!("being written")
    }
    pub fn num_row_groups(&self) -> usize {
        unimplemented!("being written")
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        unimplemented!("being written")
    }
    pub fn read_row_group(&self, i: usize) -> Result<LatentBatch, ShardError> {
        let _ = i;
        unimplemented!("being written")
    }
}

/// Exact per-element mean/variance, f64 accumulation, mergeable (Chan et al.).
#[derive(Debug, Clone)]
pub struct StatsAccumulator {
    pub count: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}
