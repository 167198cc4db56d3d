//! Class accuracy of generated latents by a nearest-centroid classifier
//! fitted on a cache's real latents: one centroid (the mean latent) per
//! label, each sample assigned the label of the nearest centroid in squared
//! Euclidean distance. A cheap check that class-conditional samples carry
//! their class, with no decoder and no classifier network.

use std::path::PathBuf;

use super::EvalError;
use crate::shards::ShardReader;

/// Labels and latents (`rows x dim`, row-major) of a set of shards.
pub struct LabelledRows {
    /// One label per row.
    pub labels: Vec<i32>,
    /// The latents, `labels.len() x dim`.
    pub latents: Vec<f32>,
    /// Elements per row (`tokens x channels`).
    pub dim: usize,
}

impl LabelledRows {
    /// Every row of `shards`, in the given order. Sample shards must hold
    /// de-normalised latents (`sample --stats`) to compare with a cache.
    pub fn read(shards: &[PathBuf]) -> Result<Self, EvalError> {
        let mut out = Self {
            labels: Vec::new(),
            latents: Vec::new(),
            dim: 0,
        };
        for path in shards {
            let b = ShardReader::open(path)?.read_all()?;
            let dim = b.tokens * b.channels;
            if out.dim != 0 && dim != out.dim {
                return Err(EvalError::Invalid(format!(
                    "{}: rows of {dim} values, earlier shards have {}",
                    path.display(),
                    out.dim
                )));
            }
            out.dim = dim;
            out.labels.extend_from_slice(&b.labels);
            out.latents.extend_from_slice(&b.latents);
        }
        if out.labels.is_empty() {
            return Err(EvalError::Invalid("no rows to classify".into()));
        }
        Ok(out)
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.latents[i * self.dim..(i + 1) * self.dim]
    }
}

/// One mean latent per label.
pub struct NearestCentroid {
    labels: Vec<i32>,
    centroids: Vec<Vec<f64>>,
}

impl NearestCentroid {
    /// The per-label means of `real`.
    pub fn fit(real: &LabelledRows) -> Self {
        let mut labels: Vec<i32> = real.labels.clone();
        labels.sort_unstable();
        labels.dedup();
        let mut centroids = vec![vec![0f64; real.dim]; labels.len()];
        let mut counts = vec![0usize; labels.len()];
        for (i, l) in real.labels.iter().enumerate() {
            let k = labels.binary_search(l).unwrap_or_default();
            counts[k] += 1;
            for (c, v) in centroids[k].iter_mut().zip(real.row(i)) {
                *c += f64::from(*v);
            }
        }
        for (c, n) in centroids.iter_mut().zip(&counts) {
            c.iter_mut().for_each(|v| *v /= *n as f64);
        }
        Self { labels, centroids }
    }

    /// The label of the centroid nearest to `x`.
    pub fn predict(&self, x: &[f32]) -> i32 {
        let dist = |c: &[f64]| -> f64 {
            x.iter()
                .zip(c)
                .map(|(a, b)| (f64::from(*a) - b).powi(2))
                .sum()
        };
        let best = (0..self.centroids.len())
            .min_by(|&a, &b| dist(&self.centroids[a]).total_cmp(&dist(&self.centroids[b])));
        best.map_or(-1, |k| self.labels[k])
    }

    /// The fraction of `rows` predicted as their own label.
    pub fn accuracy(&self, rows: &LabelledRows) -> Result<f64, EvalError> {
        if rows.dim != self.centroids.first().map_or(0, Vec::len) {
            return Err(EvalError::Invalid(format!(
                "rows of {} values against centroids of {}",
                rows.dim,
                self.centroids.first().map_or(0, Vec::len)
            )));
        }
        let hits = (0..rows.labels.len())
            .filter(|&i| self.predict(rows.row(i)) == rows.labels[i])
            .count();
        Ok(hits as f64 / rows.labels.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(labels: &[i32], latents: &[f32]) -> LabelledRows {
        LabelledRows {
            labels: labels.to_vec(),
            latents: latents.to_vec(),
            dim: latents.len() / labels.len(),
        }
    }

    #[test]
    fn classifies_by_the_nearest_mean() {
        // two classes centred at (0, 0) and (10, 10)
        let real = rows(&[3, 3, 7, 7], &[-1.0, 0.0, 1.0, 0.0, 9.0, 10.0, 11.0, 10.0]);
        let nc = NearestCentroid::fit(&real);
        assert_eq!(nc.predict(&[2.0, 1.0]), 3);
        assert_eq!(nc.predict(&[6.0, 6.0]), 7);
        let gen_rows = rows(&[3, 7, 7, 3], &[0.5, 0.5, 9.0, 9.0, 1.0, 1.0, 4.0, 4.0]);
        // the third is nearer class 3's centroid: 3 of 4 right
        assert_eq!(nc.accuracy(&gen_rows).unwrap(), 0.75);
        assert!(nc.accuracy(&rows(&[3], &[1.0, 2.0, 3.0])).is_err());
    }
}
