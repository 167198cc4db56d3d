//! DiffAugment as the reference `src/disc/diffaug.py` (from StyleGAN-T):
//! translation, then colour, then cutout, each on with probability `prob`,
//! every sample with its own parameters, all differentiable w.r.t. the
//! image. The released config uses prob 1 and cutout 0 (a no-op).
//!
//! The reference draws `flags = rand(3) <= prob` and `r = rand(7, B)`
//! per call; [`DiffAugParams`] holds exactly those, so a test (or a
//! replay) can inject them:
//!
//! * translation by `t = floor(r0 * (2d + 1)) - d` rows (`r1`: columns),
//!   `d = round(0.125 * H)`, zeros shifted in (mid-grey in [-1, 1]);
//! * brightness `x += r2 - 0.5`; saturation `(x - mean_C) * 2 r3 + mean_C`;
//!   contrast `(x - mean_CHW) * (r4 + 0.5) + mean_CHW`;
//! * cutout (`cutout > 0`): a `round(cutout * H)` square centred at
//!   `floor(r5 * (H + 1 - side % 2))` (r6: columns) set to 0.

use candle_core::{Device, Tensor};

use super::{DiscError, Result};

/// The augmentation policy (reference `DiffAug(prob, cutout)`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiffAug {
    /// Probability of each of the three policies (`abs` taken; < 1e-6: off).
    pub prob: f64,
    /// Cutout side as a fraction of the image (0: none).
    pub cutout: f64,
}

impl Default for DiffAug {
    /// The released config: `prob: 1.0, cutout: 0.0`.
    fn default() -> Self {
        Self {
            prob: 1.0,
            cutout: 0.0,
        }
    }
}

/// One call's random draws: the three policy flags and, per sample, the
/// seven uniforms `r0..r6` (the reference's `rand01[k, i]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DiffAugParams {
    /// translation, colour, cutout.
    pub flags: [bool; 3],
    /// `rand[i][k]`: sample i, uniform k.
    pub rand: Vec<[f32; 7]>,
}

impl DiffAugParams {
    /// Fresh draws for a batch of `b`.
    pub fn draw(aug: &DiffAug, b: usize, rng: &mut impl rand::Rng) -> Self {
        let p = aug.prob.abs() as f32;
        let flags = [0; 3].map(|_| rng.random::<f32>() <= p);
        let rand = (0..b)
            .map(|_| [0; 7].map(|_| rng.random::<f32>()))
            .collect();
        Self { flags, rand }
    }

    /// All policies on, uniforms from a `[7, B]` tensor (the reference's
    /// `rand01` squeezed).
    pub fn from_tensor(r: &Tensor) -> Result<Self> {
        let (k, b) = r.dims2()?;
        if k != 7 {
            return Err(DiscError::Config(format!(
                "DiffAug draws are [{k}, {b}], want [7, B]"
            )));
        }
        let v = r.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let rand = (0..b).map(|i| std::array::from_fn(|j| v[j][i])).collect();
        Ok(Self {
            flags: [true; 3],
            rand,
        })
    }
}

/// Python's `round` (ties to even) of `n * ratio`.
fn py_round(n: usize, ratio: f64) -> usize {
    (n as f64 * ratio).round_ties_even().max(0.0) as usize
}

/// `[B, 1, 1, 1]` per-sample values.
fn per_sample(v: Vec<f32>, x: &Tensor) -> Result<Tensor> {
    let b = v.len();
    Ok(Tensor::from_vec(v, (b, 1, 1, 1), x.device())?.to_dtype(x.dtype())?)
}

