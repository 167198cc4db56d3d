//! Sample N latents with a DiT and write them as shards (same schema as
//! `build`) plus a manifest.json under `<out>/`.
//!
//! The model works in normalised latent space; with dataset statistics the
//! samples are de-normalised (z * sqrt(var + 1e-5) + mean, as the reference
//! `RAE.decode`) so the shards hold raw encoder-space latents that `decode`
//! and `inspect` treat like encoded ones. Layout: model `[B,C,H,W]` ->
//! shard rows token-major `[H*W, C]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::GenerateError;
use super::labels::LabelSpec;
use super::noise::noise_for;
use crate::diffusion::{Guidance, SamplerConfig, SamplerMethod, sample};
use crate::models::VelocityModel;
use crate::pipeline::plan::{PartSpec, ShardPlan};
use crate::progress::Progress;
use crate::shards::manifest::{HFlip, MANIFEST_FILE, SHARDS_DIR, shard_file_name};
use crate::shards::{
    EncoderInfo, LatentDType, LatentRow, LatentStats, Manifest, ShardInfo, ShardWriter,
    WriterOptions,
};

/// The reference `RAE` eps in sqrt(var + eps).
pub const STATS_EPS: f64 = 1e-5;
/// Footer key of sampled shards (also `META_DENORMALISED`, `META_SAMPLE`):
/// where the rows came from, `sample`.
pub const META_SOURCE: &str = "rae_cache.source";
/// `true` when the latents were de-normalised with dataset statistics.
pub const META_DENORMALISED: &str = "rae_cache.denormalised";
/// The sampling settings and provenance, as JSON.
pub const META_SAMPLE: &str = "rae_cache.sample";

/// Everything `run_sampling` needs besides the models.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Where `shards/` and `manifest.json` go.
    pub out_dir: PathBuf,
    /// Ignored when `noise` is given (N = its batch).
    pub num: usize,
    /// Class label of each sample.
    pub labels: LabelSpec,
    /// Method, steps, shift and guidance.
    pub sampler: SamplerConfig,
    /// Seeds the labels (`equal`), the initial noise and the SDE noise.
    pub seed: u64,
    /// Samples per model batch.
    pub batch_size: usize,
    /// Storage type of the sampled latents.
    pub dtype: LatentDType,
    /// Exact initial noise `[N,C,H,W]`.
    pub noise: Option<Tensor>,
    /// Dataset statistics: de-normalise the samples to raw encoder latents.
    pub stats: Option<LatentStats>,
    /// Latent grid of the model: channels, height = width.
    pub channels: usize,
    /// Latent height and width.
    pub size: usize,
    /// Number of classes of the model.
    pub num_classes: usize,
    /// Rows per shard.
    pub rows_per_shard: usize,
    /// Free-form description (model path, config, guide, ...) for the
    /// manifest and footers.
    pub provenance: serde_json::Value,
    /// `(index, count)`: sample only part `index` of `count` (a contiguous
    /// range of whole shards, numbered globally) and write no manifest; the
    /// caller lists every part's shards with [`write_sample_manifest`].
    pub part: Option<(usize, usize)>,
}

/// What a sampling run did, for the CLI's report and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleSummary {
    /// The output directory.
    pub out_dir: PathBuf,
    /// Samples written (all parts, on rank 0 of a job).
    pub samples: usize,
    /// The shards, paths relative to `out_dir`.
    pub shards: Vec<ShardInfo>,
    /// Whether the latents were de-normalised.
    pub denormalised: bool,
    /// Wall time of the sampling loop.
    pub seconds: f64,
    /// Throughput of this process.
    pub samples_per_second: f64,
}

/// Sampled row keys: `sample/000000`, wider when N needs it.
pub fn sample_key(i: usize, n: usize) -> String {
    let w = n.saturating_sub(1).to_string().len().max(6);
    format!("sample/{i:0w$}")
}

