//! The cheap training signal of `train --eval-every N`: every N steps, a
//! small fixed-seed sample set from the EMA weights (ODE sampler,
//! de-normalised with the training statistics), scored in latent space
//! against the training cache: pooled-latent FD and the per-element
//! mean/variance drift against the cache's statistics. One JSON line per
//! probe is appended to the run's `log.jsonl`:
//! `{"step": N, "probe": {"fd_pooled": .., "drift": {..}, ..}}`.
//!
//! No decoder and no feature network: the numbers are in the encoder's
//! space and comparable only within a run (same K, seed, sampler).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use super::EvalError;
use super::latent::LatentReference;
use super::run::{EvalOptions, Input, latent_against, latent_reference_of};
use crate::diffusion::SamplerConfig;
use crate::generate::{LabelSpec, SampleOptions, resolve_shards, run_sampling};
use crate::models::{DitConfig, DitModel, state_dict};
use crate::progress::NoProgress;
use crate::shards::{LatentDType, LatentStats};

/// What a probe samples.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Probe every N optimizer steps (0: never).
    pub every: u64,
    /// Samples per probe (K); labels `equal` over the classes.
    pub samples: usize,
    /// ODE sampler steps.
    pub sampler_steps: usize,
    /// Seeds labels and noise: the same set of noises every probe.
    pub seed: u64,
    /// Samples per model batch.
    pub batch_size: usize,
}

/// The probe of one run: the reference is scanned once.
pub struct LatentProbe {
    opts: ProbeOptions,
    reference: LatentReference,
    /// De-normalises the model's output (the training normaliser).
    stats: LatentStats,
    cfg: DitConfig,
    shift: f64,
    /// Where each probe's samples go (replaced every time).
    dir: PathBuf,
    log: PathBuf,
}

fn eval_options() -> EvalOptions {
    EvalOptions {
        latent_pr: false,
        latent_tokens: false,
        ..EvalOptions::default()
    }
}

impl LatentProbe {
    /// A probe writing into `run_dir` (`probe-samples/`, `log.jsonl`),
    /// scoring against `reference` (a cache directory or an eval-ref file
    /// made from one; its statistics give the drift), sampling `cfg` at
    /// time shift `shift` and de-normalising with `stats`.
    pub fn new(
        run_dir: &Path,
        reference: &Path,
        stats: LatentStats,
        cfg: DitConfig,
        shift: f64,
        opts: ProbeOptions,
    ) -> Result<Self, EvalError> {
        if opts.samples < 2 || opts.sampler_steps == 0 || opts.batch_size == 0 {
            return Err(EvalError::Invalid(format!(
                "probe: {} samples (at least 2), {} sampler steps, batch {}",
                opts.samples, opts.sampler_steps, opts.batch_size
            )));
        }
        let t = Instant::now();
        let mut refl =
            latent_reference_of(&Input::detect(reference)?, &eval_options(), &mut NoProgress)?;
        if refl.stats.is_none() {
            refl.stats = Some(stats.clone());
        }
        tracing::info!(
            "probe reference {}: {} rows in {:.1}s",
            reference.display(),
            refl.pooled.count,
            t.elapsed().as_secs_f64()
        );
        Ok(Self {
            opts,
            reference: refl,
            stats,
            cfg,
            shift,
            dir: run_dir.join("probe-samples"),
            log: run_dir.join("log.jsonl"),
        })
    }

    /// Whether a probe is due after optimizer step `step`.
    pub fn due(&self, step: u64) -> bool {
        self.opts.every > 0 && step > 0 && step.is_multiple_of(self.opts.every)
    }

    /// Sample with `weights` (the EMA state dict), score, append the line to
    /// `log.jsonl`; returns the line.
    pub fn run(
        &self,
        step: u64,
        weights: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Value, EvalError> {
        let t = Instant::now();
        let err = |e: String| EvalError::Invalid(format!("probe at step {step}: {e}"));
        let sd: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let vb = state_dict::var_builder(sd, DType::F32, device);
        let model = DitModel::new(&self.cfg, vb).map_err(|e| err(e.to_string()))?;
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).map_err(|e| EvalError::io(&self.dir, e))?;
        }
        let sopts = SampleOptions {
            out_dir: self.dir.clone(),
            num: self.opts.samples,
            labels: LabelSpec::Equal,
            sampler: SamplerConfig {
                num_steps: self.opts.sampler_steps,
                time_shift: self.shift,
                ..SamplerConfig::default()
            },
            seed: self.opts.seed,
            batch_size: self.opts.batch_size,
            dtype: LatentDType::F32,
            noise: None,
            stats: Some(self.stats.clone()),
            channels: self.cfg.in_channels(),
            size: self.cfg.input_size(),
            num_classes: self.cfg.num_classes(),
            rows_per_shard: self.opts.samples,
            provenance: json!({"probe_step": step}),
            part: None,
        };
        run_sampling(&model, None, &sopts, device, &mut NoProgress)?;
        let shards = resolve_shards(&self.dir)?;
        let mut v = latent_against(&shards, &self.reference, &eval_options(), &mut NoProgress)?;
        v["sampler_steps"] = json!(self.opts.sampler_steps);
        v["seed"] = json!(self.opts.seed);
        v["seconds"] = json!(t.elapsed().as_secs_f64());
        let line = json!({"step": step, "probe": v});
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| EvalError::io(&self.log, e))?;
        // one write per line: the trainer appends its own lines to this file
        f.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| EvalError::io(&self.log, e))?;
        Ok(line)
    }
}
