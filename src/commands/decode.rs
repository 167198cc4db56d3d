//! `rae-cache decode`: latent shards -> PNG / npz / safetensors images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use rae_cache::generate::{DecodeFormat, DecodeOptions, Rounding, decode_shards, resolve_shards};
use rae_cache::models::config::load_config;
use rae_cache::models::{DecoderConfig, WeightsKey, load_decoder};

use super::progress::Bar;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A shard file, a directory of shards, or a cache / sample directory.
    input: PathBuf,
    /// RAE decoder checkpoint (.safetensors or .pt), or a run directory,
    /// its `checkpoints/` or `checkpoints/latest` (the newest checkpoint).
    #[arg(long)]
    decoder: PathBuf,
    /// Decoder config (JSON/TOML with the decoder keys).
    #[arg(long, conflicts_with = "preset")]
    decoder_config: Option<PathBuf>,
    /// Decoder preset: ViT-B, ViT-L, ViT-XL (256 tokens x 768).
    #[arg(long)]
    preset: Option<String>,
    /// Decoder patch size with --preset (16: 256 px, 32: 512 px).
    #[arg(long, default_value_t = 16)]
    patch_size: usize,
    /// Which checkpoint entry holds the weights: auto, root, ema, model, ...
    #[arg(long, default_value = "auto")]
    weights_key: String,
    #[arg(long)]
    out: PathBuf,
    /// One PNG per row, an ADM-evaluator `.npz`, or f32 `.safetensors`.
    #[arg(long, value_enum, default_value_t = DecodeFormat::Png)]
    format: DecodeFormat,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Decode only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Also write grid.png with the first N images.
    #[arg(long, default_value_t = 0)]
    grid: usize,
    /// Float -> byte: trunc (the reference's `.mul(255).to(uint8)`) or round.
    #[arg(long, value_enum, default_value_t = Rounding::Trunc)]
    rounding: Rounding,
    #[command(flatten)]
    compute: super::ComputeArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let device = rae_cache::device::parse_device(&a.compute.device)?;
    let cfg: DecoderConfig = match (&a.decoder_config, &a.preset) {
        (Some(p), _) => load_config(p)?,
        (None, Some(name)) => DecoderConfig::preset(name, a.patch_size)
            .with_context(|| format!("--preset {name:?}: expected ViT-B, ViT-L or ViT-XL"))?,
        (None, None) => bail!("give --decoder-config FILE or --preset NAME"),
    };
    if a.compute.tf32 {
        rae_cache::precision::set_tf32(true);
    }
    // A run directory, its checkpoints/ or `latest` name the newest checkpoint.
    let weights = rae_cache::train::checkpoint::resolve(&a.decoder)
        .with_context(|| format!("--decoder {}", a.decoder.display()))?;
    let mut decoder = load_decoder(
        &weights,
        &cfg,
        &WeightsKey::parse(&a.weights_key),
        a.compute.precision.resolve(&device),
        &device,
    )
    .with_context(|| format!("loading {}", weights.display()))?;
    decoder.set_fused(true);
    let shards = resolve_shards(&rae_cache::store::local_cache_dir(&a.input)?)?;
    let opts = DecodeOptions {
        out_dir: a.out.clone(),
        format: a.format,
        batch_size: a.batch_size,
        limit: a.limit,
        grid: a.grid,
        rounding: a.rounding,
    };
    let s = decode_shards(
        &decoder,
        &shards,
        &opts,
        &device,
        &mut Bar::labelled("decode", true),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        eprintln!(
            "decoded {} images ({}x{}) from {} shard(s) into {} ({:.1} images/s)",
            s.images,
            s.width,
            s.height,
            s.shards,
            s.out_dir.display(),
            s.images_per_second
        );
    }
    Ok(ExitCode::SUCCESS)
}
