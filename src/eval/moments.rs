//! Streaming mean and covariance in f64, so 50k x 2048 features never sit
//! in one matrix. Each pushed batch is centred on its own mean and its
//! scatter matrix formed with a gemm (faer), then merged with Chan et al.'s
//! pairwise update; the result is `np.cov(x, rowvar=False)` (ddof = 1) to
//! rounding, whatever the batch sizes.

use faer::{Accum, Mat, MatRef, Par};

use super::{EvalError, Gaussian, check_finite};

/// Running count, mean and scatter matrix (sum of centred outer products).
#[derive(Debug, Clone)]
pub struct Moments {
    dim: usize,
    count: u64,
    mean: Vec<f64>,
    /// `dim x dim`, symmetric.
    m2: Mat<f64>,
}

impl Moments {
    /// Empty statistics of `dim`-dimensional rows.
    pub fn new(dim: usize) -> Self {
        Moments {
            dim,
            count: 0,
            mean: vec![0.0; dim],
            m2: Mat::zeros(dim, dim),
        }
    }

    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows accumulated.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Add `rows x dim` values (row-major). Non-finite values are an error
    /// naming `what`.
    pub fn push(&mut self, what: &str, data: &[f32]) -> Result<(), EvalError> {
        let dim = self.dim;
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(EvalError::Invalid(format!(
                "{what}: {} values are not rows of {dim} features",
                data.len()
            )));
        }
        check_finite(what, data, dim)?;
        let rows = data.len() / dim;
        if rows == 0 {
            return Ok(());
        }
        let mut mean = vec![0f64; dim];
        for row in data.chunks_exact(dim) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= rows as f64);
        let centred = Mat::<f64>::from_fn(rows, dim, |i, j| data[i * dim + j] as f64 - mean[j]);
        let mut m2 = Mat::<f64>::zeros(dim, dim);
        faer::linalg::matmul::matmul(
            &mut m2,
            Accum::Replace,
            centred.transpose(),
            &centred,
            1.0,
            Par::rayon(0),
        );
        self.merge_parts(rows as u64, &mean, m2.as_ref())
    }

    /// Combine with statistics of disjoint rows.
    pub fn merge(&mut self, other: &Moments) -> Result<(), EvalError> {
        if other.dim != self.dim {
            return Err(EvalError::Invalid(format!(
                "cannot merge statistics of {} and {} features",
                self.dim, other.dim
            )));
        }
        self.merge_parts(other.count, &other.mean, other.m2.as_ref())
    }

    fn merge_parts(
        &mut self,
        nb: u64,
        mean_b: &[f64],
        m2_b: MatRef<'_, f64>,
    ) -> Result<(), EvalError> {
        if nb == 0 {
            return Ok(());
        }
        let (na, n) = (self.count as f64, (self.count + nb) as f64);
        let nbf = nb as f64;
        let delta: Vec<f64> = mean_b.iter().zip(&self.mean).map(|(b, a)| b - a).collect();
        let w = na * nbf / n;
        let d = self.dim;
        for j in 0..d {
            for i in 0..d {
                self.m2[(i, j)] += m2_b[(i, j)] + w * delta[i] * delta[j];
            }
        }
        for (m, dl) in self.mean.iter_mut().zip(&delta) {
            *m += dl * nbf / n;
        }
        self.count += nb;
        Ok(())
    }

    /// The mean and the unbiased (ddof = 1) covariance; needs 2 rows.
    pub fn finish(&self, what: &str) -> Result<Gaussian, EvalError> {
        if self.count < 2 {
            return Err(EvalError::Invalid(format!(
                "{what}: {} row(s), a covariance needs at least 2",
                self.count
            )));
        }
        let d = self.dim;
        let s = 1.0 / (self.count - 1) as f64;
        let mut sigma = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                // symmetrise: the two triangles differ by rounding only
                sigma[i * d + j] = 0.5 * (self.m2[(i, j)] + self.m2[(j, i)]) * s;
            }
        }
        Ok(Gaussian {
            mu: self.mean.clone(),
            sigma,
            count: self.count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batching_does_not_change_the_result() {
        let (rows, dim) = (37, 5);
        let data: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 + (i % dim) as f32)
            .collect();
        let mut one = Moments::new(dim);
        one.push("x", &data).unwrap();
        let mut many = Moments::new(dim);
        for c in data.chunks(dim * 6) {
            many.push("x", c).unwrap();
        }
        let (a, b) = (one.finish("x").unwrap(), many.finish("x").unwrap());
        // direct two-pass covariance
        let mean: Vec<f64> = (0..dim)
            .map(|j| (0..rows).map(|i| data[i * dim + j] as f64).sum::<f64>() / rows as f64)
            .collect();
        for i in 0..dim {
            for j in 0..dim {
                let c: f64 = (0..rows)
                    .map(|r| {
                        (data[r * dim + i] as f64 - mean[i]) * (data[r * dim + j] as f64 - mean[j])
                    })
                    .sum::<f64>()
                    / (rows - 1) as f64;
                assert!((a.sigma[i * dim + j] - c).abs() < 1e-12 * (1.0 + c.abs()));
                assert!((b.sigma[i * dim + j] - c).abs() < 1e-12 * (1.0 + c.abs()));
            }
            assert!((a.mu[i] - mean[i]).abs() < 1e-12 && (b.mu[i] - mean[i]).abs() < 1e-12);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut m = Moments::new(3);
        assert!(m.push("x", &[1.0, 2.0]).is_err());
        assert!(
            m.push("x", &[1.0, f32::NAN, 2.0])
                .unwrap_err()
                .to_string()
                .contains("row 0, column 1")
        );
        m.push("x", &[1.0, 2.0, 3.0]).unwrap();
        assert!(
            m.finish("x")
                .unwrap_err()
                .to_string()
                .contains("at least 2")
        );
    }
}
