//! The adversarial half of a stage-1 run, as the reference
//! (`train_stage1.py`): the DINO discriminator of [`crate::disc`] with its
//! own AdamW and learning-rate schedule. Per training step `s`:
//!
//! * from `gan_start_epoch`, the decoder's loss gets `-mean(D(DiffAug(x)))`
//!   with the adaptive weight (the discriminator in eval mode: no
//!   spectral-norm iteration), see [`Gan::generator_term`];
//! * after the decoder's update, from `disc_start_epoch`, one discriminator
//!   update on the post-update decoder's noise-free, 8-bit quantised
//!   reconstruction against the real crop ([`Gan::disc_step`]).
//!
//! The DiffAug draws of step `s` come from a stream keyed by (seed, s), in
//! the reference's order (generator's fake, D's fake, D's real), so a
//! resumed run draws what the uninterrupted one did with nothing to store.
//! The heads, their spectral-norm buffers, the AdamW moments and the D
//! update count go into the checkpoint's `aux` tensors (`disc.*`) and
//! metadata ([`Gan::save`], [`Gan::restore`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::train_config::DecoderTrainConfig;
use super::{AdversarialLoss, Result, Stage1Error};
use crate::disc::backbone::resolve_dino_weights;
use crate::disc::{
    DiffAug, DiffAugParams, DinoBackbone, DiscState, DiscTrainer, Discriminator, Heads, HeadsConfig,
};
use crate::train::Gradients;
use crate::train::checkpoint::{self, Checkpoint};

/// Prefix of the discriminator's tensors in a checkpoint's `aux` map.
const AUX: &str = "disc";
/// Metadata key of the D optimizer's step counts and the D update count.
const META: &str = "disc_state";
/// Decorrelates the heads' initialisation and the DiffAug streams from the
/// decoder's draws made from the same seed.
const HEADS_SEED: u64 = 0xd15c_4ead;
const AUG_SEED: u64 = 0xd1ff_a065;

/// What the discriminator did in one step (`log.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DiscLog {
    /// Hinge loss.
    pub d_loss: f64,
    /// Mean logit on the real crops.
    pub logits_real: f64,
    /// Mean logit on the fakes.
    pub logits_fake: f64,
    /// Share of logit pairs with real > fake.
    pub d_accuracy: f64,
    /// Learning rate of this D update.
    pub disc_lr: f64,
}

/// The D step counts a checkpoint keeps in its metadata.
#[derive(Debug, Serialize, serde::Deserialize)]
struct SavedCounts {
    updates: u64,
    optim_step: u64,
    param_steps: BTreeMap<String, u64>,
}

/// The discriminator, its trainer and the two start steps.
#[derive(Debug)]
pub struct Gan {
    trainer: DiscTrainer,
    disc_start: u64,
    gan_start: u64,
    seed: u64,
    /// This process's rank and the number of ranks: each rank takes its
    /// slice of the draws for the global batch, so the draws do not depend
    /// on the layout.
    rank: usize,
    world: usize,
}

impl Gan {
    /// The discriminator of `cfg` (`None` when `disc_weight` is 0): the
    /// frozen DINO backbone from `dino_weights` (a clear error naming where
    /// it looked when absent), fresh heads from the seed, AdamW with the
    /// decoder's settings on the decoder's schedule (`steps_per_epoch`).
    pub fn new(
        cfg: &DecoderTrainConfig,
        steps_per_epoch: u64,
        device: &Device,
    ) -> Result<Option<Self>> {
        if cfg.disc_weight <= 0.0 {
            return Ok(None);
        }
        let path = resolve_dino_weights(&cfg.dino_weights, None).map_err(|e| {
            Stage1Error::Invalid(format!(
                "{e} (or train without the discriminator: --disc-weight 0)"
            ))
        })?;
        let dino = cfg.dino_config.clone().unwrap_or_default();
        let backbone = DinoBackbone::from_file(dino, &path, device)?;
        let heads = Heads::init(
            HeadsConfig {
                channels: backbone.config().embed_dim,
                count: backbone.config().feature_count(),
                ..HeadsConfig::default()
            },
            cfg.seed ^ HEADS_SEED,
            device,
        )?;
        let trainer = DiscTrainer::new(
            Discriminator::new(backbone, heads)?,
            DiffAug::default(),
            cfg.optimizer(),
            cfg.schedule(steps_per_epoch),
            cfg.disc_lr_clock,
        )?;
        let n: usize = trainer
            .disc
            .heads
            .named_params()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        tracing::info!(
            "discriminator: DINO backbone {}, {:.2}M trainable head parameters; \
             D updates from epoch {}, adversarial term from epoch {}",
            path.display(),
            n as f64 / 1e6,
            cfg.disc_start_epoch,
            cfg.gan_start_epoch
        );
        Ok(Some(Self {
            trainer,
            disc_start: cfg.disc_start_epoch * steps_per_epoch,
            gan_start: cfg.gan_start_epoch * steps_per_epoch,
            seed: cfg.seed,
            rank: 0,
            world: 1,
        }))
    }

    /// Take this rank's slice (`rank` of `world`) of each step's draws.
    pub fn set_rank(&mut self, rank: usize, world: usize) {
        (self.rank, self.world) = (rank, world.max(1));
    }

    /// DiffAug draws for this rank's `b` samples: the global batch's
    /// draws, this rank's slice.
    fn draw(&self, b: usize, rng: &mut ChaCha8Rng) -> DiffAugParams {
        let mut p = DiffAugParams::draw(&self.trainer.aug, b * self.world, rng);
        p.rand = p.rand[self.rank * b..(self.rank + 1) * b].to_vec();
        p
    }

