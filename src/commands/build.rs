//! `rae-cache build`: encode an image folder into Parquet latent shards.

use std::path::PathBuf;
use std::process::ExitCode;

use rae_cache::dist::tcp::TcpGroup;
use rae_cache::dist::{Collective, DistEnv};
use rae_cache::pipeline::{self, BuildConfig, BuildSummary, HFlip, PartSpec};
use rae_cache::precision::Precision;
use rae_cache::shards::LatentDType;
use rae_cache::sources::{self, InputFormat, SourceOptions};

use super::progress::Bar;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The images: a folder (ImageNet layout, one sub-folder per class, or
    /// flat); or tar archives (a tar of per-class tars such as
    /// ILSVRC2012_img_train.tar, flat tars, WebDataset shards); or Parquet
    /// files with an image column (Hugging Face `datasets` layout). Several
    /// files, directories of them, or a quoted `*` pattern.
    #[arg(required = true, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// How to read the inputs (`auto`: a directory with images is a folder,
    /// `.tar` files are archives, `.parquet` files a Parquet dataset).
    #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
    pub input_format: InputFormat,
    /// Labels for tar members: `KEY<tab|comma|space>LABEL` lines, or one
    /// label per line in sorted key order; labels are class indices, or
    /// class names (sorted to indices).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Parquet: the image column (struct {bytes, path}, or binary).
    #[arg(long, default_value = sources::DEFAULT_IMAGE_COLUMN)]
    pub image_column: String,
    /// Parquet: the integer label column ("" for none: label -1).
    #[arg(long, default_value = sources::DEFAULT_LABEL_COLUMN)]
    pub label_column: String,
    /// Cache directory to create (manifest.json, stats.safetensors, shards/),
    /// or a store prefix (`s3://bucket/cache`, `gs://`, `az://`, `file://`):
    /// shards are staged locally and each uploaded once finished.
    #[arg(long)]
    pub out: PathBuf,
    /// With a store --out: the local directory shards are written to before
    /// their upload (default: the system's temp dir).
    #[arg(long)]
    pub staging_dir: Option<PathBuf>,
    /// With a store --out: remove another build's lock object first (only
    /// when that build is known to be dead).
    #[arg(long)]
    pub break_lock: bool,
    /// Encoder: a Hugging Face model directory or repo id (looked up in the
    /// local HF cache; no download unless --allow-download).
    #[arg(long, default_value = pipeline::DEFAULT_ENCODER)]
    pub encoder: String,
    /// Fetch the encoder from the Hugging Face Hub if it is not cached.
    #[arg(long)]
    pub allow_download: bool,
    /// Storage type of the latents.
    #[arg(long, value_enum, default_value_t = pipeline::DEFAULT_DTYPE)]
    pub dtype: LatentDType,
    /// `both`: store the crop and its left-right flip (the reference trains
    /// with random flips); `none`: the crop only.
    #[arg(long, value_enum, default_value_t = pipeline::DEFAULT_HFLIP)]
    pub hflip: HFlip,
    /// Images per encoder batch (each gives one crop per flip); 0 = 256 on
    /// CUDA, 32 on the CPU.
    #[arg(long, default_value_t = 0)]
    pub batch_size: usize,
    /// Rows per shard (one row per image and flip); default 1024 images' rows.
    #[arg(long)]
    pub rows_per_shard: Option<usize>,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = pipeline::DEFAULT_ROWS_PER_ROW_GROUP)]
    pub rows_per_group: usize,
    /// zstd compression level.
    #[arg(long, default_value_t = pipeline::DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// Decode threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Shards written (compressed) in parallel (0 = half the cores, 2 to 16).
    #[arg(long, default_value_t = 0)]
    pub writers: usize,
    /// `cpu`, `cuda:N` or `auto` (CUDA when built with it and present).
    #[arg(long, default_value = pipeline::DEFAULT_DEVICE)]
    pub device: String,
    /// Encoder compute precision: auto (bf16 on CUDA, f32 on CPU), f32,
    /// bf16 or f16. Norms, softmax and the stored latents stay f32.
    #[arg(long, default_value_t = pipeline::DEFAULT_PRECISION)]
    pub precision: Precision,
    /// Allow TF32 tensor-core math in f32 matrix products (CUDA only; a
    /// no-op on the CPU).
    #[arg(long)]
    pub tf32: bool,
    /// Split the build into N parts (for N machines); see --part.
    #[arg(long, requires = "part")]
    pub num_parts: Option<usize>,
    /// Which part (0-based) of --num-parts this run builds.
    #[arg(long, requires = "num_parts")]
    pub part: Option<usize>,
    /// Only the first N images (sorted by key).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, default_value_t = rae_cache::images::DecodeOptions::default().max_pixels)]
    pub max_pixels: u64,
    /// Continue an interrupted build in --out (same arguments required).
    #[arg(long)]
    pub resume: bool,
    /// Exit non-zero if any input image was rejected.
    #[arg(long)]
    pub strict: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    pub fn to_config(&self) -> BuildConfig {
        let mut c = BuildConfig::new(&self.images[0], &self.out);
        c.extra_inputs = self.images[1..].to_vec();
        c.source = SourceOptions {
            format: self.input_format,
            labels: self.labels.clone(),
            image_column: self.image_column.clone(),
            label_column: self.label_column.clone(),
        };
        c.encoder = self.encoder.clone();
        c.allow_download = self.allow_download;
        c.dtype = self.dtype;
        c.hflip = self.hflip;
        c.batch_size = self.batch_size;
        c.rows_per_shard = self.rows_per_shard;
        c.rows_per_group = self.rows_per_group;
        c.zstd_level = self.zstd_level;
        c.threads = self.threads;
        c.writers = self.writers;
        c.device = self.device.clone();
        c.precision = self.precision;
        c.tf32 = self.tf32;
        c.part = match (self.num_parts, self.part) {
            (Some(count), Some(index)) => Some(PartSpec { index, count }),
            _ => None,
        };
        c.limit = self.limit;
        c.max_pixels = self.max_pixels;
        c.resume = self.resume;
        c.staging_dir = self.staging_dir.clone();
        c.break_lock = self.break_lock;
        c
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = args.to_config();
    // One process of a job (`rae-cache launch`, torchrun, a cluster
    // wrapper) without an explicit --part: build part RANK of WORLD_SIZE on
    // this rank's GPU, wait for every part, and rank 0 merges.
    let job = match args.part {
        None => DistEnv::from_env()?,
        Some(_) => None,
    };
    // One bar per job: rank 0's.
    let mut bar = Bar::images(job.as_ref().is_none_or(|d| d.rank == 0));
    let group = match &job {
        Some(d) => {
            cfg.part = Some(PartSpec {
                index: d.rank,
                count: d.world_size,
            });
            cfg.device = rae_cache::device::spec_for_rank(&cfg.device, d.local_rank)?;
            // Connect first: every rank is starting now, whereas they finish
            // their parts minutes apart.
            Some(TcpGroup::connect(d)?)
        }
        None => None,
    };
    let s = pipeline::run_build(&cfg, &mut bar)?;
    if let Some(g) = group {
        return merge_job(&args, &cfg, &s, &g);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_built(&s);
    }
    let strict_failed = report_rejected(&s, args.strict);
    if let Some(cut) = &s.truncated {
        eprintln!(
            "error: the source ends early: {}: {}\n  built the {} whole shards before it; make the source complete and rerun with --resume",
            cut.key, cut.reason, s.shards
        );
        return Ok(ExitCode::from(3));
    }
    if strict_failed {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// The end of one process of a job, whose part `s` is built: wait for every
/// part, then rank 0 merges them and reports the merged cache.
fn merge_job(
    args: &Args,
    cfg: &BuildConfig,
    s: &BuildSummary,
    g: &TcpGroup,
) -> anyhow::Result<ExitCode> {
    // Warnings only here: --strict is judged on the merged total below.
    report_rejected(s, false);
    g.barrier()?; // every part is built
    if g.rank() != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let m = pipeline::merge::merge_parts(&cfg.out)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        eprintln!(
            "built {} parts on {} processes and merged them into {}: {} images ({} rejected), {} rows in {} shards, {:.1} MB",
            m.parts,
            g.world_size(),
            m.cache_dir.display(),
            m.images_encoded,
            m.images_rejected,
            m.rows,
            m.shards,
            m.bytes as f64 / 1e6
        );
    }
    Ok(if args.strict && m.images_rejected > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// The one-line summary of a build (or part) on stderr.
fn print_built(s: &BuildSummary) {
    let what = match s.part {
        Some(p) => format!("part {} of {}", p.index, p.count),
        None => "cache".into(),
    };
    eprintln!(
        "built {what} {}: {} images, {} rows in {} shards, {:.1} MB ({:.2}x smaller than raw f32), {:.1} images/s",
        s.cache_dir.display(),
        s.images_encoded,
        s.rows,
        s.shards,
        s.bytes as f64 / 1e6,
        s.compression_ratio,
        s.images_per_second
    );
    if let Some(p) = s.part
        && p.index + 1 == p.count
    {
        eprintln!(
            "when every part is built: rae-cache merge {}",
            s.cache_dir.display()
        );
    }
}

/// Warn about rejected inputs; true when `--strict` makes that an error.
fn report_rejected(s: &BuildSummary, strict: bool) -> bool {
    if s.images_rejected == 0 {
        return false;
    }
    eprintln!(
        "warning: {} input(s) rejected (listed in the manifest's `rejected`):",
        s.images_rejected
    );
    for r in s.rejected.iter().take(20) {
        eprintln!("  {}: {}", r.key, r.reason);
    }
    if s.rejected.len() > 20 {
        eprintln!("  ... and {} more", s.rejected.len() - 20);
    }
    if strict {
        eprintln!(
            "error: --strict: {} input(s) could not be encoded",
            s.images_rejected
        );
    }
    strict
}
