//! `rae-cache sample`: draw latents from a DiT / DiT-DH into shards.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use rae_cache::diffusion::{Guidance, SamplerConfig, SamplerMethod, default_shift};
use rae_cache::dist::tcp::TcpGroup;
use rae_cache::dist::{Collective, DistEnv};
use rae_cache::generate::{LabelSpec, SampleOptions, run_sampling, write_sample_manifest};
use rae_cache::models::{DitConfig, VelocityModel, WeightsKey, load_dit};
use rae_cache::precision::Precision;
use rae_cache::shards::{LatentDType, LatentStats, ShardInfo};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// DiT / DiT-DH checkpoint (.safetensors or .pt; `ema` preferred).
    #[arg(long)]
    model: PathBuf,
    /// Model constructor keys (JSON/TOML file).
    #[arg(long, conflicts_with = "preset")]
    model_config: Option<String>,
    /// Model preset (DiT-DH-S/B/L/XL, LightningDiT-S/B/L/XL).
    #[arg(long)]
    preset: Option<String>,
    /// Which checkpoint entry holds the weights: auto, root, ema, model, ...
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
    /// euler | heun | sde
    #[arg(long, default_value = "euler")]
    sampler: String,
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
    /// trained on): samples are de-normalised to raw encoder latents.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Stored latent dtype: f16 | f32 | bf16.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Rows per shard.
    #[arg(long, default_value_t = 1024)]
    shard_rows: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Model compute precision: auto (bf16 on CUDA, f32 on CPU), f32, bf16
    /// or f16. The sampler state, time embedding, norms and softmax stay f32.
    #[arg(long, default_value = "auto")]
    precision: Precision,
    /// Allow TF32 tensor-core math in f32 matrix products (CUDA only; a
    /// no-op on the CPU).
    #[arg(long)]
    tf32: bool,
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

fn sha256_file(path: &str) -> String {
    use sha2::{Digest, Sha256};
    std::fs::read(path)
        .map(|b| {
            Sha256::digest(&b)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect()
        })
        .unwrap_or_default()
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    // One process of a job (`rae-cache launch`, torchrun): sample part RANK
    // of WORLD_SIZE on this rank's GPU; rank 0 writes the manifest.
    let job = DistEnv::from_env()?;
    let device = match &job {
        Some(d) => rae_cache::device::parse_device(&rae_cache::device::spec_for_rank(
            &a.device,
            d.local_rank,
        )?)?,
        None => rae_cache::device::parse_device(&a.device)?,
    };
    let group = job.as_ref().map(TcpGroup::connect).transpose()?;
    let dtype: LatentDType = a.dtype.parse().map_err(anyhow::Error::msg)?;
    if dtype == LatentDType::Int8 {
        bail!("--dtype: sampled latents are stored as f16, f32 or bf16");
    }
    let key = WeightsKey::parse(&a.weights_key);
    let src = config_source(&a.model_config, &a.preset, "--model-config/--preset")?;
    let cfg = DitConfig::load(&src)?;
    let compute = a.precision.resolve(&device);
    if a.tf32 {
        rae_cache::precision::set_tf32(true);
    }
    let mut model = load_dit(&a.model, &src, &key, compute, &device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    model.set_fused(true);
    let (c, h) = (cfg.in_channels(), cfg.input_size());

    let guide = match &a.guide_model {
        Some(p) => {
            let gsrc = config_source(
                &a.guide_config,
                &a.guide_preset,
                "--guide-config/--guide-preset",
            )?;
            let mut g = load_dit(p, &gsrc, &key, compute, &device)
                .with_context(|| format!("loading guide {}", p.display()))?;
            g.set_fused(true);
            Some((g, gsrc))
        }
        None => None,
    };
    let (t_min, t_max) = a
        .cfg_interval
        .split_once(',')
        .and_then(|(l, h)| Some((l.trim().parse::<f64>().ok()?, h.trim().parse::<f64>().ok()?)))
        .context("--cfg-interval: expected LO,HI")?;
    let guidance = if a.cfg_scale > 1.0 {
        if guide.is_some() {
            Guidance::Auto {
                scale: a.cfg_scale,
                t_min,
                t_max,
            }
        } else {
            Guidance::Cfg {
                scale: a.cfg_scale,
                t_min,
                t_max,
                null_class: cfg.num_classes() as u32,
            }
        }
    } else {
        Guidance::None
    };
    let method = match a.sampler.as_str() {
        "euler" => SamplerMethod::EulerOde,
        "heun" => SamplerMethod::HeunOde,
        "sde" => SamplerMethod::EulerMaruyama,
        o => bail!("--sampler {o:?}: expected euler, heun or sde"),
    };
    let sampler = SamplerConfig {
        method,
        num_steps: a.steps,
        time_shift: a.shift.unwrap_or_else(|| default_shift(h * h, c)),
        guidance,
        ..Default::default()
    };
    let noise = match &a.noise {
        Some(p) => {
            let mut t = candle_core::safetensors::load(p, &candle_core::Device::Cpu)
                .with_context(|| format!("reading --noise {}", p.display()))?;
            Some(
                t.remove("z0")
                    .with_context(|| format!("{}: no tensor `z0`", p.display()))?,
            )
        }
        None => None,
    };
    if noise.is_none() && a.num == 0 {
        bail!("--num N (or --noise FILE) is required");
    }
    let stats = a
        .stats
        .as_ref()
        .map(|p| LatentStats::load(p).with_context(|| format!("reading --stats {}", p.display())))
        .transpose()?;
    let provenance = serde_json::json!({
        "model": a.model.display().to_string(),
        "model_config": src,
        "model_config_sha256": sha256_file(&src),
        "guide_model": a.guide_model.as_ref().map(|p| p.display().to_string()),
        "guide_config": guide.as_ref().map(|g| g.1.clone()),
        "stats": a.stats.as_ref().map(|p| p.display().to_string()),
        "noise": a.noise.as_ref().map(|p| p.display().to_string()),
        "precision": compute.as_str(),
        "tf32": rae_cache::precision::tf32_enabled(),
    });
    let opts = SampleOptions {
        out_dir: a.out.clone(),
        num: a.num,
        labels: LabelSpec::parse(&a.labels)?,
        sampler,
        seed: a.seed,
        batch_size: a.batch_size,
        dtype,
        noise,
        stats,
        channels: c,
        size: h,
        num_classes: cfg.num_classes(),
        rows_per_shard: a.shard_rows,
        progress: group.as_ref().is_none_or(|g| g.rank() == 0),
        provenance,
        part: group.as_ref().map(|g| (g.rank(), g.world_size())),
    };
    let g: Option<&dyn VelocityModel> = guide.as_ref().map(|g| &g.0 as &dyn VelocityModel);
    let mut s = run_sampling(&model, g, &opts, &device)?;
    if let Some(group) = &group {
        let all = group.gather_to_root(&serde_json::to_vec(&s.shards)?)?;
        let Some(all) = all else {
            return Ok(ExitCode::SUCCESS); // rank 0 reports
        };
        let mut shards = Vec::new();
        for part in all {
            shards.extend(serde_json::from_slice::<Vec<ShardInfo>>(&part)?);
        }
        let n = opts.noise.as_ref().map_or(Ok(opts.num), |z| z.dim(0))?;
        write_sample_manifest(&opts, &shards, n, s.denormalised)?;
        s.samples = n;
        s.shards = shards;
    }
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
