//! Flow-matching schedule of RAE: time shift, the sampling grid, the linear
//! interpolant and training-time sampling (seeded).
//!
//! Convention: t = 1 is pure noise, t = 0 is data; x_t = (1-t) x + t eps,
//! velocity target eps - x.

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// t' = a t / (1 + (a-1) t).
pub fn shift_time(t: f64, a: f64) -> f64 {
    a * t / (1.0 + (a - 1.0) * t)
}

/// Shift applied elementwise to a tensor of times.
pub fn shift_time_tensor(t: &Tensor, a: f64) -> Result<Tensor> {
    (t * a)? / ((t * (a - 1.0))? + 1.0)?
}

/// sqrt(tokens * channels / 4096), the reference `time_dist_shift`.
pub fn default_shift(tokens: usize, channels: usize) -> f64 {
    ((tokens * channels) as f64 / 4096.0).sqrt()
}

/// The reference sampling grid: shift(1 - linspace(t0, t1, n)) computed in
/// f32 like torch (t0 = 0, t1 = 0.999 for the ODE samplers).
pub fn time_grid(n: usize, t0: f64, t1: f64, shift: f64) -> Vec<f32> {
    let (t0, t1, a) = (t0 as f32, t1 as f32, shift as f32);
    (0..n)
        .map(|i| {
            // torch.linspace: start + i*step for the first half, end - (n-1-i)*step after
            let lin = if n == 1 {
                t0
            } else {
                let step = (t1 - t0) / (n - 1) as f32;
                if i < n / 2 {
                    t0 + step * i as f32
                } else {
                    t1 - step * (n - 1 - i) as f32
                }
            };
            let t = 1.0 - lin;
            a * t / (1.0 + (a - 1.0) * t)
        })
        .collect()
}

/// t broadcast to x: `[B]` -> `[B,1,1,...]`.
pub fn expand_t_like(t: &Tensor, x: &Tensor) -> Result<Tensor> {
    let mut shape = vec![t.dim(0)?];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    t.reshape(shape)
}

/// x_t = (1-t) x0 + t eps.
pub fn interpolate(x0: &Tensor, eps: &Tensor, t: &Tensor) -> Result<Tensor> {
    let t = expand_t_like(t, x0)?;
    x0.broadcast_mul(&(1.0 - &t)?)?
        .broadcast_add(&eps.broadcast_mul(&t)?)
}

/// The velocity target eps - x0.
pub fn velocity_target(x0: &Tensor, eps: &Tensor) -> Result<Tensor> {
    eps - x0
}

/// How training times are drawn (before the shift).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimeDist {
    /// t ~ U(0, 1).
    Uniform,
    /// sigmoid(N(mean, std)) (reference `logit-normal_0_1`).
    LogitNormal {
        /// Mean of the normal before the sigmoid.
        mean: f64,
        /// Standard deviation of the normal before the sigmoid.
        std: f64,
    },
}

