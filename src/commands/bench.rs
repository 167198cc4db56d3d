//! `rae-cache bench` (hidden): throughput of the encoder, a DiT training
//! step and the decoder with random weights, plus synthetic JPEG folders for
//! timing a whole `build`. Each mode prints one JSON line on stdout;
//! `scripts/gpu-check.sh` collects them into its table.

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::bench_support::{
    Dinov2Shape, TrainStep, is_out_of_memory, random_crops, random_decoder, time_iters,
    write_random_dinov2,
};
use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use rae_cache::device::{device_name, parse_device};
use rae_cache::encoders::load_encoder;
use rae_cache::memory::{peak_rss_bytes, rss_bytes};
use rae_cache::models::config::load_config;
use rae_cache::models::{DecoderConfig, DitConfig};
use rae_cache::precision::Precision;
use rayon::prelude::*;
use serde_json::{Value, json};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(clap::Subcommand, Debug)]
enum Mode {
    /// Encoder forward (resize + normalise + ViT) on random 256x256 crops.
    Encoder(EncoderArgs),
    /// Write a random-weight DINOv2-with-registers directory (for `build`).
    RandomEncoder(RandomEncoderArgs),
    /// One DiT / DiT-DH training step (forward, backward, clip, AdamW, EMA).
    Train(TrainArgs),
    /// RAE decoder forward on random latents.
    Decoder(DecoderArgs),
    /// One stage-1 decoder training step (latent noise, decoder forward,
    /// L1 + LPIPS with a random full-width VGG16, backward, AdamW), as
    /// `scripts/torch_stage1_step.py` times the reference's.
    DecoderTrain(DecoderArgs),
    /// Euler sampling of a DiT (random weights), with CFG, as `sample` runs it.
    Sample(SampleArgs),
    /// Deterministic synthetic JPEGs in an ImageNet-style class-folder layout.
    SynthImages(SynthArgs),
    /// Trainable parameter counts of a DiT preset and a decoder preset.
    Params(ParamsArgs),
}

#[derive(clap::Args, Debug)]
struct ParamsArgs {
    #[arg(long, default_value = "ditdh-xl")]
    preset: String,
    #[arg(long, default_value = "vit-xl")]
    decoder_preset: String,
    #[arg(long, default_value_t = 16)]
    patch_size: usize,
}

