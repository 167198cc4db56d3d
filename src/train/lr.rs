//! Learning-rate schedules, as the reference `build_scheduler` (a LambdaLR
//! evaluated at the optimizer-step index): an optional warmup, then a linear
//! or cosine decay from `base_lr` to `final_lr` ending at `decay_end_steps`.

use serde::{Deserialize, Serialize};

/// Shape of the lr after warmup (reference `scheduler.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// `base_lr` for ever (warmup still applies if `warmup_from_zero`).
    #[default]
    Constant,
    /// Linear from `base_lr` to `final_lr` at `decay_end_steps`, then `final_lr`.
    Linear,
    /// Half-cosine from `base_lr` to `final_lr` at `decay_end_steps`, then `final_lr`.
    Cosine,
}

/// A schedule evaluated per optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LrSchedule {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Peak learning rate (reference `base_lr`).
    pub base_lr: f64,
    /// Learning rate at and after `decay_end_steps` (linear / cosine only).
    pub final_lr: f64,
    /// Optimizer steps of warmup.
    pub warmup_steps: u64,
    /// Step at which the decay reaches `final_lr` (clamped to >= warmup).
    pub decay_end_steps: u64,
    /// Ramp linearly from 0 during warmup; otherwise the reference keeps
    /// `base_lr` constant during "warmup" (its default).
    pub warmup_from_zero: bool,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self::constant(2e-4)
    }
}

impl LrSchedule {
    /// `lr` at every step, no warmup.
    pub fn constant(lr: f64) -> Self {
        Self {
            kind: ScheduleKind::Constant,
            base_lr: lr,
            final_lr: lr,
            warmup_steps: 0,
            decay_end_steps: 0,
            warmup_from_zero: false,
        }
    }

    /// Learning rate for the optimizer step with 0-based index `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let warmup = self.warmup_steps;
        if step < warmup {
            return if self.warmup_from_zero {
                (step + 1) as f64 / warmup as f64
            } else {
                1.0
            };
        }
        let final_ratio = if self.base_lr > 0.0 {
            self.final_lr / self.base_lr
        } else {
            1.0
        };
        let end = self.decay_end_steps.max(warmup);
        let span = (end - warmup).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            _ if step >= end => final_ratio,
            ScheduleKind::Linear => {
                let progress = (step - warmup) as f64 / span;
                1.0 - (1.0 - final_ratio) * progress
            }
            ScheduleKind::Cosine => {
                let progress = (step - warmup) as f64 / span;
                final_ratio
                    + (1.0 - final_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, from_zero: bool) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 2e-4,
            final_lr: 2e-5,
            warmup_steps: 10,
            decay_end_steps: 110,
            warmup_from_zero: from_zero,
        }
    }

    #[test]
    fn constant_is_constant() {
        let s = LrSchedule::constant(1e-3);
        assert_eq!(s.lr_at(0), 1e-3);
        assert_eq!(s.lr_at(1_000_000), 1e-3);
    }

    #[test]
    fn warmup_from_zero_ramps() {
        let s = sched(ScheduleKind::Linear, true);
        assert!((s.lr_at(0) - 2e-5).abs() < 1e-12);
        assert!((s.lr_at(4) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 2e-4).abs() < 1e-12);
        // reference default: constant during warmup
        assert_eq!(sched(ScheduleKind::Linear, false).lr_at(3), 2e-4);
    }

    #[test]
    fn linear_decay_reaches_final() {
        let s = sched(ScheduleKind::Linear, false);
        assert!((s.lr_at(10) - 2e-4).abs() < 1e-12);
        assert!((s.lr_at(60) - 1.1e-4).abs() < 1e-12);
        assert!((s.lr_at(110) - 2e-5).abs() < 1e-12);
        assert!((s.lr_at(10_000) - 2e-5).abs() < 1e-12);
    }

    #[test]
    fn cosine_decay_midpoint_and_end() {
        let s = sched(ScheduleKind::Cosine, false);
        assert!((s.lr_at(10) - 2e-4).abs() < 1e-12);
        assert!((s.lr_at(60) - 1.1e-4).abs() < 1e-12);
        assert!(s.lr_at(30) > 1.1e-4 && s.lr_at(90) < 1.1e-4);
        assert!((s.lr_at(110) - 2e-5).abs() < 1e-12);
    }
}
