//! Decoder output -> 8-bit pixels, and output file names from row keys.

use std::path::{Component, Path, PathBuf};

/// How `[0, 1]` floats become bytes (`--rounding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[value(rename_all = "lowercase")]
pub enum Rounding {
    /// `clamp(0,1) * 255` then truncate: the reference's
    /// `.mul(255).to(torch.uint8)` in `sample_ddp.py` / `eval`, so FID
    /// numbers compare with the paper's.
    #[default]
    #[value(alias = "truncate")]
    Trunc,
    /// `clamp(0,1) * 255` rounded to nearest.
    Round,
}

/// One channel value to a byte (NaN -> 0).
#[inline]
pub fn to_u8(v: f32, r: Rounding) -> u8 {
    let x = if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, 1.0) * 255.0
    };
    match r {
        Rounding::Trunc => x as u8,
        Rounding::Round => x.round() as u8,
    }
}

/// One image `[3,H,W]` (planar f32) -> interleaved RGB `[H,W,3]` bytes.
pub fn chw_to_hwc_u8(chw: &[f32], h: usize, w: usize, r: Rounding) -> Vec<u8> {
    let plane = h * w;
    let mut out = vec![0u8; plane * 3];
    for (p, px) in out.chunks_exact_mut(3).enumerate() {
        for (c, v) in px.iter_mut().enumerate() {
            *v = to_u8(chw[c * plane + p], r);
        }
    }
    out
}

/// The output path (without extension) for a row: its key's components
/// under `out`, the last one without its extension, `_flip` for flipped
/// rows. Absolute prefixes, `.` and `..` are dropped, so every path stays
/// inside `out`.
pub fn image_stem(out: &Path, key: &str, flip: bool) -> PathBuf {
    let norm = key.replace('\\', "/");
    let parts: Vec<String> = Path::new(&norm)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let mut p = out.to_path_buf();
    let last = parts.len().saturating_sub(1);
    for (i, part) in parts.iter().enumerate() {
        if i == last {
            let stem = Path::new(part)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| part.clone());
            p.push(if flip { format!("{stem}_flip") } else { stem });
        } else {
            p.push(part);
        }
    }
    if parts.is_empty() {
        p.push(if flip { "unnamed_flip" } else { "unnamed" });
    }
    p
}

/// A contact sheet: images `[H,W,3]` tiled on a near-square grid.
pub fn grid(images: &[Vec<u8>], h: usize, w: usize) -> (Vec<u8>, usize, usize) {
    let n = images.len().max(1);
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let (gw, gh) = (cols * w, rows * h);
    let mut out = vec![0u8; gw * gh * 3];
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        for y in 0..h {
            let dst = ((r * h + y) * gw + c * w) * 3;
            out[dst..dst + w * 3].copy_from_slice(&img[y * w * 3..(y + 1) * w * 3]);
        }
    }
    (out, gw, gh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_the_reference_truncation() {
        assert_eq!(to_u8(0.999, Rounding::Trunc), 254);
        assert_eq!(to_u8(0.999, Rounding::Round), 255);
        assert_eq!(to_u8(-1.0, Rounding::Trunc), 0);
        assert_eq!(to_u8(2.0, Rounding::Trunc), 255);
        assert_eq!(to_u8(f32::NAN, Rounding::Round), 0);
    }

    #[test]
    fn names_stay_inside_out() {
        let o = Path::new("/o");
        assert_eq!(
            image_stem(o, "n01440764/x.JPEG", false),
            Path::new("/o/n01440764/x")
        );
        assert_eq!(
            image_stem(o, "n01440764/x.JPEG", true),
            Path::new("/o/n01440764/x_flip")
        );
        assert_eq!(
            image_stem(o, "/etc/../../passwd", false),
            Path::new("/o/etc/passwd")
        );
        assert_eq!(image_stem(o, "..\\..\\a.png", false), Path::new("/o/a"));
        assert_eq!(
            image_stem(o, "sample/000001", false),
            Path::new("/o/sample/000001")
        );
        assert_eq!(image_stem(o, "", false), Path::new("/o/unnamed"));
    }

    #[test]
    fn planar_to_interleaved_and_grid() {
        let chw = [0.0, 1.0, 0.5, 0.5, 1.0, 0.0];
        assert_eq!(
            chw_to_hwc_u8(&chw, 1, 2, Rounding::Trunc),
            vec![0, 127, 255, 255, 127, 0]
        );
        let imgs = vec![vec![1u8; 3 * 4], vec![2u8; 3 * 4], vec![3u8; 3 * 4]];
        let (g, gw, gh) = grid(&imgs, 2, 2);
        assert_eq!((gw, gh), (4, 4));
        assert_eq!(g[0], 1);
        assert_eq!(g[2 * 3], 2);
        assert_eq!(g[(2 * 4) * 3], 3);
        assert_eq!(g[(2 * 4 + 2) * 3], 0);
    }
}