#[derive(clap::Args, Debug)]
struct Common {
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Timed iterations (after the warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed iterations first (kernel compilation, allocator growth).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32 | bf16 | f16 | auto (auto: bf16 on CUDA, f32 on the CPU; for
    /// `train`, f32 as the trainer).
    #[arg(long, default_value = "auto")]
    precision: Precision,
}

/// `--shape` of the random DINOv2-with-registers encoder.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ShapeArg {
    /// DINOv2-B-reg (`facebook/dinov2-with-registers-base`).
    #[value(alias = "b")]
    Base,
    /// Two layers, 48 wide (smoke tests).
    Tiny,
}

impl ShapeArg {
    fn shape(self) -> Dinov2Shape {
        match self {
            Self::Base => Dinov2Shape::BASE,
            Self::Tiny => Dinov2Shape::TINY,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Tiny => "tiny",
        }
    }
}

#[derive(clap::Args, Debug)]
struct EncoderArgs {
    #[command(flatten)]
    common: Common,
    /// An encoder directory; default: random DINOv2-B-with-registers weights
    /// written to a temporary directory.
    #[arg(long)]
    encoder: Option<PathBuf>,
    /// With no --encoder: `base` (DINOv2-B-reg) or `tiny` (smoke tests).
    #[arg(long, value_enum, default_value = "base")]
    shape: ShapeArg,
}

#[derive(clap::Args, Debug)]
struct RandomEncoderArgs {
    #[arg(long)]
    out: PathBuf,
    /// `base` (DINOv2-B-reg) or `tiny`.
    #[arg(long, value_enum, default_value = "base")]
    shape: ShapeArg,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    common: Common,
    /// Model preset (ditdh-s|b|l|xl, dit-xl, ...) or a config file.
    #[arg(long, default_value = "ditdh-xl")]
    preset: String,
    /// Try --batch, 2x, 4x, ... up to --max-batch; time the largest that
    /// runs (an out-of-memory error ends the series).
    #[arg(long)]
    find_max_batch: bool,
    #[arg(long, default_value_t = 4096)]
    max_batch: usize,
    /// Leave out the EMA update the trainer does every step.
    #[arg(long)]
    no_ema: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Soak: run this many steps, printing resident memory and step time
    /// every --report-every steps (stderr), and the series as JSON.
    #[arg(long)]
    soak_steps: Option<u64>,
    #[arg(long, default_value_t = 100)]
    report_every: u64,
}

#[derive(clap::Args, Debug)]
struct DecoderArgs {
    #[command(flatten)]
    common: Common,
    /// ViT-B | ViT-L | ViT-XL.
    #[arg(long, default_value = "vit-xl", conflicts_with = "decoder_config")]
    preset: String,
    #[arg(long)]
    decoder_config: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    patch_size: usize,
}

#[derive(clap::Args, Debug)]
struct SampleArgs {
    #[command(flatten)]
    common: Common,
    /// Model preset (ditdh-s|b|l|xl, dit-xl, ...) or a config file.
    #[arg(long, default_value = "ditdh-s")]
    preset: String,
    /// Grid points (N-1 Euler steps), as `sample --steps`.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (> 1: the model runs on a doubled batch).
    #[arg(long, default_value_t = 4.0)]
    cfg_scale: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// WIDTHxHEIGHT (ImageNet's typical photo is about 500x375).
    #[arg(long, default_value = "500x375")]
    size: String,
    #[arg(long, default_value_t = 10)]
    classes: usize,
    #[arg(long, default_value_t = 90)]
    quality: u8,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let line = match a.mode {
        Mode::Encoder(a) => encoder(a)?,
        Mode::RandomEncoder(a) => random_encoder(a)?,
        Mode::Train(a) => train(a)?,
        Mode::Decoder(a) => decoder(a)?,
        Mode::DecoderTrain(a) => decoder_train(a)?,
        Mode::Sample(a) => sample_bench(a)?,
        Mode::SynthImages(a) => synth(a)?,
        Mode::Params(a) => params(a)?,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `--precision` to a candle dtype: the library's rule (`auto` = bf16 on
/// CUDA, f32 on the CPU; for `train`, bf16 means autocast from f32 masters).
fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// What a timing mode measured, for the JSON line every mode prints.
struct Report<'a> {
    what: &'a str,
    model: &'a str,
    device: &'a Device,
    dtype: DType,
    batch: usize,
    params: usize,
    notes: String,
}

impl Report<'_> {
    /// The JSON line, with the timing `t`.
    fn json(&self, t: &crate::bench_support::Timing) -> Value {
        let batch = self.batch;
        json!({
            "what": self.what,
            "model": self.model,
            "device": device_name(self.device),
            "precision": dtype_name(self.dtype),
            "batch": batch,
            "warmup": t.warmup,
            "iters": t.iters,
            "seconds_per_iter": t.mean_s,
            "min_seconds_per_iter": t.min_s,
            "images_per_s": batch as f64 / t.mean_s.max(1e-12),
            "params": self.params,
            "peak_rss_bytes": peak_rss_bytes(),
            // candle exposes no device-memory statistics: gpu-check.sh samples nvidia-smi.
            "peak_device_bytes": Value::Null,
            "notes": self.notes,
        })
    }
}

/// A temporary directory removed on drop (tempfile is a dev-dependency only).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p =
            std::env::temp_dir().join(format!("rae-bench-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn encoder(a: EncoderArgs) -> anyhow::Result<Value> {
    let c = &a.common;
    let device = parse_device(&c.device)?;
    let dtype = c.precision.resolve(&device);
    let shape = a.shape.shape();
    let mut _tmp = None;
    let (dir, model, params) = match &a.encoder {
        Some(d) => (d.clone(), d.display().to_string(), count_safetensors(d)),
        None => {
            let t = TempDir::new("encoder")?;
            write_random_dinov2(&t.0, &shape, 0)?;
            let d = t.0.clone();
            _tmp = Some(t);
            (
                d,
                format!("dinov2-reg-{}-random", a.shape.name()),
                shape.param_count(),
            )
        }
    };
    let enc =
        load_encoder(&dir, &device, dtype).with_context(|| format!("loading {}", dir.display()))?;
    let crop = enc.spec().crop_size;
    let x = random_crops(c.batch, crop, 1, &device)?;
    let timing = time_iters(&device, c.warmup, c.iters, || {
        // The result stays on the device; time_iters synchronises.
        enc.encode(&x)
            .map(|_| ())
            .map_err(|e| crate::bench_support::BenchError::Other(e.to_string()))
    })?;
    Ok(Report {
        what: "encoder",
        model: &model,
        device: &device,
        dtype,
        batch: c.batch,
        params,
        notes: format!("input {crop}x{crop} crops -> encoder resize/normalise/forward"),
    }
    .json(&timing))
}

/// Total elements in a directory's `model.safetensors` (0 when unreadable:
/// only used for the report).
fn count_safetensors(dir: &Path) -> usize {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .map(|t| t.values().map(|v| v.elem_count()).sum())
        .unwrap_or(0)
}

fn random_encoder(a: RandomEncoderArgs) -> anyhow::Result<Value> {
    let shape = a.shape.shape();
    let start = Instant::now();
    write_random_dinov2(&a.out, &shape, a.seed)?;
    Ok(json!({
        "what": "random-encoder",
        "out": a.out.display().to_string(),
        "shape": a.shape.name(),
        "params": shape.param_count(),
        "seconds": start.elapsed().as_secs_f64(),
    }))
}

/// Text of a caught panic payload.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn train(a: TrainArgs) -> anyhow::Result<Value> {
    let c = &a.common;
    let device = parse_device(&c.device)?;
    // The trainer keeps f32 weights: that is what `auto` measures.
    let dtype = c.precision.resolve(&device);
    let cfg = DitConfig::load(&a.preset).with_context(|| format!("model {:?}", a.preset))?;
    let mut step = TrainStep::new(&cfg, a.seed, dtype, &device, !a.no_ema)?;
    let params = step.trainable_params();
    let mut tried = Vec::new();
    let batch = if a.find_max_batch {
        let mut best = None;
        let mut b = c.batch.max(1);
        loop {
            let t0 = Instant::now();
            // Candle reports a failed CUDA allocation as an error; a panic
            // deeper down is caught too so the series still ends cleanly.
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<()> {
                step.set_batch(b)?;
                step.step()?;
                device.synchronize()?;
                Ok(())
            }));
            let err = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(p) => Some(format!("panic: {}", panic_text(p))),
            };
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "bench train: batch {b}: {} ({secs:.2} s)",
                err.as_deref().unwrap_or("ok")
            );
            match err {
                None => {
                    tried.push(json!({"batch": b, "ok": true, "seconds": secs}));
                    best = Some(b);
                    if b * 2 > a.max_batch {
                        break;
                    }
                    b *= 2;
                }
                Some(e) => {
                    let oom = is_out_of_memory(&e);
                    tried.push(json!({"batch": b, "ok": false, "out_of_memory": oom, "error": e}));
                    break;
                }
            }
        }
        match best {
            Some(b) => b,
            None => bail!(
                "no batch size from {} runs: {}",
                c.batch,
                Value::Array(tried)
            ),
        }
    } else {
        c.batch
    };
    step.set_batch(batch)?;
    if let Some(n) = a.soak_steps {
        return soak(
            &mut step,
            &device,
            n,
            a.report_every.max(1),
            &a.preset,
            batch,
        );
    }
    let timing = time_iters(&device, c.warmup, c.iters, || step.step().map(|_| ()))?;
    let mut v = Report {
        what: "train",
        model: &a.preset,
        device: &device,
        dtype,
        batch,
        params,
        notes: format!(
            "fwd+bwd+clip+AdamW{}; weights {}, AdamW moments f32; fixed inputs (no loader)",
            if a.no_ema { "" } else { "+EMA" },
            dtype_name(dtype)
        ),
    }
    .json(&timing);
    if a.find_max_batch {
        v["max_batch_search"] = Value::Array(tried);
    }
    Ok(v)
}

