//! The run configuration: every knob of `rae-cache train`, with the same
//! names in a TOML `--config` file and on the command line (flags override
//! the file). Stored as JSON in every checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lr::{LrSchedule, ScheduleKind};
use super::optim::{AdamWConfig, AdamWSettings};
use super::{Result, TrainError};

/// Settings of a training run; defaults follow the reference
/// `configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml` where it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Cache directories (manifest.json + shards + stats.safetensors).
    pub data: Vec<PathBuf>,
    /// Run directory (checkpoints, log.jsonl, config.json).
    pub out: PathBuf,
    /// Model: a preset name (`ditdh-s`, ..., `dit-xl`) or a config file.
    pub model: String,
    /// Per-rank micro-batch size.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub accum: usize,
    /// Samples per optimizer step over all ranks. When set, `accum` follows
    /// from it (`global_batch / (batch_size * world_size)`), so a run resumed
    /// on another number of processes keeps its global batch; when unset it
    /// is fixed from the first run's layout.
    pub global_batch: Option<usize>,
    /// Peak (base) learning rate (default and reference 2e-4).
    pub lr: f64,
    /// Learning-rate schedule after warmup: constant, linear, cosine.
    pub lr_schedule: ScheduleKind,
    /// Final lr of a linear / cosine decay (default: lr).
    pub final_lr: Option<f64>,
    /// Optimizer steps of warmup (default 0; the reference uses 40 epochs).
    pub warmup_steps: u64,
    /// Ramp the lr from 0 during warmup; else hold `lr` (default false, as the reference).
    pub warmup_from_zero: bool,
    /// Step at which the decay reaches final_lr (default: the last step).
    pub decay_end_steps: Option<u64>,
    /// AdamW betas, eps, weight decay (keys `betas`, `eps`, `weight_decay`).
    #[serde(flatten)]
    pub adamw: AdamWSettings,
    /// Global gradient-norm clip (0 = off).
    pub clip_grad: f64,
    /// Total optimizer steps (takes precedence over epochs).
    pub steps: Option<u64>,
    /// Passes over the data, used when `steps` is unset (the reference trains 1400).
    pub epochs: Option<u64>,
    /// EMA decay per optimizer step (default and reference 0.9995).
    pub ema: f64,
    /// `logit-normal` (= logit-normal_0_1), `logit-normal_<mu>_<sigma>`, `uniform`.
    pub time_dist: String,
    /// Time shift a; default sqrt(tokens * C / 4096).
    pub shift: Option<f64>,
    /// Probability of replacing a label by the null class.
    pub label_dropout: f64,
    /// Seed of the weight init, data order, time, label dropout and noise draws
    /// (default 0; reference 42).
    pub seed: u64,
    /// Checkpoint every N optimizer steps (0 = only at the end).
    pub ckpt_every: u64,
    /// Checkpoints kept (0 = all).
    pub keep_checkpoints: usize,
    /// Log a line every N optimizer steps.
    pub log_every: u64,
    /// Device: `auto` (CUDA 0 if available, else CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Allow TF32 tensor-core math in the f32 matrix products on CUDA
    /// (process-wide; master weights, optimizer and loss stay f32; a no-op
    /// on the CPU). Off by default, as in PyTorch.
    pub tf32: bool,
    /// Compute dtype of the model's forward and backward: `auto` (bf16 on
    /// CUDA, f32 on the CPU), `f32` or `bf16`. Master weights, gradients,
    /// optimizer state, loss and EMA stay f32 (autocast).
    pub precision: crate::precision::Precision,
    /// Loader: row groups per shuffle window (default 64).
    pub shuffle_window: usize,
    /// Loader reader threads (default 2).
    pub workers: usize,
    /// Batches the loader prepares ahead (default 4).
    pub prefetch: usize,
    /// This process's data-parallel rank, `0..world_size`.
    pub rank: usize,
    /// Number of data-parallel processes (default 1: a single process).
    pub world_size: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            data: Vec::new(),
            out: PathBuf::new(),
            model: "ditdh-s".into(),
            batch_size: 32,
            accum: 1,
            global_batch: None,
            lr: 2e-4,
            lr_schedule: ScheduleKind::Constant,
            final_lr: None,
            warmup_steps: 0,
            warmup_from_zero: false,
            decay_end_steps: None,
            adamw: AdamWSettings::default(),
            clip_grad: 1.0,
            steps: None,
            epochs: None,
            ema: 0.9995,
            time_dist: "logit-normal".into(),
            shift: None,
            label_dropout: 0.1,
            seed: 0,
            ckpt_every: 1000,
            keep_checkpoints: 3,
            log_every: 1,
            device: "auto".into(),
            tf32: false,
            precision: crate::precision::Precision::Auto,
            shuffle_window: 64,
            workers: 2,
            prefetch: 4,
            rank: 0,
            world_size: 1,
        }
    }
}

