//! The settings of `rae-cache train-decoder`, the same names in a TOML
//! `--config` file and on the command line (flags win). Defaults are the
//! reference recipe (`configs/stage1/training/DINOv2-B_decXL.yaml`). Stored
//! as JSON in every checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{GenLossConfig, Result, Stage1Error};
use crate::disc::{DinoConfig, DiscLrClock};
use crate::train::optim::AdamWSettings;
use crate::train::{AdamWConfig, LrSchedule, ScheduleKind};

/// Every knob of a decoder training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecoderTrainConfig {
    /// Cache directories (manifest.json + shards).
    pub data: Vec<PathBuf>,
    /// The folder the cache was built from (default: the manifest's
    /// `dataset_root`); with `online_encoder`, the images to train on.
    pub images: Option<PathBuf>,
    /// Train on the reference's recipe instead of the cache: each image
    /// resized (shorter side 1.5x the crop, bicubic), randomly cropped, and
    /// encoded by `encoder` every step; the crop is the target.
    pub online_encoder: bool,
    /// The frozen encoder of `online_encoder`: a Hugging Face model
    /// directory or a repo id in the local cache.
    pub encoder: Option<String>,
    /// Run directory (checkpoints/, log.jsonl, config.json, decoder.json).
    pub out: PathBuf,
    /// Decoder: a preset (`ViT-B`, `ViT-L`, `ViT-XL`) or a JSON/TOML config
    /// file with the decoder keys.
    pub decoder: String,
    /// Patch size of a preset (16: 256 px from 16x16 tokens).
    pub patch_size: usize,
    /// Per-step batch size.
    pub batch_size: usize,
    /// Total optimizer steps (takes precedence over epochs).
    pub steps: Option<u64>,
    /// Epochs (reference 16).
    pub epochs: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub final_lr: f64,
    /// Linear warm-up from zero, in epochs.
    pub warmup_epochs: u64,
    /// Epoch at which the cosine reaches `final_lr`.
    pub decay_end_epoch: u64,
    /// AdamW betas, eps, weight decay (keys `betas`, `eps`, `weight_decay`).
    #[serde(flatten)]
    pub adamw: AdamWSettings,
    /// Global gradient-norm clip (0: off, the reference's `clip_grad: 0.0`).
    pub clip_grad: f64,
    /// EMA decay, every step.
    pub ema: f64,
    /// Noise augmentation strength (sigma = tau * U[0,1) per sample).
    pub noise_tau: f64,
    /// LPIPS weight.
    pub perceptual_weight: f64,
    /// Adversarial weight (0.75); 0 trains without the discriminator.
    pub disc_weight: f64,
    /// Clamp of the adaptive weight.
    pub max_d_weight: f64,
    /// DINO ViT-S/8 weights of the discriminator's frozen backbone: file,
    /// directory or HF repo id (needed when `disc_weight > 0`).
    pub dino_weights: String,
    /// Shape of that backbone (default: the reference's ViT-S/8 at 224).
    pub dino_config: Option<DinoConfig>,
    /// Epoch from which the discriminator trains (reference
    /// `disc_upd_start`, 6).
    pub disc_start_epoch: u64,
    /// Epoch from which the decoder's loss has the adversarial term
    /// (reference `disc_start`, 8).
    pub gan_start_epoch: u64,
    /// What indexes the discriminator's learning-rate schedule.
    pub disc_lr_clock: DiscLrClock,
    /// LPIPS VGG16 weights: file, directory or HF repo id.
    pub lpips_vgg: String,
    /// LPIPS v0.1 linear weights (`vgg.pth`): file or directory.
    pub lpips_lin: Option<String>,
    /// Train the sin-cos position table as the reference does.
    pub train_pos_embed: bool,
    /// Seed of the initialisation and of every per-sample draw.
    pub seed: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub ckpt_every: u64,
    /// Checkpoints kept (0: all).
    pub keep_checkpoints: usize,
    /// Log a line every N steps.
    pub log_every: u64,
    /// Reconstruct a fixed batch with the EMA decoder every N steps (and at
    /// the end): `previews/step-N.png` and `psnr` in the log (0: never).
    pub preview_every: u64,
    /// Images in that batch.
    pub preview_count: usize,
    /// Loader reader threads.
    pub workers: usize,
    /// Row groups per shuffle window.
    pub shuffle_window: usize,
    /// cpu | cuda | cuda:N | auto.
    pub device: String,
}

impl Default for DecoderTrainConfig {
    fn default() -> Self {
        let opt = AdamWConfig::default();
        let loss = GenLossConfig::default();
        Self {
            data: Vec::new(),
            images: None,
            online_encoder: false,
            encoder: None,
            out: PathBuf::new(),
            decoder: "ViT-XL".into(),
            patch_size: 16,
            batch_size: 16,
            steps: None,
            epochs: 16,
            lr: opt.lr,
            final_lr: 2e-5,
            warmup_epochs: 1,
            decay_end_epoch: 16,
            adamw: AdamWSettings::default(),
            clip_grad: 0.0,
            ema: 0.9978,
            noise_tau: super::noise::DEFAULT_TAU,
            perceptual_weight: loss.perceptual_weight,
            disc_weight: loss.disc_weight,
            max_d_weight: loss.max_d_weight,
            dino_weights: crate::disc::backbone::DEFAULT_DINO_WEIGHTS.into(),
            dino_config: None,
            disc_start_epoch: 6,
            gan_start_epoch: 8,
            disc_lr_clock: DiscLrClock::default(),
            lpips_vgg: super::lpips::LpipsSource::default().vgg,
            lpips_lin: None,
            train_pos_embed: false,
            seed: 0,
            ckpt_every: 1000,
            keep_checkpoints: 3,
            log_every: 1,
            preview_every: 1000,
            preview_count: 8,
            workers: 2,
            shuffle_window: 64,
            device: "auto".into(),
        }
    }
}

