//! Noise augmentation of the latent during decoder training, as the
//! reference code (`RAE.noising`, `src/stage1/rae.py`): one
//! `sigma_b = tau * U_b`, `U_b ~ U[0, 1)` per sample, shared by every token
//! and channel, and `z~ = z + sigma_b * eps`, `eps ~ N(0, I)`, on the raw
//! (not normalised) latent. Off at evaluation (`tau = 0` or no draws).
//!
//! The random draws are a value of their own ([`NoiseDraws`]) so tests can
//! pass the reference's draws and the trainer can make them from a seeded
//! stream.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Result, Stage1Error};

/// The reference training default (`noise_tau: 0.8`).
pub const DEFAULT_TAU: f64 = 0.8;

/// Noise augmentation with strength `tau`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseAug {
    /// Upper end of the per-sample sigma.
    pub tau: f64,
}

/// One batch's random draws: `u` `[B]` in [0, 1), `eps` shaped as the latent.
#[derive(Debug, Clone)]
pub struct NoiseDraws {
    /// Per-sample uniform draws.
    pub u: Tensor,
    /// Standard normal draws, one per latent element.
    pub eps: Tensor,
}

impl Default for NoiseAug {
    fn default() -> Self {
        Self { tau: DEFAULT_TAU }
    }
}

impl NoiseDraws {
    /// Draws for a latent of `shape` (`[B, ...]`) from `rng` (u first,
    /// then eps, as the reference's order).
    pub fn sample(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Self> {
        let b = *shape
            .first()
            .ok_or_else(|| Stage1Error::Invalid("noise for a scalar latent".into()))?;
        let n: usize = shape.iter().product();
        let u = crate::train::init::uniforms(rng, b, 0.0, 1.0);
        let eps = crate::train::init::normals(rng, n, 0.0, 1.0);
        Ok(Self {
            u: Tensor::from_vec(u, b, device)?,
            eps: Tensor::from_vec(eps, shape, device)?,
        })
    }
}

impl NoiseDraws {
    /// Draws for a batch of samples named by `ids` (the loader's
    /// layout-independent sample ids), each from its own stream (stream 2 of
    /// [`crate::train::loader::sample_seed`]): `u` then `row` normals. The
    /// same sample gets the same noise whatever the batch, rank or resume.
    pub fn for_samples(seed: u64, ids: &[u64], row: &[usize], device: &Device) -> Result<Self> {
        let n: usize = row.iter().product();
        let mut u = Vec::with_capacity(ids.len());
        let mut eps = Vec::with_capacity(ids.len() * n);
        for &id in ids {
            let mut rng = ChaCha8Rng::seed_from_u64(crate::train::loader::sample_seed(seed, id, 2));
            u.extend(crate::train::init::uniforms(&mut rng, 1, 0.0, 1.0));
            eps.extend(crate::train::init::normals(&mut rng, n, 0.0, 1.0));
        }
        let mut shape = vec![ids.len()];
        shape.extend_from_slice(row);
        Ok(Self {
            u: Tensor::from_vec(u, ids.len(), device)?,
            eps: Tensor::from_vec(eps, shape, device)?,
        })
    }
}

impl NoiseAug {
    /// `z + tau * u[b] * eps` (f32 as the reference: sigma first, then the
    /// noise, then the sum). `tau <= 0` returns `z` unchanged.
    pub fn apply(&self, z: &Tensor, draws: &NoiseDraws) -> Result<Tensor> {
        if self.tau <= 0.0 {
            return Ok(z.clone());
        }
        let b = z.dim(0)?;
        if draws.u.dims() != [b] || draws.eps.dims() != z.dims() {
            return Err(Stage1Error::Invalid(format!(
                "noise draws u {:?} / eps {:?} do not fit the latent {:?}",
                draws.u.dims(),
                draws.eps.dims(),
                z.dims()
            )));
        }
        let mut bshape = vec![1usize; z.rank()];
        bshape[0] = b;
        let sigma = draws
            .u
            .to_dtype(z.dtype())?
            .affine(self.tau, 0.0)?
            .reshape(bshape)?;
        let noise = sigma.broadcast_mul(&draws.eps.to_dtype(z.dtype())?)?;
        Ok((z + noise)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sigma_per_sample_and_off_at_zero() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let z = Tensor::zeros((2, 4, 3), candle_core::DType::F32, &dev).unwrap();
        let d = NoiseDraws::sample(&mut rng, z.dims(), &dev).unwrap();
        let u = d.u.to_vec1::<f32>().unwrap();
        assert!(u.iter().all(|&v| (0.0..1.0).contains(&v)));
        let out = NoiseAug { tau: 0.5 }.apply(&z, &d).unwrap();
        let ratio = (out / &d.eps).unwrap().to_vec3::<f32>().unwrap();
        for (b, rows) in ratio.iter().enumerate() {
            for v in rows.iter().flatten() {
                assert!((v - 0.5 * u[b]).abs() < 1e-6, "{v} vs {}", 0.5 * u[b]);
            }
        }
        let off = NoiseAug { tau: 0.0 }.apply(&z, &d).unwrap();
        assert_eq!(off.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // same seed, same draws (resume)
        let mut rng2 = ChaCha8Rng::seed_from_u64(3);
        let d2 = NoiseDraws::sample(&mut rng2, z.dims(), &dev).unwrap();
        assert_eq!(
            d2.eps.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            d.eps.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
