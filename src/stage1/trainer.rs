//! The stage-1 training loop over a latent cache: batches of latent rows
//! (raw, as the cache stores them) with the matching crops of their source
//! images as targets ([`super::targets`]) or, with `online_encoder`, the
//! reference's random crops encoded every step ([`super::online`]); the
//! reference's noise
//! augmentation, L1 + LPIPS (+ the DINO discriminator's adversarial term
//! and the discriminator's own updates, [`super::gan`]), AdamW on the
//! reference schedule, EMA, atomic checkpoints in the `train` run-directory
//! layout, `log.jsonl`, exact resume.
//!
//! All randomness derives from the seed: the data order from (seed, epoch)
//! (the cache loader), each sample's noise from (seed, sample id), the
//! initialisation from the seed, DiffAug from (seed, step). A checkpoint
//! holds the weights, the EMA, the AdamW moments, the discriminator's state,
//! the step and the loader cursor, which is all a resumed run needs to
//! compute exactly what the uninterrupted run would have.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::gan::{DiscLog, Gan};
use super::generator::{GeneratorConfig, GeneratorState};
use super::lpips::{Lpips, LpipsSource};
use super::noise::{NoiseAug, NoiseDraws};
use super::online::{OnlineConfig, OnlineData};
use super::preview::Preview;
use super::targets::TargetImages;
use super::train_config::DecoderTrainConfig;
use super::{AdversarialLoss, GenBatch, GenLossConfig, Result, Stage1Error};
use crate::dist::{Collective, SingleProcess};
use crate::models::DecoderConfig;
use crate::models::config::load_config;
use crate::sources::InputFormat;
use crate::train::cadence::{RunSteps, run_steps};
use crate::train::checkpoint::{self, Checkpoint, LoaderCursor};
use crate::train::loader::{CacheSet, Loader, LoaderConfig};
use crate::train::trainer::{all_reduce_mean, mean_over_ranks};
use crate::train::{LrSchedule, TrainError};
use rand_chacha::ChaCha8Rng;

/// The decoder config file written into the run directory (for `decode`).
pub const DECODER_CONFIG_FILE: &str = "decoder.json";

/// What one optimizer step did (a `log.jsonl` line).
#[derive(Debug, Clone, Serialize)]
pub struct DecoderStepStats {
    /// Optimizer steps done after this one.
    pub step: u64,
    /// Epoch of the batch.
    pub epoch: u64,
    /// L1 on [0, 1] pixels.
    pub l1: f64,
    /// LPIPS.
    pub lpips: f64,
    /// Adversarial generator loss (0 without a discriminator).
    pub gan: f64,
    /// Adaptive weight (0 without a discriminator).
    pub adaptive_weight: f64,
    /// The optimised total.
    pub total: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Throughput of this step.
    pub images_per_s: f64,
    /// Wall time of this step.
    pub seconds: f64,
    /// Mean PSNR of the preview batch (EMA decoder), on preview steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psnr: Option<f64>,
    /// The discriminator's update of this step (from `disc_start_epoch`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub disc: Option<DiscLog>,
}

/// Decoder, LPIPS, data and schedule of one run.
pub struct DecoderTrainer {
    cfg: DecoderTrainConfig,
    dec_cfg: DecoderConfig,
    state: GeneratorState,
    lpips: Option<Lpips>,
    data: Data,
    device: Device,
    schedule: LrSchedule,
    noise: NoiseAug,
    losses: GenLossConfig,
    step: u64,
    total_steps: u64,
    last_ckpt: Option<PathBuf>,
    /// `log.jsonl` (rank 0).
    log: Option<File>,
    /// The data-parallel job this process is a rank of.
    comm: Box<dyn Collective>,
    /// The discriminator (`None` with `disc_weight` 0).
    gan: Option<Gan>,
    preview: Option<Preview>,
}

/// Where the batches come from.
enum Data {
    /// Latent rows of the cache and the matching crops of their images.
    Cache {
        loader: Loader,
        targets: TargetImages,
    },
    /// The reference recipe: random crops encoded every step.
    Online(Box<OnlineData>),
}

