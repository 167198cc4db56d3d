//! Reconstruction metrics as RAE reports them (`src/eval/ref_iqa.py`):
//!
//! * PSNR per image on [0, 1] pixels, `20 log10(1 / sqrt(max(mse, 1e-10)))`,
//!   averaged over images;
//! * SSIM as torchmetrics' `structural_similarity_index_measure` with its
//!   defaults: Gaussian window 11, sigma 1.5, k1 = 0.01, k2 = 0.03, data
//!   range 1, population (co)variances clamped at 0, per image the mean over
//!   channels and positions, then averaged over images. Positions: since
//!   torchmetrics 1.5 (PR #2721, what RAE's unpinned requirement installs)
//!   every pixel of the reflect-padded image ([`SsimBorder::Full`]); before
//!   it, and in skimage, only those whose window lies inside the image
//!   ([`SsimBorder::Valid`]).
//!
//! Images are `[N, C, H, W]` f32, row-major; computed in f64.

use rayon::prelude::*;

use super::EvalError;

fn check(x: &[f32], y: &[f32], n: usize) -> Result<usize, EvalError> {
    if x.len() != y.len() || n == 0 || !x.len().is_multiple_of(n) {
        return Err(EvalError::Invalid(format!(
            "reconstruction metrics: {} and {} values for {n} images",
            x.len(),
            y.len()
        )));
    }
    Ok(x.len() / n)
}

/// PSNR of each image pair.
pub fn psnr_per_image(x: &[f32], y: &[f32], n: usize) -> Result<Vec<f64>, EvalError> {
    let per = check(x, y, n)?;
    Ok(x.chunks_exact(per)
        .zip(y.chunks_exact(per))
        .map(|(a, b)| {
            let mse = a
                .iter()
                .zip(b)
                .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
                .sum::<f64>()
                / per as f64;
            20.0 * (1.0 / mse.max(1e-10).sqrt()).log10()
        })
        .collect())
}

/// Mean PSNR over images.
pub fn psnr(x: &[f32], y: &[f32], n: usize) -> Result<f64, EvalError> {
    let v = psnr_per_image(x, y, n)?;
    Ok(v.iter().sum::<f64>() / v.len() as f64)
}

fn gaussian_window() -> [f64; 11] {
    let mut g = [0f64; 11];
    for (i, v) in g.iter_mut().enumerate() {
        let d = i as f64 - 5.0;
        *v = (-(d / 1.5).powi(2) / 2.0).exp();
    }
    let s: f64 = g.iter().sum();
    g.iter_mut().for_each(|v| *v /= s);
    g
}

/// Separable valid filtering of an `h x w` plane: `(h-10) x (w-10)`.
fn filter_valid(p: &[f64], h: usize, w: usize, g: &[f64; 11]) -> Vec<f64> {
    let (oh, ow) = (h - 10, w - 10);
    let mut rows = vec![0f64; oh * w];
    for i in 0..oh {
        for (k, gk) in g.iter().enumerate() {
            let src = &p[(i + k) * w..(i + k + 1) * w];
            rows[i * w..(i + 1) * w]
                .iter_mut()
                .zip(src)
                .for_each(|(r, s)| *r += gk * s);
        }
    }
    let mut out = vec![0f64; oh * ow];
    for i in 0..oh {
        for j in 0..ow {
            out[i * ow + j] = (0..11).map(|k| g[k] * rows[i * w + j + k]).sum();
        }
    }
    out
}

/// Which positions SSIM averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SsimBorder {
    /// Every pixel, windows reflect-padded by 5 (torchmetrics >= 1.5).
    Full,
    /// Only windows inside the image (skimage, torchmetrics < 1.5).
    Valid,
}

/// An `h x w` plane reflect-padded by 5 on each side (torch `reflect`: the
/// edge pixel is not repeated).
fn reflect_pad(p: &[f64], h: usize, w: usize) -> Vec<f64> {
    let idx = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let j = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        j as usize
    };
    let (ph, pw) = (h + 10, w + 10);
    let mut out = vec![0f64; ph * pw];
    for i in 0..ph {
        for j in 0..pw {
            out[i * pw + j] = p[idx(i as isize - 5, h) * w + idx(j as isize - 5, w)];
        }
    }
    out
}

/// SSIM of one image pair `[C, H, W]`: the mean over channels and positions.
fn ssim_image(
    a: &[f32],
    b: &[f32],
    (channels, h, w): (usize, usize, usize),
    border: SsimBorder,
) -> f64 {
    let g = gaussian_window();
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let plane = h * w;
    let mut total = 0f64;
    for c in 0..channels {
        let f64s = |v: &[f32]| {
            v[c * plane..(c + 1) * plane]
                .iter()
                .map(|v| *v as f64)
                .collect::<Vec<f64>>()
        };
        let (mut pa, mut pb) = (f64s(a), f64s(b));
        let (fh, fw) = match border {
            SsimBorder::Valid => (h, w),
            SsimBorder::Full => {
                pa = reflect_pad(&pa, h, w);
                pb = reflect_pad(&pb, h, w);
                (h + 10, w + 10)
            }
        };
        let prod = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(u, v)| u * v).collect::<Vec<f64>>();
        let (mx, my) = (filter_valid(&pa, fh, fw, &g), filter_valid(&pb, fh, fw, &g));
        let sxx = filter_valid(&prod(&pa, &pa), fh, fw, &g);
        let syy = filter_valid(&prod(&pb, &pb), fh, fw, &g);
        let sxy = filter_valid(&prod(&pa, &pb), fh, fw, &g);
        for i in 0..mx.len() {
            let (ux, uy) = (mx[i], my[i]);
            let (vx, vy) = ((sxx[i] - ux * ux).max(0.0), (syy[i] - uy * uy).max(0.0));
            let cxy = sxy[i] - ux * uy;
            total += ((2.0 * ux * uy + c1) * (2.0 * cxy + c2))
                / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
        }
    }
    let positions = match border {
        SsimBorder::Valid => (h - 10) * (w - 10),
        SsimBorder::Full => h * w,
    };
    total / (channels * positions) as f64
}

/// SSIM of each image pair, `[N, C, H, W]` (images in parallel).
pub fn ssim_per_image(
    x: &[f32],
    y: &[f32],
    n: usize,
    (channels, h, w): (usize, usize, usize),
    border: SsimBorder,
) -> Result<Vec<f64>, EvalError> {
    let per = check(x, y, n)?;
    if per != channels * h * w || h < 11 || w < 11 {
        return Err(EvalError::Invalid(format!(
            "SSIM: images of {per} values are not [{channels}, {h}, {w}] with sides >= 11"
        )));
    }
    Ok(x.par_chunks_exact(per)
        .zip(y.par_chunks_exact(per))
        .map(|(a, b)| ssim_image(a, b, (channels, h, w), border))
        .collect())
}

/// Mean SSIM over images (RAE: [`SsimBorder::Full`]).
pub fn ssim(
    x: &[f32],
    y: &[f32],
    n: usize,
    chw: (usize, usize, usize),
    border: SsimBorder,
) -> Result<f64, EvalError> {
    let v = ssim_per_image(x, y, n, chw, border)?;
    Ok(v.iter().sum::<f64>() / v.len() as f64)
}
