//! Image side of the pipeline: folder discovery, decoding to RGB8, and the
//! ADM center crop, each bit-compatible with what the reference (PIL) does.
//!
//! * [`discover`]: ImageNet layout or flat folder, deterministic order.
//! * [`decode_rgb8`] / [`decode_rgb8_bytes`]: JPEG/PNG/WebP to RGB8 with
//!   PIL's `convert("RGB")` semantics, a decompression-bomb guard and typed
//!   errors (never a panic).
//! * [`adm_center_crop`] / [`load_crop`]: ADM `center_crop_arr` with a
//!   Pillow-exact resampler ([`resample`]).

use std::path::PathBuf;

mod crop;
mod decode;
mod discover;
pub mod resample;

pub use crop::{adm_center_crop, load_crop};
pub use decode::{decode_rgb8, decode_rgb8_bytes, is_image_extension};
pub use discover::discover;

/// One image found under the dataset root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Absolute (or root-joined) path to read; for a tar or Parquet source
    /// (see [`crate::sources`]) the image's place in it, for messages only
    /// (`train.tar/n01440764.tar/x.JPEG`, `train-00000.parquet#12`).
    pub path: PathBuf,
    /// Path relative to the root with `/` separators: the shard `key`.
    pub key: String,
    /// Index of the class folder in sorted order, -1 for a flat folder.
    pub label: i32,
}

/// A file that was seen but not taken, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// Path relative to the dataset root.
    pub key: String,
    /// Why it was skipped or rejected.
    pub reason: String,
}

/// The images found under a dataset root.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The folder that was listed.
    pub root: PathBuf,
    /// Sorted class folder names (empty for a flat folder).
    pub classes: Vec<String>,
    /// Sorted by key.
    pub entries: Vec<ImageEntry>,
    /// Files that are not images.
    pub skipped: Vec<Skipped>,
}

/// Why an image cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A format no decoder here handles.
    #[error("{path}: not a supported image ({reason})")]
    Unsupported {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// The decoder gave up part-way.
    #[error("{path}: corrupt or truncated image: {reason}")]
    Corrupt {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// More pixels than `--max-pixels` allows.
    #[error(
        "{path}: {width}x{height} = {pixels} pixels exceeds the limit of {limit} (decompression-bomb guard, see --max-pixels)"
    )]
    TooLarge {
        /// The image file.
        path: PathBuf,
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// A zero-byte file.
    #[error("{path}: empty file")]
    Empty {
        /// The image file.
        path: PathBuf,
    },
}

impl ImageError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            ImageError::Io { path, .. }
            | ImageError::Unsupported { path, .. }
            | ImageError::Corrupt { path, .. }
            | ImageError::TooLarge { path, .. }
            | ImageError::Empty { path } => path,
        }
    }

    /// Short machine-readable kind, for manifests and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::Io { .. } => "io",
            ImageError::Unsupported { .. } => "unsupported",
            ImageError::Corrupt { .. } => "corrupt",
            ImageError::TooLarge { .. } => "too_large",
            ImageError::Empty { .. } => "empty",
        }
    }
}

/// Limits applied while decoding an image.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Refuse images with more pixels than this.
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        // Pillow's own bomb limit is ~89 M pixels; stay there.
        Self {
            max_pixels: 89_478_485,
        }
    }
}
