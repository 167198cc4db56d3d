//! The demo's image set: a few classes of clearly different coloured shapes
//! on a noisy grey background, varied in position and size, deterministic
//! from the class and index alone (no RNG state, no threads), so the same
//! arguments always write the same files.

use std::path::Path;

use crate::error::FileError;

/// The classes, in label order: (folder name, foreground colour).
pub const CLASSES: [(&str, [u8; 3]); 6] = [
    ("red_disc", [220, 30, 30]),
    ("green_square", [30, 200, 40]),
    ("blue_stripes", [30, 50, 230]),
    ("yellow_cross", [230, 220, 30]),
    ("magenta_ring", [210, 40, 200]),
    ("cyan_triangle", [30, 210, 220]),
];

/// How many images of which classes, and their side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShapeSet {
    /// Classes used: the first `classes` of [`CLASSES`] (at most 6).
    pub classes: usize,
    /// Images per class.
    pub per_class: usize,
    /// Image side in pixels.
    pub side: u32,
}

/// A small deterministic hash (splitmix64's finaliser) for per-image jitter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether `(dx, dy)` from the centre lies on class `class`'s shape of
/// radius `r` (`y` is the absolute row, for the stripes).
fn inside(class: usize, dx: i32, dy: i32, r: i32, y: u32, side: u32) -> bool {
    let stripe = (side / 10).max(2);
    match class {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= r && dy.abs() <= r,
        2 => (y / stripe) % 2 == 0,
        3 => (dx - dy).abs() <= r / 4 || (dx + dy).abs() <= r / 4,
        4 => {
            let d2 = dx * dx + dy * dy;
            d2 <= r * r && d2 >= (r * r) / 3
        }
        _ => dy <= r / 2 && dy >= -r && 2 * dx.abs() <= dy + r,
    }
}

impl ShapeSet {
    /// Image `i` of `class` (`class < classes`).
    pub fn image(&self, class: usize, i: usize) -> image::RgbImage {
        let side = self.side;
        let h = mix((class * 1_000_003 + i) as u64);
        let s = side as i32;
        let jitter = |k: u32, span: i32| ((h >> (8 * k)) % span.max(1) as u64) as i32;
        let (cx, cy) = (3 * s / 8 + jitter(0, s / 4), 3 * s / 8 + jitter(1, s / 4));
        let r = 3 * s / 16 + jitter(2, s / 8);
        let fg = CLASSES[class % CLASSES.len()].1;
        image::RgbImage::from_fn(side, side, |x, y| {
            let (dx, dy) = (x as i32 - cx, y as i32 - cy);
            if inside(class, dx, dy, r, y, side) {
                image::Rgb(fg)
            } else {
                // Textured background: per-pixel noise over a soft gradient.
                let n = (mix(h ^ (u64::from(y) * u64::from(side) + u64::from(x))) % 40) as u8;
                let g = (40 * (x + y) / (2 * side).max(1)) as u8;
                image::Rgb([50 + n + g, 50 + n + g, 55 + n + g])
            }
        })
    }

    /// Write every image as `DIR/<k>_<class name>/<index>.png` (an
    /// ordinary class-folder layout; the `k_` prefix makes the sorted
    /// folder order, which `build` labels by, the class order) and return
    /// the folder names.
    pub fn write(&self, dir: &Path) -> Result<Vec<String>, FileError> {
        let mut names = Vec::new();
        for (class, (name, _)) in CLASSES.iter().enumerate().take(self.classes) {
            let name = format!("{class}_{name}");
            let folder = dir.join(&name);
            std::fs::create_dir_all(&folder).map_err(|e| FileError::io(&folder, e))?;
            for i in 0..self.per_class {
                let path = folder.join(format!("{i:04}.png"));
                self.image(class, i)
                    .save(&path)
                    .map_err(|e| FileError::format(&path, e.to_string()))?;
            }
            names.push(name);
        }
        Ok(names)
    }

    /// The first `n` images of each class on one sheet, one row per class
    /// (2 px gaps), for the demo page.
    pub fn example_sheet(&self, n: usize) -> image::RgbImage {
        let n = n.min(self.per_class).max(1);
        let cell = self.side + 2;
        let mut sheet = image::RgbImage::from_pixel(
            cell * n as u32,
            cell * self.classes.max(1) as u32,
            image::Rgb([255, 255, 255]),
        );
        for c in 0..self.classes {
            for i in 0..n {
                let (x, y) = (i as u32 * cell, c as u32 * cell);
                image::imageops::replace(&mut sheet, &self.image(c, i), x.into(), y.into());
            }
        }
        sheet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_classes_differ() {
        let set = ShapeSet {
            classes: 6,
            per_class: 3,
            side: 64,
        };
        assert_eq!(set.image(2, 1), set.image(2, 1));
        assert_ne!(set.image(2, 1), set.image(2, 2));
        // each class paints its own colour somewhere, and no other's
        for c in 0..6 {
            let img = set.image(c, 0);
            for (k, (_, fg)) in CLASSES.iter().enumerate() {
                let has = img.pixels().any(|p| p.0 == *fg);
                assert_eq!(has, k == c, "class {c} colour {k}");
            }
        }
    }
}
