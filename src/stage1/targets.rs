//! The decoder's training targets from the cache: for each latent row, the
//! same crop of its source image that the build encoded (ADM center crop,
//! `crate::images::load_crop`), at the decoder's output size, mirrored when
//! the row is the flipped one. The center crop covers the same region at any
//! size, so a 512 px decoder on a 256 px build still sees the encoded
//! region.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::{Result, Stage1Error};
use crate::images::{DecodeOptions, load_crop};

/// Loads target images `[B, 3, S, S]` in [0, 1] for cache rows.
#[derive(Debug, Clone)]
pub struct TargetImages {
    root: PathBuf,
    size: u32,
    opts: DecodeOptions,
}

impl TargetImages {
    /// Images under `root` (the cache's keys are paths relative to it),
    /// cropped to `size`.
    pub fn new(root: &Path, size: usize) -> Result<Self> {
        if !root.is_dir() {
            return Err(Stage1Error::Invalid(format!(
                "image folder {} does not exist (the images the cache was built from; pass --images)",
                root.display()
            )));
        }
        Ok(Self {
            root: root.to_path_buf(),
            size: size as u32,
            opts: DecodeOptions::default(),
        })
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
        let path = self.root.join(key);
        let mut img = load_crop(&path, self.size, &self.opts).map_err(|e| Stage1Error::Image {
            path: path.clone(),
            reason: e.to_string(),
        })?;
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