impl TrainConfig {
    /// Read a TOML file with the same keys (missing keys take defaults).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(super::io_err(path))?;
        toml::from_str(&text)
            .map_err(|e| crate::error::FileError::format(path, e.to_string()).into())
    }

    /// The config as one-line JSON (stored in checkpoints and the run directory).
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parse a config stored by [`Self::to_json`].
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| TrainError::Config(format!("stored config: {e}")))
    }

    /// Check the settings before training starts; the first bad one is an error.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.data.is_empty() {
            return bad("no --data cache directory".into());
        }
        if self.batch_size == 0 || self.accum == 0 {
            return bad("batch size and accum must be >= 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr {} must be positive", self.lr));
        }
        let betas = self.adamw.betas;
        if !(0.0..1.0).contains(&betas[0]) || !(0.0..1.0).contains(&betas[1]) {
            return bad(format!("betas {betas:?} must lie in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.ema) {
            return bad(format!("ema {} must lie in [0, 1]", self.ema));
        }
        if !(0.0..=1.0).contains(&self.label_dropout) {
            return bad(format!(
                "label dropout {} must lie in [0, 1]",
                self.label_dropout
            ));
        }
        if let Some(a) = self.shift
            && !(a > 0.0 && a.is_finite())
        {
            return bad(format!("shift {a} must be positive"));
        }
        if self.precision == crate::precision::Precision::F16 {
            return bad(
                "precision f16 would need loss scaling to train; use bf16 (same speed, f32 range)"
                    .into(),
            );
        }
        if self.steps.is_none() && self.epochs.is_none() {
            return bad("give --steps or --epochs".into());
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!(
                "rank {} of world size {}",
                self.rank, self.world_size
            ));
        }
        Ok(())
    }

    /// Total optimizer steps given the loader's optimizer steps per epoch.
    pub fn total_steps(&self, steps_per_epoch: usize) -> u64 {
        match (self.steps, self.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * steps_per_epoch as u64,
            (None, None) => 0,
        }
    }

    /// Fix `accum` and `global_batch` for this run's `world_size`: derive
    /// `accum` from a given global batch, or record the global batch.
    pub fn resolve_layout(&mut self) -> Result<()> {
        let per_pass = self.batch_size * self.world_size.max(1);
        match self.global_batch {
            Some(g) => {
                if per_pass == 0 || g == 0 || g % per_pass != 0 {
                    return Err(TrainError::Config(format!(
                        "global batch {g} is not a multiple of batch size {} x world size {}: \
                         choose --batch-size so that it divides",
                        self.batch_size, self.world_size
                    )));
                }
                self.accum = g / per_pass;
            }
            None => self.global_batch = Some(per_pass * self.accum),
        }
        Ok(())
    }

    /// The loader's settings for this rank (training: noise drawn by the
    /// loader's thread).
    pub fn loader(&self) -> super::loader::LoaderConfig {
        super::loader::LoaderConfig {
            batch_size: self.batch_size,
            seed: self.seed,
            shuffle_window: self.shuffle_window,
            workers: self.workers,
            prefetch: self.prefetch,
            rank: self.rank,
            world_size: self.world_size,
            accum: self.accum,
            noise: true,
            raw: false,
        }
    }

    /// The AdamW hyper-parameters of this config.
    pub fn optimizer(&self) -> AdamWConfig {
        self.adamw.with_lr(self.lr)
    }

    /// The lr schedule of this config, decaying until `decay_end_steps` or else
    /// `total_steps`.
    pub fn schedule(&self, total_steps: u64) -> LrSchedule {
        LrSchedule {
            kind: self.lr_schedule,
            base_lr: self.lr,
            final_lr: self.final_lr.unwrap_or(self.lr),
            warmup_steps: self.warmup_steps,
            decay_end_steps: self.decay_end_steps.unwrap_or(total_steps),
            warmup_from_zero: self.warmup_from_zero,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_keys_and_json_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(
            &p,
            "data = [\"/c\"]\nbatch_size = 8\nlr = 1e-3\nsteps = 10\nlr_schedule = \"cosine\"\nfinal_lr = 1e-5\nbetas = [0.8, 0.9]\nweight_decay = 0\n",
        )
        .unwrap();
        let c = TrainConfig::from_toml_file(&p).unwrap();
        assert_eq!(c.batch_size, 8);
        assert_eq!(c.lr_schedule, ScheduleKind::Cosine);
        assert_eq!(c.ema, 0.9995);
        // the flattened AdamW keys: given ones read, the others defaulted
        assert_eq!((c.adamw.betas, c.adamw.eps), ([0.8, 0.9], 1e-8));
        assert_eq!(c.optimizer().beta1, 0.8);
        c.validate().unwrap();
        assert_eq!(TrainConfig::from_json(&c.to_json()).unwrap(), c);
        std::fs::write(&p, "batch_sise = 8\n").unwrap();
        assert!(
            TrainConfig::from_toml_file(&p).is_err(),
            "unknown keys are rejected"
        );
    }
}