/// The sampler settings as JSON (manifest / footer).
pub fn sampler_json(cfg: &SamplerConfig) -> serde_json::Value {
    let guidance = match cfg.guidance {
        Guidance::None => serde_json::json!({"kind": "none"}),
        Guidance::Cfg {
            scale,
            t_min,
            t_max,
            null_class,
        } => serde_json::json!({
            "kind": "cfg", "scale": scale, "interval": [t_min, t_max], "null_class": null_class}),
        Guidance::Auto {
            scale,
            t_min,
            t_max,
        } => {
            serde_json::json!({"kind": "autoguidance", "scale": scale, "interval": [t_min, t_max]})
        }
    };
    serde_json::json!({
        "method": cfg.method.name(),
        "num_steps": cfg.num_steps,
        "time_shift": cfg.time_shift,
        "guidance": guidance,
        "sde": if cfg.method == SamplerMethod::EulerMaruyama {
            serde_json::json!({"diffusion_norm": cfg.sde.diffusion_norm, "t0": cfg.sde.t0,
                "last_step_size": cfg.sde.last_step_size, "seed": cfg.seed})
        } else { serde_json::Value::Null },
    })
}

/// `[C,H,W]` statistics as (sqrt(var + eps), mean) tensors `[1,C,H,W]`.
fn stats_tensors(
    s: &LatentStats,
    c: usize,
    h: usize,
    device: &Device,
) -> Result<(Tensor, Tensor), GenerateError> {
    if s.channels != c || s.height != h || s.width != h {
        return Err(GenerateError::Invalid(format!(
            "stats are [{}, {}, {}], the model samples [{c}, {h}, {h}]",
            s.channels, s.height, s.width
        )));
    }
    let std: Vec<f32> = s
        .var
        .iter()
        .map(|v| ((*v as f64) + STATS_EPS).sqrt() as f32)
        .collect();
    let std = Tensor::from_vec(std, (1, c, h, h), device)?;
    let mean = Tensor::from_slice(&s.mean, (1, c, h, h), device)?;
    Ok((std, mean))
}

/// [`run_sampling`] as one process of a job: each rank samples its part
/// (`opts.part`), rank 0 gathers every part's shard list and writes the
/// manifest, byte-identical to one process. Returns the summary on rank 0
/// (or without a job), `None` on the other ranks.
pub fn run_sampling_job(
    model: &dyn VelocityModel,
    guide: Option<&dyn VelocityModel>,
    opts: &SampleOptions,
    device: &Device,
    group: Option<&crate::dist::tcp::TcpGroup>,
    progress: &mut dyn Progress,
) -> Result<Option<SampleSummary>, GenerateError> {
    let mut s = run_sampling(model, guide, opts, device, progress)?;
    let Some(group) = group else {
        return Ok(Some(s));
    };
    let json_err = |e: serde_json::Error| GenerateError::Invalid(format!("shard list: {e}"));
    let mine = serde_json::to_vec(&s.shards).map_err(json_err)?;
    let Some(all) = group.gather_to_root(&mine)? else {
        return Ok(None); // rank 0 reports
    };
    let mut shards = Vec::new();
    for part in all {
        shards.extend(serde_json::from_slice::<Vec<ShardInfo>>(&part).map_err(json_err)?);
    }
    let n = opts.noise.as_ref().map_or(Ok(opts.num), |z| z.dim(0))?;
    write_sample_manifest(opts, &shards, n, s.denormalised)?;
    s.samples = n;
    s.shards = shards;
    Ok(Some(s))
}

