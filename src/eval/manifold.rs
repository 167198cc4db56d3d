//! Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM
//! evaluator's `ManifoldEstimator` computes them:
//!
//! * squared distances `max(|u|^2 - 2 u.v + |v|^2, 0)`, with the features
//!   cast to float16 ([`Distance::AdmF16`], ADM's `DistanceBlock`): norms
//!   and dot products accumulate in f32 and are rounded to f16 (the GPU
//!   behaviour assumed for TF), `-`, `+` and `max` are f16 operations;
//! * a (row block x column block) tile (10000 x 10000 in ADM) holding any
//!   non-finite value (f16 overflow) is recomputed in f32;
//! * each point's radius is the (k+1)-th smallest distance within its own
//!   set, itself included (`np.partition(.., kth=[0..k])[:, k]`);
//! * precision = fraction of samples within some real point's radius,
//!   recall = fraction of real points within some sample's radius, with
//!   `<=` (ties count as inside; f16 distances make ties common).
//!
//! [`Distance::F32`] is the plain f32 distance (torch-fidelity-like).

use rayon::prelude::*;
use serde::Serialize;

use super::{EvalError, check_finite};

/// How the pairwise distances are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Distance {
    /// ADM: f16 distance blocks, f32 fallback for a tile that overflows.
    AdmF16,
    /// f32 everywhere.
    F32,
}

/// Parameters of the estimator.
#[derive(Debug, Clone, Copy)]
pub struct PrOptions {
    /// Neighbourhood size (ADM: 3).
    pub k: usize,
    /// Tile side of the f16 overflow fallback (ADM: 10000).
    pub block: usize,
    /// Distance arithmetic.
    pub distance: Distance,
}

impl Default for PrOptions {
    fn default() -> Self {
        PrOptions {
            k: 3,
            block: 10_000,
            distance: Distance::AdmF16,
        }
    }
}

/// Precision, recall and how they were computed.
#[derive(Debug, Clone, Serialize)]
pub struct PrResult {
    /// Fraction of samples on the real manifold.
    pub precision: f64,
    /// Fraction of real points on the sample manifold.
    pub recall: f64,
    /// Real points.
    pub real: usize,
    /// Samples.
    pub fake: usize,
    /// Neighbourhood size.
    pub k: usize,
    /// Distance arithmetic.
    pub distance: Distance,
    /// Tiles recomputed in f32 after an f16 overflow.
    pub fallback_tiles: usize,
}

/// `x` rounded to the nearest f16 (ties to even), returned as f32: what
/// `half::f16::from_f32(x).to_f32()` gives, without the conversions (the
/// inner loop of the distance blocks runs it three times per distance).
#[inline]
pub fn round_f16(x: f32) -> f32 {
    let a = x.abs();
    if a.is_nan() || a < 6.103_515_6e-5 {
        // f16 subnormals (quantum 2^-24), zero, NaN
        return if a.is_nan() {
            x
        } else {
            (x * 16_777_216.0).round_ties_even() / 16_777_216.0
        };
    }
    let b = x.to_bits();
    // round the 23-bit mantissa to 10 bits, ties to even
    let r = f32::from_bits((b + 0x0FFF + ((b >> 13) & 1)) & !0x1FFF);
    if r.abs() > 65504.0 {
        f32::INFINITY.copysign(x)
    } else {
        r
    }
}

/// Rows of the f32 product computed at once (bounds memory, not results).
const SUB_ROWS: usize = 1024;

/// A feature set prepared for distance tiles.
pub struct Prepared<'a> {
    raw: &'a [f32],
    /// Features rounded to f16 (held as f32, exactly).
    rounded: Vec<f32>,
    /// f16 values held as f32.
    norms16: Vec<f32>,
    norms32: Vec<f32>,
    dim: usize,
}