/// One batch, whichever the source: raw latents `[B, T, C]`, targets
/// `[B, 3, S, S]`, the samples' ids, the epoch.
struct StepData {
    z: candle_core::Tensor,
    images: candle_core::Tensor,
    sample_ids: Vec<u64>,
    epoch: u64,
}

impl Data {
    fn next(&mut self, device: &Device) -> Result<StepData> {
        match self {
            Data::Cache { loader, targets } => {
                let batch = loader.next_batch()?;
                // [B, C, h, w] -> tokens [B, T, C] (row-major grid, as stored)
                let z = batch.x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
                let images = targets.load(&batch.keys, &batch.flips, batch.x.device())?;
                Ok(StepData {
                    z,
                    images,
                    sample_ids: batch.sample_ids,
                    epoch: batch.cursor.epoch,
                })
            }
            Data::Online(d) => {
                let b = d.next_batch(device)?;
                Ok(StepData {
                    z: b.z,
                    images: b.images,
                    sample_ids: b.sample_ids,
                    epoch: b.cursor.epoch,
                })
            }
        }
    }

    fn cursor(&self) -> LoaderCursor {
        match self {
            Data::Cache { loader, .. } => loader.cursor(),
            Data::Online(d) => d.cursor(),
        }
    }

    fn steps_per_epoch(&self) -> u64 {
        match self {
            Data::Cache { loader, .. } => loader.steps_per_epoch() as u64,
            Data::Online(d) => d.steps_per_epoch() as u64,
        }
    }
}

/// The decoder for this cache: a config file, or a preset fitted to the
/// cache's tokens and channels (image mean/std 0.5 for SigLIP2, ImageNet's
/// otherwise, as the encoder normalised its input).
pub fn decoder_config(cfg: &DecoderTrainConfig, set: &CacheSet) -> Result<DecoderConfig> {
    let siglip = set
        .manifests()
        .iter()
        .any(|m| m.encoder.kind.contains("siglip"));
    let stats = siglip.then_some(([0.5; 3], [0.5; 3]));
    fit_decoder(cfg, set.tokens(), set.channels(), stats)
}

/// A config file, or a preset fitted to `tokens` x `channels` (with the
/// encoder's image mean/std when given).
fn fit_decoder(
    cfg: &DecoderTrainConfig,
    tokens: usize,
    channels: usize,
    image_stats: Option<([f32; 3], [f32; 3])>,
) -> Result<DecoderConfig> {
    let path = Path::new(&cfg.decoder);
    let dc: DecoderConfig = if path.is_file() {
        load_config(path)?
    } else {
        let mut dc = DecoderConfig::preset(&cfg.decoder, cfg.patch_size).ok_or_else(|| {
            Stage1Error::Invalid(format!(
                "decoder {:?}: neither a config file nor a preset (ViT-B, ViT-L, ViT-XL)",
                cfg.decoder
            ))
        })?;
        dc.latent_dim = channels;
        dc.num_patches = tokens;
        if let Some((mean, std)) = image_stats {
            dc.image_mean = mean;
            dc.image_std = std;
        }
        dc
    };
    if dc.latent_dim != channels || dc.num_patches != tokens {
        return Err(Stage1Error::Invalid(format!(
            "decoder {} takes {} tokens x {}, the latents are {tokens} x {channels}",
            cfg.decoder, dc.num_patches, dc.latent_dim
        )));
    }
    Ok(dc)
}

