//! Exact per-element latent statistics (stats.safetensors).
//!
//! The reference (bytetriper/RAE `src/calculate_stat.py`) estimates the
//! per-element mean and the *population* variance (`x.var(dim=0,
//! unbiased=False)`) of latents shaped [C, H, W] with BatchNorm-style running
//! averages, and saves `{"mean", "var"}` as `stat.pt`. We compute the same
//! quantities exactly: f64 Welford updates per row, Chan et al.'s pairwise
//! merge across parts, var = M2 / count (divide by count, not count - 1).
//! Layout follows the reference: element (c, h, w) is token h*W + w,
//! channel c, with H = W = sqrt(tokens).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::ShardError;

/// Running statistics over latents shaped [tokens, C] (token-major).
#[derive(Debug, Clone)]
pub struct StatsAccumulator {
    /// Rows accumulated.
    pub count: u64,
    /// Running mean per element, `[tokens, C]`.
    pub mean: Vec<f64>,
    /// Running sum of squared deviations per element (Welford).
    pub m2: Vec<f64>,
    /// Tokens per row.
    pub tokens: usize,
    /// Channels per token.
    pub channels: usize,
}

/// Finalised statistics in the reference `stat.pt` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentStats {
    /// [C, H, W], f32.
    pub mean: Vec<f32>,
    /// [C, H, W], f32, population variance.
    pub var: Vec<f32>,
    /// Rows the statistics are over.
    pub count: u64,
    /// C.
    pub channels: usize,
    /// H (sqrt(tokens)).
    pub height: usize,
    /// W (sqrt(tokens)).
    pub width: usize,
}

const STATS_NOTE_KEY: &str = "rae_cache.stats";
const STATS_NOTE: &str =
    "per-element mean and population variance (M2/count) over stored latents, [C,H,W]";
const STATE_NOTE_KEY: &str = "rae_cache.stats_state";
const STATE_NOTE: &str = "accumulator state: count, f64 mean and M2 over [tokens,C]";

impl StatsAccumulator {
    /// An empty accumulator for rows of `tokens x channels`.
    pub fn new(tokens: usize, channels: usize) -> Self {
        let n = tokens * channels;
        StatsAccumulator {
            count: 0,
            mean: vec![0.0; n],
            m2: vec![0.0; n],
            tokens,
            channels,
        }
    }

    fn elems(&self) -> usize {
        self.tokens * self.channels
    }

    /// Add `rows` latents (rows*tokens*C values). Per-row updates, so the
    /// result depends only on the row order, not on how rows are batched.
    pub fn push_rows(&mut self, latents: &[f32], rows: usize) -> Result<(), ShardError> {
        let n = self.elems();
        if latents.len() != rows * n {
            return Err(ShardError::Invalid(format!(
                "stats: got {} values for {rows} rows of {}x{} latents",
                latents.len(),
                self.tokens,
                self.channels
            )));
        }
        for row in latents.chunks_exact(n) {
            self.count += 1;
            let inv = 1.0 / self.count as f64;
            for ((m, m2), &x) in self.mean.iter_mut().zip(self.m2.iter_mut()).zip(row) {
                let x = x as f64;
                let d = x - *m;
                *m += d * inv;
                *m2 += d * (x - *m);
            }
        }
        Ok(())
    }

