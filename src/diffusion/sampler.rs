//! Samplers for velocity models on the RAE grid
//! t_k = shift(1 - linspace(t0, t1, N)) (t = 1 noise -> t ~ 0 data):
//! Euler ODE (the reference default), Heun ODE, Euler-Maruyama SDE; with
//! classifier-free guidance or AutoGuidance on a t-interval.

use candle_core::{Result, Tensor};

use super::schedule::{NoiseRng, time_grid};
use crate::models::VelocityModel;

/// How the sampler integrates from noise (t = 1) to data (t = 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerMethod {
    /// x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k); torchdiffeq `euler`.
    EulerOde,
    /// Second-order Heun (trapezoid with an Euler predictor) on the same grid.
    HeunOde,
    /// Euler-Maruyama on the reverse SDE with the same marginals.
    EulerMaruyama,
}

impl SamplerMethod {
    /// The name on the command line (`--sampler`) and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            SamplerMethod::EulerOde => "euler",
            SamplerMethod::HeunOde => "heun",
            SamplerMethod::EulerMaruyama => "sde",
        }
    }
}

/// `--sampler euler|heun|sde`, by [`SamplerMethod::name`].
impl clap::ValueEnum for SamplerMethod {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::EulerOde, Self::HeunOde, Self::EulerMaruyama]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// The SDE's diffusion coefficient w(t) and last step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdeConfig {
    /// `SBDM` form: w(t) = norm * t / (1 - t) (the reference's magnitude
    /// for the linear path), scaled by `diffusion_norm`.
    pub diffusion_norm: f64,
    /// Grid start offset: t starts at shift(1 - t0); w is infinite at t = 1.
    pub t0: f64,
    /// The grid ends at shift(last_step_size); a final deterministic "Mean"
    /// step (no noise) goes from there to t = 0.
    pub last_step_size: f64,
}

impl Default for SdeConfig {
    fn default() -> Self {
        Self {
            diffusion_norm: 1.0,
            t0: 1e-3,
            last_step_size: 0.04,
        }
    }
}

/// Guidance, applied while the (shifted) t lies in [t_min, t_max]
/// (inclusive, as the reference `torch.where((t >= min) & (t <= max))`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guidance {
    /// The conditional velocity only.
    None,
    /// v = v_uncond + scale (v_cond - v_uncond), unconditional = `null_class`.
    Cfg {
        /// Guidance scale (> 1 strengthens the condition).
        scale: f64,
        /// Start of the interval where guidance applies.
        t_min: f64,
        /// End of that interval.
        t_max: f64,
        /// The label of the unconditional branch.
        null_class: u32,
    },
    /// v = v_guide + scale (v_model - v_guide), guide = a second (weaker) model.
    Auto {
        /// Guidance scale.
        scale: f64,
        /// Start of the interval where guidance applies.
        t_min: f64,
        /// End of that interval.
        t_max: f64,
    },
}

/// How to sample: method, grid, guidance and SDE settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// The integrator.
    pub method: SamplerMethod,
    /// Grid points (N); N-1 model steps for Euler.
    pub num_steps: usize,
    /// Time shift a (see `schedule::default_shift`).
    pub time_shift: f64,
    /// Classifier-free guidance or AutoGuidance, if any.
    pub guidance: Guidance,
    /// Used by [`SamplerMethod::EulerMaruyama`] only.
    pub sde: SdeConfig,
    /// Seeds the SDE noise (the ODE samplers are deterministic given z0).
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            method: SamplerMethod::EulerOde,
            num_steps: 50,
            time_shift: 1.0,
            guidance: Guidance::None,
            sde: SdeConfig::default(),
            seed: 0,
        }
    }
}

/// The ODE grid end (reference `check_interval`: t1 = 1 - 1/1000).
pub const ODE_T1: f64 = 0.999;