/// `--images` (its format detected), else the folder or source every cache
/// was built from, in the format the build read it.
fn image_source(cfg: &DecoderTrainConfig, set: &CacheSet) -> Result<(PathBuf, InputFormat)> {
    if let Some(p) = &cfg.images {
        return Ok((p.clone(), InputFormat::Auto));
    }
    let format = set
        .manifests()
        .iter()
        .find_map(|m| m.build_args["settings"]["source"]["format"].as_str())
        .map(|f| match f {
            "webdataset" => InputFormat::Webdataset,
            "parquet" => InputFormat::Parquet,
            _ => InputFormat::Tar,
        })
        .unwrap_or(InputFormat::Auto);
    let roots: std::collections::BTreeSet<&str> = set
        .manifests()
        .iter()
        .map(|m| m.dataset_root.as_str())
        .collect();
    match roots.into_iter().collect::<Vec<_>>().as_slice() {
        [one] => Ok((PathBuf::from(one), format)),
        many => Err(Stage1Error::Invalid(format!(
            "the caches were built from different folders ({}): pass --images",
            many.join(", ")
        ))),
    }
}

fn open_log(cfg: &DecoderTrainConfig, dec_cfg: &DecoderConfig) -> Result<File> {
    let write = |name: &str, text: String| {
        let p = cfg.out.join(name);
        crate::fsutil::write_atomic(&p, text.as_bytes())
            .map_err(|e| Stage1Error::Invalid(format!("{}: {e}", p.display())))
    };
    write("config.json", cfg.to_json())?;
    write(
        DECODER_CONFIG_FILE,
        serde_json::to_string_pretty(dec_cfg).unwrap_or_default(),
    )?;
    let p = cfg.out.join("log.jsonl");
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(|e| Stage1Error::Invalid(format!("{}: {e}", p.display())))
}

impl DecoderTrainer {
    /// Build everything for `cfg` on `device`; with `resume`, restore the
    /// state from that checkpoint.
    pub fn new(cfg: DecoderTrainConfig, device: &Device, resume: Option<&Path>) -> Result<Self> {
        Self::with_collective(cfg, device, resume, Box::new(SingleProcess))
    }

