//! Latent-space metrics straight from shards, with no decoder and no extra
//! network: the cheap signal to watch during training. Samples (from
//! `rae-cache sample`, de-normalised with the cache's `stats.safetensors`
//! when they were written normalised) are compared with the real cache:
//!
//! * `fd_pooled`: FD of per-image token means (C-d);
//! * `fd_tokens`: FD of the token marginal (every token a row, C-d);
//! * precision/recall (k = 3) on the pooled vectors;
//! * drift: the samples' per-element mean and variance against the cache's
//!   `stats.safetensors` (in units of the cache's std).
//!
//! These are **not** FD-DINOv2 nor comparable to any published number.

use std::path::PathBuf;

use serde::Serialize;

use super::{
    EvalError, Gaussian, Moments, PrOptions, PrResult, frechet_distance, precision_recall,
};
use crate::generate::decode_run::denormalise;
use crate::generate::sample_run::{META_DENORMALISED, STATS_EPS};
use crate::progress::Progress;
use crate::shards::{LatentStats, ShardReader, StatsAccumulator};

/// What to accumulate over a set of shards.
#[derive(Debug, Clone, Default)]
pub struct LatentOptions {
    /// The token-marginal statistics (`rows x tokens` rows: the costly part).
    pub tokens: bool,
    /// Keep the pooled vectors for precision/recall.
    pub keep_pooled: bool,
    /// Per-element mean/variance (for the drift against stats.safetensors).
    pub elements: bool,
    /// Read at most this many rows.
    pub limit: Option<usize>,
    /// Skip the flipped rows of a cache built with both flips.
    pub unflipped_only: bool,
    /// At most this many rows, evenly strided over the set, feed the token
    /// statistics and the kept pooled vectors (P/R is quadratic, tokens
    /// cost `tokens x C^2` a row); the pooled FD always uses every row.
    pub subset_rows: Option<usize>,
}

/// Statistics of one set of latent shards.
pub struct LatentSet {
    /// Rows read.
    pub rows: u64,
    /// Tokens per row.
    pub tokens: usize,
    /// Channels per token.
    pub channels: usize,
    /// Per-image token means.
    pub pooled: Moments,
    /// Every token as a row.
    pub token_moments: Option<Moments>,
    /// The pooled vectors, `rows x channels` (when kept).
    pub pooled_rows: Vec<f32>,
    /// Per-element statistics (when asked).
    pub elements: Option<StatsAccumulator>,
    /// Shards that held normalised latents and were de-normalised.
    pub denormalised_shards: usize,
    keep_pooled: bool,
    stride: u64,
    cap: usize,
    /// Rows in the strided subset.
    pub subset: usize,
}

fn open_all(shards: &[PathBuf]) -> Result<Vec<ShardReader>, EvalError> {
    if shards.is_empty() {
        return Err(EvalError::Invalid("no latent shards to read".into()));
    }
    let readers: Vec<ShardReader> = shards
        .iter()
        .map(|p| ShardReader::open(p))
        .collect::<Result<_, _>>()?;
    let (t, c) = (readers[0].tokens(), readers[0].channels());
    for r in &readers {
        if (r.tokens(), r.channels()) != (t, c) {
            return Err(EvalError::Invalid(format!(
                "{}: latents are [{}, {}], {} has [{t}, {c}]",
                r.path().display(),
                r.tokens(),
                r.channels(),
                readers[0].path().display()
            )));
        }
    }
    Ok(readers)
}

