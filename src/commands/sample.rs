//! `rae-cache sample`: draw latents from a DiT / DiT-DH into shards.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use rae_cache::diffusion::{Guidance, SamplerConfig, SamplerMethod, default_shift};
use rae_cache::dist::tcp::TcpGroup;
use rae_cache::dist::{Collective, DistEnv};
use rae_cache::generate::{LabelSpec, SampleOptions, run_sampling_job};
use rae_cache::models::{DitConfig, DitModel, VelocityModel, WeightsKey, load_dit};
use rae_cache::shards::{LatentDType, LatentStats};
use rae_cache::train::checkpoint::open_trained;

use super::progress::Bar;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// DiT / DiT-DH checkpoint (.safetensors or .pt), or a `rae-cache
    /// train` run directory, its `checkpoints/` or `checkpoints/latest`
    /// (the newest checkpoint, with the run's model config).
    #[arg(long)]
    model: PathBuf,
    /// Model constructor keys (JSON/TOML file).
    #[arg(long, conflicts_with = "preset")]
    model_config: Option<String>,
    /// Model preset (DiT-DH-S/B/L/XL, LightningDiT-S/B/L/XL).
    #[arg(long)]
    preset: Option<String>,
    /// Which checkpoint entry holds the weights: auto, root, ema, model, ...
    /// auto: `ema` if present, else `model`/`state_dict`; for a rae-cache
    /// run, the EMA once it holds at most 1% of the initial weights
    /// (decay^step), else the raw weights.
    #[arg(long, default_value = "auto")]
    weights_key: String,
    /// Output directory (shards/ + manifest.json).
    #[arg(long)]
    out: PathBuf,
    /// Number of samples (ignored with --noise: N = its batch).
    #[arg(long, default_value_t = 0)]
    num: usize,
    /// `all` (i mod classes), `equal` (balanced, seeded order) or a comma list.
    #[arg(long, default_value = "all")]
    labels: String,
    /// Grid points N (N-1 Euler steps).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Euler ODE, Heun ODE or Euler-Maruyama SDE.
    #[arg(long, value_enum, default_value_t = SamplerMethod::EulerOde)]
    sampler: SamplerMethod,
    /// Time shift (default sqrt(tokens * C / 4096), as the reference).
    #[arg(long)]
    shift: Option<f64>,
    /// Guidance scale; guidance is on when > 1 (CFG, or AutoGuidance with --guide-model).
    #[arg(long, default_value_t = 1.0)]
    cfg_scale: f64,
    /// t interval `LO,HI` where guidance applies.
    #[arg(long, default_value = "0,1")]
    cfg_interval: String,
    /// AutoGuidance guide model checkpoint.
    #[arg(long)]
    guide_model: Option<PathBuf>,
    #[arg(long, conflicts_with = "guide_preset")]
    guide_config: Option<String>,
    #[arg(long)]
    guide_preset: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// safetensors file with `z0` [N,C,H,W]: exact initial noise.
    #[arg(long)]
    noise: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Dataset statistics (stats.safetensors of the cache the model was
    /// trained on, a path or a store URL of that object): samples are
    /// de-normalised to raw encoder latents.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Stored latent dtype: f16 | f32 | bf16.
    #[arg(long, default_value = "f16", value_parser = <LatentDType as std::str::FromStr>::from_str)]
    dtype: LatentDType,
    /// Rows per shard.
    #[arg(long, default_value_t = 1024)]
    shard_rows: usize,
    #[command(flatten)]
    compute: super::ComputeArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

fn config_source(
    cfg: &Option<String>,
    preset: &Option<String>,
    what: &str,
) -> anyhow::Result<String> {
    match (cfg, preset) {
        (Some(c), _) => Ok(c.clone()),
        (None, Some(p)) => Ok(p.clone()),
        (None, None) => bail!("{what}: give a config file or a preset"),
    }
}

/// sha256 of a config file; "" for a preset name (no file to hash).
fn config_sha256(src: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(src);
    if !path.is_file() {
        return Ok(String::new());
    }
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

/// A DiT named on the command line, loaded: a checkpoint file, or a run
/// directory / `checkpoints/` / `latest` (the newest checkpoint, the run's
/// model config, and EMA or raw weights as `open_trained` decides).
struct Loaded {
    model: DitModel,
    cfg: DitConfig,
    /// The preset or config file it was built from.
    src: String,
    file: PathBuf,
}

/// One model's flags: its checkpoint, config file or preset, and the
/// names of those two flags (for the error when neither is given).
struct ModelFlags<'a> {
    path: &'a std::path::Path,
    config: &'a Option<String>,
    preset: &'a Option<String>,
    flag_names: &'a str,
}

fn load_model(
    m: ModelFlags,
    key: &WeightsKey,
    compute: DType,
    device: &Device,
) -> anyhow::Result<Loaded> {
    let trained = open_trained(m.path, key).with_context(|| m.path.display().to_string())?;
    let src = match (m.config, m.preset, &trained.model) {
        (None, None, Some(run_model)) => run_model.clone(),
        _ => config_source(m.config, m.preset, m.flag_names)?,
    };
    if let Some(why) = &trained.reason {
        tracing::info!("{}: {why}", trained.file.display());
    }
    let cfg = DitConfig::load(&src)?;
    let mut model = load_dit(&trained.file, &src, &trained.weights, compute, device)
        .with_context(|| format!("loading {}", trained.file.display()))?;
    model.set_fused(true);
    Ok(Loaded {
        model,
        cfg,
        src,
        file: trained.file,
    })
}

/// `--cfg-scale`, `--cfg-interval` and the guide model as a `Guidance`.
fn guidance(a: &Args, cfg: &DitConfig, with_guide: bool) -> anyhow::Result<Guidance> {
    let (t_min, t_max) = a
        .cfg_interval
        .split_once(',')
        .and_then(|(l, h)| Some((l.trim().parse::<f64>().ok()?, h.trim().parse::<f64>().ok()?)))
        .context("--cfg-interval: expected LO,HI")?;
    Ok(match (a.cfg_scale > 1.0, with_guide) {
        (false, _) => Guidance::None,
        (true, true) => Guidance::Auto {
            scale: a.cfg_scale,
            t_min,
            t_max,
        },
        (true, false) => Guidance::Cfg {
            scale: a.cfg_scale,
            t_min,
            t_max,
            null_class: cfg.num_classes() as u32,
        },
    })
}

fn sampler_config(a: &Args, cfg: &DitConfig, guidance: Guidance) -> SamplerConfig {
    let (c, h) = (cfg.in_channels(), cfg.input_size());
    SamplerConfig {
        method: a.sampler,
        num_steps: a.steps,
        time_shift: a.shift.unwrap_or_else(|| default_shift(h * h, c)),
        guidance,
        ..Default::default()
    }
}

/// `--noise FILE`: its `z0` tensor.
fn read_noise(path: &Option<PathBuf>) -> anyhow::Result<Option<Tensor>> {
    let Some(p) = path else { return Ok(None) };
    let mut t = candle_core::safetensors::load(p, &Device::Cpu)
        .with_context(|| format!("reading --noise {}", p.display()))?;
    Ok(Some(t.remove("z0").with_context(|| {
        format!("{}: no tensor `z0`", p.display())
    })?))
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    // One process of a job (`rae-cache launch`, torchrun): sample part RANK
    // of WORLD_SIZE on this rank's GPU; rank 0 writes the manifest.
    let job = DistEnv::from_env()?;
    let device = rae_cache::device::for_job(&a.compute.device, job.as_ref().map(|d| d.local_rank))?;
    let group = job.as_ref().map(TcpGroup::connect).transpose()?;
    let dtype = a.dtype;
    if dtype == LatentDType::Int8 {
        bail!("--dtype: sampled latents are stored as f16, f32 or bf16");
    }
    let compute = a.compute.precision.resolve(&device);
    if a.compute.tf32 {
        rae_cache::precision::set_tf32(true);
    }

    // Models.
    let key = WeightsKey::parse(&a.weights_key);
    let main = ModelFlags {
        path: &a.model,
        config: &a.model_config,
        preset: &a.preset,
        flag_names: "--model-config/--preset",
    };
    let main = load_model(main, &key, compute, &device)?;
    let guide = a
        .guide_model
        .as_ref()
        .map(|path| {
            let flags = ModelFlags {
                path,
                config: &a.guide_config,
                preset: &a.guide_preset,
                flag_names: "--guide-config/--guide-preset",
            };
            load_model(flags, &key, compute, &device)
        })
        .transpose()?;

    let part = group.as_ref().map(|g| (g.rank(), g.world_size()));
    let opts = sample_options(&a, &main, guide.as_ref(), dtype, compute, part)?;

    // Sample; rank 0 reports.
    let g = guide.as_ref().map(|g| &g.model as &dyn VelocityModel);
    let Some(s) = run_sampling_job(
        &main.model,
        g,
        &opts,
        &device,
        group.as_ref(),
        &mut Bar::labelled("sample", group.as_ref().is_none_or(|g| g.rank() == 0)),
    )?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        eprintln!(
            "sampled {} latents into {} shard(s) under {} ({:.1} samples/s){}",
            s.samples,
            s.shards.len(),
            s.out_dir.display(),
            s.samples_per_second,
            if s.denormalised {
                ""
            } else {
                " -- NOT de-normalised (no --stats)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The sampling run: sampler, noise, statistics, provenance, and which
/// `part` (rank, world size) of a job this process samples.
fn sample_options(
    a: &Args,
    main: &Loaded,
    guide: Option<&Loaded>,
    dtype: LatentDType,
    compute: DType,
    part: Option<(usize, usize)>,
) -> anyhow::Result<SampleOptions> {
    let sampler = sampler_config(a, &main.cfg, guidance(a, &main.cfg, guide.is_some())?);
    let noise = read_noise(&a.noise)?;
    if noise.is_none() && a.num == 0 {
        bail!("--num N (or --noise FILE) is required");
    }
    let stats = a
        .stats
        .as_ref()
        .map(|p| {
            // A store URL of the object (`s3://bucket/cache/stats.safetensors`)
            // is fetched into the read-through cache.
            let local = rae_cache::store::local_file(p)?;
            LatentStats::load(&local).with_context(|| format!("reading --stats {}", p.display()))
        })
        .transpose()?;
    let provenance = serde_json::json!({
        "model": main.file.display().to_string(),
        "model_config": main.src,
        "model_config_sha256": config_sha256(&main.src)?,
        "guide_model": guide.map(|g| g.file.display().to_string()),
        "guide_config": guide.map(|g| g.src.clone()),
        "stats": a.stats.as_ref().map(|p| p.display().to_string()),
        "noise": a.noise.as_ref().map(|p| p.display().to_string()),
        "precision": compute.as_str(),
        "tf32": rae_cache::precision::tf32_enabled(),
    });
    Ok(SampleOptions {
        out_dir: a.out.clone(),
        num: a.num,
        labels: LabelSpec::parse(&a.labels)?,
        sampler,
        seed: a.seed,
        batch_size: a.batch_size,
        dtype,
        noise,
        stats,
        channels: main.cfg.in_channels(),
        size: main.cfg.input_size(),
        num_classes: main.cfg.num_classes(),
        rows_per_shard: a.shard_rows,
        provenance,
        part,
    })
}