/// Run the sampler over all N samples in batches and write the shards,
/// reporting samples done to `progress`.
pub fn run_sampling(
    model: &dyn VelocityModel,
    guide: Option<&dyn VelocityModel>,
    opts: &SampleOptions,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<SampleSummary, GenerateError> {
    let n = sample_count(opts)?;
    // This process's samples: whole shards, so every part numbers its
    // shards globally and the union is the single-process output.
    let part = opts.part.map(|(index, count)| PartSpec { index, count });
    let plan = ShardPlan::new(n, opts.rows_per_shard, part)
        .map_err(|e| GenerateError::Invalid(format!("sampling part: {e}")))?;
    let labels = opts.labels.labels(n, opts.num_classes, opts.seed)?;
    let stats = opts
        .stats
        .as_ref()
        .map(|s| stats_tensors(s, opts.channels, opts.size, device))
        .transpose()?;
    if stats.is_none() {
        tracing::warn!("no --stats: shards hold NORMALISED latents (decode needs raw ones)");
    }
    let denormalised = stats.is_some();
    let batches = Batches {
        model,
        guide,
        opts,
        labels: &labels,
        stats,
        device,
    };

    let shard_dir = opts.out_dir.join(SHARDS_DIR);
    std::fs::create_dir_all(&shard_dir).map_err(|e| GenerateError::io(&shard_dir, e))?;
    let wopts = writer_options(opts, denormalised);
    let mut out = ShardRoller::new(shard_dir, wopts, plan.shards.start, opts.rows_per_shard);
    let todo = plan.images();
    let per = opts.size * opts.size * opts.channels;
    progress.start(todo.len() as u64);
    let start = Instant::now();
    let mut i0 = todo.start;
    while i0 < todo.end {
        let b = opts.batch_size.min(todo.end - i0);
        let rows = batches.sample(i0, b)?;
        for (i, latent) in (i0..i0 + b).zip(rows.chunks_exact(per)) {
            out.write(&LatentRow {
                key: &sample_key(i, n),
                label: labels[i] as i32,
                flip: false,
                latent,
            })?;
        }
        progress.advance(b as u64);
        i0 += b;
    }
    let shards = out.finish()?;
    progress.finish();
    let seconds = start.elapsed().as_secs_f64();

    let listed = relative_to_out_dir(shards);
    if opts.part.is_none() {
        write_sample_manifest(opts, &listed, n, denormalised)?;
    }
    Ok(SampleSummary {
        out_dir: opts.out_dir.clone(),
        samples: todo.len(),
        shards: listed,
        denormalised,
        seconds,
        samples_per_second: todo.len() as f64 / seconds.max(1e-9),
    })
}

/// N, the number of samples (the batch of `--noise` when given), checked
/// with the batch and shard sizes.
fn sample_count(opts: &SampleOptions) -> Result<usize, GenerateError> {
    let (c, h) = (opts.channels, opts.size);
    let n = match &opts.noise {
        Some(z) => {
            let d = z.dims();
            if d.len() != 4 || d[1] != c || d[2] != h || d[3] != h {
                return Err(GenerateError::Invalid(format!(
                    "--noise z0 has shape {d:?}, the model samples [N, {c}, {h}, {h}]"
                )));
            }
            d[0]
        }
        None => opts.num,
    };
    if n == 0 {
        return Err(GenerateError::Invalid("nothing to sample (N = 0)".into()));
    }
    if opts.batch_size == 0 || opts.rows_per_shard == 0 {
        return Err(GenerateError::Invalid(
            "batch size and shard size must be positive".into(),
        ));
    }
    Ok(n)
}

/// Shard writer options, with the footer keys of sampled shards.
fn writer_options(opts: &SampleOptions, denormalised: bool) -> WriterOptions {
    let mut meta = BTreeMap::new();
    meta.insert(META_SOURCE.to_string(), "sample".to_string());
    meta.insert(META_DENORMALISED.to_string(), denormalised.to_string());
    let desc = serde_json::json!({
        "provenance": opts.provenance, "sampler": sampler_json(&opts.sampler), "seed": opts.seed,
    });
    meta.insert(META_SAMPLE.to_string(), desc.to_string());
    let mut wopts = WriterOptions::new(opts.dtype, opts.size * opts.size, opts.channels);
    wopts.metadata = meta;
    wopts
}

/// What one batch of samples needs: the models, labels, statistics.
struct Batches<'a> {
    model: &'a dyn VelocityModel,
    guide: Option<&'a dyn VelocityModel>,
    opts: &'a SampleOptions,
    labels: &'a [u32],
    /// (sqrt(var + eps), mean) `[1,C,H,W]`: de-normalise the samples.
    stats: Option<(Tensor, Tensor)>,
    device: &'a Device,
}

impl Batches<'_> {
    /// Samples `i0..i0 + b` as shard rows: `b` blocks of `[H*W, C]`,
    /// token-major.
    fn sample(&self, i0: usize, b: usize) -> Result<Vec<f32>, GenerateError> {
        let (opts, device) = (self.opts, self.device);
        let (c, h) = (opts.channels, opts.size);
        let z0 = match &opts.noise {
            Some(z) => z
                .narrow(0, i0, b)?
                .to_dtype(DType::F32)?
                .to_device(device)?,
            None => noise_for(opts.seed, i0 as u64..(i0 + b) as u64, &[c, h, h], device)?,
        };
        let y = Tensor::from_slice(&self.labels[i0..i0 + b], b, device)?;
        let mut cfg = opts.sampler.clone();
        // SDE noise: seeded per batch start (deterministic for a given batch size)
        cfg.seed = opts.seed.wrapping_add(i0 as u64);
        let mut x = sample(self.model, self.guide, &z0, &y, &cfg)?.to_dtype(DType::F32)?;
        if let Some((std, mean)) = &self.stats {
            x = x.broadcast_mul(std)?.broadcast_add(mean)?;
        }
        // [B,C,H,W] -> [B,H*W,C], token-major
        Ok(x.permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1()?)
    }
}

