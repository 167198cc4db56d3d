//! The discriminator update of one training step (reference
//! `train_stage1.py`, the `if train_disc:` block), split so that a
//! data-parallel trainer can all-reduce the head gradients between
//! [`DiscTrainer::gradients`] and [`DiscTrainer::apply`] (the reference
//! never does: see the README).
//!
//! Per step: the fake is the post-update decoder's noise-free
//! reconstruction, quantised ([`super::quantize_fake`]); fake and real get
//! independent DiffAug draws (fake first); the discriminator runs in
//! training mode on the fake, then on the real (one power iteration each);
//! hinge loss; AdamW on the heads.

use std::collections::HashMap;

use candle_core::Tensor;

use super::diffaug::{DiffAug, DiffAugParams};
use super::loss::{hinge_d_loss, quantize_fake};
use super::{Discriminator, Mode, Result};
use crate::train::optim::AdamWState;
use crate::train::{AdamW, AdamWConfig, Gradients, LrSchedule, ParamGroup};

/// Which counter indexes the discriminator's learning-rate schedule.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum DiscLrClock {
    /// The global training step, like the decoder's schedule: D's warm-up
    /// and cosine sit on the same epochs as G's and end at `final_lr`.
    #[default]
    GlobalStep,
    /// The number of D updates so far (the reference: its scheduler only
    /// steps with D, so D warms up again at `disc_upd_start` and ends
    /// near 0.41 x base instead of `final_lr`).
    DiscUpdates,
}

impl DiscLrClock {
    /// The D learning rate at training step `global_step` after `updates`
    /// D updates.
    pub fn lr(self, schedule: &LrSchedule, global_step: u64, updates: u64) -> f64 {
        match self {
            Self::GlobalStep => schedule.lr_at(global_step),
            Self::DiscUpdates => schedule.lr_at(updates),
        }
    }
}

/// What one D update measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DiscStats {
    /// Hinge loss.
    pub loss: f32,
    /// Mean logit on the real images.
    pub logits_real: f32,
    /// Mean logit on the fakes.
    pub logits_fake: f32,
    /// Fraction of logit pairs with real > fake (the reference's accuracy).
    pub accuracy: f32,
}

/// The discriminator's checkpointable state.
#[derive(Debug, Clone)]
pub struct DiscState {
    /// Head parameters and spectral-norm buffers, reference names.
    pub heads: Vec<(String, Tensor)>,
    /// AdamW moments and step counts of the heads.
    pub optim: AdamWState,
    /// D updates taken (the [`DiscLrClock::DiscUpdates`] clock).
    pub updates: u64,
}

/// The discriminator with its augmentation, optimizer and schedule.
#[derive(Debug)]
pub struct DiscTrainer {
    /// The discriminator (frozen backbone, trainable heads).
    pub disc: Discriminator,
    /// DiffAug policy.
    pub aug: DiffAug,
    /// D learning-rate schedule (same config as G's in the reference).
    pub schedule: LrSchedule,
    /// What indexes `schedule`.
    pub clock: DiscLrClock,
    opt: AdamW,
    updates: u64,
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
}

impl DiscTrainer {
    /// AdamW over every head parameter (the reference's `disc_params`).
    pub fn new(
        disc: Discriminator,
        aug: DiffAug,
        opt: AdamWConfig,
        schedule: LrSchedule,
        clock: DiscLrClock,
    ) -> Result<Self> {
        let opt = AdamW::new(vec![ParamGroup::new(disc.heads.named_params())], opt)?;
        Ok(Self {
            disc,
            aug,
            schedule,
            clock,
            opt,
            updates: 0,
        })
    }

    /// D updates taken so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The learning rate of the next D update at training step `global_step`.
    pub fn lr(&self, global_step: u64) -> f64 {
        self.clock.lr(&self.schedule, global_step, self.updates)
    }