    /// The DiffAug stream of training step `step`.
    pub fn rng(&self, step: u64) -> ChaCha8Rng {
        let mut r = ChaCha8Rng::seed_from_u64(self.seed ^ AUG_SEED);
        r.set_stream(step);
        r
    }

    /// The adversarial term for step `step`'s generator loss (drawing its
    /// DiffAug from `rng`), `None` before `gan_start_epoch`.
    pub fn generator_term<'a>(
        &'a self,
        step: u64,
        rng: &'a mut ChaCha8Rng,
    ) -> Option<impl AdversarialLoss + 'a> {
        (step >= self.gan_start).then_some({
            move |recon_pm1: &Tensor| -> candle_core::Result<Tensor> {
                let params = self.draw(recon_pm1.dim(0)?, &mut *rng);
                let disc = &self.trainer.disc;
                disc.generator_loss(recon_pm1, &self.trainer.aug, &params)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
        })
    }

    /// Whether the discriminator trains at step `step`.
    pub fn trains_at(&self, step: u64) -> bool {
        step >= self.disc_start
    }

    /// One D update at training step `step` on the post-update decoder's
    /// noise-free reconstruction `recon01` and the real crops `real01`
    /// (both `[B, 3, H, W]` in [0, 1] scale), DiffAug from `rng`, the head
    /// gradients through `reduce` (the ranks' all-reduce).
    pub fn disc_step(
        &mut self,
        batch: [&Tensor; 2],
        step: u64,
        rng: &mut ChaCha8Rng,
        reduce: impl FnOnce(Gradients) -> crate::disc::Result<Gradients>,
    ) -> Result<DiscLog> {
        let [recon01, real01] = batch;
        let disc_lr = self.trainer.lr(step);
        let fa = self.draw(recon01.dim(0)?, rng);
        let ra = self.draw(real01.dim(0)?, rng);
        let s = self
            .trainer
            .step_with(&recon01.detach(), real01, [&fa, &ra], step, reduce)?;
        Ok(DiscLog {
            d_loss: s.loss as f64,
            logits_real: s.logits_real as f64,
            logits_fake: s.logits_fake as f64,
            d_accuracy: s.accuracy as f64,
            disc_lr,
        })
    }

    /// The discriminator and its trainer.
    pub fn trainer(&self) -> &DiscTrainer {
        &self.trainer
    }

    /// Put the discriminator's state into a checkpoint: heads and
    /// spectral-norm buffers as `aux` `disc.heads.*`, AdamW moments as
    /// `disc.optim.{m,v}.*`, counts in the metadata.
    pub fn save(&self, ck: &mut Checkpoint) -> Result<()> {
        let st = self.trainer.export_state();
        for (k, t) in st.heads {
            ck.aux.insert(format!("{AUX}.{k}"), t);
        }
        let mut moments = Vec::new();
        let param_steps = checkpoint::push_optim(&st.optim, &format!("{AUX}.optim"), &mut moments);
        for (k, t) in moments {
            ck.aux.insert(k, t.clone());
        }
        let counts = SavedCounts {
            updates: st.updates,
            optim_step: st.optim.step,
            param_steps,
        };
        let json = serde_json::to_string(&counts)
            .map_err(|e| Stage1Error::Invalid(format!("discriminator state: {e}")))?;
        ck.extra.insert(META.into(), json);
        Ok(())
    }

    /// Restore what [`Self::save`] wrote. A checkpoint without it (written
    /// without the discriminator) is accepted only while the discriminator
    /// has not trained yet (`ck.step <= disc_start`): it starts fresh then.
    pub fn restore(&mut self, ck: &Checkpoint, path: &Path) -> Result<()> {
        let Some(json) = ck.extra.get(META) else {
            if ck.step > self.disc_start {
                return Err(Stage1Error::BadWeights {
                    path: path.to_path_buf(),
                    reason: format!(
                        "no discriminator state, but the discriminator trains from step {} \
                         and the checkpoint is at step {}",
                        self.disc_start, ck.step
                    ),
                });
            }
            return Ok(());
        };
        let counts: SavedCounts =
            serde_json::from_str(json).map_err(|e| Stage1Error::BadWeights {
                path: path.to_path_buf(),
                reason: format!("discriminator state: {e}"),
            })?;
        let (mut heads, mut ms, mut vs) = (HashMap::new(), BTreeMap::new(), BTreeMap::new());
        let (pm, pv, ph) = (
            format!("{AUX}.optim.m."),
            format!("{AUX}.optim.v."),
            format!("{AUX}."),
        );
        for (k, t) in &ck.aux {
            if let Some(n) = k.strip_prefix(&pm) {
                ms.insert(n.to_string(), t.clone());
            } else if let Some(n) = k.strip_prefix(&pv) {
                vs.insert(n.to_string(), t.clone());
            } else if let Some(n) = k.strip_prefix(&ph) {
                heads.insert(n.to_string(), t.clone());
            }
        }
        let optim = checkpoint::assemble_optim(
            counts.optim_step,
            counts.param_steps,
            ms,
            vs,
            &format!("{AUX}.optim"),
            path,
        )?;
        let mut heads: Vec<(String, Tensor)> = heads.into_iter().collect();
        heads.sort_by(|a, b| a.0.cmp(&b.0));
        self.trainer
            .import_state(DiscState {
                heads,
                optim,
                updates: counts.updates,
            })
            .map_err(|e| Stage1Error::BadWeights {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
    }
}
