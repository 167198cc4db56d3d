//! Flow-matching schedule (time shift, grid, interpolant, training-time
//! sampling) and the samplers (Euler / Heun ODE, Euler-Maruyama SDE) with
//! classifier-free guidance and AutoGuidance.

pub mod sampler;
pub mod schedule;

pub use sampler::{Guidance, SamplerConfig, SamplerMethod, SdeConfig, sample};
pub use schedule::{
    NoiseRng, TimeDist, default_shift, interpolate, shift_time, time_grid, velocity_target,
};
