//! `rae-cache verify`: re-hash and decode every shard against the manifest.

use std::path::PathBuf;
use std::process::ExitCode;

use super::progress::Bar;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Cache directory (or a part's directory, CACHE/parts/I), or a cache in
    /// a store (`s3://bucket/cache`: its shards are downloaded through
    /// --cache-dir and checked there).
    pub cache_dir: PathBuf,
    /// Print a machine-readable report on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = rae_cache::store::local_cache_dir(&args.cache_dir)?;
    let report = rae_cache::pipeline::verify::verify_cache(&dir, &mut Bar::plain(true))?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["ok"] = serde_json::Value::Bool(report.ok());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if report.ok() {
        eprintln!(
            "ok: {} shards, {} rows match the manifest",
            report.shards_checked, report.rows_checked
        );
    } else {
        eprintln!(
            "{} problem(s) in {}:",
            report.problems.len(),
            args.cache_dir.display()
        );
        for p in &report.problems {
            eprintln!("  {p}");
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
