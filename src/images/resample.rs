//! A Pillow-exact separable resampler for RGB8 images.
//!
//! Reproduces `ImagingResample` (Pillow `libImaging/Resample.c`) for 8-bit
//! images: per-output-pixel weights computed in f64 with the filter support
//! scaled by the downscale factor, normalised to sum 1, converted to 22-bit
//! fixed point, a horizontal pass rounded to u8 first and then a vertical
//! pass. Every floating-point expression keeps Pillow's evaluation order, so
//! the integer weights (and therefore the output bytes) are identical.
//!
//! The window variants compute only a sub-rectangle of the full result. Each
//! output pixel depends only on its own weights, so the window is
//! byte-identical to cropping the full resize, at a fraction of the cost.

use std::ops::Range;

/// Fixed-point precision of the 8-bit path: 32 bits minus 8 for the value
/// minus 2 for overflow of negative lobes (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resampling filters (Pillow's `Image.BOX` and `Image.BICUBIC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Box filter, support 0.5.
    Box,
    /// Keys cubic with a = -0.5 (Catmull-Rom), support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    // Same expressions, same order as Pillow's `box_filter` / `bicubic_filter`.
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = if x < 0.0 { -x } else { x };
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point weights of one axis for a range of output indices.
#[derive(Debug, Clone)]
pub struct Coeffs {
    /// First source index used by each output index.
    starts: Vec<usize>,
    /// Number of source indices used by each output index.
    lens: Vec<usize>,
    /// Row stride of `weights`.
    ksize: usize,
    weights: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a resize of
    /// `in_size` to `out_size` (box = the whole input), restricted to the
    /// output indices in `outputs`.
    pub fn new(in_size: usize, out_size: usize, filter: Filter, outputs: Range<usize>) -> Self {
        // Pillow passes the box edges as f32 and subtracts them in f32.
        let in0 = 0.0f32;
        let in1 = in_size as f32;
        let scale = f64::from(in1 - in0) / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = filter.support() * filterscale;
        let ksize = (support.ceil() as usize) * 2 + 1;
        let n = outputs.len();
        let mut starts = Vec::with_capacity(n);
        let mut lens = Vec::with_capacity(n);
        let mut weights = vec![0i32; n * ksize];
        let mut k = vec![0f64; ksize];
        for (i, xx) in outputs.enumerate() {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C `(int)` casts truncate toward zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let len = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let xmin = xmin as usize;
            let mut ww = 0.0f64;
            for (x, kx) in k.iter_mut().enumerate().take(len) {
                let w = filter.eval(((x + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut weights[i * ksize..i * ksize + len];
            for (dst, &w) in row.iter_mut().zip(&k[..len]) {
                let w = if ww != 0.0 { w / ww } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                *dst = if w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            starts.push(xmin);
            lens.push(len);
        }
        Coeffs {
            starts,
            lens,
            ksize,
            weights,
        }
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let w = &self.weights[i * self.ksize..i * self.ksize + self.lens[i]];
        (self.starts[i], w)
    }

    /// Source index range that the outputs use (empty if none).
    fn source_span(&self) -> Range<usize> {
        let lo = self
            .starts
            .iter()
            .zip(&self.lens)
            .filter(|(_, l)| **l > 0)
            .map(|(s, _)| *s)
            .min();
        let hi = self.starts.iter().zip(&self.lens).map(|(s, l)| s + l).max();
        match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => lo..hi,
            _ => 0..0,
        }
    }
}

#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUND: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over source rows `rows` (RGB8, `src_w` pixels per row).
fn horizontal(src: &[u8], src_w: usize, rows: Range<usize>, cx: &Coeffs) -> Vec<u8> {
    let out_w = cx.len();
    let mut out = vec![0u8; rows.len() * out_w * 3];
    let stride = src_w * 3;
    #[cfg(target_arch = "x86_64")]
    let sse41 = std::arch::is_x86_feature_detected!("sse4.1");
    for (orow, y) in out.chunks_exact_mut(out_w * 3).zip(rows) {
        #[cfg(target_arch = "x86_64")]
        if sse41 {
            // SAFETY: the CPU supports SSE4.1 (checked above).
            unsafe { horizontal_row_sse41(src, y * stride, orow, cx) };
            continue;
        }
        horizontal_row(&src[y * stride..(y + 1) * stride], orow, cx);
    }
    out
}

fn horizontal_row(srow: &[u8], orow: &mut [u8], cx: &Coeffs) {
    for (xx, opx) in orow.chunks_exact_mut(3).enumerate() {
        horizontal_px(srow, opx, cx, xx);
    }
}

#[inline(always)]
fn horizontal_px(srow: &[u8], opx: &mut [u8], cx: &Coeffs, xx: usize) {
    let (start, k) = cx.taps(xx);
    let px = &srow[start * 3..(start + k.len()) * 3];
    let (mut s0, mut s1, mut s2) = (ROUND, ROUND, ROUND);
    for (p, &w) in px.chunks_exact(3).zip(k) {
        // Wrapping: Pillow's int arithmetic; bounded weights never
        // actually overflow, and this keeps debug builds panic-free.
        s0 = s0.wrapping_add(i32::from(p[0]).wrapping_mul(w));
        s1 = s1.wrapping_add(i32::from(p[1]).wrapping_mul(w));
        s2 = s2.wrapping_add(i32::from(p[2]).wrapping_mul(w));
    }
    opx[0] = clip8(s0);
    opx[1] = clip8(s1);
    opx[2] = clip8(s2);
}

/// One output row of the horizontal pass with the three channels of a tap
/// in one 4-lane vector (the 4th lane reads the next pixel and is ignored).
/// `src` is the whole image so that the 1-byte over-read stays in bounds
/// except at the very end, where the scalar code takes over.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn horizontal_row_sse41(src: &[u8], row_start: usize, orow: &mut [u8], cx: &Coeffs) {
    use std::arch::x86_64::*;
    for (xx, opx) in orow.chunks_exact_mut(3).enumerate() {
        let (start, k) = cx.taps(xx);
        let base = row_start + start * 3;
        if base + k.len() * 3 + 1 > src.len() {
            horizontal_px(&src[row_start..], opx, cx, xx);
            continue;
        }
        let mut acc = _mm_set1_epi32(ROUND);
        for (t, &w) in k.iter().enumerate() {
            // SAFETY: base + 3*t + 4 <= base + 3*len + 1 <= src.len() (checked above).
            let raw =
                unsafe { std::ptr::read_unaligned(src.as_ptr().add(base + 3 * t) as *const i32) };
            let px = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(raw));
            acc = _mm_add_epi32(acc, _mm_mullo_epi32(px, _mm_set1_epi32(w)));
        }
        // >> 22 then saturate to [0, 255]: Pillow's clip8.
        let v = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(acc);
        let v = _mm_packus_epi16(_mm_packs_epi32(v, v), v);
        let bytes = (_mm_cvtsi128_si32(v) as u32).to_le_bytes();
        opx.copy_from_slice(&bytes[..3]);
    }
}

/// Vertical pass: `src` holds rows `row_offset..` of an RGB8 image `w` pixels
/// wide, restricted to columns `cols`.
fn vertical(src: &[u8], w: usize, row_offset: usize, cols: Range<usize>, cy: &Coeffs) -> Vec<u8> {
    let out_w = cols.len();
    let stride = w * 3;
    let mut out = vec![0u8; cy.len() * out_w * 3];
    let mut acc = vec![0i32; out_w * 3];
    for (yy, orow) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let (start, k) = cy.taps(yy);
        acc.fill(ROUND);
        for (t, &wt) in k.iter().enumerate() {
            let y = start + t - row_offset;
            let srow = &src[y * stride + cols.start * 3..y * stride + cols.end * 3];
            accumulate(&mut acc, srow, wt);
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// `acc += row * w`, lane-wise: the hot loop of the vertical pass.
#[inline]
fn accumulate(acc: &mut [i32], row: &[u8], w: i32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { accumulate_avx2(acc, row, w) };
            return;
        }
    }
    accumulate_generic(acc, row, w);
}

#[inline(always)]
fn accumulate_generic(acc: &mut [i32], row: &[u8], w: i32) {
    for (a, &p) in acc.iter_mut().zip(row) {
        *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
    }
}

/// Same loop, compiled with AVX2 so it vectorises to 8-lane `vpmulld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_avx2(acc: &mut [i32], row: &[u8], w: i32) {
    accumulate_generic(acc, row, w)
}

/// Resize an RGB8 image to `dst_w` x `dst_h` exactly as Pillow's `Image.resize(size, filter)` and
/// return only the window `xs` x `ys` of the result (tightly packed,
/// `xs.len()` x `ys.len()`). Ranges must lie inside the destination.
pub fn resize_rgb8_window(
    img: &image::RgbImage,
    dst_w: usize,
    dst_h: usize,
    filter: Filter,
    xs: Range<usize>,
    ys: Range<usize>,
) -> Vec<u8> {
    let (src, src_w, src_h) = (img.as_raw(), img.width() as usize, img.height() as usize);
    let xs = xs.start.min(dst_w)..xs.end.min(dst_w);
    let ys = ys.start.min(dst_h)..ys.end.min(dst_h);
    if xs.is_empty() || ys.is_empty() || src_w == 0 || src_h == 0 {
        return vec![0u8; xs.len() * ys.len() * 3];
    }
    if filter == Filter::Box && src_w == 2 * dst_w && src_h == 2 * dst_h {
        return halve_box_even(src, src_w, xs, ys);
    }
    let need_h = dst_w != src_w;
    let need_v = dst_h != src_h;
    match (need_h, need_v) {
        // Same size: Pillow returns a copy.
        (false, false) => {
            let mut out = Vec::with_capacity(xs.len() * ys.len() * 3);
            for y in ys {
                out.extend_from_slice(&src[(y * src_w + xs.start) * 3..(y * src_w + xs.end) * 3]);
            }
            out
        }
        (true, false) => {
            let cx = Coeffs::new(src_w, dst_w, filter, xs);
            horizontal(src, src_w, ys, &cx)
        }
        (false, true) => {
            let cy = Coeffs::new(src_h, dst_h, filter, ys);
            vertical(src, src_w, 0, xs, &cy)
        }
        (true, true) => {
            let cy = Coeffs::new(src_h, dst_h, filter, ys);
            let rows = cy.source_span();
            let cx = Coeffs::new(src_w, dst_w, filter, xs.clone());
            let tmp = horizontal(src, src_w, rows.clone(), &cx);
            vertical(&tmp, xs.len(), rows.start, 0..xs.len(), &cy)
        }
    }
}

/// Exact 2:1 box reduction (both source sides even). Pillow's weights are
/// then exactly 1/2 = 2^21 each, so the horizontal pass is `(a + b + 1) >> 1`
/// and the vertical pass the same on its (already rounded) output.
fn halve_box_even(src: &[u8], src_w: usize, xs: Range<usize>, ys: Range<usize>) -> Vec<u8> {
    let stride = src_w * 3;
    let mut out = Vec::with_capacity(xs.len() * ys.len() * 3);
    let mut h0 = vec![0u8; xs.len() * 3];
    let mut h1 = vec![0u8; xs.len() * 3];
    let pair = |row: &[u8], dst: &mut [u8]| {
        for (d, x) in dst.chunks_exact_mut(3).zip(xs.clone()) {
            let a = &row[6 * x..6 * x + 6];
            for c in 0..3 {
                d[c] = ((u16::from(a[c]) + u16::from(a[c + 3]) + 1) >> 1) as u8;
            }
        }
    };
    for y in ys {
        pair(&src[2 * y * stride..(2 * y + 1) * stride], &mut h0);
        pair(&src[(2 * y + 1) * stride..(2 * y + 2) * stride], &mut h1);
        out.extend(
            h0.iter()
                .zip(&h1)
                .map(|(a, b)| ((u16::from(*a) + u16::from(*b) + 1) >> 1) as u8),
        );
    }
    out
}

/// Full Pillow-exact resize of an RGB8 image.
pub fn resize(img: &image::RgbImage, dst_w: u32, dst_h: u32, filter: Filter) -> image::RgbImage {
    let buf = resize_rgb8_window(
        img,
        dst_w as usize,
        dst_h as usize,
        filter,
        0..dst_w as usize,
        0..dst_h as usize,
    );
    // Length is dst_w * dst_h * 3 by construction.
    image::RgbImage::from_raw(dst_w, dst_h, buf)
        .unwrap_or_else(|| image::RgbImage::new(dst_w, dst_h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb(w: usize, h: usize, raw: Vec<u8>) -> image::RgbImage {
        image::RgbImage::from_raw(w as u32, h as u32, raw).expect("w * h * 3 bytes")
    }

    #[test]
    fn box_halving_of_even_width_averages_pairs_rounding_half_up() {
        let src: Vec<u8> = [10u8, 11, 200, 255]
            .iter()
            .flat_map(|&v| [v, v, v])
            .collect();
        let out = resize_rgb8_window(&rgb(4, 1, src), 2, 1, Filter::Box, 0..2, 0..1);
        assert_eq!(out, vec![11, 11, 11, 228, 228, 228]);
    }

    #[test]
    fn even_box_halving_fast_path_equals_generic_path() {
        let (w, h) = (38usize, 26usize);
        let src: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i * 7919 + 13) % 256) as u8)
            .collect();
        let fast = resize_rgb8_window(
            &rgb(w, h, src.clone()),
            w / 2,
            h / 2,
            Filter::Box,
            0..w / 2,
            0..h / 2,
        );
        let cy = Coeffs::new(h, h / 2, Filter::Box, 0..h / 2);
        let cx = Coeffs::new(w, w / 2, Filter::Box, 0..w / 2);
        let rows = cy.source_span();
        let tmp = horizontal(&src, w, rows.clone(), &cx);
        let generic = vertical(&tmp, w / 2, rows.start, 0..w / 2, &cy);
        assert_eq!(fast, generic);
    }