/// The guided velocity at one time (same t for the whole batch).
pub fn guided_velocity(
    model: &dyn VelocityModel,
    guide: Option<&dyn VelocityModel>,
    x: &Tensor,
    t: f32,
    y: &Tensor,
    guidance: &Guidance,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let tt = Tensor::full(t, b, x.device())?.to_dtype(x.dtype())?;
    let inside = |lo: f64, hi: f64| (t as f64) >= lo && (t as f64) <= hi;
    match *guidance {
        Guidance::None => model.forward(x, &tt, y),
        Guidance::Cfg {
            scale,
            t_min,
            t_max,
            null_class,
        } => {
            if !inside(t_min, t_max) {
                return model.forward(x, &tt, y);
            }
            // one batched forward over [cond; uncond], as the reference
            let y_null = Tensor::full(null_class, b, y.device())?.to_dtype(y.dtype())?;
            let xx = Tensor::cat(&[x, x], 0)?;
            let yy = Tensor::cat(&[y, &y_null], 0)?;
            let t2 = Tensor::cat(&[&tt, &tt], 0)?;
            let v = model.forward(&xx, &t2, &yy)?;
            let cond = v.narrow(0, 0, b)?;
            let uncond = v.narrow(0, b, b)?;
            &uncond + ((cond - &uncond)? * scale)?
        }
        Guidance::Auto {
            scale,
            t_min,
            t_max,
        } => {
            let v = model.forward(x, &tt, y)?;
            if !inside(t_min, t_max) {
                return Ok(v);
            }
            let g = guide
                .ok_or_else(|| candle_core::Error::Msg("AutoGuidance needs a guide model".into()))?
                .forward(x, &tt, y)?;
            &g + ((v - &g)? * scale)?
        }
    }
}

/// Integrate from the noise `z0` `[B,C,H,W]` (at t = 1) with labels `y`
/// `[B]` to a sample at the end of the grid. Deterministic given z0 (and
/// `cfg.seed` for the SDE).
pub fn sample(
    model: &dyn VelocityModel,
    guide: Option<&dyn VelocityModel>,
    z0: &Tensor,
    y: &Tensor,
    cfg: &SamplerConfig,
) -> Result<Tensor> {
    if cfg.num_steps < 2 {
        candle_core::bail!("sampler: num_steps must be >= 2, got {}", cfg.num_steps);
    }
    if matches!(cfg.guidance, Guidance::Auto { .. }) && guide.is_none() {
        candle_core::bail!("sampler: AutoGuidance needs a guide model");
    }
    let v_at = |x: &Tensor, t: f32| guided_velocity(model, guide, x, t, y, &cfg.guidance);
    let mut x = z0.clone();
    match cfg.method {
        SamplerMethod::EulerOde | SamplerMethod::HeunOde => {
            let ts = time_grid(cfg.num_steps, 0.0, ODE_T1, cfg.time_shift);
            for k in 0..ts.len() - 1 {
                let (tc, tn) = (ts[k], ts[k + 1]);
                tracing::trace!(step = k, t = tc, "ode step");
                let h = (tn - tc) as f64;
                let v = v_at(&x, tc)?;
                x = if cfg.method == SamplerMethod::EulerOde {
                    (&x + (v * h)?)?
                } else {
                    let xp = (&x + (&v * h)?)?;
                    let v2 = v_at(&xp, tn)?;
                    (&x + ((v + v2)? * (0.5 * h))?)?
                };
            }
        }
        SamplerMethod::EulerMaruyama => {
            let sde = cfg.sde;
            let ts = time_grid(
                cfg.num_steps,
                sde.t0,
                1.0 - sde.last_step_size,
                cfg.time_shift,
            );
            let mut rng = NoiseRng::new(cfg.seed);
            let dims = x.dims().to_vec();
            for k in 0..ts.len() - 1 {
                let (tc, tn) = (ts[k] as f64, ts[k + 1] as f64);
                let drift = sde_drift(&x, &v_at(&x, tc as f32)?, tc, sde.diffusion_norm)?;
                let w = sde.diffusion_norm * tc / (1.0 - tc);
                let noise = rng.randn(&dims, x.device())?.to_dtype(x.dtype())?;
                let mean = (&x - (drift * (tc - tn))?)?;
                x = (mean + (noise * (2.0 * w * (tc - tn)).sqrt())?)?;
            }
            // last step: deterministic mean step to t = 0
            let tl = *ts.last().unwrap_or(&0.0) as f64;
            let drift = sde_drift(&x, &v_at(&x, tl as f32)?, tl, sde.diffusion_norm)?;
            x = (&x - (drift * tl)?)?;
        }
    }
    Ok(x)
}

/// Reverse-time SDE drift for the linear path: v - w(t) * score, with the
/// score from the velocity: score = -((1-t) v + x) / t.
fn sde_drift(x: &Tensor, v: &Tensor, t: f64, norm: f64) -> Result<Tensor> {
    let w = norm * t / (1.0 - t);
    let score = ((v * (1.0 - t))? + x)?.affine(-1.0 / t, 0.0)?;
    v - (score * w)?
}

/// Times as a `[B]` tensor of `x`'s dtype (helper for callers).
pub fn times_like(t: f32, x: &Tensor) -> Result<Tensor> {
    Tensor::full(t, x.dim(0)?, x.device())?.to_dtype(x.dtype())
}
