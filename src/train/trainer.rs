//! The training loop: flow matching on cached latents (docs/DESIGN.md),
//! AdamW with global-norm clipping, gradient accumulation, EMA, periodic
//! checkpoints, `log.jsonl`, and exact resume.
//!
//! All randomness of a sample (its time, noise and label dropout) comes from
//! a generator seeded by (seed, epoch, the sample's place in the epoch
//! order), and the data order from (seed, epoch): a run resumed from a
//! checkpoint computes exactly what the uninterrupted run would have, on any
//! number of processes with the same global batch.
//!
//! Data parallel: every rank holds the whole model (broadcast from rank 0 at
//! the start), reads its share of each global batch, and the gradients are
//! averaged over the ranks before clipping, so every rank takes the same
//! optimizer step. Rank 0 alone writes checkpoints, logs and the EMA.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::cadence::{RunSteps, run_steps, run_steps_with};
use super::checkpoint::{self, Checkpoint, LoaderCursor};
use super::config::TrainConfig;
use super::loader::{CacheSet, Loader, sample_seed};
use super::state::{FlowBatch, TrainState, TrainStateConfig};
use super::{Ema, GradAccumulator, Gradients, LrSchedule, Result, TrainError, io_err};
use crate::diffusion::schedule::{NoiseRng, TimeDist, default_shift};
use crate::dist::{Collective, SingleProcess};
use crate::models::DitConfig;

/// Upper end of the training time interval (reference `check_interval`).
pub const T_MAX: f64 = 1.0 - 1.0 / 1000.0;

/// What one optimizer step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    /// Optimizer steps done after this one.
    pub step: u64,
    /// Epoch (0-based) of the step's data.
    pub epoch: u64,
    /// Mean loss over the micro-batches (and ranks).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate the step used.
    pub lr: f64,
    /// Images of the global batch per second of the step's wall time.
    pub images_per_s: f64,
    /// Throughput in latent tokens (images x tokens per image) per second.
    pub tokens_per_s: f64,
    /// Wall time of the step, seconds.
    pub seconds: f64,
    /// Resident memory of the process after the step (Linux), bytes: flat
    /// over a healthy run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
}

/// One rank of a training run: state, loader, schedule, collective and run log.
pub struct Trainer {
    cfg: TrainConfig,
    /// Model, master weights, optimizer and (rank 0) EMA.
    state: TrainState,
    comm: Box<dyn Collective>,
    schedule: LrSchedule,
    loader: Loader,
    step: u64,
    total_steps: u64,
    time_dist: TimeDist,
    shift: f64,
    null_class: i64,
    tokens_per_image: usize,
    last_ckpt: Option<PathBuf>,
    /// Rank 0 only.
    log: Option<File>,
}

/// Gradients are all-reduced in flat buckets of at most this many values
/// (fewer, larger messages; bounded extra memory).
const BUCKET_ELEMS: usize = 1 << 26;

fn cfg_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Config(e.to_string())
}

/// Refuse a model that does not take the cache's latents or classes.
fn check_model_fits_cache(cfg: &TrainConfig, mcfg: &DitConfig, set: &CacheSet) -> Result<()> {
    let (tokens, channels) = (set.tokens(), set.channels());
    let side = mcfg.input_size();
    if mcfg.in_channels() != channels || side * side != tokens {
        return Err(TrainError::Config(format!(
            "model {} takes {side}x{side}x{} latents, the cache holds {tokens} tokens x {channels}",
            cfg.model,
            mcfg.in_channels()
        )));
    }
    let width = match mcfg {
        DitConfig::DitDh(c) => c.hidden_size[1],
        DitConfig::Lightning(c) => c.hidden_size,
    };
    if width < channels {
        tracing::warn!(
            "!!! model width {width} is below the token dimension {channels}: RAE shows such a diffusion \
             transformer cannot fit the latents (use DiT-DH's wide head or a wider model) !!!"
        );
    }
    if set.num_classes() > mcfg.num_classes() {
        return Err(TrainError::Config(format!(
            "the cache has {} classes, the model {}",
            set.num_classes(),
            mcfg.num_classes()
        )));
    }
    Ok(())
}

/// The checkpoint at `path`, refused when it was trained under another
/// global batch: the loader's cursor counts global batches, so it names
/// the same data only under the same global batch.
fn read_resume_checkpoint(cfg: &TrainConfig, path: &Path, device: &Device) -> Result<Checkpoint> {
    let ck = checkpoint::load(path, device)?;
    if let Ok(stored) = TrainConfig::from_json(&ck.config) {
        if let (Some(was), Some(now)) = (stored.global_batch, cfg.global_batch) {
            if was != now {
                return Err(TrainError::Config(format!(
                    "{} was trained with global batch {was}, this run has {now}: resume with \
                     --global-batch {was} (any batch size and number of processes that divide it)",
                    path.display()
                )));
            }
        }
    }
    Ok(ck)
}