/// `n` training steps with resident memory and the mean step time every
/// `every` steps; the verdict is the RSS slope over the second half (after
/// the allocator has warmed up), per step.
fn soak(
    step: &mut TrainStep,
    device: &Device,
    n: u64,
    every: u64,
    preset: &str,
    batch: usize,
) -> anyhow::Result<Value> {
    let mut series = Vec::new();
    let mut window = Instant::now();
    for i in 1..=n {
        step.step()?;
        if i % every == 0 || i == n {
            device.synchronize()?;
            let k = if i % every == 0 { every } else { i % every };
            let step_s = window.elapsed().as_secs_f64() / k as f64;
            let rss = rss_bytes().unwrap_or(0);
            let graphs = step.state().tensors_with_graph().len();
            eprintln!(
                "soak: step {i:>7}  rss {:>8.1} MB  step {:.4} s  tensors with a graph {graphs}",
                rss as f64 / 1e6,
                step_s
            );
            series.push(
                json!({"step": i, "rss_bytes": rss, "step_s": step_s, "graph_tensors": graphs}),
            );
            window = Instant::now();
        }
    }
    let half: Vec<(f64, f64)> = series[series.len() / 2..]
        .iter()
        .map(|p| {
            (
                p["step"].as_f64().unwrap_or(0.0),
                p["rss_bytes"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    Ok(json!({
        "what": "train-soak",
        "model": preset,
        "device": device_name(device),
        "batch": batch,
        "steps": n,
        "params": step.trainable_params(),
        "rss_bytes_per_step_second_half": slope(&half),
        "peak_rss_bytes": peak_rss_bytes(),
        "series": series,
    }))
}

/// Least-squares slope of y over x (0 for fewer than two points).
fn slope(p: &[(f64, f64)]) -> f64 {
    let n = p.len() as f64;
    if p.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (
        p.iter().map(|q| q.0).sum::<f64>() / n,
        p.iter().map(|q| q.1).sum::<f64>() / n,
    );
    let cov: f64 = p.iter().map(|q| (q.0 - mx) * (q.1 - my)).sum();
    let var: f64 = p.iter().map(|q| (q.0 - mx).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}

/// Random weights of LPIPS at full width: VGG16 (He-normal-scaled
/// uniform) and positive linear heads.
fn random_lpips(dev: &Device) -> anyhow::Result<rae_cache::stage1::Lpips> {
    use rae_cache::stage1::vgg::{CONV_INDICES, Vgg16Features};
    use std::collections::HashMap;
    let widths = [
        64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
    ];
    let mut sd = HashMap::new();
    let mut cin = 3;
    for (&i, &c) in CONV_INDICES.iter().zip(&widths) {
        let bound = (6.0 / (cin * 9) as f64).sqrt();
        let w = Tensor::rand(-bound as f32, bound as f32, (c, cin, 3, 3), dev)?;
        sd.insert(format!("features.{i}.weight"), w);
        sd.insert(
            format!("features.{i}.bias"),
            Tensor::zeros(c, DType::F32, dev)?,
        );
        cin = c;
    }
    let vgg = Vgg16Features::from_state_dict(&sd, Path::new("random"))?;
    let lin: HashMap<String, Tensor> = [64, 128, 256, 512, 512]
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let w = Tensor::rand(0f32, 0.02, (1, c, 1, 1), dev)?;
            Ok((format!("lin{k}.model.1.weight"), w))
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(rae_cache::stage1::Lpips::new(
        vgg,
        &lin,
        Path::new("random"),
    )?)
}

/// The decoder `--decoder-config` or `--preset` names, and its label.
fn decoder_shape(a: &DecoderArgs) -> anyhow::Result<(DecoderConfig, String)> {
    Ok(match &a.decoder_config {
        Some(p) => (load_config(p)?, p.display().to_string()),
        None => (
            DecoderConfig::preset(&a.preset, a.patch_size).with_context(|| {
                format!("--preset {:?}: expected ViT-B, ViT-L or ViT-XL", a.preset)
            })?,
            a.preset.clone(),
        ),
    })
}

/// `bench decoder-train`: the stage-1 generator step of `train-decoder`
/// without the discriminator (f32 master weights, no EMA, as the reference
/// script it is compared with).
fn decoder_train(a: DecoderArgs) -> anyhow::Result<Value> {
    use rae_cache::stage1::generator::GeneratorConfig;
    use rae_cache::stage1::{GenBatch, GenLossConfig, GeneratorState, NoiseAug, NoiseDraws};
    let c = &a.common;
    let device = parse_device(&c.device)?;
    let (cfg, model) = decoder_shape(&a)?;
    let lpips = random_lpips(&device)?;
    let gcfg = GeneratorConfig {
        ema: None,
        ..Default::default()
    };
    let mut st = GeneratorState::new(&cfg, &gcfg, None, &device)?;
    let params = crate::bench_support::decoder_param_count(&cfg)?;
    let (t, ch, s) = (cfg.num_patches, cfg.latent_dim, cfg.image_size());
    let ids: Vec<u64> = (0..c.batch as u64).collect();
    let batch = GenBatch {
        images: Tensor::rand(0f32, 1.0, (c.batch, 3, s, s), &device)?,
        z: Tensor::randn(0f32, 1.0, (c.batch, t, ch), &device)?,
        noise: Some(NoiseDraws::for_samples(0, &ids, &[t, ch], &device)?),
    };
    let losses = GenLossConfig::default();
    let timing = time_iters(&device, c.warmup, c.iters, || {
        let other = |e: rae_cache::stage1::Stage1Error| {
            crate::bench_support::BenchError::Other(e.to_string())
        };
        let (_, g) = st
            .grads(Some(&lpips), &batch, NoiseAug::default(), &losses, None)
            .map_err(other)?;
        st.update(g, 1e-4).map_err(other)?;
        Ok(())
    })?;
    Ok(Report {
        what: "decoder-train",
        model: &model,
        device: &device,
        dtype: DType::F32,
        batch: c.batch,
        params,
        notes: format!(
            "{t} tokens x {ch} -> {s}px; noise tau 0.8, L1 + LPIPS (random VGG16), backward, AdamW; random weights"
        ),
    }
    .json(&timing))
}

fn decoder(a: DecoderArgs) -> anyhow::Result<Value> {
    let c = &a.common;
    let device = parse_device(&c.device)?;
    let dtype = c.precision.resolve(&device);
    let (cfg, model) = decoder_shape(&a)?;
    let params = crate::bench_support::decoder_param_count(&cfg)?;
    let mut dec = random_decoder(&cfg, dtype, &device)?;
    // Inference path, as `rae-cache decode`.
    dec.set_fused(true);
    let z = Tensor::randn(
        0f32,
        1.0,
        (c.batch, cfg.num_patches, cfg.latent_dim),
        &device,
    )?
    .to_dtype(dtype)?;
    let timing = time_iters(&device, c.warmup, c.iters, || {
        dec.forward(&z).map(|_| ()).map_err(Into::into)
    })?;
    Ok(Report {
        what: "decoder",
        model: &model,
        device: &device,
        dtype,
        batch: c.batch,
        params,
        notes: format!(
            "{} tokens x {} -> {}px, random weights",
            cfg.num_patches,
            cfg.latent_dim,
            cfg.image_size()
        ),
    }
    .json(&timing))
}

fn sample_bench(a: SampleArgs) -> anyhow::Result<Value> {
    use rae_cache::diffusion::sampler::{Guidance, SamplerConfig, sample};
    let c = &a.common;
    let device = parse_device(&c.device)?;
    let dtype = c.precision.resolve(&device);
    let cfg = DitConfig::load(&a.preset).with_context(|| format!("model {:?}", a.preset))?;
    let model = crate::bench_support::random_sampling_model(&cfg, a.seed, dtype, &device)?;
    let (ch, s) = (cfg.in_channels(), cfg.input_size());
    let z0 = Tensor::randn(0f32, 1.0, (c.batch, ch, s, s), &device)?;
    let classes = cfg.num_classes() as u32;
    let y = Tensor::from_vec(
        (0..c.batch as u32).map(|i| i % classes).collect(),
        c.batch,
        &device,
    )?;
    let guidance = if a.cfg_scale > 1.0 {
        Guidance::Cfg {
            scale: a.cfg_scale,
            t_min: 0.0,
            t_max: 1.0,
            null_class: classes,
        }
    } else {
        Guidance::None
    };
    let sc = SamplerConfig {
        num_steps: a.steps,
        guidance,
        ..Default::default()
    };
    let timing = time_iters(&device, c.warmup, c.iters, || {
        sample(&model, None, &z0, &y, &sc)?
            .sum_all()?
            .to_scalar::<f32>()?;
        Ok(())
    })?;
    Ok(Report {
        what: "sample",
        model: &a.preset,
        device: &device,
        dtype,
        batch: c.batch,
        params: crate::bench_support::dit_param_count(&cfg)?,
        notes: format!(
            "Euler, {} grid points, cfg {} (model batch {}), random weights",
            a.steps,
            a.cfg_scale,
            if a.cfg_scale > 1.0 {
                2 * c.batch
            } else {
                c.batch
            }
        ),
    }
    .json(&timing))
}

fn params(a: ParamsArgs) -> anyhow::Result<Value> {
    let cfg = DitConfig::load(&a.preset).with_context(|| format!("model {:?}", a.preset))?;
    let dcfg = DecoderConfig::preset(&a.decoder_preset, a.patch_size)
        .with_context(|| format!("--decoder-preset {:?}", a.decoder_preset))?;
    let mut v = json!({"what": "params", "impl": "rae-cache"});
    v[a.preset.to_ascii_lowercase()] = crate::bench_support::dit_param_count(&cfg)?.into();
    v[a.decoder_preset.to_ascii_lowercase()] =
        crate::bench_support::decoder_param_count(&dcfg)?.into();
    Ok(v)
}

/// splitmix64: a cheap, well-mixed hash for per-image and per-pixel values.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One synthetic photo-like RGB image: smooth colour gradients, a few
/// discs and mild noise, so the JPEG has realistic entropy (a flat image
/// would decode unrealistically fast).
fn synth_image(w: u32, h: u32, seed: u64) -> Vec<u8> {
    let r = |k: u64| (mix(seed ^ k.wrapping_mul(0x1000_0000_01b3)) % 1000) as f32 / 1000.0;
    let base = [r(1), r(2), r(3)];
    let grad = [r(4) - 0.5, r(5) - 0.5, r(6) - 0.5];
    let discs: Vec<(f32, f32, f32, [f32; 3])> = (0..6)
        .map(|i| {
            let k = 10 + i * 8;
            (
                r(k) * w as f32,
                r(k + 1) * h as f32,
                (0.05 + 0.25 * r(k + 2)) * w.min(h) as f32,
                [r(k + 3), r(k + 4), r(k + 5)],
            )
        })
        .collect();
    let mut px = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let mut c = [0f32; 3];
            for (ch, v) in c.iter_mut().enumerate() {
                *v = base[ch] + grad[ch] * (fx + fy);
            }
            for (cx, cy, rad, col) in &discs {
                let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                if dx * dx + dy * dy < rad * rad {
                    c = *col;
                }
            }
            let n = mix(seed ^ ((y as u64) << 32 | x as u64));
            for (ch, v) in c.iter().enumerate() {
                let noise = ((n >> (ch * 8)) & 0xff) as f32 / 255.0 - 0.5;
                px.push(((v + 0.08 * noise).clamp(0.0, 1.0) * 255.0) as u8);
            }
        }
    }
    px
}

fn synth(a: SynthArgs) -> anyhow::Result<Value> {
    let (w, h) = a
        .size
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .with_context(|| format!("--size {:?}: expected WIDTHxHEIGHT", a.size))?;
    if w == 0 || h == 0 || a.classes == 0 {
        bail!("--size and --classes must be positive");
    }
    let classes: Vec<PathBuf> = (0..a.classes)
        .map(|k| a.out.join(format!("n{k:08}")))
        .collect();
    for d in &classes {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let bytes = AtomicU64::new(0);
    let start = Instant::now();
    (0..a.count).into_par_iter().try_for_each(|i| {
        let seed = mix(a.seed ^ mix(i as u64));
        let px = synth_image(w, h, seed);
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, a.quality)
            .encode(&px, w, h, image::ExtendedColorType::Rgb8)
            .with_context(|| format!("encoding image {i}"))?;
        let path = classes[i % a.classes].join(format!("synth_{i:08}.JPEG"));
        std::fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
        bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        anyhow::Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "what": "synth-images",
        "out": a.out.display().to_string(),
        "count": a.count,
        "size": format!("{w}x{h}"),
        "classes": a.classes,
        "bytes": bytes.load(Ordering::Relaxed),
        "seconds": secs,
        "images_per_s": a.count as f64 / secs.max(1e-12),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_images_are_deterministic_and_varied() {
        let a = synth_image(32, 24, 7);
        assert_eq!(a, synth_image(32, 24, 7));
        assert_ne!(a, synth_image(32, 24, 8));
        assert_eq!(a.len(), 32 * 24 * 3);
    }
}
