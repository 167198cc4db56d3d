//! `rae-cache` command line: a thin layer over the library.

// Benchmark scaffolding lives with the benches; the `bench` subcommand
// compiles the same file so both measure the same models.
#[allow(dead_code)]
#[path = "../benches/support/mod.rs"]
mod bench_support;
mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rae-cache",
    version,
    about = "Latent caches for Representation Autoencoder diffusion research"
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info`, `rae_cache=debug`.
    #[arg(long, global = true, env = "RAE_LOG", default_value = "info")]
    log: String,
    /// Local read-through cache for caches in a store (`--data
    /// s3://bucket/cache`): each shard is downloaded there once.
    #[arg(long = "cache-dir", global = true, env = "RAE_CACHE_DIR")]
    read_cache_dir: Option<std::path::PathBuf>,
    /// Bound on the read-through cache (e.g. 500G, 2TiB): least-recently
    /// used shards of other caches are evicted.
    #[arg(long = "cache-size", global = true, env = "RAE_CACHE_SIZE", value_parser = rae_cache::store::cache::parse_size)]
    read_cache_size: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Encode an image folder into Parquet latent shards.
    Build(commands::build::Args),
    /// Summarise a cache directory or one shard.
    Inspect(commands::inspect::Args),
    /// Re-hash and decode every shard of a cache against its manifest.
    Verify(commands::verify::Args),
    /// Combine the parts of a multi-machine build.
    Merge(commands::merge::Args),
    /// Train DiT / DiT-DH from cached latents.
    Train(commands::train::Args),
    /// Train the RAE pixel decoder (stage 1) from a latent cache, or from images
    /// with the encoder run per batch (--online-encoder).
    TrainDecoder(commands::train_decoder::Args),
    /// Start one process per GPU (torchrun-style environment), e.g.
    /// `launch --nproc-per-node 8 -- train ...`.
    Launch(commands::launch::Args),
    /// Sample latents with a trained DiT / DiT-DH.
    Sample(commands::sample::Args),
    /// Decode latent shards to images with an RAE decoder.
    Decode(commands::decode::Args),
    /// Score samples: FID, sFID, IS, precision/recall, FD-DINOv2, latent metrics.
    Eval(commands::eval::Args),
    /// Reference statistics for `eval` (a cache, an image folder or an npz).
    EvalRef(commands::eval_ref::Args),
    /// The whole pipeline on built-in data, from nothing to a page of
    /// generated pictures (minutes on a CPU, no download).
    Demo(commands::demo::Args),
    /// Reconstruction metrics of a decoder (PSNR, SSIM, LPIPS, rFID) over an
    /// image folder (encode -> decode) or a cache and its source images.
    EvalRecon(commands::eval_recon::Args),
    /// Throughput benchmarks with random weights (see scripts/gpu-check.sh).
    #[command(hide = true)]
    Bench(commands::bench::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    rae_cache::store::cache::configure(rae_cache::store::cache::ReadCacheSettings {
        dir: cli
            .read_cache_dir
            .clone()
            .unwrap_or_else(rae_cache::store::cache::default_dir),
        max_bytes: cli.read_cache_size,
    });
    let res = match cli.cmd {
        Cmd::Build(a) => commands::build::run(a),
        Cmd::Inspect(a) => commands::inspect::run(a),
        Cmd::Verify(a) => commands::verify::run(a),
        Cmd::Merge(a) => commands::merge::run(a),
        Cmd::Train(a) => commands::train::run(a),
        Cmd::TrainDecoder(a) => commands::train_decoder::run(a),
        Cmd::Launch(a) => commands::launch::run(a),
        Cmd::Sample(a) => commands::sample::run(a),
        Cmd::Decode(a) => commands::decode::run(a),
        Cmd::Eval(a) => commands::eval::run(a),
        Cmd::EvalRef(a) => commands::eval_ref::run(a),
        Cmd::Demo(a) => commands::demo::run(a),
        Cmd::EvalRecon(a) => commands::eval_recon::run(a),
        Cmd::Bench(a) => commands::bench::run(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
