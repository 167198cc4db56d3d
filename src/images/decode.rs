//! Decoding to RGB8 with PIL's `Image.open(p).convert("RGB")` semantics.
//!
//! * The format comes from the file's signature, not its extension (ImageNet
//!   has PNG files named `.JPEG`).
//! * Dimensions are read from the header and checked against
//!   `max_pixels` before any pixel buffer is allocated.
//! * Alpha is dropped, not composited. 16-bit samples follow PIL's unpackers:
//!   RGB(A)/LA 16-bit keep the high byte (`>> 8`), 16-bit gray becomes mode
//!   `I;16`, whose RGB conversion clips at 255.
//! * CMYK/YCCK JPEGs: PIL always reads CMYK as Adobe-inverted (`CMYK;I`) and
//!   converts with `R = (255-C')(255-K')/255` on the un-inverted values, which
//!   is `raw_C * raw_K / 255`; zune-jpeg's CMYK and YCCK conversions compute
//!   exactly that.
//! * JPEGs go straight to zune-jpeg (what `image` uses too) so that a
//!   truncated file is an error, as in PIL, rather than a gray-padded image.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions as ZuneOptions;

use super::{DecodeOptions, ImageError};

/// Extensions taken by discovery (compared case-insensitively).
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Whether `path` has one of the image extensions (jpg/jpeg/png/webp, any case).
pub fn is_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Decode a file to RGB8 (alpha dropped as PIL's `convert("RGB")`).
pub fn decode_rgb8(path: &Path, opts: &DecodeOptions) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_rgb8_bytes(&bytes, path, opts)
}

/// Decode in-memory file contents to RGB8; `path` is only used in errors.
pub fn decode_rgb8_bytes(
    bytes: &[u8],
    path: &Path,
    opts: &DecodeOptions,
) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
        });
    }
    // Last line of defence: a decoder bug on hostile bytes must not take the
    // whole build down.
    match catch_unwind(AssertUnwindSafe(|| decode_inner(bytes, path, opts))) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(corrupt(path, format!("decoder panicked: {msg}")))
        }
    }
}

fn decode_inner(bytes: &[u8], path: &Path, opts: &DecodeOptions) -> Result<RgbImage, ImageError> {
    let format = image::guess_format(bytes).map_err(|_| ImageError::Unsupported {
        path: path.to_path_buf(),
        reason: "unrecognised file signature".into(),
    })?;
    match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, path, opts),
        ImageFormat::Png => {
            let dec = image::codecs::png::PngDecoder::with_limits(Cursor::new(bytes), limits(opts))
                .map_err(|e| map_image_error(path, e))?;
            // IHDR is always the first chunk: bit depth at 24, colour type at 25.
            let gray16 = bytes.get(24) == Some(&16) && bytes.get(25) == Some(&0);
            decode_with(dec, path, opts, gray16)
        }
        ImageFormat::WebP => {
            let dec = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))
                .map_err(|e| map_image_error(path, e))?;
            decode_with(dec, path, opts, false)
        }
        other => Err(ImageError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("{other:?} files are not supported (JPEG, PNG and WebP are)"),
        }),
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn check_size(
    path: &Path,
    width: u32,
    height: u32,
    opts: &DecodeOptions,
) -> Result<(), ImageError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > opts.max_pixels {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            pixels,
            limit: opts.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(corrupt(
            path,
            format!("zero-sized image ({width}x{height})"),
        ));
    }
    Ok(())
}

/// Allocation guard for the `image` decoders: room for the largest allowed
/// image at 16-bit RGBA plus working memory.
fn limits(opts: &DecodeOptions) -> image::Limits {
    let mut l = image::Limits::no_limits();
    l.max_alloc = Some(opts.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    l
}

fn map_image_error(path: &Path, e: image::ImageError) -> ImageError {
    use image::ImageError as E;
    match e {
        E::Unsupported(u) => ImageError::Unsupported {
            path: path.to_path_buf(),
            reason: u.to_string(),
        },
        E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            corrupt(path, format!("truncated: {io}"))
        }
        E::Limits(l) => corrupt(path, format!("exceeds the decoder memory limit: {l}")),
        other => corrupt(path, other.to_string()),
    }
}