/// `config.json` written and `log.jsonl` opened for appending (rank 0).
fn open_run_log(cfg: &TrainConfig) -> Result<File> {
    let config_path = cfg.out.join("config.json");
    crate::fsutil::write_atomic(&config_path, cfg.to_json().as_bytes())
        .map_err(io_err(&config_path))?;
    let log_path = cfg.out.join("log.jsonl");
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(&log_path))
}

impl Trainer {
    /// Build the model, optimizer, EMA and loader for a single-process
    /// `cfg`; with `resume`, restore them from that checkpoint.
    pub fn new(cfg: TrainConfig, device: &Device, resume: Option<&Path>) -> Result<Self> {
        if cfg.world_size > 1 {
            return Err(TrainError::Config(format!(
                "world size {} needs the other processes: use Trainer::with_collective",
                cfg.world_size
            )));
        }
        Self::with_collective(cfg, device, resume, Box::new(SingleProcess))
    }

    /// The same as one rank of a data-parallel job connected by `comm`
    /// (its rank and world size override the config's).
    pub fn with_collective(
        mut cfg: TrainConfig,
        device: &Device,
        resume: Option<&Path>,
        comm: Box<dyn Collective>,
    ) -> Result<Self> {
        // Settings.
        cfg.rank = comm.rank();
        cfg.world_size = comm.world_size();
        cfg.resolve_layout()?;
        cfg.validate()?;
        let rank0 = cfg.rank == 0;
        if cfg.tf32 {
            crate::precision::set_tf32(true);
        }
        std::fs::create_dir_all(&cfg.out).map_err(io_err(&cfg.out))?;
        let set = CacheSet::open(&cfg.data)?;
        let mcfg = DitConfig::load(&cfg.model).map_err(cfg_err)?;
        check_model_fits_cache(&cfg, &mcfg, &set)?;

        // Model, optimizer, EMA (rank 0): fresh or from the checkpoint.
        let compute = cfg.precision.resolve(device);
        let scfg = TrainStateConfig {
            seed: cfg.seed,
            optimizer: cfg.optimizer(),
            ema: rank0.then_some(cfg.ema),
            clip_grad: cfg.clip_grad,
            compute,
        };
        let mut state = TrainState::new(&mcfg, &scfg, device)?;
        tracing::info!(
            "model {}: {:.2}M trainable parameters",
            cfg.model,
            state.trainable_params() as f64 / 1e6
        );
        if compute != DType::F32 {
            tracing::info!("autocast: forward and backward in {compute:?}, f32 master weights");
        }
        let (mut step, mut cursor, mut last_ckpt) = (0, LoaderCursor::default(), None);
        if let Some(path) = resume {
            let ck = read_resume_checkpoint(&cfg, path, device)?;
            (step, cursor) = (ck.step, ck.cursor.clone());
            state.restore(ck, path)?;
            last_ckpt = Some(path.to_path_buf());
            tracing::info!(
                "resumed from {} at step {step} (epoch {}, batch {})",
                path.display(),
                cursor.epoch,
                cursor.step_in_epoch
            );
        }
        if cfg.world_size > 1 {
            // Identical starting weights on every rank, whatever each
            // initialised or loaded.
            state.set_weights(|t| Ok(comm.broadcast(t, 0)?))?;
            tracing::info!(
                "rank {} of {} ({} backend): global batch {} = {} per micro-batch x {} ranks x {} accumulation steps",
                cfg.rank,
                cfg.world_size,
                comm.backend(),
                cfg.batch_size * cfg.world_size * cfg.accum,
                cfg.batch_size,
                cfg.world_size,
                cfg.accum
            );
        }

        // Data, schedule, log.
        let loader = Loader::new(&set, &cfg.loader(), cursor, device)?;
        let total_steps = cfg.total_steps(loader.steps_per_epoch());
        let schedule = cfg.schedule(total_steps);
        let time_dist = TimeDist::parse(&cfg.time_dist).ok_or_else(|| {
            TrainError::Config(format!("unknown time distribution {:?}", cfg.time_dist))
        })?;
        let (tokens, channels) = (set.tokens(), set.channels());
        let shift = cfg.shift.unwrap_or_else(|| default_shift(tokens, channels));
        let log = rank0.then(|| open_run_log(&cfg)).transpose()?;
        Ok(Self {
            cfg,
            state,
            comm,
            schedule,
            loader,
            step,
            total_steps,
            time_dist,
            shift,
            null_class: mcfg.num_classes() as i64,
            tokens_per_image: tokens,
            last_ckpt,
            log,
        })
    }

