//! `rae-cache eval`: FID, sFID, IS, precision/recall, FD-DINOv2 (through
//! the feature networks) and latent-space metrics (from shards alone).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use std::sync::Arc;

use rae_cache::eval::features::{ImageFeatures, SampleDecoder};
use rae_cache::eval::networks::{Dinov2Features, InceptionFeatures};
use rae_cache::eval::run::{EvalOptions, Input, Metric, Networks, evaluate};
use rae_cache::eval::{Distance, PrOptions};
use rae_cache::precision::Precision;
use rae_cache::shards::LatentStats;
use serde_json::{Value, json};

use super::progress::Bar;

/// Where the Inception weights the FID protocol uses are published.
pub const INCEPTION_HINT: &str = "pytorch-fid pt_inception-2015-12-05-6726825d.pth, published at \
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";

/// Where the FD-DINOv2 weights are published.
pub const DINOV2_HINT: &str = "DINOv2 ViT-L/14: a Hugging Face facebook/dinov2-large directory (config.json + model.safetensors)";

/// Flags shared by `eval` and `eval-ref`.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// Metrics, comma-separated: fid,sfid,is,pr,fd-dinov2,latent. Default:
    /// latent for shards, fid,sfid,is,pr for images.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub metrics: Vec<Metric>,
    /// Inception-v3 weights (FID/sFID/IS/P&R): pytorch-fid's
    /// pt_inception-2015-12-05-6726825d.pth.
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// DINOv2 ViT-L/14 weights (FD-DINOv2): a facebook/dinov2-large
    /// directory, or that id in the local Hugging Face cache.
    #[arg(long)]
    pub dinov2: Option<String>,
    /// Where the feature networks run: cpu | cuda | cuda:N | auto. TF32
    /// stays off (the protocol's f32).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Images per network batch.
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
    /// Precision/recall neighbourhood size.
    #[arg(long, default_value_t = 3)]
    pub k: usize,
    /// Precision/recall distances: adm-f16 (ADM's float16 blocks) or f32.
    #[arg(long, value_enum, default_value_t = Distance::AdmF16)]
    pub pr_distance: Distance,
    /// Tile side of the f16 overflow fallback (ADM: 10000).
    #[arg(long, default_value_t = 10_000)]
    pub pr_block: usize,
    /// Skip the latent token-marginal FD (reads every token: the costly part).
    #[arg(long)]
    pub no_latent_tokens: bool,
    /// Skip latent precision/recall.
    #[arg(long)]
    pub no_latent_pr: bool,
    /// Latent token FD and precision/recall use at most N rows per side
    /// (evenly strided; 0: every row). The pooled FD always uses every row.
    #[arg(long, default_value_t = 10_000)]
    pub latent_subset: usize,
    /// Reference cache rows: all (both flips) or unflipped.
    #[arg(long, default_value = "all", value_parser = ["all", "unflipped"])]
    pub ref_flips: String,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Samples: a sample / cache directory (latent shards), an ADM-style
    /// .npz (`arr_0` uint8) or a folder of images; or a store URL of a
    /// cache (`s3://bucket/cache`) or of one file (`s3://bucket/x.npz`).
    samples: PathBuf,
    /// Reference: an eval-ref .safetensors, an ADM reference .npz, a latent
    /// cache directory or an image folder / npz; or a store URL of a cache
    /// or of one such file.
    #[arg(long = "ref")]
    reference: PathBuf,
    #[command(flatten)]
    common: Common,
    /// IS split size (ADM: 5000 rows per split, in file order).
    #[arg(long, default_value_t = 5000)]
    is_split: usize,
    /// Use at most N samples.
    #[arg(long)]
    limit: Option<usize>,
    /// RAE decoder checkpoint (file, run directory or
    /// `checkpoints/latest`): SAMPLES given as latent shards are decoded
    /// in-process through `decode`'s pixel path (no files written) for the
    /// pixel metrics; then fid,sfid,is,pr is the default metric set.
    #[arg(long)]
    decoder: Option<PathBuf>,
    #[command(flatten)]
    dec: super::decode::DecoderArgs,
    /// Decoder compute precision: auto (bf16 on CUDA, f32 on CPU, as
    /// `decode`), f32, bf16 or f16. The paper recommends f32 for low FIDs.
    #[arg(long, default_value = "auto")]
    decoder_precision: Precision,
    /// The training cache's stats.safetensors: de-normalises sample shards
    /// written without `sample --stats` (when the sample directory has no
    /// stats.safetensors of its own).
    #[arg(long)]
    latent_stats: Option<PathBuf>,
    /// Print the JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl Common {
    /// Options with `metrics` resolved against the input kind.
    pub fn options(&self, input: &Path) -> anyhow::Result<EvalOptions> {
        let metrics = if self.metrics.is_empty() {
            match Input::detect(input)? {
                Input::Shards { .. } => vec![Metric::Latent],
                _ => vec![Metric::Fid, Metric::Sfid, Metric::Is, Metric::Pr],
            }
        } else {
            self.metrics.clone()
        };
        Ok(EvalOptions {
            metrics,
            pr: PrOptions {
                k: self.k,
                block: self.pr_block,
                distance: self.pr_distance,
            },
            latent_pr: !self.no_latent_pr,
            latent_tokens: !self.no_latent_tokens,
            batch: self.batch_size,
            ref_unflipped_only: self.ref_flips == "unflipped",
            latent_subset: (self.latent_subset > 0).then_some(self.latent_subset),
            ..EvalOptions::default()
        })
    }

    /// Load the networks the metrics need; a clear error naming the file
    /// (and where it is published) when one is missing.
    pub fn networks(&self, metrics: &[Metric]) -> anyhow::Result<LoadedNetworks> {
        let mut nets = LoadedNetworks::default();
        let inception = [Metric::Fid, Metric::Sfid, Metric::Is, Metric::Pr];
        if metrics.iter().any(|m| inception.contains(m)) {
            let Some(p) = &self.inception else {
                bail!("inception weights needed: --inception FILE ({INCEPTION_HINT})");
            };
            nets.inception = Some(load_inception(p, &self.device)?);
        }
        if metrics.contains(&Metric::FdDinov2) {
            let Some(p) = &self.dinov2 else {
                bail!("DINOv2 weights needed for fd-dinov2: --dinov2 DIR ({DINOV2_HINT})");
            };
            nets.dinov2 = Some(load_dinov2(p, &self.device)?);
        }
        Ok(nets)
    }
}

