//! What `train` and `train-decoder` share around a run directory: the
//! run-directory flags ([`RunDirArgs`]), which checkpoint to resume from
//! (and the config that then defines the run), and the step progress bar.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rae_cache::dist::{Collective, DistEnv, SingleProcess};
use rae_cache::train::checkpoint::{self, latest};

/// The run-directory flags of `train` and `train-decoder`.
#[derive(clap::Args, Debug)]
pub struct RunDirArgs {
    /// Run directory: checkpoints/, log.jsonl, config.json (train-decoder:
    /// also decoder.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Checkpoint every N optimizer steps (and always at the end).
    #[arg(long)]
    pub ckpt_every: Option<u64>,
    /// Checkpoints to keep (0 = all).
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// TOML file with the same keys as these flags (snake_case).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl RunDirArgs {
    /// The flags given override a config's `out`, `ckpt_every` and
    /// `keep_checkpoints`.
    pub fn apply(&self, out: &mut PathBuf, ckpt_every: &mut u64, keep_checkpoints: &mut usize) {
        if let Some(v) = &self.out {
            *out = v.clone();
        }
        if let Some(v) = self.ckpt_every {
            *ckpt_every = v;
        }
        if let Some(v) = self.keep_checkpoints {
            *keep_checkpoints = v;
        }
    }

    /// The run's config and the checkpoint to resume from: `--config`
    /// (`from_toml`, else the defaults) with the flags on top (`apply`);
    /// then, see [`resolve_resume`], a stored run's config (`from_json`)
    /// with the flags on top. `out` reads the run directory of a config.
    pub fn resolve<C: Default>(
        &self,
        from_toml: impl Fn(&Path) -> anyhow::Result<C>,
        from_json: impl Fn(&str) -> anyhow::Result<C>,
        apply: impl Fn(&mut C) -> anyhow::Result<()>,
        out: impl Fn(&C) -> PathBuf,
    ) -> anyhow::Result<(C, Option<PathBuf>)> {
        let mut cfg = match &self.config {
            Some(p) => from_toml(p)?,
            None => C::default(),
        };
        apply(&mut cfg)?;
        let dir = out(&cfg);
        resolve_resume(cfg, &dir, self.resume, from_json, apply)
    }
}

/// The config that defines the run and the checkpoint to continue from.
/// With `--resume` and a checkpoint in `out`, the run is the stored config
/// (`from_json`) with today's flags on top (`apply`, e.g. more --steps);
/// without `--resume`, a run directory that holds checkpoints is refused.
pub fn resolve_resume<C>(
    cfg: C,
    out: &Path,
    resume: bool,
    from_json: impl Fn(&str) -> anyhow::Result<C>,
    apply: impl Fn(&mut C) -> anyhow::Result<()>,
) -> anyhow::Result<(C, Option<PathBuf>)> {
    if out.as_os_str().is_empty() {
        bail!("give --out RUN_DIR (or `out` in --config)");
    }
    match (resume, latest(out)?) {
        (true, Some(p)) => {
            let stored =
                checkpoint::read_config(&p).with_context(|| format!("reading {}", p.display()))?;
            let mut stored = from_json(&stored)?;
            apply(&mut stored)?;
            Ok((stored, Some(p)))
        }
        (true, None) => {
            tracing::info!("no checkpoint in {}: starting a new run", out.display());
            Ok((cfg, None))
        }
        (false, Some(p)) => bail!(
            "{} already holds checkpoints ({}); pass --resume to continue or choose another --out",
            out.display(),
            p.display()
        ),
        (false, None) => Ok((cfg, None)),
    }
}

/// A bar over the run's optimizer steps, starting at `at` (hidden unless
/// `show`: `--json`, or a rank other than 0).
pub fn step_bar(total: u64, at: u64, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(at);
    bar
}

/// This process's device and collective: one process of a data-parallel
/// job (RANK / WORLD_SIZE / LOCAL_RANK from torchrun, `rae-cache launch` or
/// a cluster wrapper), or a single process.
pub fn join_job(device_spec: &str) -> anyhow::Result<(Device, Box<dyn Collective>)> {
    let dist = DistEnv::from_env()?;
    let device = rae_cache::device::for_job(device_spec, dist.as_ref().map(|d| d.local_rank))?;
    let comm: Box<dyn Collective> = match &dist {
        Some(d) => {
            tracing::info!(
                "rank {} of {} (local rank {}) on {}: waiting for the other ranks",
                d.rank,
                d.world_size,
                d.local_rank,
                rae_cache::device::device_name(&device)
            );
            rae_cache::dist::connect(d, &device)?
        }
        None => Box::new(SingleProcess),
    };
    Ok((device, comm))
}
