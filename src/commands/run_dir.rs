//! What `train` and `train-decoder` share around a run directory: which
//! checkpoint to resume from (and the config that then defines the run),
//! and the step progress bar.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rae_cache::train::checkpoint::{self, latest};

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
