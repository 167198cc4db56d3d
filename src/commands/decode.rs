//! `rae-cache decode`: latent shards -> PNG / npz / safetensors images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use candle_core::Device;
use rae_cache::generate::{DecodeFormat, DecodeOptions, Rounding, decode_shards, resolve_shards};
use rae_cache::models::config::load_config;
use rae_cache::models::{DecoderConfig, RaeDecoder, WeightsKey, load_decoder};
use rae_cache::precision::Precision;

use super::progress::Bar;

/// How to build the RAE decoder and turn its output into bytes (`decode`,
/// and `eval` of sample shards).
#[derive(clap::Args, Debug)]
pub struct DecoderArgs {
    /// Decoder config (JSON/TOML with the decoder keys).
    #[arg(long, conflicts_with = "preset")]
    pub decoder_config: Option<PathBuf>,
    /// Decoder preset: ViT-B, ViT-L, ViT-XL (256 tokens x 768).
    #[arg(long)]
    pub preset: Option<String>,
    /// Decoder patch size with --preset (16: 256 px, 32: 512 px).
    #[arg(long, default_value_t = 16)]
    pub patch_size: usize,
    /// Which checkpoint entry holds the weights: auto, root, ema, model, ...
    #[arg(long, default_value = "auto")]
    pub weights_key: String,
    /// Float -> byte: trunc (the reference's `.mul(255).to(uint8)`) or round.
    #[arg(long, value_enum, default_value_t = Rounding::Trunc)]
    pub rounding: Rounding,
}

impl DecoderArgs {
    /// The decoder of checkpoint `decoder` (a file, a run directory, its
    /// `checkpoints/` or `checkpoints/latest`), fused attention on.
    pub fn load(
        &self,
        decoder: &Path,
        precision: Precision,
        device: &Device,
    ) -> anyhow::Result<RaeDecoder> {
        let cfg: DecoderConfig = match (&self.decoder_config, &self.preset) {
            (Some(p), _) => load_config(p)?,
            (None, Some(name)) => DecoderConfig::preset(name, self.patch_size)
                .with_context(|| format!("--preset {name:?}: expected ViT-B, ViT-L or ViT-XL"))?,
            (None, None) => bail!("give --decoder-config FILE or --preset NAME"),
        };
        // A run directory, its checkpoints/ or `latest` name the newest checkpoint.
        let weights = rae_cache::train::checkpoint::resolve(decoder)
            .with_context(|| format!("--decoder {}", decoder.display()))?;
        let mut dec = load_decoder(
            &weights,
            &cfg,
            &WeightsKey::parse(&self.weights_key),
            precision.resolve(device),
            device,
        )
        .with_context(|| format!("loading {}", weights.display()))?;
        dec.set_fused(true);
        Ok(dec)
    }
}

/// A required decoder checkpoint and how to build it (`decode`, `eval-recon`).
#[derive(clap::Args, Debug)]
pub struct DecoderFlags {
    /// RAE decoder checkpoint (.safetensors or .pt), or a run directory,
    /// its `checkpoints/` or `checkpoints/latest` (the newest checkpoint).
    #[arg(long)]
    pub decoder: PathBuf,
    #[command(flatten)]
    pub args: DecoderArgs,
}

impl DecoderFlags {
    /// The decoder ([`DecoderArgs::load`]).
    pub fn load(&self, precision: Precision, device: &Device) -> anyhow::Result<RaeDecoder> {
        self.args.load(&self.decoder, precision, device)
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A shard file, a directory of shards, or a cache / sample directory.
    input: PathBuf,
    #[command(flatten)]
    dec: DecoderFlags,
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
    #[command(flatten)]
    compute: super::ComputeArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let device = rae_cache::device::parse_device(&a.compute.device)?;
    if a.compute.tf32 {
        rae_cache::precision::set_tf32(true);
    }
    let decoder = a.dec.load(a.compute.precision, &device)?;
    let shards = resolve_shards(&rae_cache::store::local_cache_dir(&a.input)?)?;
    let opts = DecodeOptions {
        out_dir: a.out.clone(),
        format: a.format,
        batch_size: a.batch_size,
        limit: a.limit,
        grid: a.grid,
        rounding: a.dec.args.rounding,
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
