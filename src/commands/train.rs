//! `rae-cache train`: flags (or a TOML `--config` with the same keys, flags
//! winning) -> TrainConfig -> Trainer, with a progress bar and a summary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;
use rae_cache::eval::probe::{LatentProbe, ProbeOptions};
use rae_cache::models::DitConfig;
use rae_cache::precision::Precision;
use rae_cache::shards::LatentStats;
use rae_cache::train::checkpoint::latest;
use rae_cache::train::loader::source::CacheSet;
use rae_cache::train::trainer::{StepStats, Trainer};
use rae_cache::train::{ScheduleKind, TrainConfig, TrainError};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Cache directories to train on (manifest.json + shards + stats).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Model preset: ditdh-s, ditdh-b, ditdh-l, ditdh-xl, dit-s ... dit-xl.
    #[arg(long, conflicts_with = "model_config")]
    preset: Option<String>,
    /// Model constructor arguments as JSON or TOML (reference keys).
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Micro-batch size (per process).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, conflicts_with = "global_batch")]
    accum: Option<usize>,
    /// Samples per optimizer step over all processes; sets --accum from
    /// the batch size and world size (kept when resuming on another number
    /// of GPUs).
    #[arg(long)]
    global_batch: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// constant | linear | cosine (decay to --final-lr after --warmup-steps).
    #[arg(long, value_enum)]
    lr_schedule: Option<ScheduleKind>,
    #[arg(long)]
    final_lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Total optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    #[arg(long)]
    epochs: Option<u64>,
    /// EMA decay.
    #[arg(long)]
    ema: Option<f64>,
    /// logit-normal | logit-normal_<mu>_<sigma> | uniform.
    #[arg(long)]
    time_dist: Option<String>,
    /// Time shift a (default sqrt(tokens * C / 4096)).
    #[arg(long)]
    shift: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// cpu | cuda | cuda:N | auto (in a data-parallel job: cuda:LOCAL_RANK).
    #[arg(long)]
    device: Option<String>,
    /// Allow TF32 tensor-core math in f32 matrix products (CUDA only; a
    /// no-op on the CPU). Also `tf32 = true` in --config.
    #[arg(long)]
    tf32: bool,
    /// Compute dtype of forward and backward: auto (bf16 on CUDA, f32 on
    /// the CPU), f32 or bf16; master weights and optimizer state stay f32.
    #[arg(long)]
    precision: Option<Precision>,
    #[command(flatten)]
    run: super::run_dir::RunDirArgs,
    #[command(flatten)]
    probe: ProbeArgs,
}

/// The latent probe: a few EMA samples scored in latent space every N steps
/// (command-line only; not stored in the run's config).
#[derive(clap::Args, Debug)]
struct ProbeArgs {
    /// Every N optimizer steps, sample --eval-samples latents from the EMA
    /// weights and append their latent FD (pooled) and mean/variance drift
    /// against the training cache to log.jsonl (`{"step", "probe"}`); 0: off.
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Samples per probe (fixed seed, labels equal over the classes).
    #[arg(long, default_value_t = 256)]
    eval_samples: usize,
    /// ODE sampler steps of a probe.
    #[arg(long, default_value_t = 25)]
    eval_sampler_steps: usize,
    /// The probe's reference: a cache directory or an `eval-ref` file made
    /// from one (scanning a large cache at start is slow: make the file
    /// once). Default: the first --data cache.
    #[arg(long)]
    eval_ref: Option<PathBuf>,
}