    /// Combine with statistics over disjoint rows (Chan et al. 1979).
    pub fn merge(&mut self, other: &StatsAccumulator) -> Result<(), ShardError> {
        if (self.tokens, self.channels) != (other.tokens, other.channels) {
            return Err(ShardError::Invalid(format!(
                "stats: cannot merge {}x{} with {}x{}",
                self.tokens, self.channels, other.tokens, other.channels
            )));
        }
        if other.count == 0 {
            return Ok(());
        }
        if self.count == 0 {
            *self = other.clone();
            return Ok(());
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        for i in 0..self.mean.len() {
            let d = other.mean[i] - self.mean[i];
            self.mean[i] += d * (nb / n);
            self.m2[i] += other.m2[i] + d * d * (na * nb / n);
        }
        self.count += other.count;
        Ok(())
    }

    /// Mean and population variance in [C, H, W] layout.
    pub fn finalize(&self) -> Result<LatentStats, ShardError> {
        if self.count == 0 {
            return Err(ShardError::Invalid("stats: no rows accumulated".into()));
        }
        let side = (self.tokens as f64).sqrt().round() as usize;
        if side * side != self.tokens {
            return Err(ShardError::Invalid(format!(
                "stats: {} tokens is not a square grid, cannot lay out as [C,H,W]",
                self.tokens
            )));
        }
        let (t, c) = (self.tokens, self.channels);
        let mut mean = vec![0f32; t * c];
        let mut var = vec![0f32; t * c];
        let cnt = self.count as f64;
        for tok in 0..t {
            for ch in 0..c {
                mean[ch * t + tok] = self.mean[tok * c + ch] as f32;
                var[ch * t + tok] = (self.m2[tok * c + ch] / cnt).max(0.0) as f32;
            }
        }
        Ok(LatentStats {
            mean,
            var,
            count: self.count,
            channels: c,
            height: side,
            width: side,
        })
    }

    /// Save the exact state (count, f64 mean, f64 M2) so a resumed build
    /// continues bit-for-bit.
    pub fn save_state(&self, path: &Path) -> Result<(), ShardError> {
        let shape = vec![self.tokens, self.channels];
        let count = (self.count as i64).to_le_bytes();
        let mean = f64_bytes(&self.mean);
        let m2 = f64_bytes(&self.m2);
        let tensors = [
            ("count", view(Dtype::I64, vec![1], &count)?),
            ("m2", view(Dtype::F64, shape.clone(), &m2)?),
            ("mean", view(Dtype::F64, shape, &mean)?),
        ];
        write_safetensors(path, tensors, STATE_NOTE_KEY, STATE_NOTE)
    }

    /// Read an accumulator written by `save_state`.
    pub fn load_state(path: &Path) -> Result<Self, ShardError> {
        let bytes = std::fs::read(path).map_err(|e| ShardError::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| ShardError::format(path, e.to_string()))?;
        let count = read_i64_scalar(path, &st, "count")?;
        let (mean, shape) = read_tensor(path, &st, "mean", Dtype::F64)?;
        let (m2, shape2) = read_tensor(path, &st, "m2", Dtype::F64)?;
        if shape.len() != 2 || shape != shape2 {
            return Err(ShardError::format(
                path,
                format!("mean/m2 shapes {shape:?} / {shape2:?}, expected [tokens, C]"),
            ));
        }
        Ok(StatsAccumulator {
            count: count.max(0) as u64,
            mean: le_f64(&mean),
            m2: le_f64(&m2),
            tokens: shape[0],
            channels: shape[1],
        })
    }

    /// finalize() then save stats.safetensors.
    pub fn save_stats(&self, path: &Path) -> Result<LatentStats, ShardError> {
        let s = self.finalize()?;
        s.save(path)?;
        Ok(s)
    }
}

impl LatentStats {
    /// stats.safetensors: `mean`, `var` f32 `[C, H, W]`, `count` i64 `[1]`.
    pub fn save(&self, path: &Path) -> Result<(), ShardError> {
        let shape = vec![self.channels, self.height, self.width];
        let mean = f32_bytes(&self.mean);
        let var = f32_bytes(&self.var);
        let count = (self.count as i64).to_le_bytes();
        let tensors = [
            ("count", view(Dtype::I64, vec![1], &count)?),
            ("mean", view(Dtype::F32, shape.clone(), &mean)?),
            ("var", view(Dtype::F32, shape, &var)?),
        ];
        write_safetensors(path, tensors, STATS_NOTE_KEY, STATS_NOTE)
    }

    /// Read a `stats.safetensors`.
    pub fn load(path: &Path) -> Result<Self, ShardError> {
        let bytes = std::fs::read(path).map_err(|e| ShardError::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| ShardError::format(path, e.to_string()))?;
        let (mean, shape) = read_tensor(path, &st, "mean", Dtype::F32)?;
        let (var, vshape) = read_tensor(path, &st, "var", Dtype::F32)?;
        if shape.len() != 3 || shape != vshape {
            return Err(ShardError::format(
                path,
                format!("mean/var shapes {shape:?} / {vshape:?}, expected [C,H,W]"),
            ));
        }
        // `count` is optional: a reference stat.pt converted to safetensors lacks it.
        let count = if st.names().contains(&"count") {
            read_i64_scalar(path, &st, "count")?
        } else {
            0
        };
        Ok(LatentStats {
            mean: le_f32(&mean),
            var: le_f32(&var),
            count: count.max(0) as u64,
            channels: shape[0],
            height: shape[1],
            width: shape[2],
        })
    }
}

fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>, ShardError> {
    TensorView::new(dtype, shape, data).map_err(|e| ShardError::Invalid(format!("stats: {e}")))
}

/// One metadata entry only: safetensors keeps metadata in a HashMap, and a
/// single key keeps the header bytes deterministic.
fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, TensorView<'a>)>,
    note_key: &str,
    note: &str,
) -> Result<(), ShardError> {
    let meta = HashMap::from([(note_key.to_string(), note.to_string())]);
    let bytes = safetensors::serialize(tensors, Some(meta))
        .map_err(|e| ShardError::format(path, e.to_string()))?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|e| ShardError::io(path, e))
}

fn read_tensor(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &str,
    dtype: Dtype,
) -> Result<(Vec<u8>, Vec<usize>), ShardError> {
    let t = st
        .tensor(name)
        .map_err(|e| ShardError::format(path, format!("tensor {name}: {e}")))?;
    if t.dtype() != dtype {
        return Err(ShardError::format(
            path,
            format!("tensor {name} is {:?}, expected {dtype:?}", t.dtype()),
        ));
    }
    Ok((t.data().to_vec(), t.shape().to_vec()))
}

fn read_i64_scalar(path: &Path, st: &SafeTensors<'_>, name: &str) -> Result<i64, ShardError> {
    let t = st
        .tensor(name)
        .map_err(|e| ShardError::format(path, format!("tensor {name}: {e}")))?;
    let b = t.data();
    match t.dtype() {
        Dtype::I64 if b.len() == 8 => Ok(i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))),
        Dtype::F64 if b.len() == 8 => Ok(f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as i64),
        d => Err(ShardError::format(
            path,
            format!(
                "tensor {name}: expected one i64, got {d:?} of {} bytes",
                b.len()
            ),
        )),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
fn le_f64(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}
