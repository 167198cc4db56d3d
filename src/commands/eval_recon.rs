//! `rae-cache eval-recon`: a decoder's reconstruction metrics (PSNR, SSIM,
//! LPIPS, rFID) over an image folder (encode -> decode round trip) or a
//! latent cache and the images it was built from.
//!
//! A subcommand of its own rather than more `eval --metrics`: the inputs
//! are paired (each reconstruction against its own original), it needs an
//! encoder and a decoder instead of a reference set, and none of `eval`'s
//! reference/P&R/IS options apply.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use rae_cache::eval::features::{ImageBatch, ImageFeatures};
use rae_cache::eval::recon_run::{
    ReconAccumulator, ReconMetric, ReconNets, Reconstructor, cache_pairs, round_trip_images,
};
use rae_cache::precision::Precision;
use rae_cache::shards::manifest::MANIFEST_FILE;
use rae_cache::stage1::Lpips;
use rae_cache::stage1::lpips::LpipsSource;
use serde_json::json;

use super::eval::{INCEPTION_HINT, emit, load_inception};
use super::progress::Bar;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An image folder (round trip through --encoder and the decoder) or a
    /// latent cache directory (its latents decoded against its source images).
    input: PathBuf,
    #[command(flatten)]
    dec: super::decode::DecoderFlags,
    /// Encoder for an image folder: a Hugging Face model directory or a
    /// repo id in the local cache (as `build --encoder`).
    #[arg(long)]
    encoder: Option<String>,
    /// A cache's source images, when they moved since `build` (default: the
    /// manifest's dataset_root).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Metrics, comma-separated: psnr,ssim,lpips,rfid.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "psnr,ssim")]
    metrics: Vec<ReconMetric>,
    /// Inception-v3 weights for rfid (pytorch-fid's .pth).
    #[arg(long)]
    inception: Option<PathBuf>,
    /// LPIPS VGG16 weights: file, directory or HF repo id (timm/vgg16.tv_in1k).
    #[arg(long)]
    lpips_vgg: Option<String>,
    /// LPIPS v0.1 linear weights `vgg.pth` (default: next to the VGG weights).
    #[arg(long)]
    lpips_lin: Option<String>,
    /// Model compute precision of the encoder and decoder: auto (bf16 on
    /// CUDA, f32 on CPU), f32, bf16, f16. The metric networks run in f32.
    #[arg(long, default_value = "auto")]
    precision: Precision,
    /// cpu | cuda | cuda:N | auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Use at most N images (cache: rows).
    #[arg(long)]
    limit: Option<usize>,
    /// Print the JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn load_lpips(a: &Args, device: &candle_core::Device) -> anyhow::Result<Lpips> {
    let mut src = LpipsSource::default();
    if let Some(v) = &a.lpips_vgg {
        src.vgg = v.clone();
    }
    src.lin = a.lpips_lin.clone();
    Ok(Lpips::from_source(&src, device)?)
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let device = rae_cache::device::parse_device(&a.device)?;
    let has = |m| a.metrics.contains(&m);
    let mut inception: Option<Box<dyn ImageFeatures>> = match (&a.inception, has(ReconMetric::Rfid))
    {
        (Some(p), true) => Some(load_inception(p, &a.device)?),
        (None, true) => {
            bail!("inception weights needed for rfid: --inception FILE ({INCEPTION_HINT})")
        }
        _ => None,
    };
    let lpips = has(ReconMetric::Lpips)
        .then(|| load_lpips(&a, &device))
        .transpose()?;
    let inception_provenance = nets_provenance(inception.as_deref());
    let decoder = a.dec.load(a.precision, &device)?;
    let rec = Reconstructor {
        decoder: &decoder,
        device: &device,
        rounding: a.dec.args.rounding,
    };
    let mut nets = ReconNets {
        inception: inception
            .as_deref_mut()
            .map(|n| n as &mut dyn ImageFeatures),
        lpips: lpips.as_ref().map(|l| (l, device.clone())),
    };
    let mut acc = ReconAccumulator::new(&a.metrics);
    let mut push = |x: &ImageBatch<'_>, y: &ImageBatch<'_>| acc.push(x, y, &mut nets);
    let mut bar = Bar::labelled("eval-recon", true);
    let t = Instant::now();
    let kind = if a.input.join(MANIFEST_FILE).is_file() {
        cache_pairs(
            &a.input,
            a.images.as_deref(),
            &rec,
            (a.batch_size, a.limit),
            &mut bar,
            &mut push,
        )?;
        "cache"
    } else {
        let files = image_files(&a.input, a.limit)?;
        let Some(enc) = &a.encoder else {
            bail!(
                "{}: an image folder needs --encoder (the encoder the decoder was trained on)",
                a.input.display()
            );
        };
        let model = rae_cache::weights::resolve_model(enc, false)
            .with_context(|| format!("--encoder {enc}"))?;
        let encoder =
            rae_cache::encoders::load_resolved(&model, &device, a.precision.resolve(&device))?;
        round_trip_images(
            &files,
            encoder.as_ref(),
            &rec,
            a.batch_size,
            &mut bar,
            &mut push,
        )?;
        "round-trip"
    };
    let r = acc.finish()?;
    let report = json!({
        "metrics": {"psnr": r.psnr, "ssim": r.ssim, "lpips": r.lpips, "rfid": r.rfid},
        "counts": {"samples": r.images},
        "input": {"path": a.input.display().to_string(), "kind": kind, "size": r.size},
        "decoder": {"checkpoint": a.dec.decoder.display().to_string(), "rounding": format!("{:?}", a.dec.args.rounding).to_lowercase(), "precision": format!("{:?}", decoder.dtype())},
        "encoder": a.encoder,
        "protocol": {
            "pixels": "original and reconstruction as uint8 (decoder output clamped to [0,1], * 255, rounding as above)",
            "psnr": "per image 20 log10(1 / sqrt(max(mse, 1e-10))) on x / 255, mean over images",
            "ssim": "torchmetrics defaults (gaussian 11, sigma 1.5, k1 0.01, k2 0.03, data range 1, reflect-padded full image), per image, mean",
            "lpips": "VGG16 + LPIPS v0.1 linear heads (decoder training's network) on x / 255 * 2 - 1, per image, mean",
            "rfid": "Frechet distance of Inception pool_3 statistics, reconstructions vs originals",
            "inception": inception_provenance,
        },
        "timings_s": {"total": t.elapsed().as_secs_f64()},
        "tool_version": env!("CARGO_PKG_VERSION"),
    });
    emit(&report, a.out.as_deref(), a.json)
}

fn nets_provenance(net: Option<&dyn ImageFeatures>) -> serde_json::Value {
    net.map_or(serde_json::Value::Null, |n| n.provenance())
}

/// The images of a folder, sorted, at most `limit`.
fn image_files(dir: &Path, limit: Option<usize>) -> anyhow::Result<Vec<PathBuf>> {
    let d = rae_cache::images::discover(dir).with_context(|| format!("{}", dir.display()))?;
    let mut files: Vec<PathBuf> = d.entries.into_iter().map(|e| e.path).collect();
    if files.is_empty() {
        bail!("{}: no images found", dir.display());
    }
    files.truncate(limit.unwrap_or(usize::MAX));
    Ok(files)
}
