//! `rae-cache merge`: combine the parts of a multi-machine build.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The cache directory the parts were built into (--out of every part).
    pub cache_dir: PathBuf,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if rae_cache::store::is_url(&args.cache_dir) {
        anyhow::bail!(
            "{}: merge works on a local (or shared) directory: the parts of a --num-parts build cannot be written to a store, so build them into a shared directory and merge there",
            args.cache_dir.display()
        );
    }
    let s = rae_cache::pipeline::merge::merge_parts(&args.cache_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        eprintln!(
            "merged {} parts into {}: {} images ({} rejected), {} rows in {} shards, {:.1} MB",
            s.parts,
            s.cache_dir.display(),
            s.images_encoded,
            s.images_rejected,
            s.rows,
            s.shards,
            s.bytes as f64 / 1e6
        );
    }
    Ok(ExitCode::SUCCESS)
}
