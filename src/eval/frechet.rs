//! The Fréchet distance between two Gaussians,
//! |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2), in f64.
//!
//! ADM (and pytorch-fid, EDM2) take `scipy.linalg.sqrtm(S1 S2)`, a Schur
//! method on a non-symmetric product. The eigenvalues of S1 S2 are those of
//! the symmetric PSD matrix A = S1^(1/2) S2 S1^(1/2), so the trace term is
//! sum sqrt(eig(A)) with two symmetric eigendecompositions (faer): no
//! complex numbers, no eps retry, stable for singular covariances (n < d).
//! Negative eigenvalues (rounding) are clamped to 0.

use faer::{Accum, Mat, Par, Side};

use super::EvalError;

/// Mean and covariance (row-major `d x d`) of a feature set.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    /// Mean, `d`.
    pub mu: Vec<f64>,
    /// Covariance, `d x d` row-major, ddof = 1.
    pub sigma: Vec<f64>,
    /// Rows the statistics are over (0 when unknown, e.g. ADM's npz).
    pub count: u64,
}

impl Gaussian {
    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    /// Check the shapes agree and every value is finite.
    pub fn validate(&self, what: &str) -> Result<(), EvalError> {
        let d = self.dim();
        if self.sigma.len() != d * d {
            return Err(EvalError::Invalid(format!(
                "{what}: covariance has {} values, the mean {d} (expected {})",
                self.sigma.len(),
                d * d
            )));
        }
        if self.mu.iter().chain(&self.sigma).any(|x| !x.is_finite()) {
            return Err(EvalError::Invalid(format!(
                "{what}: non-finite mean or covariance"
            )));
        }
        Ok(())
    }
}

fn sym(d: usize, v: &[f64]) -> Mat<f64> {
    Mat::from_fn(d, d, |i, j| 0.5 * (v[i * d + j] + v[j * d + i]))
}

/// tr (S1 S2)^(1/2) for symmetric PSD `s1`, `s2` (`d x d`).
pub fn trace_sqrt_product(s1: &Mat<f64>, s2: &Mat<f64>) -> Result<f64, EvalError> {
    let d = s1.nrows();
    let e = s1
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| EvalError::Linalg(format!("{e:?}")))?;
    let (u, s) = (e.U(), e.S().column_vector());
    // U diag(sqrt(max(s,0))) U^T
    let us = Mat::<f64>::from_fn(d, d, |i, j| u[(i, j)] * s[j].max(0.0).sqrt());
    let mut root = Mat::<f64>::zeros(d, d);
    faer::linalg::matmul::matmul(
        &mut root,
        Accum::Replace,
        &us,
        u.transpose(),
        1.0,
        Par::rayon(0),
    );
    let mut tmp = Mat::<f64>::zeros(d, d);
    faer::linalg::matmul::matmul(&mut tmp, Accum::Replace, &root, s2, 1.0, Par::rayon(0));
    let mut a = Mat::<f64>::zeros(d, d);
    faer::linalg::matmul::matmul(&mut a, Accum::Replace, &tmp, &root, 1.0, Par::rayon(0));
    let a = Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (a[(i, j)] + a[(j, i)]));
    let ev = a
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| EvalError::Linalg(format!("{e:?}")))?;
    Ok(ev.iter().map(|&l| l.max(0.0).sqrt()).sum())
}

/// FD(N(a.mu, a.sigma), N(b.mu, b.sigma)). Not clamped at 0 (ADM reports
/// the raw value; identical inputs give ~1e-13).
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64, EvalError> {
    a.validate("first statistics")?;
    b.validate("second statistics")?;
    let d = a.dim();
    if b.dim() != d {
        return Err(EvalError::Invalid(format!(
            "statistics of {d} and {} features cannot be compared",
            b.dim()
        )));
    }
    let diff: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let tr = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    let cross = trace_sqrt_product(&sym(d, &a.sigma), &sym(d, &b.sigma))?;
    Ok(diff + tr(&a.sigma) + tr(&b.sigma) - 2.0 * cross)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_closed_form() {
        // FD of diagonal Gaussians: |dmu|^2 + sum (sqrt a - sqrt b)^2
        let d = 6;
        let va: Vec<f64> = (0..d).map(|i| 0.5 + i as f64).collect();
        let vb: Vec<f64> = (0..d).map(|i| 2.0 + 0.3 * i as f64).collect();
        let diag = |v: &[f64]| {
            let mut s = vec![0.0; d * d];
            (0..d).for_each(|i| s[i * d + i] = v[i]);
            s
        };
        let a = Gaussian {
            mu: vec![0.0; d],
            sigma: diag(&va),
            count: 0,
        };
        let b = Gaussian {
            mu: vec![1.0; d],
            sigma: diag(&vb),
            count: 0,
        };
        let want: f64 = d as f64
            + va.iter()
                .zip(&vb)
                .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-12 * want, "{got} vs {want}");
        let bad = Gaussian {
            mu: vec![0.0; d - 1],
            sigma: diag(&va),
            count: 0,
        };
        assert!(frechet_distance(&a, &bad).is_err());
    }
}