    /// Optimizer steps done so far (resumed runs count from the checkpoint).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Steps the run trains for (`steps`, or `epochs` x steps per epoch).
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The resolved config (rank, world size, accumulation fixed).
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The time shift in use (`shift`, or the default from the latent size).
    pub fn shift(&self) -> f64 {
        self.shift
    }

    /// Current weights, by name (frozen tensors included).
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.state
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The EMA weights (rank 0 only).
    pub fn ema(&self) -> Option<&Ema> {
        self.state.ema()
    }

    /// The model, optimizer and EMA.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// This process's data-parallel rank.
    pub fn rank(&self) -> usize {
        self.cfg.rank
    }

    /// Flow-matching loss of one micro-batch; returns (loss value, grads).
    fn micro_step(&mut self, micro: usize) -> Result<(f64, Gradients, u64)> {
        let batch = self.loader.next_batch()?;
        if batch.micro != micro {
            return Err(TrainError::State(format!(
                "loader is at micro-batch {} of a step, the trainer at {micro}",
                batch.micro
            )));
        }
        let x = batch.x;
        let b = x.dim(0)?;
        let dev = x.device().clone();
        // Per-sample streams named by the sample, not by rank or step: the
        // same sample gets the same draw on any layout.
        let (seed, dist, shift, p_drop) = (
            self.cfg.seed,
            self.time_dist,
            self.shift,
            self.cfg.label_dropout,
        );
        let null = self.null_class;
        let labels = &batch.labels;
        let (tv, yv): (Vec<f32>, Vec<u32>) = batch
            .sample_ids
            .iter()
            .zip(labels)
            .map(|(&id, &l)| {
                let mut r = NoiseRng::new(sample_seed(seed, id, 0));
                let t = r.sample_time(dist, T_MAX, shift) as f32;
                let keep = r.uniform() >= p_drop;
                let y = if keep && l >= 0 && l < null {
                    l as u32
                } else {
                    null as u32
                };
                (t, y)
            })
            .unzip();
        let t = Tensor::from_vec(tv, b, &dev)?;
        let y = Tensor::from_vec(yv, b, &dev)?;
        // Drawn by the loader's thread while the previous step ran.
        let eps = batch.noise.ok_or_else(|| {
            TrainError::State("the loader drew no noise for a training batch".into())
        })?;

        let (loss, grads) = self.state.loss_and_grads(&FlowBatch { x, eps, t, y })?;
        let trainable = self.state.trainable();
        if self.step == 0 && micro == 0 && grads.len() < trainable.len() {
            // A parameter without gradient is silently never trained: say so.
            let missing: Vec<&str> = trainable
                .iter()
                .filter(|(k, _)| grads.get(k).is_none())
                .map(|(k, _)| k.as_str())
                .collect();
            tracing::warn!(
                "{} trainable tensors receive no gradient: {}",
                missing.len(),
                missing.join(", ")
            );
        }
        Ok((loss, grads, batch.cursor.epoch))
    }

    /// Average `grads` over the ranks (bucketed flat all-reduces).
    fn average_gradients(&self, grads: Gradients) -> Result<Gradients> {
        all_reduce_mean(self.comm.as_ref(), grads)
    }

    /// One optimizer step over `accum` micro-batches (on every rank).
    pub fn train_step(&mut self) -> Result<StepStats> {
        let start = Instant::now();
        let mut acc = GradAccumulator::new();
        let mut loss_sum = 0.0;
        let mut epoch = 0;
        for micro in 0..self.cfg.accum {
            let (loss, grads, ep) = self.micro_step(micro)?;
            loss_sum += loss;
            epoch = ep;
            acc.add(&grads)?;
        }
        let mut loss = loss_sum / self.cfg.accum as f64;
        if self.comm.world_size() > 1 {
            loss = mean_over_ranks(self.comm.as_ref(), &[loss], self.loader_device())?[0];
        }
        // Every rank sees the same mean loss and so stops together.
        if !loss.is_finite() {
            return Err(self.non_finite(format!("loss {loss}")));
        }
        let mut grads = self.average_gradients(acc.finish()?)?;
        let grad_norm = self.state.clip(&mut grads)?;
        if !grad_norm.is_finite() {
            return Err(self.non_finite(format!("gradient norm {grad_norm}")));
        }
        let lr = self.schedule.lr_at(self.step);
        self.state.update(grads, lr)?;
        self.step += 1;
        let seconds = start.elapsed().as_secs_f64();
        let images = (self.cfg.batch_size * self.cfg.accum * self.cfg.world_size) as f64;
        Ok(StepStats {
            step: self.step,
            epoch,
            loss,
            grad_norm,
            lr,
            images_per_s: images / seconds.max(1e-9),
            tokens_per_s: images * self.tokens_per_image as f64 / seconds.max(1e-9),
            seconds,
            rss_bytes: crate::memory::rss_bytes(),
        })
    }

