//! PyTorch-compatible 1-D bicubic resampling weights, as dense `[out, in]`
//! matrices, so a separable 2-D resize is two matrix products that run on
//! any device (images) or a few host loops (position tables).

/// Bicubic coefficient for |x| < 1 (Keys' cubic convolution, parameter `a`).
fn cubic_near(x: f64, a: f64) -> f64 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

/// Bicubic coefficient for 1 <= |x| < 2.
fn cubic_far(x: f64, a: f64) -> f64 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// `torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
/// antialias=False)` along one axis, with `size=` given (so the scale is
/// `in / out`). Row `o` holds the weights of output sample `o` over the
/// input samples. Like torch, the four taps use a = -0.75 and source
/// indices outside the input are clamped to the border (their weights pile
/// up on the edge sample).
pub fn bicubic_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    // torch computes the scale and source coordinate in the input's
    // opmath type (f32 for f32 inputs); follow it for identical taps.
    bicubic_matrix_scaled(in_size, out_size, in_size as f32 / out_size as f32)
}

/// `bicubic_matrix` when `interpolate` is given `scale_factor=f` instead of
/// a size: torch then maps output to input coordinates with `scale =
/// f32(1 / f)`, not `in / out` (facebookresearch/dinov2 resizes its
/// position table this way, with `f = (16 + 0.1) / 37` at 224 px).
pub fn bicubic_matrix_scaled(in_size: usize, out_size: usize, scale: f32) -> Vec<f32> {
    const A: f64 = -0.75;
    let mut m = vec![0f32; out_size * in_size];
    if in_size == 0 || out_size == 0 {
        return m;
    }
    for o in 0..out_size {
        let real = scale * (o as f32 + 0.5) - 0.5;
        let idx = (real.floor() as i64).min(in_size as i64 - 1);
        let t = ((real - idx as f32).clamp(0.0, 1.0)) as f64;
        let w = [
            cubic_far(t + 1.0, A),
            cubic_near(t, A),
            cubic_near(1.0 - t, A),
            cubic_far(2.0 - t, A),
        ];
        for (k, wk) in w.iter().enumerate() {
            let src = (idx + k as i64 - 1).clamp(0, in_size as i64 - 1) as usize;
            m[o * in_size + src] += *wk as f32;
        }
    }
    m
}

/// `interpolate(mode="bicubic", align_corners=False, antialias=True)` along
/// one axis with `size=` given, as aten's separable antialiased kernel does
/// it: Keys' cubic with a = -0.5 (PIL's), stretched by the downscale factor
/// when shrinking, taps restricted to the input and renormalised to sum 1.
pub fn bicubic_aa_matrix(in_size: usize, out_size: usize) -> Vec<f64> {
    const A: f64 = -0.5;
    let filter = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            cubic_near(x, A)
        } else if x < 2.0 {
            cubic_far(x, A)
        } else {
            0.0
        }
    };
    let mut m = vec![0f64; out_size * in_size];
    if in_size == 0 || out_size == 0 {
        return m;
    }
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    for o in 0..out_size {
        let center = scale * (o as f64 + 0.5);
        // `as i64` truncates toward zero, as the C++ static_cast does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let row = &mut m[o * in_size..(o + 1) * in_size];
        let mut total = 0.0;
        for j in xmin..xmax {
            let w = filter((j as f64 - center + 0.5) * invscale);
            row[j as usize] = w;
            total += w;
        }
        if total != 0.0 {
            for j in xmin..xmax {
                row[j as usize] /= total;
            }
        }
    }
    m
}

/// Resize a token-major grid `[h_in * w_in, c]` to `[h_out * w_out, c]`
/// with separable weights `mh` `[h_out, h_in]` and `mw` `[w_out, w_in]`
/// (width first, then height, as aten does). Host-side, f64 accumulation:
/// used once at load time on position tables.
pub fn resize_grid(
    table: &[f32],
    (h_in, w_in): (usize, usize),
    c: usize,
    (h_out, w_out): (usize, usize),
    mh: &[f64],
    mw: &[f64],
) -> Vec<f32> {
    debug_assert_eq!(table.len(), h_in * w_in * c);
    // Along the width: [h_in, w_out, c].
    let mut tmp = vec![0f64; h_in * w_out * c];
    for y in 0..h_in {
        for xo in 0..w_out {
            let dst = &mut tmp[(y * w_out + xo) * c..(y * w_out + xo + 1) * c];
            for xi in 0..w_in {
                let w = mw[xo * w_in + xi];
                if w == 0.0 {
                    continue;
                }
                let src = &table[(y * w_in + xi) * c..(y * w_in + xi + 1) * c];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += w * *s as f64;
                }
            }
        }
    }
    // Along the height: [h_out, w_out, c].
    let mut out = vec![0f32; h_out * w_out * c];
    let mut acc = vec![0f64; c];
    for yo in 0..h_out {
        for x in 0..w_out {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for yi in 0..h_in {
                let w = mh[yo * h_in + yi];
                if w == 0.0 {
                    continue;
                }
                let src = &tmp[(yi * w_out + x) * c..(yi * w_out + x + 1) * c];
                for (a, s) in acc.iter_mut().zip(src) {
                    *a += w * s;
                }
            }
            let dst = &mut out[(yo * w_out + x) * c..(yo * w_out + x + 1) * c];
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = *a as f32;
            }
        }
    }
    out
}

/// f32 weights widened to f64 (for `resize_grid`).
pub fn widen(m: &[f32]) -> Vec<f64> {
    m.iter().map(|&v| v as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one() {
        for (i, o) in [(256, 224), (14, 16), (37, 16), (5, 5)] {
            let m = bicubic_matrix(i, o);
            for r in 0..o {
                let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{i}->{o} row {r}: {s}");
            }
            let m = bicubic_aa_matrix(i, o);
            for r in 0..o {
                let s: f64 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "aa {i}->{o} row {r}: {s}");
            }
        }
    }

    #[test]
    fn same_size_is_identity() {
        let m = bicubic_matrix(7, 7);
        for r in 0..7 {
            for c in 0..7 {
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((m[r * 7 + c] - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn upsample_by_two_matches_hand_computed_taps() {
        // 4 -> 8, output 0: real = 0.5 * 0.5 - 0.5 = -0.25 -> idx -1, t = 0.75;
        // taps at -2, -1, 0, 1 clamp to 0, 0, 0, 1.
        let m = bicubic_matrix(4, 8);
        let t = 0.75f64;
        let w = [
            cubic_far(t + 1.0, -0.75),
            cubic_near(t, -0.75),
            cubic_near(1.0 - t, -0.75),
            cubic_far(2.0 - t, -0.75),
        ];
        assert!((m[0] as f64 - (w[0] + w[1] + w[2])).abs() < 1e-6);
        assert!((m[1] as f64 - w[3]).abs() < 1e-6);
    }

    #[test]
    fn aa_downscale_widens_support() {
        // 37 -> 16: scale 2.3125, support 4.625 -> up to 10 taps per row.
        let m = bicubic_aa_matrix(37, 16);
        let taps = (0..37).filter(|&j| m[8 * 37 + j] != 0.0).count();
        assert!(taps >= 9, "{taps}");
    }
}
