//! Crops -> encoder input on the encoder's device: [0, 1] floats, torch
//! bicubic resize to the encoder's input size (two matmuls with fixed
//! weight matrices), normalisation with the encoder's mean/std.

use candle_core::{DType, Device, Tensor};

use super::EncoderError;
use super::resample::bicubic_matrix;

/// RGB8 crops -> one `[B, H, W, 3]` u8 tensor on `device`, the crops'
/// bytes as they are. This is the only host -> device copy of a batch: a
/// quarter of the bytes of f32 pixels, and shared by both flips (see
/// [`u8_to_input`]). All crops must share a size.
pub fn crops_to_u8(crops: &[&image::RgbImage], device: &Device) -> Result<Tensor, EncoderError> {
    let first = crops
        .first()
        .ok_or_else(|| EncoderError::Input("no crops given".into()))?;
    let (w, h) = first.dimensions();
    if let Some(bad) = crops.iter().find(|c| c.dimensions() != first.dimensions()) {
        return Err(EncoderError::Input(format!(
            "crops differ in size: {}x{} and {}x{}",
            w,
            h,
            bad.width(),
            bad.height()
        )));
    }
    let (w, h) = (w as usize, h as usize);
    let mut data = Vec::with_capacity(crops.len() * h * w * 3);
    for img in crops {
        data.extend_from_slice(img.as_raw());
    }
    Ok(Tensor::from_vec(data, (crops.len(), h, w, 3), device)?)
}

/// `[B, H, W, 3]` u8 (on any device) -> `[F*B, 3, H, W]` f32 in [0, 1] on
/// the same device: for each entry of `flips` in order, the whole batch,
/// left-right flipped when the entry is true. `x / 255` is an exact f32
/// division, as torchvision's `to_tensor`, so the values are bit-identical
/// to converting on the host.
pub fn u8_to_input(pixels: &Tensor, flips: &[bool]) -> Result<Tensor, EncoderError> {
    let dims = pixels.dims();
    if pixels.dtype() != DType::U8 || dims.len() != 4 || dims[3] != 3 {
        return Err(EncoderError::Input(format!(
            "expected u8 crops [B, H, W, 3], got {:?} {dims:?}",
            pixels.dtype()
        )));
    }
    if flips.is_empty() {
        return Err(EncoderError::Input("no flips requested".into()));
    }
    let device = pixels.device();
    let w = dims[2];
    // Multiplying by 1/255 (candle's `tensor / scalar`) would round
    // differently from the division; divide by a 255 tensor instead.
    let x = pixels
        .permute((0, 3, 1, 2))?
        .to_dtype(DType::F32)?
        .broadcast_div(&Tensor::new(255f32, device)?)?;
    let mut parts = Vec::with_capacity(flips.len());
    for &flip in flips {
        if flip {
            // Reversed column indices: index_select exists on every backend.
            let rev: Vec<u32> = (0..w as u32).rev().collect();
            let rev = Tensor::from_vec(rev, w, device)?;
            parts.push(x.index_select(&rev, 3)?);
        } else {
            parts.push(x.clone());
        }
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        Tensor::cat(&parts, 0)?
    })
}

/// RGB8 crops -> `[B, 3, H, W]` f32 in [0, 1] (`x / 255` as torchvision's
/// `to_tensor`), optionally flipped left-right. All crops must share a size.
pub fn crops_to_tensor(
    crops: &[&image::RgbImage],
    flip: bool,
    device: &Device,
) -> Result<Tensor, EncoderError> {
    u8_to_input(&crops_to_u8(crops, device)?, &[flip])
}

/// Resize + normalise, fixed for one encoder.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    crop_size: usize,
    input_size: usize,
    /// `[input, crop]` (rows) and `[crop, input]` (columns, transposed).
    resize: Option<(Tensor, Tensor)>,
    mean: Tensor,
    std: Tensor,
}

impl Preprocessor {
    /// A preprocessor from `crop_size` to `input_size` with the encoder's
    /// normalisation, its tables on `device`.
    pub fn new(
        crop_size: usize,
        input_size: usize,
        mean: [f32; 3],
        std: [f32; 3],
        device: &Device,
    ) -> Result<Self, EncoderError> {
        let resize = if crop_size != input_size {
            let m = Tensor::from_vec(
                bicubic_matrix(crop_size, input_size),
                (input_size, crop_size),
                device,
            )?;
            let mt = m.t()?.contiguous()?;
            Some((m, mt))
        } else {
            None
        };
        Ok(Self {
            crop_size,
            input_size,
            resize,
            mean: Tensor::from_vec(mean.to_vec(), (1, 3, 1, 1), device)?,
            std: Tensor::from_vec(std.to_vec(), (1, 3, 1, 1), device)?,
        })
    }