/// Rows in order into shards of `rows_per_shard` rows, numbered from
/// `first` (global shard numbers), each opened at its first row.
struct ShardRoller {
    dir: PathBuf,
    opts: WriterOptions,
    first: usize,
    rows_per_shard: usize,
    current: Option<ShardWriter>,
    done: Vec<ShardInfo>,
}

impl ShardRoller {
    fn new(dir: PathBuf, opts: WriterOptions, first: usize, rows_per_shard: usize) -> Self {
        Self {
            dir,
            opts,
            first,
            rows_per_shard,
            current: None,
            done: Vec::new(),
        }
    }

    fn write(&mut self, row: &LatentRow<'_>) -> Result<(), GenerateError> {
        let w = match &mut self.current {
            Some(w) => w,
            None => {
                let p = self.dir.join(shard_file_name(self.first + self.done.len()));
                self.current
                    .insert(ShardWriter::create(&p, self.opts.clone())?)
            }
        };
        w.write_rows(std::slice::from_ref(row))?;
        if w.rows() as usize >= self.rows_per_shard {
            self.finish_current()?;
        }
        Ok(())
    }

    fn finish_current(&mut self) -> Result<(), GenerateError> {
        if let Some(w) = self.current.take() {
            self.done.push(w.finish()?);
        }
        Ok(())
    }

    /// Every shard written, in order.
    fn finish(mut self) -> Result<Vec<ShardInfo>, GenerateError> {
        self.finish_current()?;
        Ok(self.done)
    }
}

/// Shard paths as the manifest lists them: relative to the output
/// directory.
fn relative_to_out_dir(mut shards: Vec<ShardInfo>) -> Vec<ShardInfo> {
    for s in &mut shards {
        s.file = format!(
            "{SHARDS_DIR}/{}",
            Path::new(&s.file)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| s.file.clone())
        );
    }
    shards
}

/// The manifest keeps the `build` schema: the "encoder" names the sampling
/// model, and `build_args.source` / `preprocessing` say these are samples.
/// `n` is the total number of samples, `shards` every shard in order.
pub fn write_sample_manifest(
    opts: &SampleOptions,
    shards: &[ShardInfo],
    n: usize,
    denorm: bool,
) -> Result<(), GenerateError> {
    let (c, h) = (opts.channels, opts.size);
    let model_id = opts
        .provenance
        .get("model")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let encoder = EncoderInfo {
        kind: "sample".into(),
        id: model_id,
        revision: None,
        config_hash: opts
            .provenance
            .get("model_config_sha256")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        tokens: h * h,
        channels: c,
        crop_size: 0,
        input_size: h,
        patch_size: 1,
    };
    let classes = (0..opts.num_classes).map(|i| i.to_string()).collect();
    let mut m = Manifest::new("", classes, encoder, opts.dtype, HFlip::None);
    m.hflip_note = "sampled latents: no flipped rows".into();
    m.preprocessing = serde_json::json!({
        "source": "sample",
        "denormalised": denorm,
        "note": if denorm {
            "model output de-normalised with the dataset statistics: z * sqrt(var + 1e-5) + mean (raw encoder-space latents)"
        } else {
            "WARNING: no statistics given; latents are in the model's NORMALISED space, not raw encoder space"
        },
    });
    m.build_args = serde_json::json!({
        "source": "sample",
        "provenance": opts.provenance,
        "sampler": sampler_json(&opts.sampler),
        "seed": opts.seed,
        "labels": match &opts.labels { LabelSpec::All => "all".to_string(), LabelSpec::Equal => "equal".into(), LabelSpec::List(_) => "list".into() },
        "noise_file": opts.noise.is_some(),
        "batch_size": opts.batch_size,
    });
    m.shards = shards.to_vec();
    m.totals.images = n as u64;
    m.update_totals();
    let path = opts.out_dir.join(MANIFEST_FILE);
    m.save(&path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_zero_padded() {
        assert_eq!(super::sample_key(7, 10), "sample/000007");
        assert_eq!(super::sample_key(7, 10_000_001), "sample/00000007");
    }
}