    /// One rank of a data-parallel job connected by `comm`: its share of
    /// each global batch (`batch_size` per rank), the decoder's and the
    /// discriminator's gradients averaged over the ranks, so every rank
    /// takes the same steps; rank 0 writes the run directory. Every rank
    /// starts from the same weights (seeded, or the same checkpoint).
    pub fn with_collective(
        cfg: DecoderTrainConfig,
        device: &Device,
        resume: Option<&Path>,
        comm: Box<dyn Collective>,
    ) -> Result<Self> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.out)
            .map_err(|e| Stage1Error::Invalid(format!("{}: {e}", cfg.out.display())))?;
        let ck = resume
            .map(|p| checkpoint::load(p, device).map(|ck| (p, ck)))
            .transpose()?;
        let cursor = ck.as_ref().map(|(_, ck)| ck.cursor).unwrap_or_default();
        let (rank, world) = (comm.rank(), comm.world_size());
        let want_preview = cfg.preview_every > 0 && rank == 0;
        let (dec_cfg, data, preview) = if cfg.online_encoder {
            Self::online_data(&cfg, cursor, (rank, world), want_preview, device)?
        } else {
            Self::cache_data(&cfg, cursor, (rank, world), want_preview, device)?
        };
        // A zero perceptual weight needs no VGG weights at all.
        let lpips = if cfg.perceptual_weight > 0.0 {
            Some(Lpips::from_source(
                &LpipsSource {
                    vgg: cfg.lpips_vgg.clone(),
                    lin: cfg.lpips_lin.clone(),
                },
                device,
            )?)
        } else {
            None
        };
        let gcfg = GeneratorConfig {
            seed: cfg.seed,
            optimizer: cfg.optimizer(),
            ema: Some(cfg.ema),
            clip_grad: cfg.clip_grad,
            train_pos_embed: cfg.train_pos_embed,
        };
        let mut state = GeneratorState::new(&dec_cfg, &gcfg, None, device)?;
        let params: usize = state
            .params()
            .trainable()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        tracing::info!("decoder: {:.2}M trainable parameters", params as f64 / 1e6);
        let spe = data.steps_per_epoch();
        let mut gan = Gan::new(&cfg, spe, device)?;
        if let Some(g) = &mut gan {
            g.set_rank(rank, world);
        }
        let (mut step, mut last_ckpt) = (0, None);
        if let Some((path, ck)) = ck {
            if let Some(g) = &mut gan {
                g.restore(&ck, path)?;
            }
            step = ck.step;
            state.restore(ck, path)?;
            last_ckpt = Some(path.to_path_buf());
            tracing::info!("resumed from {} at step {step}", path.display());
        }
        let log = (rank == 0).then(|| open_log(&cfg, &dec_cfg)).transpose()?;
        Ok(Self {
            schedule: cfg.schedule(spe),
            total_steps: cfg.total_steps(spe),
            noise: NoiseAug { tau: cfg.noise_tau },
            losses: cfg.losses(),
            cfg,
            dec_cfg,
            state,
            lpips,
            data,
            device: device.clone(),
            step,
            last_ckpt,
            log,
            comm,
            gan,
            preview,
        })
    }

    /// The cache's loader from `cursor`, its targets, the decoder fitted
    /// to it and (`want_preview`) the preview batch.
    fn cache_data(
        cfg: &DecoderTrainConfig,
        cursor: LoaderCursor,
        (rank, world): (usize, usize),
        want_preview: bool,
        device: &Device,
    ) -> Result<(DecoderConfig, Data, Option<Preview>)> {
        let set = CacheSet::open(&cfg.data)?;
        let dec_cfg = decoder_config(cfg, &set)?;
        let (root, format) = image_source(cfg, &set)?;
        let targets = TargetImages::new(&root, format, dec_cfg.image_size())?;
        let lcfg = Self::loader_config(cfg, rank, world);
        let loader = Loader::new(&set, &lcfg, cursor, device)?;
        let preview = want_preview
            .then(|| {
                Preview::new(
                    &set,
                    &targets,
                    cfg.preview_count,
                    cfg.seed,
                    &cfg.out,
                    device,
                )
            })
            .transpose()?;
        Ok((dec_cfg, Data::Cache { loader, targets }, preview))
    }

    /// `--online-encoder`: the encoder (resolved like `build`'s), the
    /// images (`--images`, else the cache's), the decoder fitted to the
    /// encoder's latents, which must output the encoder's crop size.
    fn online_data(
        cfg: &DecoderTrainConfig,
        cursor: LoaderCursor,
        (rank, world): (usize, usize),
        want_preview: bool,
        device: &Device,
    ) -> Result<(DecoderConfig, Data, Option<Preview>)> {
        let id = cfg.encoder.as_deref().unwrap_or_default();
        let model = crate::weights::resolve_model(id, false)?;
        let encoder = crate::encoders::load_resolved(&model, device, candle_core::DType::F32)
            .map_err(|e| Stage1Error::Invalid(format!("encoder {id}: {e}")))?;
        let spec = encoder.spec().clone();
        let dec_cfg = fit_decoder(
            cfg,
            spec.tokens,
            spec.channels,
            Some((spec.image_mean, spec.image_std)),
        )?;
        if dec_cfg.image_size() != spec.crop_size {
            return Err(Stage1Error::Invalid(format!(
                "--online-encoder: the decoder outputs {0}x{0} px, the encoder takes {1}x{1} crops; \
                 the decoder must output the crop size (patch size {2} for {3} tokens)",
                dec_cfg.image_size(),
                spec.crop_size,
                spec.crop_size / (spec.tokens as f64).sqrt().round().max(1.0) as usize,
                spec.tokens
            )));
        }
        let (root, format) = match &cfg.images {
            Some(p) => (p.clone(), InputFormat::Auto),
            None => image_source(cfg, &CacheSet::open(&cfg.data)?)?,
        };
        let images = TargetImages::new(&root, format, spec.crop_size)?;
        let ocfg = OnlineConfig {
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            rank,
            world_size: world,
        };
        let data = OnlineData::new(images, encoder, ocfg, cursor)?;
        tracing::info!(
            "online encoder {}: {} images, {} steps per epoch",
            spec.id,
            data.num_images(),
            data.steps_per_epoch()
        );
        let preview = want_preview
            .then(|| -> Result<Preview> {
                let (z, images) = data.center_batch(cfg.preview_count, device)?;
                Ok(Preview::from_batch(z, images, &cfg.out))
            })
            .transpose()?;
        Ok((dec_cfg, Data::Online(Box::new(data)), preview))
    }

    /// The cache loader's settings (raw latents: the decoder sees them as
    /// the encoder produced them).
    fn loader_config(cfg: &DecoderTrainConfig, rank: usize, world_size: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            shuffle_window: cfg.shuffle_window,
            workers: cfg.workers,
            rank,
            world_size,
            raw: true,
            ..Default::default()
        }
    }

    /// The discriminator, when the run has one.
    pub fn gan(&self) -> Option<&Gan> {
        self.gan.as_ref()
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The run's settings.
    pub fn config(&self) -> &DecoderTrainConfig {
        &self.cfg
    }

    /// The decoder's config.
    pub fn decoder_config(&self) -> &DecoderConfig {
        &self.dec_cfg
    }

    /// Weights, optimizer and EMA.
    pub fn state(&self) -> &GeneratorState {
        &self.state
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<DecoderStepStats> {
        let start = Instant::now();
        let d = self.data.next(&self.device)?;
        let dev = d.z.device().clone();
        let (b, t, c) = d.z.dims3()?;
        let noise = NoiseDraws::for_samples(self.cfg.seed, &d.sample_ids, &[t, c], &dev)?;
        let (images, z) = (d.images, d.z);
        let gb = GenBatch {
            images,
            z,
            noise: Some(noise),
        };
        let mut aug_rng = self.gan.as_ref().map(|g| g.rng(self.step));
        let mut adv = match (&self.gan, &mut aug_rng) {
            (Some(g), Some(rng)) => g.generator_term(self.step, rng),
            _ => None,
        };
        let (mut l, grads) = self.state.grads(
            self.lpips.as_ref(),
            &gb,
            self.noise,
            &self.losses,
            adv.as_mut().map(|a| a as &mut dyn AdversarialLoss),
        )?;
        drop(adv);
        let grads = all_reduce_mean(self.comm.as_ref(), grads)?;
        if self.comm.world_size() > 1 {
            // every rank sees the same means and so stops together
            let m = [l.l1, l.lpips, l.gan, l.adaptive_weight, l.total];
            let m = mean_over_ranks(self.comm.as_ref(), &m, &dev)?;
            (l.l1, l.lpips, l.gan, l.adaptive_weight, l.total) = (m[0], m[1], m[2], m[3], m[4]);
        }
        if !l.total.is_finite() {
            return Err(self.non_finite(format!("loss {}", l.total)));
        }
        if self.step == 0 && grads.len() < self.state.params().trainable().len() {
            tracing::warn!("some decoder tensors receive no gradient");
        }
        let lr = self.schedule.lr_at(self.step);
        let grad_norm = self.state.update(grads, lr)?;
        if !grad_norm.is_finite() {
            return Err(self.non_finite(format!("gradient norm {grad_norm}")));
        }
        let disc = match aug_rng {
            Some(mut rng) => self.disc_update(&gb, &mut rng)?,
            None => None,
        };
        if let Some(d) = &disc
            && !d.d_loss.is_finite()
        {
            return Err(self.non_finite(format!("discriminator loss {}", d.d_loss)));
        }
        self.step += 1;
        let seconds = start.elapsed().as_secs_f64();
        Ok(DecoderStepStats {
            step: self.step,
            epoch: d.epoch,
            l1: l.l1,
            lpips: l.lpips,
            gan: l.gan,
            adaptive_weight: l.adaptive_weight,
            total: l.total,
            grad_norm,
            lr,
            images_per_s: (b * self.comm.world_size()) as f64 / seconds.max(1e-9),
            seconds,
            psnr: None,
            disc,
        })
    }

    /// The discriminator's update of this step (when it trains), on the
    /// post-update decoder's reconstruction without the latent noise; its
    /// gradients and statistics averaged over the ranks.
    fn disc_update(&mut self, gb: &GenBatch, rng: &mut ChaCha8Rng) -> Result<Option<DiscLog>> {
        let comm = self.comm.as_ref();
        let Some(g) = self.gan.as_mut().filter(|g| g.trains_at(self.step)) else {
            return Ok(None);
        };
        let recon = self.state.decoder().forward(&gb.z)?.detach();
        let reduce = |grads| Ok(all_reduce_mean(comm, grads)?);
        let mut d = g.disc_step([&recon, &gb.images], self.step, rng, reduce)?;
        if comm.world_size() > 1 {
            let m = [d.d_loss, d.logits_real, d.logits_fake, d.d_accuracy];
            let m = mean_over_ranks(comm, &m, recon.device())?;
            (d.d_loss, d.logits_real, d.logits_fake, d.d_accuracy) = (m[0], m[1], m[2], m[3]);
        }
        Ok(Some(d))
    }

    fn non_finite(&self, what: String) -> Stage1Error {
        TrainError::non_finite(self.step, what, self.last_ckpt.as_deref()).into()
    }

    /// Write a checkpoint (weights, EMA, AdamW, discriminator, step, cursor,
    /// config): rank 0; the other ranks write nothing and return `None`.
    pub fn save_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        if self.comm.rank() != 0 {
            return Ok(None);
        }
        let ema = self
            .state
            .params()
            .ema()
            .map(|e| e.tensors().clone())
            .unwrap_or_default();
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("kind".to_string(), "rae-decoder".to_string());
        extra.insert(
            "decoder_config".to_string(),
            serde_json::to_string(&self.dec_cfg).unwrap_or_default(),
        );
        let mut ck = Checkpoint {
            step: self.step,
            model: self.state.params().state_dict(),
            ema,
            optim: self.state.params().optimizer().state().clone(),
            cursor: self.data.cursor(),
            rng: None, // every draw derives from the seed
            config: self.cfg.to_json(),
            extra,
            aux: Default::default(),
        };
        if let Some(g) = &self.gan {
            g.save(&mut ck)?;
        }
        let p = checkpoint::save(&self.cfg.out, &ck, self.cfg.keep_checkpoints)?;
        self.last_ckpt = Some(p.clone());
        Ok(Some(p))
    }

    /// Train to the last step, checkpointing every `ckpt_every` steps and at
    /// the end; `on_step` sees each step (progress display).
    pub fn run(
        &mut self,
        on_step: impl FnMut(&DecoderStepStats),
    ) -> Result<Option<DecoderStepStats>> {
        run_steps(self, on_step)
    }
}