impl Args {
    /// Flags given on the command line override `c`.
    fn apply(&self, c: &mut TrainConfig) -> anyhow::Result<()> {
        if !self.data.is_empty() {
            c.data = self.data.clone();
        }
        self.run
            .apply(&mut c.out, &mut c.ckpt_every, &mut c.keep_checkpoints);
        if let Some(v) = &self.preset {
            c.model = v.clone();
        }
        if let Some(v) = &self.model_config {
            c.model = v.display().to_string();
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone().into(); } )* };
        }
        set!(
            batch_size,
            accum,
            lr,
            warmup_steps,
            ema,
            time_dist,
            seed,
            device
        );
        if let Some(k) = self.lr_schedule {
            c.lr_schedule = k;
        }
        if self.tf32 {
            c.tf32 = true;
        }
        if let Some(p) = self.precision {
            c.precision = p;
        }
        if let Some(g) = self.global_batch {
            c.global_batch = Some(g);
        } else if self.accum.is_some() {
            // Accumulation given by hand defines the global batch; a new
            // --batch-size alone keeps it (accum follows).
            c.global_batch = None;
        }
        if self.final_lr.is_some() {
            c.final_lr = self.final_lr;
        }
        if self.shift.is_some() {
            c.shift = self.shift;
        }
        if self.steps.is_some() {
            c.steps = self.steps;
            c.epochs = None;
        }
        if self.epochs.is_some() {
            c.epochs = self.epochs;
            c.steps = None;
        }
        Ok(())
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (cfg, resume_from) = resolve(&args)?;
    let (device, comm) = super::run_dir::join_job(&cfg.device)?;
    let rank = comm.rank();
    let mut trainer = Trainer::with_collective(cfg, &device, resume_from.as_deref(), comm)?;
    let probe = match (args.probe.eval_every, rank) {
        (0, _) | (_, 1..) => None,
        _ => Some(make_probe(&args.probe, &trainer)?),
    };
    let last = train_with_bar(
        &mut trainer,
        !args.run.json && rank == 0,
        probe.as_ref(),
        &device,
    )?;
    if rank == 0 {
        report(&trainer, last, args.run.json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The run's config (a stored run's config with today's flags on top when
/// resuming) and the checkpoint to resume from.
fn resolve(args: &Args) -> anyhow::Result<(TrainConfig, Option<PathBuf>)> {
    args.run.resolve(
        |p| Ok(TrainConfig::from_toml_file(p)?),
        |j| Ok(TrainConfig::from_json(j)?),
        |c| args.apply(c),
        |c| c.out.clone(),
    )
}

/// The latent probe of `--eval-every` (rank 0 only).
fn make_probe(a: &ProbeArgs, trainer: &Trainer) -> anyhow::Result<LatentProbe> {
    let cfg = trainer.config();
    let set = CacheSet::open(&cfg.data)?;
    let n = set.normalizer();
    let stats = LatentStats {
        mean: n.mean.clone(),
        var: n.var.clone(),
        count: set.num_images() as u64,
        channels: n.channels,
        height: n.height,
        width: n.width,
    };
    let reference = a.eval_ref.clone().or_else(|| cfg.data.first().cloned());
    let reference = reference.context("--eval-every needs a --data cache or --eval-ref")?;
    let opts = ProbeOptions {
        every: a.eval_every,
        samples: a.eval_samples,
        sampler_steps: a.eval_sampler_steps,
        seed: cfg.seed,
        batch_size: cfg.batch_size.max(1),
    };
    let model = DitConfig::load(&cfg.model)?;
    LatentProbe::new(&cfg.out, &reference, stats, model, trainer.shift(), opts)
        .with_context(|| format!("--eval-ref {}", reference.display()))
}

/// Runs the trainer to its last step under a progress bar (hidden unless
/// `show`), with the latent probe when given; the last step's statistics.
fn train_with_bar(
    trainer: &mut Trainer,
    show: bool,
    probe: Option<&LatentProbe>,
    device: &Device,
) -> anyhow::Result<Option<StepStats>> {
    let bar = super::run_dir::step_bar(trainer.total_steps(), trainer.step(), show);
    let update = |s: &StepStats| {
        bar.set_position(s.step);
        bar.set_message(format!(
            "loss {:.4} gn {:.3} lr {:.2e} {:.1} img/s {:.0} tok/s rss {:.0} MB",
            s.loss,
            s.grad_norm,
            s.lr,
            s.images_per_s,
            s.tokens_per_s,
            s.rss_bytes.unwrap_or(0) as f64 / 1e6
        ));
    };
    let last = trainer.run_with(|t, s| {
        if let Some(p) = probe.filter(|p| p.due(s.step)) {
            let weights = match t.ema() {
                Some(e) => e.tensors().clone(),
                None => t.weights().into_iter().collect(),
            };
            let line = p
                .run(s.step, &weights, device)
                .map_err(|e| TrainError::State(format!("latent probe at step {}: {e}", s.step)))?;
            tracing::info!("probe: {}", line["probe"]["fd_pooled"]);
        }
        update(s);
        Ok(())
    })?;
    bar.finish();
    Ok(last)
}

/// The summary on stdout (`--json`) or one line on stderr.
fn report(trainer: &Trainer, last: Option<StepStats>, json: bool) -> anyhow::Result<()> {
    let out = &trainer.config().out;
    let ck = latest(out)?;
    if json {
        let summary = serde_json::json!({
            "run_dir": out,
            "steps": trainer.step(),
            "last": last,
            "checkpoint": ck,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if let Some(s) = last {
        eprintln!(
            "trained to step {} (loss {:.4}); checkpoint {}",
            s.step,
            s.loss,
            ck.map(|p| p.display().to_string()).unwrap_or_default()
        );
    } else {
        eprintln!(
            "nothing to do: already at step {} of {}",
            trainer.step(),
            trainer.total_steps()
        );
    }
    Ok(())
}
