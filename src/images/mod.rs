//! Image side of the pipeline: folder discovery, decoding to RGB8, and the
//! ADM center crop. (Interface fixed here; bodies being written.)

use std::path::{Path, PathBuf};

/// One image found under the dataset root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Absolute (or root-joined) path to read.
    pub path: PathBuf,
    /// Path relative to the root with `/` separators: the shard `key`.
    pub key: String,
    /// Index of the class folder in sorted order, -1 for a flat folder.
    pub label: i32,
}

/// A file that was seen but not taken, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Discovery {
    pub root: PathBuf,
    /// Sorted class folder names (empty for a flat folder).
    pub classes: Vec<String>,
    /// Sorted by key.
    pub entries: Vec<ImageEntry>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a supported image ({reason})")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path}: corrupt or truncated image: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {width}x{height} = {pixels} pixels exceeds the limit of {limit} (decompression-bomb guard, see --max-pixels)")]
    TooLarge { path: PathBuf, width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("{path}: empty file")]
    Empty { path: PathBuf },
}

#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Refuse images with more pixels than this.
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        // Pillow's own bomb limit is ~89 M pixels; stay there.
        Self { max_pixels: 89_478_485 }
    }
}

/// List images under `root` (ImageNet layout or flat), deterministic order.
pub fn discover(root: &Path) -> Result<Discovery, ImageError> {
    let _ = root;
    unimplemented!("being written")
}

/// Decode a file to RGB8 (alpha dropped as PIL's `convert("RGB")`).
pub fn decode_rgb8(path: &Path, opts: &DecodeOptions) -> Result<image::RgbImage, ImageError> {
    let _ = (path, opts);
    unimplemented!("being written")
}

/// ADM `center_crop_arr`: box-halve while short side >= 2*size, PIL bicubic
/// to short side `size`, center crop to `size` x `size`.
pub fn adm_center_crop(img: &image::RgbImage, size: u32) -> image::RgbImage {
    let _ = (img, size);
    unimplemented!("being written")
}