impl RunSteps for DecoderTrainer {
    type Stats = DecoderStepStats;
    type Error = Stage1Error;

    fn steps(&self) -> (u64, u64) {
        (self.step, self.total_steps)
    }

    /// A step, then (on preview steps) the EMA decoder's preview and PSNR.
    fn one_step(&mut self) -> Result<(u64, DecoderStepStats)> {
        let mut s = self.train_step()?;
        let every = self.cfg.preview_every;
        if let Some(p) = &self.preview
            && (s.step % every == 0 || s.step == self.total_steps)
        {
            let weights = match self.state.params().ema() {
                Some(e) => e.tensors().clone(),
                None => self.state.params().state_dict(),
            };
            s.psnr = Some(p.run(&self.dec_cfg, &weights, s.step)?);
        }
        Ok((s.step, s))
    }

    fn write_log(&mut self, s: &DecoderStepStats) -> Result<()> {
        let Some(log) = &mut self.log else {
            return Ok(());
        };
        let line = serde_json::to_string(s).unwrap_or_default();
        writeln!(log, "{line}").map_err(|e| {
            Stage1Error::Invalid(format!("{}: {e}", self.cfg.out.join("log.jsonl").display()))
        })
    }

    fn periods(&self) -> (u64, u64) {
        (self.cfg.log_every, self.cfg.ckpt_every)
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.save_checkpoint()?;
        Ok(())
    }
}