impl DecoderTrainConfig {
    /// Read a TOML file with these keys.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Stage1Error::Invalid(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Stage1Error::Invalid(format!("{}: {e}", path.display())))
    }

    /// As stored in checkpoints.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From a checkpoint's stored config.
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Stage1Error::Invalid(format!("stored config: {e}")))
    }

    /// Refuse settings that cannot train.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Stage1Error::Invalid(m.to_string()));
        if self.online_encoder {
            if self.encoder.is_none() {
                return bad(
                    "--online-encoder needs --encoder: the frozen encoder to run on every crop \
                     (a Hugging Face model directory, or a repo id in the local cache such as \
                     facebook/dinov2-with-registers-base)",
                );
            }
            if self.data.is_empty() && self.images.is_none() {
                return bad(
                    "--online-encoder needs --images (or a --data cache whose manifest names them)",
                );
            }
        } else if self.data.is_empty() {
            return bad("no --data cache directory");
        }
        if self.out.as_os_str().is_empty() {
            return bad("no --out run directory");
        }
        if self.batch_size == 0 {
            return bad("batch size must be >= 1");
        }
        if !(self.lr.is_finite()
            && self.lr > 0.0
            && self.final_lr.is_finite()
            && self.final_lr >= 0.0)
        {
            return bad("lr must be > 0 and final lr >= 0");
        }
        if !(0.0..=1.0).contains(&self.ema) {
            return bad("EMA decay must lie in [0, 1]");
        }
        if self.noise_tau.is_nan() || self.noise_tau < 0.0 {
            return bad("noise tau must be >= 0");
        }
        if self.disc_weight.is_nan() || self.disc_weight < 0.0 {
            return bad("disc weight must be >= 0 (0: no discriminator)");
        }
        Ok(())
    }

    /// AdamW hyper-parameters.
    pub fn optimizer(&self) -> AdamWConfig {
        self.adamw.with_lr(self.lr)
    }

    /// Loss weights.
    pub fn losses(&self) -> GenLossConfig {
        GenLossConfig {
            perceptual_weight: self.perceptual_weight,
            disc_weight: self.disc_weight,
            max_d_weight: self.max_d_weight,
        }
    }

    /// The reference schedule: linear warm-up from zero over
    /// `warmup_epochs`, cosine to `final_lr` at `decay_end_epoch`.
    pub fn schedule(&self, steps_per_epoch: u64) -> LrSchedule {
        LrSchedule {
            kind: ScheduleKind::Cosine,
            base_lr: self.lr,
            final_lr: self.final_lr,
            warmup_steps: self.warmup_epochs * steps_per_epoch,
            decay_end_steps: self.decay_end_epoch * steps_per_epoch,
            warmup_from_zero: true,
        }
    }

    /// Total optimizer steps.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        self.steps.unwrap_or(self.epochs * steps_per_epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GAN keys, the backbone shape as a table and the flattened AdamW
    /// keys read from TOML; unknown keys refused; JSON round trip exact.
    #[test]
    fn toml_gan_keys_and_json_roundtrip() {
        let text = "data = [\"/c\"]\nout = \"/r\"\ndisc_start_epoch = 0\ngan_start_epoch = 1\n\
                    disc_lr_clock = \"disc-updates\"\ndino_weights = \"/w/dino.pth\"\nbetas = [0.5, 0.9]\n\
                    [dino_config]\ndepth = 12\nkey_depths = [2, 5]\npatch_size = 8\nembed_dim = 32\n\
                    num_heads = 2\nmlp_ratio = 4.0\nnorm_eps = 1e-6\nimg_size = 224\n";
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(&p, text).unwrap();
        let c = DecoderTrainConfig::from_toml_file(&p).unwrap();
        assert_eq!((c.disc_start_epoch, c.gan_start_epoch), (0, 1));
        assert_eq!(c.disc_lr_clock, DiscLrClock::DiscUpdates);
        assert_eq!(c.dino_config.as_ref().unwrap().embed_dim, 32);
        assert_eq!(c.optimizer().beta1, 0.5);
        assert_eq!(c.disc_weight, 0.75);
        c.validate().unwrap();
        assert_eq!(DecoderTrainConfig::from_json(&c.to_json()).unwrap(), c);
        std::fs::write(&p, "disc_start = 3\n").unwrap();
        assert!(DecoderTrainConfig::from_toml_file(&p).is_err());
    }

    /// `online_encoder` and `encoder` are TOML keys; online mode needs an
    /// encoder and images (no cache), and says so.
    #[test]
    fn online_keys_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(
            &p,
            "online_encoder = true\nimages = \"/imgs\"\nout = \"/r\"\n",
        )
        .unwrap();
        let mut c = DecoderTrainConfig::from_toml_file(&p).unwrap();
        assert!(c.online_encoder && c.data.is_empty());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--online-encoder needs --encoder"), "{err}");
        c.encoder = Some("/enc".into());
        c.validate().unwrap();
        c.images = None;
        assert!(c.validate().unwrap_err().to_string().contains("--images"));
        c.online_encoder = false;
        assert!(c.validate().unwrap_err().to_string().contains("--data"));
    }
}
