//! The shard contract (schemas/ holds the normative copy): Parquet files of
//! (key, label, flip, latent[, scale]) rows, plus manifest.json and
//! stats.safetensors.
//!
//! * [`schema`]: the Arrow schema and footer metadata keys.
//! * [`quant`]: f32 <-> f16 / bf16 / int8 conversions of latent buffers.
//! * [`writer`]: [`ShardWriter`] (temp file, fsync, rename, sha256).
//! * [`reader`]: [`ShardReader`] (validated, row-group reads, projections).
//! * [`stats`]: exact, mergeable per-element mean/variance.
//! * [`manifest`]: the public `manifest.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;

mod latent_chunk;
pub mod manifest;
mod pages;
pub mod quant;
pub mod reader;
pub mod schema;
pub mod stats;
pub mod writer;

pub use manifest::{EncoderInfo, Manifest, PartInfo, RejectedInput, Totals};
pub use reader::{RowIndex, ShardReader};
pub use stats::{LatentStats, StatsAccumulator};
pub use writer::ShardWriter;

/// Bumped on any incompatible change to the shard layout.
pub const SCHEMA_VERSION: &str = "1";

/// How latents are stored: `f16`, `bf16`, `f32`, or `int8` with a per-token
/// scale. (`--dtype`; [`std::str::FromStr`] also takes the long names.)
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum LatentDType {
    /// IEEE half precision.
    F16,
    /// bfloat16, stored as its u16 bit patterns.
    Bf16,
    /// Full f32.
    F32,
    /// Symmetric int8 with one f32 scale per token.
    Int8,
}

impl LatentDType {
    /// The name used in metadata, manifests and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LatentDType::F16 => "f16",
            LatentDType::Bf16 => "bf16",
            LatentDType::F32 => "f32",
            LatentDType::Int8 => "int8",
        }
    }

    /// Stored bytes per latent element (before compression).
    pub fn item_bytes(self) -> usize {
        match self {
            LatentDType::F16 | LatentDType::Bf16 => 2,
            LatentDType::F32 => 4,
            LatentDType::Int8 => 1,
        }
    }
}

impl std::fmt::Display for LatentDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LatentDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" => Ok(LatentDType::F16),
            "bf16" | "bfloat16" => Ok(LatentDType::Bf16),
            "f32" | "float32" => Ok(LatentDType::F32),
            "int8" | "i8" => Ok(LatentDType::Int8),
            other => Err(format!(
                "unknown latent dtype {other:?} (expected f16, bf16, f32 or int8)"
            )),
        }
    }
}

/// Errors reading or writing shards, manifests and statistics.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// A file could not be read or written, or its content is wrong.
    #[error(transparent)]
    File(#[from] crate::error::FileError),
    /// The Parquet library failed.
    #[error("{path}: parquet: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// Its error.
        source: parquet::errors::ParquetError,
    },
    /// Bad in-memory input not tied to a file (e.g. stats of the wrong shape).
    #[error("{0}")]
    Invalid(String),
}

impl ShardError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        crate::error::FileError::io(path, source).into()
    }
    pub(crate) fn format(path: &std::path::Path, reason: impl Into<String>) -> Self {
        crate::error::FileError::format(path, reason).into()
    }
    pub(crate) fn parquet(path: &std::path::Path, source: parquet::errors::ParquetError) -> Self {
        ShardError::Parquet {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How a [`ShardWriter`] writes one shard.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Storage type of the latents.
    pub dtype: LatentDType,
    /// Tokens per row.
    pub tokens: usize,
    /// Channels per token.
    pub channels: usize,
    /// zstd compression level.
    pub zstd_level: i32,
    /// Rows per Parquet row group (the loader's unit of random access).
    pub rows_per_row_group: usize,
    /// Extra footer key-value metadata (encoder id, preprocessing, ...).
    pub metadata: BTreeMap<String, String>,
}

impl WriterOptions {
    /// Defaults (zstd 3, 32 rows per row group, no extra metadata).
    pub fn new(dtype: LatentDType, tokens: usize, channels: usize) -> Self {
        WriterOptions {
            dtype,
            tokens,
            channels,
            zstd_level: writer::DEFAULT_ZSTD_LEVEL,
            rows_per_row_group: writer::DEFAULT_ROWS_PER_ROW_GROUP,
            metadata: BTreeMap::new(),
        }
    }
}

impl Default for WriterOptions {
    /// f16, DINOv2-B shape (256 tokens x 768 channels).
    fn default() -> Self {
        WriterOptions::new(LatentDType::F16, 256, 768)
    }
}

/// One row to write; `latent` is tokens*C raw f32 values, token-major.
pub struct LatentRow<'a> {
    /// Row key: the image path relative to the dataset root.
    pub key: &'a str,
    /// Class index, -1 when unlabelled.
    pub label: i32,
    /// Whether the latent is of the left-right flipped crop.
    pub flip: bool,
    /// tokens*C values, token-major.
    pub latent: &'a [f32],
}

/// A finished shard, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    /// File name (the manifest lists it relative to the cache directory).
    pub file: String,
    /// Rows in the shard.
    pub rows: u64,
    /// Size of the file.
    pub bytes: u64,
    /// sha256 of the file, hex.
    pub sha256: String,
}

/// A decoded row group: `latents` holds rows*tokens*C f32 (dequantised).
#[derive(Debug, Clone)]
pub struct LatentBatch {
    /// Row keys.
    pub keys: Vec<String>,
    /// Class indices (-1: unlabelled).
    pub labels: Vec<i32>,
    /// Whether each row is the flipped crop.
    pub flips: Vec<bool>,
    /// rows*tokens*C values, token-major.
    pub latents: Vec<f32>,
    /// Tokens per row.
    pub tokens: usize,
    /// Channels per token.
    pub channels: usize,
}

impl LatentBatch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// Row `i`'s latent, tokens*C values, token-major.
    pub fn latent(&self, i: usize) -> &[f32] {
        let n = self.tokens * self.channels;
        &self.latents[i * n..(i + 1) * n]
    }
}