impl DiffAug {
    /// Augment `[B, C, H, W]` with the draws `p` (one entry per sample).
    pub fn apply(&self, x: &Tensor, p: &DiffAugParams) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        if self.prob.abs() < 1e-6 {
            return Ok(x.clone());
        }
        if p.rand.len() != b {
            return Err(DiscError::Config(format!(
                "DiffAug draws for {} samples, batch of {b}",
                p.rand.len()
            )));
        }
        let mut x = x.clone();
        if p.flags[0] {
            x = self.translate(&x, p)?;
        }
        if p.flags[1] {
            let col = |k: usize, f: fn(f32) -> f32| p.rand.iter().map(|r| f(r[k])).collect();
            let bright = per_sample(col(2, |r| r - 0.5), &x)?;
            x = x.broadcast_add(&bright)?;
            let sat = per_sample(col(3, |r| r * 2.0), &x)?;
            let m = x.mean_keepdim(1)?;
            x = x
                .broadcast_sub(&m)?
                .broadcast_mul(&sat)?
                .broadcast_add(&m)?;
            let con = per_sample(col(4, |r| r + 0.5), &x)?;
            let m = x.mean_keepdim((1, 2, 3))?;
            x = x
                .broadcast_sub(&m)?
                .broadcast_mul(&con)?
                .broadcast_add(&m)?;
        }
        // The reference's `using_cutout` is `prob > 0`.
        if p.flags[2] && self.prob > 0.0 && self.cutout > 0.0 {
            let mask = cutout_mask(p, h, w, self.cutout, x.device())?;
            x = x.broadcast_mul(&mask.to_dtype(x.dtype())?)?;
        }
        Ok(x)
    }

    fn translate(&self, x: &Tensor, p: &DiffAugParams) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let (dh, dw) = (py_round(h, 0.125), py_round(w, 0.125));
        let xp = x.pad_with_zeros(2, dh, dh)?.pad_with_zeros(3, dw, dw)?;
        let shift = |r: f32, d: usize| (r * (2 * d + 1) as f32).floor() as i64 - d as i64;
        let mut rows = Vec::with_capacity(b);
        for (i, r) in p.rand.iter().enumerate() {
            // out[i, j] = x[i + t_h, j + t_w]: start at d + t in the padded copy.
            let top = (dh as i64 + shift(r[0], dh)).clamp(0, 2 * dh as i64) as usize;
            let left = (dw as i64 + shift(r[1], dw)).clamp(0, 2 * dw as i64) as usize;
            rows.push(xp.narrow(0, i, 1)?.narrow(2, top, h)?.narrow(3, left, w)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

/// `[B, 1, H, W]` ones with each sample's cutout window zeroed; window
/// indices clamped into the image as the reference's gather grid.
fn cutout_mask(p: &DiffAugParams, h: usize, w: usize, ratio: f64, dev: &Device) -> Result<Tensor> {
    let (ch, cw) = (py_round(h, ratio), py_round(w, ratio));
    let b = p.rand.len();
    let mut mask = vec![1f32; b * h * w];
    let range = |r: f32, n: usize, side: usize| -> Vec<usize> {
        let off = (r * (n + 1 - side % 2) as f32).floor() as i64;
        (0..side as i64)
            .map(|g| (g + off - (side / 2) as i64).clamp(0, n as i64 - 1) as usize)
            .collect()
    };
    for (i, r) in p.rand.iter().enumerate() {
        for &y in &range(r[5], h, ch) {
            for &xx in &range(r[6], w, cw) {
                mask[i * h * w + y * w + xx] = 0.0;
            }
        }
    }
    Ok(Tensor::from_vec(mask, (b, 1, h, w), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(b: usize, h: usize, w: usize) -> Tensor {
        let v: Vec<f32> = (0..b * h * w).map(|i| 1.0 + i as f32).collect();
        Tensor::from_vec(v, (b, 1, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn translation_shifts_in_zeros() {
        // 16 px: d = 2, t = floor(r * 5) - 2
        let x = ramp(1, 16, 16);
        let mut r = [0.5f32; 7];
        r[0] = 0.99; // t_h = +2: row i reads row i + 2
        r[1] = 0.0; // t_w = -2: column j reads column j - 2
        let p = DiffAugParams {
            flags: [true, false, false],
            rand: vec![r],
        };
        let y = DiffAug::default().apply(&x, &p).unwrap();
        let plane = |t: &Tensor| {
            t.squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let (y, x) = (plane(&y), plane(&x));
        assert_eq!(y[0][2], x[2][0]);
        assert_eq!(y[13][15], x[15][13]);
        assert_eq!(y[14][5], 0.0);
        assert_eq!(y[3][1], 0.0);
    }

    #[test]
    fn cutout_zeroes_a_clamped_window() {
        let x = ramp(1, 8, 8);
        let mut r = [0.5f32; 7];
        r[5] = 0.0; // offset 0 - side/2: window rows clamped to 0..1
        r[6] = 0.99; // offset 8: columns 6..7 (clamped)
        let p = DiffAugParams {
            flags: [false, false, true],
            rand: vec![r],
        };
        let aug = DiffAug {
            prob: 1.0,
            cutout: 0.5,
        };
        let y = aug.apply(&x, &p).unwrap().flatten_all().unwrap();
        let zeros: Vec<usize> = y
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, v)| **v == 0.0)
            .map(|(i, _)| i)
            .collect();
        // side 4, rows offset-2..offset+1 = -2..1 -> {0, 1}; cols 6..9 -> {6, 7}
        assert_eq!(zeros, vec![6, 7, 14, 15]);
    }
}