    /// `[B, 3, crop, crop]` in [0, 1] -> `[B, 3, input, input]` f32,
    /// normalised.
    pub fn apply(&self, crops: &Tensor) -> Result<Tensor, EncoderError> {
        let dims = crops.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != self.crop_size || dims[3] != self.crop_size
        {
            return Err(EncoderError::Input(format!(
                "expected crops [B, 3, {0}, {0}], got {dims:?}",
                self.crop_size
            )));
        }
        let x = crops.to_dtype(DType::F32)?;
        let x = match &self.resize {
            Some((rows, cols_t)) => {
                let (b, c, h, w) = x.dims4()?;
                let n = self.input_size;
                // Along the width: [b*c*h, w] x [w, n].
                let x = x
                    .reshape((b * c * h, w))?
                    .matmul(cols_t)?
                    .reshape((b * c, h, n))?;
                // Along the height: [n, h] x [b*c, h, n].
                rows.broadcast_matmul(&x)?.reshape((b, c, n, n))?
            }
            None => x,
        };
        Ok(x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_reverses_columns() {
        let mut img = image::RgbImage::new(3, 2);
        img.put_pixel(0, 1, image::Rgb([255, 0, 51]));
        let dev = Device::Cpu;
        let t = crops_to_tensor(&[&img], false, &dev).unwrap();
        let f = crops_to_tensor(&[&img], true, &dev).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 3]);
        let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // channel 0, row 1: [1, 0, 0] vs flipped [0, 0, 1]
        assert_eq!(&t[3..6], &[1.0, 0.0, 0.0]);
        assert_eq!(&f[3..6], &[0.0, 0.0, 1.0]);
        // channel 2 (blue = 51/255 = 0.2)
        assert!((t[2 * 6 + 3] - 0.2).abs() < 1e-7);
    }

    #[test]
    fn device_conversion_equals_host_reference() {
        // The old host loop, kept here as the reference for bit-identity.
        fn host(img: &image::RgbImage, flip: bool) -> Vec<f32> {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let mut out = vec![0f32; 3 * h * w];
            for y in 0..h {
                for x in 0..w {
                    let sx = if flip { w - 1 - x } else { x };
                    let px = img.get_pixel(sx as u32, y as u32).0;
                    for c in 0..3 {
                        out[c * h * w + y * w + x] = px[c] as f32 / 255.0;
                    }
                }
            }
            out
        }
        let mk = |seed: u32| {
            image::RgbImage::from_fn(7, 5, |x, y| {
                let v = (x * 37 + y * 101 + seed * 53) as u8;
                image::Rgb([v, v.wrapping_mul(3), v.wrapping_add(129)])
            })
        };
        let (a, b) = (mk(1), mk(2));
        let dev = Device::Cpu;
        let raw = crops_to_u8(&[&a, &b], &dev).unwrap();
        assert_eq!(raw.dims(), &[2, 5, 7, 3]);
        let x = u8_to_input(&raw, &[false, true]).unwrap();
        assert_eq!(x.dims(), &[4, 3, 5, 7]);
        let got = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = [
            host(&a, false),
            host(&b, false),
            host(&a, true),
            host(&b, true),
        ]
        .concat();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(u8_to_input(&x, &[false]).is_err());
        assert!(u8_to_input(&raw, &[]).is_err());
    }

    #[test]
    fn constant_image_survives_resize_and_normalises() {
        let dev = Device::Cpu;
        let p = Preprocessor::new(32, 28, [0.5, 0.25, 0.0], [0.5, 0.5, 2.0], &dev).unwrap();
        let x = Tensor::full(0.75f32, (2, 3, 32, 32), &dev).unwrap();
        let y = p.apply(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 28, 28]);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let plane = 28 * 28;
        for (c, want) in [0.5f32, 1.0, 0.375].iter().enumerate() {
            for v in &y[c * plane..(c + 1) * plane] {
                assert!((v - want).abs() < 1e-5, "channel {c}: {v} vs {want}");
            }
        }
    }

    #[test]
    fn rejects_wrong_crop_size() {
        let dev = Device::Cpu;
        let p = Preprocessor::new(32, 28, [0.0; 3], [1.0; 3], &dev).unwrap();
        let x = Tensor::zeros((1, 3, 30, 30), DType::F32, &dev).unwrap();
        assert!(matches!(p.apply(&x), Err(EncoderError::Input(_))));
    }
}