    fn loader_device(&self) -> &Device {
        self.state.device()
    }

    fn non_finite(&self, what: String) -> TrainError {
        TrainError::non_finite(self.step, what, self.last_ckpt.as_deref())
    }

    /// Write a checkpoint of the current state into the run directory
    /// (rank 0; other ranks write nothing and return `None`).
    pub fn save_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        let Some(ema) = self.state.ema() else {
            return Ok(None);
        };
        let ck = Checkpoint {
            step: self.step,
            model: self.weights().into_iter().collect(),
            ema: ema.tensors().clone(),
            optim: self.state.optimizer().state().clone(),
            cursor: self.loader.cursor(),
            rng: None, // all randomness derives from (seed, step): nothing to save
            config: self.cfg.to_json(),
            extra: Default::default(),
            aux: Default::default(),
        };
        let p = checkpoint::save(&self.cfg.out, &ck, self.cfg.keep_checkpoints)?;
        self.last_ckpt = Some(p.clone());
        Ok(Some(p))
    }

    /// Append one JSON line to `log.jsonl` (rank 0).
    pub fn log(&mut self, stats: &StepStats) -> Result<()> {
        let Some(log) = &mut self.log else {
            return Ok(());
        };
        let line =
            serde_json::to_string(stats).map_err(|e| TrainError::State(format!("log: {e}")))?;
        let path = self.cfg.out.join("log.jsonl");
        writeln!(log, "{line}").map_err(io_err(&path))
    }

    /// Train until `total_steps`, checkpointing every `ckpt_every` steps and
    /// at the end; `on_step` sees every step's stats (progress display).
    pub fn run(&mut self, on_step: impl FnMut(&StepStats)) -> Result<Option<StepStats>> {
        run_steps(self, on_step)
    }

    /// [`Trainer::run`] with a hook that also sees the trainer (after each
    /// step's log line, before its checkpoint); its error stops the run.
    pub fn run_with(
        &mut self,
        after_step: impl FnMut(&Trainer, &StepStats) -> Result<()>,
    ) -> Result<Option<StepStats>> {
        run_steps_with(self, after_step)
    }
}

impl RunSteps for Trainer {
    type Stats = StepStats;
    type Error = TrainError;

    fn periods(&self) -> (u64, u64) {
        (self.cfg.log_every, self.cfg.ckpt_every)
    }

    fn steps(&self) -> (u64, u64) {
        (self.step, self.total_steps)
    }

    fn one_step(&mut self) -> Result<(u64, StepStats)> {
        self.train_step().map(|s| (s.step, s))
    }

    fn write_log(&mut self, stats: &StepStats) -> Result<()> {
        self.log(stats)
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.save_checkpoint().map(drop)
    }
}

/// Average `grads` over the ranks of `comm` (bucketed flat all-reduces);
/// one process: unchanged.
pub fn all_reduce_mean(comm: &dyn Collective, grads: Gradients) -> Result<Gradients> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(grads);
    }
    let entries: Vec<(String, Tensor)> =
        grads.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    let mut out = Gradients::new();
    let mut i = 0;
    while i < entries.len() {
        let mut j = i;
        let mut n = 0;
        while j < entries.len() && (j == i || n + entries[j].1.elem_count() <= BUCKET_ELEMS) {
            n += entries[j].1.elem_count();
            j += 1;
        }
        let flat: Vec<Tensor> = entries[i..j]
            .iter()
            .map(|(_, t)| t.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let sum = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
        let avg = sum.affine(1.0 / world as f64, 0.0)?;
        let mut off = 0;
        for (name, t) in &entries[i..j] {
            let len = t.elem_count();
            out.insert(name.clone(), avg.narrow(0, off, len)?.reshape(t.shape())?)?;
            off += len;
        }
        i = j;
    }
    Ok(out)
}

/// The mean over the ranks of each of `values` (sent as f32 through a
/// tensor on `device`, the collective's).
pub fn mean_over_ranks(comm: &dyn Collective, values: &[f64], device: &Device) -> Result<Vec<f64>> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    let t = Tensor::new(v.as_slice(), &Device::Cpu)?.to_device(device)?;
    let sum = comm
        .all_reduce_sum(&t)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let world = comm.world_size() as f64;
    Ok(sum.into_iter().map(|x| x as f64 / world).collect())
}
