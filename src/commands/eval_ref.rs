//! `rae-cache eval-ref`: reference statistics (f64) with provenance, so an
//! evaluation needs no second pass over the reference set.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use rae_cache::eval::run::build_reference;

use super::eval::Common;
use super::progress::Bar;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A latent cache directory, an image folder or an npz (images or an
    /// ADM reference batch).
    source: PathBuf,
    /// The statistics file to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    common: Common,
    /// Store precision/recall feature rows as f32 instead of f16.
    #[arg(long)]
    f32_features: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let opts = a.common.options(&a.source)?;
    let mut nets = a.common.networks(&opts.metrics)?;
    let r = build_reference(
        &a.source,
        &mut nets.borrow(),
        &opts,
        &mut Bar::labelled("eval-ref", true),
    )
    .with_context(|| format!("reference statistics of {}", a.source.display()))?;
    r.save(&a.out, !a.f32_features)?;
    let summary = serde_json::json!({
        "out": a.out.display().to_string(),
        "sets": r.sets.iter().map(|(k, g)| (k.clone(), serde_json::json!({"dim": g.dim(), "count": g.count}))).collect::<serde_json::Map<_, _>>(),
        "features": r.features.iter().map(|(k, f)| (k.clone(), serde_json::json!({"dim": f.dim, "rows": f.data.len() / f.dim.max(1)}))).collect::<serde_json::Map<_, _>>(),
        "latent_stats": r.latent_stats.is_some(),
        "provenance": serde_json::Value::Object(r.provenance.clone()),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprintln!(
            "wrote {} ({} statistics sets)",
            a.out.display(),
            r.sets.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