impl TimeDist {
    /// Parse the reference names: `uniform`, `logit-normal_<mu>_<sigma>`.
    pub fn parse(s: &str) -> Option<Self> {
        let parts: Vec<&str> = s.split('_').collect();
        match parts.as_slice() {
            ["uniform"] => Some(Self::Uniform),
            ["logit-normal"] => Some(Self::LogitNormal {
                mean: 0.0,
                std: 1.0,
            }),
            ["logit-normal", m, s] => Some(Self::LogitNormal {
                mean: m.parse().ok()?,
                std: s.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// A seeded source of training randomness (times and Gaussian noise).
#[derive(Debug, Clone)]
pub struct NoiseRng {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl NoiseRng {
    /// A generator seeded with `seed` (ChaCha8: the same stream everywhere).
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    /// A uniform draw in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u1 = loop {
            let u = self.rng.random::<f64>();
            if u > 0.0 {
                break u;
            }
        };
        let u2 = self.rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * th.sin());
        r * th.cos()
    }

    /// A standard normal tensor (f32) of the given shape.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal() as f32).collect();
        Tensor::from_vec(v, shape, device)
    }

    /// One training time from `dist` restricted to [0, t_max] (the
    /// reference uses t_max = 1 - 1/1000, truncating the logit-normal), then
    /// shifted by `shift`.
    pub fn sample_time(&mut self, dist: TimeDist, t_max: f64, shift: f64) -> f64 {
        let t = match dist {
            TimeDist::Uniform => self.uniform() * t_max,
            TimeDist::LogitNormal { mean, std } => loop {
                let t = 1.0 / (1.0 + (-(mean + std * self.normal())).exp());
                if t <= t_max {
                    break t;
                }
            },
        };
        shift_time(t, shift)
    }

    /// `n` times as [`NoiseRng::sample_time`], an f32 tensor `[n]`.
    pub fn sample_times(
        &mut self,
        n: usize,
        dist: TimeDist,
        t_max: f64,
        shift: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let v: Vec<f32> = (0..n)
            .map(|_| self.sample_time(dist, t_max, shift) as f32)
            .collect();
        Tensor::from_vec(v, n, device)
    }

    /// Replace each label by `null_class` with probability `p` (CFG
    /// training dropout).
    pub fn drop_labels(&mut self, labels: &[u32], p: f64, null_class: u32) -> Vec<u32> {
        labels
            .iter()
            .map(|&l| if self.uniform() < p { null_class } else { l })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_and_default_shift() {
        assert!((shift_time(0.5, 2.0) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(shift_time(1.0, 6.9), 1.0);
        assert_eq!(shift_time(0.0, 6.9), 0.0);
        assert!((default_shift(256, 768) - 48f64.sqrt()).abs() < 1e-12);
        let t = Tensor::new(&[0.25f32, 0.5], &Device::Cpu).unwrap();
        let s = shift_time_tensor(&t, 2.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((s[0] - shift_time(0.25, 2.0) as f32).abs() < 1e-7);
    }

    #[test]
    fn grid_runs_from_noise_to_near_data() {
        let g = time_grid(50, 0.0, 0.999, 1.0);
        assert_eq!(g.len(), 50);
        assert_eq!(g[0], 1.0);
        assert!((g[49] - 0.001).abs() < 1e-6);
        assert!(g.windows(2).all(|w| w[1] < w[0]));
        let gs = time_grid(50, 0.0, 0.999, 4.0);
        assert!((gs[49] as f64 - shift_time(0.001, 4.0)).abs() < 1e-6);
    }

    #[test]
    fn interpolant_and_target() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let e = Tensor::new(&[[0f32, 0.0], [1.0, 1.0]], &dev).unwrap();
        let t = Tensor::new(&[0.25f32, 1.0], &dev).unwrap();
        let xt = interpolate(&x, &e, &t).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(xt, vec![vec![0.75, 1.5], vec![1.0, 1.0]]);
        let v = velocity_target(&x, &e).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(v, vec![vec![-1.0, -2.0], vec![-2.0, -3.0]]);
    }

    #[test]
    fn rng_is_seeded_and_distributions_are_sane() {
        let dev = Device::Cpu;
        let logit_normal = TimeDist::LogitNormal {
            mean: 0.0,
            std: 1.0,
        };
        let times =
            |r: &mut NoiseRng, n: usize| r.sample_times(n, logit_normal, 0.999, 1.0, &dev).unwrap();
        let ta = times(&mut NoiseRng::new(3), 64);
        let tb = times(&mut NoiseRng::new(3), 64);
        assert_eq!(ta.to_vec1::<f32>().unwrap(), tb.to_vec1::<f32>().unwrap());
        assert!(
            ta.to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|t| (0.0..=0.999).contains(t))
        );

        let mut r = NoiseRng::new(11);
        let n = 20000;
        let v: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        // logit-normal(0,1) has median 0.5; shift moves mass towards noise
        let t = times(&mut r, 4000);
        let med_frac = t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .filter(|x| **x < 0.5)
            .count() as f64
            / 4000.0;
        assert!((med_frac - 0.5).abs() < 0.05, "{med_frac}");
        let u = r
            .sample_times(4000, TimeDist::Uniform, 0.999, 3.0, &dev)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let below = u.iter().filter(|x| **x < 0.5).count() as f64 / 4000.0;
        // P(shift(U) < 0.5) = P(U < 1/(a+1)) = 0.25 for a = 3
        assert!((below - 0.25).abs() < 0.05, "{below}");
        assert_eq!(
            TimeDist::parse("logit-normal_0_1"),
            Some(TimeDist::LogitNormal {
                mean: 0.0,
                std: 1.0
            })
        );
        assert_eq!(TimeDist::parse("uniform"), Some(TimeDist::Uniform));
        assert_eq!(r.drop_labels(&[1, 2, 3], 0.0, 10), vec![1, 2, 3]);
        assert_eq!(r.drop_labels(&[1, 2, 3], 1.0, 10), vec![10, 10, 10]);
    }
}