/// The networks, owned.
#[derive(Default)]
pub struct LoadedNetworks {
    pub inception: Option<Box<dyn ImageFeatures>>,
    pub dinov2: Option<Box<dyn ImageFeatures>>,
}

impl LoadedNetworks {
    pub fn borrow(&mut self) -> Networks<'_> {
        Networks {
            inception: self
                .inception
                .as_deref_mut()
                .map(|n| n as &mut dyn ImageFeatures),
            dinov2: self
                .dinov2
                .as_deref_mut()
                .map(|n| n as &mut dyn ImageFeatures),
            decoder: None,
        }
    }
}

/// The FID Inception (pool / spatial / unbiased logits) as `ImageFeatures`.
pub fn load_inception(path: &Path, device: &str) -> anyhow::Result<Box<dyn ImageFeatures>> {
    if !path.is_file() {
        bail!("{}: no such file ({INCEPTION_HINT})", path.display());
    }
    let device = rae_cache::device::parse_device(device)?;
    Ok(Box::new(InceptionFeatures::load(path, &device)?))
}

/// The FD-DINOv2 extractor as `ImageFeatures`.
fn load_dinov2(id_or_dir: &str, device: &str) -> anyhow::Result<Box<dyn ImageFeatures>> {
    let device = rae_cache::device::parse_device(device)?;
    Dinov2Features::load(id_or_dir, &device)
        .map(|n| Box::new(n) as Box<dyn ImageFeatures>)
        .with_context(|| format!("--dinov2 {id_or_dir} ({DINOV2_HINT})"))
}

fn fmt(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.6}"))
}

/// The short table printed without --json.
fn table(r: &Value) -> String {
    let m = &r["metrics"];
    let mut out = String::new();
    for (k, v) in m.as_object().into_iter().flatten() {
        if !v.is_null() {
            out.push_str(&format!("{k:<18} {}\n", fmt(v)));
        }
    }
    if let Some(n) = r.get("counts").map(|c| &c["samples"]) {
        out.push_str(&format!("{:<18} {n}\n", "samples"));
    }
    out
}

/// The sample decoder of `--decoder`, with what the report records.
fn sample_decoder(a: &Args, path: &Path) -> anyhow::Result<Arc<SampleDecoder>> {
    let device = rae_cache::device::parse_device(&a.common.device)?;
    let decoder = a.dec.load(path, a.decoder_precision, &device)?;
    let stats = a
        .latent_stats
        .as_ref()
        .map(|p| LatentStats::load(p).with_context(|| format!("--latent-stats {}", p.display())))
        .transpose()?;
    let provenance = json!({
        "checkpoint": path.display().to_string(),
        "config": a.dec.decoder_config.as_ref().map(|p| p.display().to_string()),
        "preset": a.dec.preset,
        "weights_key": a.dec.weights_key,
        "precision": format!("{:?}", decoder.dtype()),
        "rounding": format!("{:?}", a.dec.rounding).to_lowercase(),
        "image_size": decoder.config().image_size(),
    });
    Ok(Arc::new(SampleDecoder {
        decoder,
        device,
        rounding: a.dec.rounding,
        stats,
        provenance,
    }))
}

pub fn run(mut a: Args) -> anyhow::Result<ExitCode> {
    // Store URLs (a cache prefix, or one object such as an .npz) are read
    // through the local read-through cache.
    a.samples = rae_cache::store::local_input(&a.samples)?;
    a.reference = rae_cache::store::local_input(&a.reference)?;
    if let Some(p) = &a.latent_stats {
        a.latent_stats = Some(rae_cache::store::local_file(p)?);
    }
    let mut opts = a.common.options(&a.samples)?;
    opts.is_split = a.is_split;
    opts.limit = a.limit;
    if a.decoder.is_some() && a.common.metrics.is_empty() {
        opts.metrics = vec![Metric::Fid, Metric::Sfid, Metric::Is, Metric::Pr];
    }
    let mut nets = a.common.networks(&opts.metrics)?;
    let mut borrowed = nets.borrow();
    if let Some(p) = &a.decoder {
        borrowed.decoder = Some(sample_decoder(&a, p)?);
    }
    let report = evaluate(
        &a.samples,
        &a.reference,
        &mut borrowed,
        &opts,
        &mut Bar::labelled("eval", true),
    )
    .with_context(|| {
        format!(
            "evaluating {} against {}",
            a.samples.display(),
            a.reference.display()
        )
    })?;
    emit(&report, a.out.as_deref(), a.json)
}

/// Write the report to `out` (atomically) if given, and print it: the JSON
/// with `json`, else the metric table.
pub fn emit(report: &Value, out: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    let text = serde_json::to_string_pretty(report)?;
    if let Some(p) = out {
        rae_cache::fsutil::write_atomic(p, text.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if json {
        println!("{text}");
    } else {
        print!("{}", table(report));
    }
    Ok(ExitCode::SUCCESS)
}