impl<'a> Prepared<'a> {
    /// `rows x dim` features (row-major); non-finite values are an error.
    pub fn new(what: &str, raw: &'a [f32], dim: usize) -> Result<Self, EvalError> {
        if dim == 0 || !raw.len().is_multiple_of(dim) {
            return Err(EvalError::Invalid(format!(
                "{what}: {} values are not rows of {dim} features",
                raw.len()
            )));
        }
        check_finite(what, raw, dim)?;
        let rounded: Vec<f32> = raw.iter().map(|&x| round_f16(x)).collect();
        let sq = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        let norms16 = rounded
            .chunks_exact(dim)
            .map(|r| round_f16(sq(r)))
            .collect();
        let norms32 = raw.chunks_exact(dim).map(sq).collect();
        Ok(Prepared {
            raw,
            rounded,
            norms16,
            norms32,
            dim,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.norms32.len()
    }
}

/// Squared distances of rows `r0..r1` of `a` to rows `c0..c1` of `b`,
/// row-major; `false` when an f16 value is not finite.
fn distances(
    a: &Prepared,
    (r0, r1): (usize, usize),
    b: &Prepared,
    (c0, c1): (usize, usize),
    mode: Distance,
) -> (Vec<f32>, bool) {
    let d = a.dim;
    let (src_a, src_b): (&[f32], &[f32]) = match mode {
        Distance::AdmF16 => (&a.rounded, &b.rounded),
        Distance::F32 => (a.raw, b.raw),
    };
    let lhs = faer::MatRef::from_row_major_slice(&src_a[r0 * d..r1 * d], r1 - r0, d);
    let rhs = faer::MatRef::from_row_major_slice(&src_b[c0 * d..c1 * d], c1 - c0, d);
    // (cols x rows), column-major: each row of distances is one contiguous column
    let mut gram = faer::Mat::<f32>::zeros(c1 - c0, r1 - r0);
    faer::linalg::matmul::matmul(
        &mut gram,
        faer::Accum::Replace,
        rhs,
        lhs.transpose(),
        1.0,
        faer::Par::rayon(0),
    );
    let cols = c1 - c0;
    let mut out = vec![0f32; (r1 - r0) * cols];
    let finite = out
        .par_chunks_mut(cols)
        .enumerate()
        .map(|(i, row)| {
            let mut ok = true;
            let g_row = gram.col_as_slice(i);
            for (j, o) in row.iter_mut().enumerate() {
                let g = g_row[j];
                *o = match mode {
                    Distance::AdmF16 => {
                        // f16 ops: each result rounded to f16 (2 * x is exact up to overflow)
                        let two = round_f16(2.0 * round_f16(g));
                        let t = round_f16(round_f16(a.norms16[r0 + i] - two) + b.norms16[c0 + j]);
                        ok &= t.is_finite();
                        t.max(0.0)
                    }
                    Distance::F32 => {
                        let t = a.norms32[r0 + i] - 2.0 * g + b.norms32[c0 + j];
                        ok &= t.is_finite();
                        t.max(0.0)
                    }
                };
            }
            ok
        })
        .reduce(|| true, |x, y| x && y);
    (out, finite)
}

/// Calls `visit(row_offset, distances)` on the sub-blocks of the tile
/// `rows x cols`. In [`Distance::AdmF16`] mode a tile with a non-finite f16
/// value is redone in f32 (`reset` is called before each attempt); returns
/// whether it fell back.
fn for_tile(
    a: &Prepared,
    rows: (usize, usize),
    b: &Prepared,
    cols: (usize, usize),
    mode: Distance,
    reset: &mut dyn FnMut(),
    visit: &mut dyn FnMut(usize, &[f32]),
) -> Result<bool, EvalError> {
    let run = |mode: Distance, visit: &mut dyn FnMut(usize, &[f32])| {
        for s in (rows.0..rows.1).step_by(SUB_ROWS) {
            let e = (s + SUB_ROWS).min(rows.1);
            let (dist, ok) = distances(a, (s, e), b, cols, mode);
            if !ok {
                return false;
            }
            visit(s - rows.0, &dist);
        }
        true
    };
    reset();
    if run(mode, visit) {
        return Ok(false);
    }
    if mode == Distance::AdmF16 {
        reset();
        if run(Distance::F32, visit) {
            return Ok(true);
        }
    }
    Err(EvalError::Invalid(
        "precision/recall: squared distances overflow f32 (features too large)".into(),
    ))
}

fn insert_smallest(best: &mut [f32], v: f32) {
    let k1 = best.len();
    if v >= best[k1 - 1] {
        return;
    }
    let mut i = k1 - 1;
    while i > 0 && best[i - 1] > v {
        best[i] = best[i - 1];
        i -= 1;
    }
    best[i] = v;
}

/// Each row's radius: its (k+1)-th smallest distance within the set.
pub fn manifold_radii(x: &Prepared, opts: &PrOptions) -> Result<(Vec<f32>, usize), EvalError> {
    let (n, k1) = (x.rows(), opts.k + 1);
    let block = opts.block.max(1);
    let mut fallbacks = 0;
    let mut radii = Vec::with_capacity(n);
    for r0 in (0..n).step_by(block) {
        let r1 = (r0 + block).min(n);
        let mut best = vec![f32::INFINITY; (r1 - r0) * k1];
        for c0 in (0..n).step_by(block) {
            let c1 = (c0 + block).min(n);
            let cols = c1 - c0;
            let saved = best.clone();
            let mut cand = best.clone();
            let fell = {
                let cand_ref = std::cell::RefCell::new(&mut cand);
                for_tile(
                    x,
                    (r0, r1),
                    x,
                    (c0, c1),
                    opts.distance,
                    &mut || cand_ref.borrow_mut().copy_from_slice(&saved),
                    &mut |off, dist| {
                        let mut c = cand_ref.borrow_mut();
                        let rows = dist.len() / cols;
                        c[off * k1..(off + rows) * k1]
                            .par_chunks_mut(k1)
                            .zip(dist.par_chunks(cols))
                            .for_each(|(b, row)| row.iter().for_each(|&v| insert_smallest(b, v)));
                    },
                )?
            };
            fallbacks += fell as usize;
            best = cand;
        }
        radii.extend(best.chunks_exact(k1).map(|b| b[k1 - 1]));
    }
    Ok((radii, fallbacks))
}

/// Precision and recall of `fake` against `real` (`dim`-wide rows).
pub fn precision_recall(
    real: &[f32],
    fake: &[f32],
    dim: usize,
    opts: &PrOptions,
) -> Result<PrResult, EvalError> {
    let real = Prepared::new("precision/recall: real features", real, dim)?;
    let fake = Prepared::new("precision/recall: sample features", fake, dim)?;
    for (what, p) in [("real", &real), ("sample", &fake)] {
        if p.rows() < opts.k + 1 {
            return Err(EvalError::Invalid(format!(
                "precision/recall: the {what} set has {} rows, k = {} needs at least {}",
                p.rows(),
                opts.k,
                opts.k + 1
            )));
        }
    }
    let (r_real, f1) = manifold_radii(&real, opts)?;
    let (r_fake, f2) = manifold_radii(&fake, opts)?;
    let (nr, nf) = (real.rows(), fake.rows());
    let mut real_in = vec![false; nr];
    let mut fake_in = vec![false; nf];
    let mut fallbacks = f1 + f2;
    let block = opts.block.max(1);
    for r0 in (0..nr).step_by(block) {
        let r1 = (r0 + block).min(nr);
        for c0 in (0..nf).step_by(block) {
            let c1 = (c0 + block).min(nf);
            let cols = c1 - c0;
            let (saved_r, saved_f) = (real_in[r0..r1].to_vec(), fake_in[c0..c1].to_vec());
            let state = std::cell::RefCell::new((saved_r.clone(), saved_f.clone()));
            let fell = for_tile(
                &real,
                (r0, r1),
                &fake,
                (c0, c1),
                opts.distance,
                &mut || *state.borrow_mut() = (saved_r.clone(), saved_f.clone()),
                &mut |off, dist| {
                    let mut st = state.borrow_mut();
                    let rows = dist.len() / cols;
                    let (rin, fin) = &mut *st;
                    let rf = &r_fake[c0..c1];
                    rin[off..off + rows]
                        .par_iter_mut()
                        .zip(dist.par_chunks(cols))
                        .for_each(|(flag, row)| *flag |= row.iter().zip(rf).any(|(d, r)| d <= r));
                    let hits = dist
                        .par_chunks(cols)
                        .enumerate()
                        .fold(
                            || vec![false; cols],
                            |mut acc, (i, row)| {
                                let rr = r_real[r0 + off + i];
                                acc.iter_mut().zip(row).for_each(|(a, d)| *a |= *d <= rr);
                                acc
                            },
                        )
                        .reduce(
                            || vec![false; cols],
                            |mut x, y| {
                                x.iter_mut().zip(y).for_each(|(a, b)| *a |= b);
                                x
                            },
                        );
                    fin.iter_mut().zip(hits).for_each(|(a, b)| *a |= b);
                },
            )?;
            fallbacks += fell as usize;
            let (rin, fin) = state.into_inner();
            real_in[r0..r1].copy_from_slice(&rin);
            fake_in[c0..c1].copy_from_slice(&fin);
        }
    }
    let frac = |v: &[bool]| v.iter().filter(|b| **b).count() as f64 / v.len() as f64;
    Ok(PrResult {
        precision: frac(&fake_in),
        recall: frac(&real_in),
        real: nr,
        fake: nf,
        k: opts.k,
        distance: opts.distance,
        fallback_tiles: fallbacks,
    })
}

#[cfg(test)]
mod tests {
    use super::round_f16;
    use half::f16;

    #[test]
    fn round_f16_matches_half() {
        let mut s = 0x1234_5678u32;
        let check = |x: f32| {
            let want = f16::from_f32(x).to_f32();
            let got = round_f16(x);
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "{x:e}: {got:e} vs {want:e}"
            );
        };
        for x in [
            0.0,
            -0.0,
            1.0,
            65504.0,
            65519.0,
            65520.0,
            -65520.0,
            1e-8,
            3e-8,
            6.1e-5,
            6.2e-5,
            f32::INFINITY,
            f32::NAN,
            2049.0,
            2051.0,
        ] {
            check(x);
        }
        for _ in 0..2_000_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            // exponents around the f16 range
            let e = 100 + (s >> 24) % 50;
            check(f32::from_bits(
                (s & 0x8000_0000) | (e << 23) | (s & 0x7F_FFFF),
            ));
        }
    }
}
