//! ADM `center_crop_arr`, byte-exact with the PIL reference.

use std::borrow::Cow;
use std::path::Path;

use image::RgbImage;

use super::resample::{self, Filter};
use super::{DecodeOptions, ImageError, decode_rgb8};

/// ADM `center_crop_arr`: box-halve while short side >= 2*size, PIL bicubic
/// to short side `size`, center crop to `size` x `size`.
///
/// Reference (guided-diffusion, used by RAE):
/// `while min(w, h) >= 2*size: img = img.resize((w//2, h//2), BOX)`;
/// `scale = size / min(w, h)`; `img = img.resize((round(w*scale),
/// round(h*scale)), BICUBIC)`; crop at `((h-size)//2, (w-size)//2)`.
/// Python's `round` is round-half-to-even. Only the cropped window of the
/// bicubic resize is computed (identical bytes, less work), so extreme
/// aspect ratios that upscale to huge sizes stay cheap.
///
/// An empty input (0 width or height) cannot be resampled; it yields a black
/// `size` x `size` image rather than a panic ([`load_crop`] never produces
/// one: decoders reject empty images).
pub fn adm_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w0, h0) = img.dimensions();
    if size == 0 || w0 == 0 || h0 == 0 {
        return RgbImage::new(size, size);
    }
    let mut cur: Cow<'_, RgbImage> = Cow::Borrowed(img);
    while cur.width().min(cur.height()) as u64 >= 2 * u64::from(size) {
        let (w, h) = cur.dimensions();
        cur = Cow::Owned(resample::resize(&cur, w / 2, h / 2, Filter::Box));
    }
    let (w, h) = cur.dimensions();
    let scale = f64::from(size) / f64::from(w.min(h));
    let nw = (f64::from(w) * scale).round_ties_even() as usize;
    let nh = (f64::from(h) * scale).round_ties_even() as usize;
    let s = size as usize;
    let top = nh.saturating_sub(s) / 2;
    let left = nw.saturating_sub(s) / 2;
    let buf =
        resample::resize_rgb8_window(&cur, nw, nh, Filter::Bicubic, left..left + s, top..top + s);
    // The window is `size` x `size` unless the resized image were smaller
    // than `size` (impossible: its short side rounds to `size`).
    RgbImage::from_raw(size, size, buf).unwrap_or_else(|| RgbImage::new(size, size))
}

/// Decode `path` to RGB8 and apply [`adm_center_crop`].
pub fn load_crop(path: &Path, size: u32, opts: &DecodeOptions) -> Result<RgbImage, ImageError> {
    let img = decode_rgb8(path, opts)?;
    Ok(adm_center_crop(&img, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_of_target_size_is_unchanged() {
        let img = RgbImage::from_fn(256, 256, |x, y| {
            image::Rgb([x as u8, y as u8, (x ^ y) as u8])
        });
        assert_eq!(adm_center_crop(&img, 256), img);
    }

    #[test]
    fn tiny_and_extreme_aspect_inputs_give_the_target_size() {
        for (w, h) in [(1, 1), (1, 1000), (3000, 2), (255, 257), (513, 2000)] {
            let img = RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
            });
            let out = adm_center_crop(&img, 256);
            assert_eq!(out.dimensions(), (256, 256), "{w}x{h}");
        }
        let one = RgbImage::from_pixel(1, 1, image::Rgb([9, 200, 33]));
        let out = adm_center_crop(&one, 256);
        assert!(out.pixels().all(|p| p.0 == [9, 200, 33]));
    }

    #[test]
    fn empty_input_gives_black_target() {
        let out = adm_center_crop(&RgbImage::new(0, 5), 16);
        assert_eq!(out.dimensions(), (16, 16));
    }
}