    #[test]
    fn simd_and_scalar_horizontal_agree() {
        let (w, h) = (53usize, 9usize);
        let src: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i * 104729 + 7) % 256) as u8)
            .collect();
        for dw in [20, 31, 53 * 3] {
            let cx = Coeffs::new(w, dw, Filter::Bicubic, 0..dw);
            let fast = horizontal(&src, w, 0..h, &cx);
            let mut scalar = vec![0u8; h * dw * 3];
            for (y, orow) in scalar.chunks_exact_mut(dw * 3).enumerate() {
                horizontal_row(&src[y * w * 3..(y + 1) * w * 3], orow, &cx);
            }
            assert_eq!(fast, scalar, "{w} -> {dw}");
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(500, 341), (375, 256), (7, 256), (1, 256), (1001, 500)] {
            let c = Coeffs::new(i, o, Filter::Bicubic, 0..o);
            for j in 0..o {
                let s: i64 = c.taps(j).1.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= 8,
                    "{i}->{o} at {j}: {s}"
                );
            }
        }
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let (w, h) = (37usize, 23usize);
        let src: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
        let img = rgb(w, h, src);
        for (dw, dh) in [(20, 13), (37, 50), (60, 23), (64, 40)] {
            let full = resize_rgb8_window(&img, dw, dh, Filter::Bicubic, 0..dw, 0..dh);
            let (xs, ys) = (3..dw - 2, 1..dh - 4);
            let win = resize_rgb8_window(&img, dw, dh, Filter::Bicubic, xs.clone(), ys.clone());
            let mut expect = Vec::new();
            for y in ys {
                expect.extend_from_slice(&full[(y * dw + xs.start) * 3..(y * dw + xs.end) * 3]);
            }
            assert_eq!(win, expect, "{dw}x{dh}");
        }
    }
}