/// Reads `shards` row group by row group into a [`LatentSet`].
/// `stats` de-normalises shards that `sample` wrote normalised (their
/// footer says `rae_cache.denormalised = false`); without it they are an
/// error. Reports rows through `progress`.
pub fn scan(
    shards: &[PathBuf],
    stats: Option<&LatentStats>,
    opts: &LatentOptions,
    progress: &mut dyn Progress,
) -> Result<LatentSet, EvalError> {
    let readers = open_all(shards)?;
    let (t, c) = (readers[0].tokens(), readers[0].channels());
    if let Some(s) = stats
        && (s.channels != c || s.height * s.width != t)
    {
        return Err(EvalError::Invalid(format!(
            "stats are [{}, {}, {}], the latents [{t} tokens, {c}]",
            s.channels, s.height, s.width
        )));
    }
    let total: u64 = readers.iter().map(|r| r.num_rows()).sum();
    let to_read = opts.limit.map_or(total, |l| (l as u64).min(total));
    progress.start(to_read);
    let cap = opts.subset_rows.unwrap_or(usize::MAX).max(1);
    // with both flips only about half the rows are read when unflipped_only
    let expected = if opts.unflipped_only {
        to_read.div_ceil(2)
    } else {
        to_read
    };
    let stride = expected.div_ceil(cap as u64).max(1);
    let mut set = LatentSet {
        rows: 0,
        tokens: t,
        channels: c,
        pooled: Moments::new(c),
        token_moments: opts.tokens.then(|| Moments::new(c)),
        pooled_rows: Vec::new(),
        elements: opts.elements.then(|| StatsAccumulator::new(t, c)),
        denormalised_shards: 0,
        keep_pooled: opts.keep_pooled,
        stride,
        cap,
        subset: 0,
    };
    'shards: for r in &readers {
        let normalised = r.metadata().get(META_DENORMALISED).map(String::as_str) == Some("false");
        if normalised {
            if stats.is_none() {
                return Err(EvalError::Invalid(format!(
                    "{}: holds normalised latents (sampled without --stats); the reference cache's stats.safetensors is needed to de-normalise them",
                    r.path().display()
                )));
            }
            set.denormalised_shards += 1;
        }
        for g in 0..r.num_row_groups() {
            let mut b = r.read_row_group(g)?;
            if opts.unflipped_only {
                let per = t * c;
                let keep: Vec<usize> = (0..b.flips.len()).filter(|&i| !b.flips[i]).collect();
                b.latents = keep
                    .iter()
                    .flat_map(|&i| b.latents[i * per..(i + 1) * per].to_vec())
                    .collect();
                b.flips = vec![false; keep.len()];
            }
            let mut rows = b.flips.len();
            if let Some(l) = opts.limit {
                rows = rows.min(l - set.rows as usize);
                b.latents.truncate(rows * t * c);
            }
            if let (true, Some(s)) = (normalised, stats) {
                denormalise(&mut b.latents, s, t, c);
            }
            push_rows(&mut set, &b.latents, rows, r)?;
            progress.advance(rows as u64);
            if opts.limit.is_some_and(|l| set.rows as usize >= l) {
                break 'shards;
            }
        }
    }
    progress.finish();
    Ok(set)
}

fn push_rows(
    set: &mut LatentSet,
    latents: &[f32],
    rows: usize,
    r: &ShardReader,
) -> Result<(), EvalError> {
    let (t, c) = (set.tokens, set.channels);
    let what = format!("{}", r.path().display());
    let mut pooled = vec![0f32; rows * c];
    for (row, p) in latents.chunks_exact(t * c).zip(pooled.chunks_exact_mut(c)) {
        let mut acc = vec![0f64; c];
        for tok in row.chunks_exact(c) {
            acc.iter_mut().zip(tok).for_each(|(a, x)| *a += *x as f64);
        }
        p.iter_mut()
            .zip(&acc)
            .for_each(|(p, a)| *p = (a / t as f64) as f32);
    }
    set.pooled.push(&what, &pooled)?;
    if let Some(e) = &mut set.elements {
        e.push_rows(latents, rows)?;
    }
    // the strided subset: rows whose global index is a multiple of the stride
    let (per, start) = (t * c, set.rows);
    let picked: Vec<usize> = (0..rows)
        .filter(|i| (start + *i as u64).is_multiple_of(set.stride))
        .take(set.cap.saturating_sub(set.subset))
        .collect();
    set.subset += picked.len();
    if let Some(m) = &mut set.token_moments {
        if picked.len() == rows {
            m.push(&what, latents)?;
        } else {
            let sub: Vec<f32> = picked
                .iter()
                .flat_map(|&i| latents[i * per..(i + 1) * per].iter().copied())
                .collect();
            m.push(&what, &sub)?;
        }
    }
    if set.keep_pooled {
        for &i in &picked {
            set.pooled_rows
                .extend_from_slice(&pooled[i * c..(i + 1) * c]);
        }
    }
    set.rows += rows as u64;
    Ok(())
}

/// The real side of the comparison: statistics of a cache (or read back
/// from a reference file).
#[derive(Debug, Clone)]
pub struct LatentReference {
    /// Pooled statistics.
    pub pooled: Gaussian,
    /// Token-marginal statistics.
    pub tokens: Option<Gaussian>,
    /// Pooled vectors for precision/recall, `rows x channels`.
    pub pooled_rows: Option<Vec<f32>>,
    /// The cache's per-element statistics (stats.safetensors).
    pub stats: Option<LatentStats>,
    /// Tokens per row.
    pub token_count: usize,
    /// Channels.
    pub channels: usize,
}