    /// The hinge loss's gradients on the heads for a quantised fake and a
    /// real batch, both `[B, 3, H, W]` in [-1, 1], with the given DiffAug
    /// draws. Advances the spectral-norm buffers twice (fake, then real).
    pub fn gradients(
        &mut self,
        fake_pm1: &Tensor,
        real_pm1: &Tensor,
        fake_aug: &DiffAugParams,
        real_aug: &DiffAugParams,
    ) -> Result<(Gradients, DiscStats)> {
        let fake_in = self.aug.apply(&fake_pm1.detach(), fake_aug)?;
        let real_in = self.aug.apply(&real_pm1.detach(), real_aug)?;
        let logits_fake = self.disc.logits(&fake_in, Mode::Train)?;
        let logits_real = self.disc.logits(&real_in, Mode::Train)?;
        let loss = hinge_d_loss(&logits_real, &logits_fake)?;
        let store = loss.backward()?;
        let grads = Gradients::from_store(&store, &self.disc.heads.named_params())?;
        let accuracy = logits_real
            .gt(&logits_fake)?
            .to_dtype(candle_core::DType::F32)?
            .mean_all()?;
        let stats = DiscStats {
            loss: scalar(&loss)?,
            logits_real: scalar(&logits_real.mean_all()?)?,
            logits_fake: scalar(&logits_fake.mean_all()?)?,
            accuracy: scalar(&accuracy)?,
        };
        Ok((grads, stats))
    }

    /// One AdamW update of the heads with (all-reduced) gradients; returns
    /// the learning rate used.
    pub fn apply(&mut self, grads: &Gradients, global_step: u64) -> Result<f64> {
        let lr = self.lr(global_step);
        self.opt.step(grads, lr)?;
        self.updates += 1;
        Ok(lr)
    }

    /// A whole single-process D update: quantise the reconstruction
    /// (`[B, 3, H, W]` in [0, 1] scale, from the post-update decoder without
    /// latent noise), draw DiffAug for the fake then the real (`real01` in
    /// [0, 1]), gradients, AdamW.
    pub fn step(
        &mut self,
        recon01: &Tensor,
        real01: &Tensor,
        global_step: u64,
        rng: &mut impl rand::Rng,
    ) -> Result<DiscStats> {
        let fa = DiffAugParams::draw(&self.aug, recon01.dim(0)?, rng);
        let ra = DiffAugParams::draw(&self.aug, real01.dim(0)?, rng);
        self.step_with(recon01, real01, [&fa, &ra], global_step, Ok)
    }

    /// [`Self::step`] with the DiffAug draws given (`[fake, real]`) and the
    /// head gradients passed through `reduce` before AdamW (the all-reduce
    /// of a data-parallel run).
    pub fn step_with(
        &mut self,
        recon01: &Tensor,
        real01: &Tensor,
        augs: [&DiffAugParams; 2],
        global_step: u64,
        reduce: impl FnOnce(Gradients) -> Result<Gradients>,
    ) -> Result<DiscStats> {
        let fake = quantize_fake(recon01)?;
        let real = ((real01.detach() * 2.0)? - 1.0)?;
        let (grads, stats) = self.gradients(&fake, &real, augs[0], augs[1])?;
        self.apply(&reduce(grads)?, global_step)?;
        Ok(stats)
    }

    /// The optimizer (moments, step count).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Everything a checkpoint must keep to resume the discriminator.
    pub fn export_state(&self) -> DiscState {
        DiscState {
            heads: self.disc.heads.state_dict(),
            optim: self.opt.state().clone(),
            updates: self.updates,
        }
    }

    /// Restore [`Self::export_state`]'s output.
    pub fn import_state(&mut self, state: DiscState) -> Result<()> {
        let heads: HashMap<String, Tensor> = state.heads.into_iter().collect();
        self.disc.heads.load_state_dict(&heads)?;
        self.opt.load_state(state.optim)?;
        self.updates = state.updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ScheduleKind;

    #[test]
    fn clocks_place_the_schedule() {
        // released recipe, 10 steps per epoch: D starts at epoch 6
        let s = LrSchedule {
            kind: ScheduleKind::Cosine,
            base_lr: 2e-4,
            final_lr: 2e-5,
            warmup_steps: 10,
            decay_end_steps: 160,
            warmup_from_zero: true,
        };
        let (start, end) = (60, 159);
        // reference: warm-up again from D's first update, never decays to final
        assert!((DiscLrClock::DiscUpdates.lr(&s, start, 0) - 2e-5).abs() < 1e-15);
        let last = DiscLrClock::DiscUpdates.lr(&s, end, end - start);
        assert!(last > 8e-5 && last < 8.5e-5, "{last}");
        // default: the decoder's schedule at the same step, ends at final_lr
        assert_eq!(DiscLrClock::GlobalStep.lr(&s, start, 0), s.lr_at(start));
        assert!((DiscLrClock::GlobalStep.lr(&s, 160, 100) - 2e-5).abs() < 1e-15);
    }
}