/// `gray16`: the file is a 16-bit grayscale PNG (PIL mode `I;16`), which
/// `image` turns into gray+alpha when it has a tRNS chunk.
fn decode_with(
    mut dec: impl ImageDecoder,
    path: &Path,
    opts: &DecodeOptions,
    gray16: bool,
) -> Result<RgbImage, ImageError> {
    let (w, h) = dec.dimensions();
    check_size(path, w, h, opts)?;
    dec.set_limits(limits(opts))
        .map_err(|e| map_image_error(path, e))?;
    let img = DynamicImage::from_decoder(dec).map_err(|e| map_image_error(path, e))?;
    Ok(to_rgb8_like_pil(img, gray16))
}

/// `convert("RGB")` as PIL does it for what its PNG/WebP plugins produce.
fn to_rgb8_like_pil(img: DynamicImage, gray16: bool) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let from_fn =
        |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    match img {
        DynamicImage::ImageRgb8(i) => i,
        // Alpha dropped, not composited.
        DynamicImage::ImageRgba8(i) => from_fn(&|x, y| {
            let p = i.get_pixel(x, y).0;
            [p[0], p[1], p[2]]
        }),
        DynamicImage::ImageLuma8(i) => from_fn(&|x, y| [i.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLumaA8(i) => from_fn(&|x, y| [i.get_pixel(x, y).0[0]; 3]),
        // PIL unpacks "RGB;16B" / "RGBA;16B" / "LA;16B" by keeping the high byte.
        DynamicImage::ImageRgb16(i) => from_fn(&|x, y| i.get_pixel(x, y).0.map(|v| (v >> 8) as u8)),
        DynamicImage::ImageRgba16(i) => from_fn(&|x, y| {
            let p = i.get_pixel(x, y).0;
            [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]
        }),
        DynamicImage::ImageLumaA16(i) if gray16 => {
            from_fn(&|x, y| [i.get_pixel(x, y).0[0].min(255) as u8; 3])
        }
        DynamicImage::ImageLumaA16(i) => from_fn(&|x, y| [(i.get_pixel(x, y).0[0] >> 8) as u8; 3]),
        // 16-bit gray opens as "I;16"; its RGB conversion clips to 255.
        DynamicImage::ImageLuma16(i) => from_fn(&|x, y| [i.get_pixel(x, y).0[0].min(255) as u8; 3]),
        other => other.to_rgb8(),
    }
}

fn zune_decoder(bytes: &[u8], strict: bool) -> zune_jpeg::JpegDecoder<ZCursor<&[u8]>> {
    let options = ZuneOptions::default()
        .set_strict_mode(strict)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options)
}

/// True when no EOI marker follows the last start-of-scan: the entropy-coded
/// data was cut off. (0xFF 0xD9 cannot occur inside stuffed scan data.)
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_sos {
        Some(i) => !bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => true,
    }
}

fn decode_jpeg(bytes: &[u8], path: &Path, opts: &DecodeOptions) -> Result<RgbImage, ImageError> {
    // Strict first: it is the only mode in which zune reports running out of
    // data instead of padding with gray. Lenient second, for the quirks
    // (stray bytes, odd markers) that libjpeg/PIL also tolerate.
    let mut dec = zune_decoder(bytes, true);
    let mut strict = true;
    if dec.decode_headers().is_err() {
        dec = zune_decoder(bytes, false);
        strict = false;
        dec.decode_headers()
            .map_err(|e| corrupt(path, e.to_string()))?;
    }
    let (w, h) = dec
        .dimensions()
        .ok_or_else(|| corrupt(path, "no frame header"))?;
    let (w, h) = (
        u32::try_from(w).unwrap_or(u32::MAX),
        u32::try_from(h).unwrap_or(u32::MAX),
    );
    check_size(path, w, h, opts)?;
    let pixels = match dec.decode() {
        Ok(p) => p,
        Err(e) if strict => {
            if jpeg_is_truncated(bytes) {
                return Err(corrupt(path, format!("truncated: {e}")));
            }
            zune_decoder(bytes, false)
                .decode()
                .map_err(|e| corrupt(path, e.to_string()))?
        }
        Err(e) => return Err(corrupt(path, e.to_string())),
    };
    RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| corrupt(path, "decoder returned a buffer of the wrong size"))
}