impl LatentSet {
    /// Finish into the reference form (`stats`: the cache's statistics).
    pub fn into_reference(
        self,
        stats: Option<LatentStats>,
        keep_rows: bool,
    ) -> Result<LatentReference, EvalError> {
        Ok(LatentReference {
            pooled: self.pooled.finish("latent reference (pooled)")?,
            tokens: self
                .token_moments
                .map(|m| m.finish("latent reference (tokens)"))
                .transpose()?,
            pooled_rows: keep_rows.then_some(self.pooled_rows),
            stats,
            token_count: self.tokens,
            channels: self.channels,
        })
    }
}

/// Per-element mean and variance of the samples against the cache's.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    /// mean |mean_s - mean_c| / std_c over elements.
    pub mean_shift_abs_mean: f64,
    /// max |mean_s - mean_c| / std_c.
    pub mean_shift_abs_max: f64,
    /// mean of var_s / var_c.
    pub var_ratio_mean: f64,
    /// max |ln(var_s / var_c)|.
    pub log_var_ratio_abs_max: f64,
}

fn drift(samples: &LatentStats, cache: &LatentStats) -> Result<Drift, EvalError> {
    if samples.mean.len() != cache.mean.len() {
        return Err(EvalError::Invalid(format!(
            "stats.safetensors has {} elements, the samples {}",
            cache.mean.len(),
            samples.mean.len()
        )));
    }
    let n = cache.mean.len() as f64;
    let (mut s_abs, mut s_max, mut v_sum, mut lv_max) = (0f64, 0f64, 0f64, 0f64);
    for i in 0..cache.mean.len() {
        let vc = cache.var[i] as f64 + STATS_EPS;
        let shift = ((samples.mean[i] - cache.mean[i]) as f64).abs() / vc.sqrt();
        let ratio = (samples.var[i] as f64 + STATS_EPS) / vc;
        s_abs += shift;
        s_max = s_max.max(shift);
        v_sum += ratio;
        lv_max = lv_max.max(ratio.ln().abs());
    }
    Ok(Drift {
        mean_shift_abs_mean: s_abs / n,
        mean_shift_abs_max: s_max,
        var_ratio_mean: v_sum / n,
        log_var_ratio_abs_max: lv_max,
    })
}

/// The latent metrics of one evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct LatentMetrics {
    /// FD of the per-image token means.
    pub fd_pooled: f64,
    /// FD of the token marginal.
    pub fd_tokens: Option<f64>,
    /// Precision/recall on the pooled vectors.
    pub pr: Option<PrResult>,
    /// Per-element drift against stats.safetensors.
    pub drift: Option<Drift>,
    /// Sample rows.
    pub samples: u64,
    /// Sample rows in the strided subset (token FD, P/R).
    pub samples_subset: usize,
    /// Token rows behind the samples' token statistics.
    pub token_rows_samples: Option<u64>,
    /// Token rows behind the reference's token statistics.
    pub token_rows_reference: Option<u64>,
    /// Reference rows (pooled statistics).
    pub reference: u64,
}

/// Compare a sample set with the reference.
pub fn compare(
    samples: LatentSet,
    reference: &LatentReference,
    pr: Option<&PrOptions>,
) -> Result<LatentMetrics, EvalError> {
    if (samples.tokens, samples.channels) != (reference.token_count, reference.channels) {
        return Err(EvalError::Invalid(format!(
            "samples are [{}, {}] latents, the reference [{}, {}]",
            samples.tokens, samples.channels, reference.token_count, reference.channels
        )));
    }
    let samples_subset = samples.subset;
    let token_rows_samples = samples.token_moments.as_ref().map(|m| m.count());
    let fd_pooled = frechet_distance(
        &samples.pooled.finish("samples (pooled)")?,
        &reference.pooled,
    )?;
    let fd_tokens = match (&samples.token_moments, &reference.tokens) {
        (Some(m), Some(r)) => Some(frechet_distance(&m.finish("samples (tokens)")?, r)?),
        _ => None,
    };
    let pr = match (pr, &reference.pooled_rows) {
        (Some(o), Some(real)) => Some(precision_recall(
            real,
            &samples.pooled_rows,
            samples.channels,
            o,
        )?),
        (Some(_), None) => {
            return Err(EvalError::Invalid(
                "latent precision/recall: the reference has no pooled vectors (make it with eval-ref --pr)".into(),
            ));
        }
        _ => None,
    };
    let drift = match (&samples.elements, &reference.stats) {
        (Some(e), Some(s)) => Some(drift(&e.finalize()?, s)?),
        _ => None,
    };
    Ok(LatentMetrics {
        fd_pooled,
        fd_tokens,
        pr,
        drift,
        samples: samples.rows,
        samples_subset,
        token_rows_samples,
        token_rows_reference: reference.tokens.as_ref().map(|g| g.count),
        reference: reference.pooled.count,
    })
}
