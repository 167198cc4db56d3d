//! The decoder's training targets from the cache: for each latent row, the
//! same crop of its source image that the build encoded (ADM center crop,
//! `crate::images::load_crop`), at the decoder's output size, mirrored when
//! the row is the flipped one. The center crop covers the same region at any
//! size, so a 512 px decoder on a 256 px build still sees the encoded
//! region.
//!
//! The images come from where the cache was built: an image folder, or a
//! tar / WebDataset / Parquet source read in place through
//! [`crate::sources`] (its listing maps each key to its member or row,
//! whose bytes are read on demand).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use super::{Result, Stage1Error};
use crate::images::{DecodeOptions, adm_center_crop, decode_rgb8_bytes, load_crop};
use crate::sources::{self, InputFormat, ItemReader, Resolved, SourceOptions};

/// Where the images are read.
#[derive(Clone)]
enum Backend {
    /// Files under a folder, the keys relative paths.
    Folder,
    /// A source's listing: key -> (index, place in the source), and its reader.
    Source {
        index: Arc<HashMap<String, (usize, PathBuf)>>,
        reader: Arc<dyn ItemReader>,
    },
}

/// Loads target images `[B, 3, S, S]` in [0, 1] for cache rows.
#[derive(Clone)]
pub struct TargetImages {
    root: PathBuf,
    size: u32,
    opts: DecodeOptions,
    backend: Backend,
}

impl std::fmt::Debug for TargetImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.backend {
            Backend::Folder => "folder",
            Backend::Source { .. } => "source",
        };
        f.debug_struct("TargetImages")
            .field("root", &self.root)
            .field("size", &self.size)
            .field("kind", &kind)
            .finish()
    }
}

impl TargetImages {
    /// Images under `root` (the cache's keys are paths relative to it), or
    /// in the tar / Parquet source `root` (`format`: as the build read it;
    /// `Auto` detects it), cropped to `size`.
    pub fn new(root: &Path, format: InputFormat, size: usize) -> Result<Self> {
        let missing = || {
            Stage1Error::Invalid(format!(
                "image folder or source {} does not exist (the images the cache was built from; pass --images)",
                root.display()
            ))
        };
        let is_pattern = root.to_string_lossy().contains(['*', '?']);
        // A store URL (the build read `s3://...`) is listed, not stat'ed.
        if !root.exists() && !is_pattern && !crate::store::is_url(root) {
            return Err(missing());
        }
        let bad =
            |e: sources::SourceError| Stage1Error::Invalid(format!("{}: {e}", root.display()));
        let inputs = [root.to_path_buf()];
        let backend = match sources::resolve(&inputs, format).map_err(bad)? {
            Resolved::Folder(_) if root.is_dir() => Backend::Folder,
            Resolved::Folder(_) => return Err(missing()),
            Resolved::Files(fmt) => {
                let opts = SourceOptions {
                    format: fmt,
                    ..Default::default()
                };
                let listing = sources::list(&inputs, fmt, &opts).map_err(bad)?;
                let reader = listing.reader.ok_or_else(|| {
                    Stage1Error::Invalid(format!("{}: the source has no reader", root.display()))
                })?;
                let index = listing
                    .discovery
                    .entries
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| (e.key, (i, e.path)))
                    .collect();
                Backend::Source {
                    index: Arc::new(index),
                    reader,
                }
            }
        };
        Ok(Self {
            root: root.to_path_buf(),
            size: size as u32,
            opts: DecodeOptions::default(),
            backend,
        })
    }

    /// The ADM center crop of the image `key`.
    fn crop(&self, key: &str) -> Result<RgbImage> {
        if let Backend::Folder = &self.backend {
            let path = self.root.join(key);
            return load_crop(&path, self.size, &self.opts).map_err(|e| Stage1Error::Image {
                path,
                reason: e.to_string(),
            });
        }
        Ok(adm_center_crop(&self.decode(key)?, self.size))
    }

    /// Every image's key, in the listing's (sorted) order.
    pub fn keys(&self) -> Result<Vec<String>> {
        match &self.backend {
            Backend::Folder => Ok(crate::images::discover(&self.root)
                .map_err(|e| Stage1Error::Image {
                    path: self.root.clone(),
                    reason: e.to_string(),
                })?
                .entries
                .into_iter()
                .map(|e| e.key)
                .collect()),
            Backend::Source { index, .. } => {
                let mut keys: Vec<(usize, &String)> =
                    index.iter().map(|(k, (i, _))| (*i, k)).collect();
                keys.sort_unstable();
                Ok(keys.into_iter().map(|(_, k)| k.clone()).collect())
            }
        }
    }

    /// The whole image `key`, decoded to RGB8.
    pub fn decode(&self, key: &str) -> Result<RgbImage> {
        let (index, reader) = match &self.backend {
            Backend::Folder => {
                let path = self.root.join(key);
                return crate::images::decode_rgb8(&path, &self.opts).map_err(|e| {
                    Stage1Error::Image {
                        path,
                        reason: e.to_string(),
                    }
                });
            }
            Backend::Source { index, reader } => (index, reader),
        };
        let (i, place) = index.get(key).ok_or_else(|| Stage1Error::Image {
            path: self.root.clone(),
            reason: format!("no image {key} in this source (the cache was built from another one? pass --images)"),
        })?;
        let failed = |reason: String| Stage1Error::Image {
            path: place.clone(),
            reason,
        };
        let (_, bytes) = reader
            .stream(*i..*i + 1)
            .next()
            .ok_or_else(|| failed("the source ended before it".into()))?
            .map_err(|e| failed(e.to_string()))?;
        let bytes = bytes.map_err(failed)?;
        decode_rgb8_bytes(&bytes, place, &self.opts).map_err(|e| failed(e.to_string()))
    }

    /// The folder the keys are relative to.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// One image per (key, flip), decoded in parallel, as f32 `x / 255`.
    pub fn load(&self, keys: &[String], flips: &[bool], device: &Device) -> Result<Tensor> {
        if keys.len() != flips.len() {
            return Err(Stage1Error::Invalid(
                "keys and flips differ in length".into(),
            ));
        }
        let s = self.size as usize;
        let pixels: Vec<Vec<f32>> = keys
            .par_iter()
            .zip(flips.par_iter())
            .map(|(key, &flip)| self.one(key, flip, s))
            .collect::<Result<_>>()?;
        let flat: Vec<f32> = pixels.into_iter().flatten().collect();
        Ok(Tensor::from_vec(flat, (keys.len(), 3, s, s), device)?)
    }

    /// `[3, S, S]` planar values of one crop.
    fn one(&self, key: &str, flip: bool, s: usize) -> Result<Vec<f32>> {
        let mut img = self.crop(key)?;
        if flip {
            image::imageops::flip_horizontal_in_place(&mut img);
        }
        let mut out = vec![0f32; 3 * s * s];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * s * s + i] = p.0[c] as f32 / 255.0;
            }
        }
        Ok(out)
    }
}
