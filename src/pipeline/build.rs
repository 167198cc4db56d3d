//! [`run_build`]: one build, or one part of a multi-machine build, as a
//! sequence of named steps. The settings are resolved first
//! ([`BuildConfig::resolve`]); then the directory is locked, the images
//! listed, the encoder loaded, the build state created or resumed, the
//! images encoded into shards, and the statistics folded.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use sha2::Digest;

use super::build_state::{self, BuildManifest, BuildSettings, HFlip, Preprocessing, RunClock};
use super::config::{BuildConfig, BuildPlan};
use super::lock::{self, DirLock};
use super::plan::{self, Inputs, PartSpec};
use super::{PipelineError, io_err, merge, sink, stages};
use crate::encoders::{Encoder, EncoderSpec};
use crate::images::{DecodeOptions, ImageEntry, Skipped};
use crate::progress::Progress;
use crate::shards::{LatentDType, WriterOptions};

/// What a build did, for the CLI's report and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildSummary {
    /// The output directory (`--out`).
    pub cache_dir: PathBuf,
    /// Its `manifest.json` (a part's, for a part).
    pub manifest: PathBuf,
    /// `stats.safetensors`, once a whole build is complete.
    pub stats: Option<PathBuf>,
    /// Every planned shard is written (false when the source was cut short).
    pub complete: bool,
    /// The source ended early (a truncated archive): where and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<Skipped>,
    /// The part built, for `--num-parts`.
    pub part: Option<PartSpec>,
    /// The first shard this run wrote, when it resumed a build.
    pub resumed_from_shard: Option<usize>,
    /// Shard files written, all runs.
    pub shards: usize,
    /// Images encoded, all runs.
    pub images_encoded: u64,
    /// Images that could not be decoded, all runs.
    pub images_rejected: u64,
    /// Rows stored (one per image and flip).
    pub rows: u64,
    /// Bytes of the shard files.
    pub bytes: u64,
    /// Bytes the latents would take as raw f32.
    pub raw_f32_bytes: u64,
    /// `raw_f32_bytes / bytes`.
    pub compression_ratio: f64,
    /// This run only.
    pub images_this_run: u64,
    /// Wall time of this run.
    pub seconds_this_run: f64,
    /// Encoding throughput of this run.
    pub images_per_second: f64,
    /// The rejected inputs, with reasons.
    pub rejected: Vec<Skipped>,
}

/// Run (or resume) a build, reporting to `progress`. Holds the directory
/// lock throughout. An `out` that is a store URL (`s3://bucket/cache`) is
/// built in a local staging directory and uploaded as it goes
/// ([`crate::store::upload`]).
pub fn run_build(
    cfg: &BuildConfig,
    progress: &mut dyn Progress,
) -> Result<BuildSummary, PipelineError> {
    if crate::store::is_url(&cfg.out) {
        return crate::store::upload::build_to_store(cfg, progress);
    }
    run_local_build(cfg, progress)
}

/// [`run_build`] into a local directory.
pub(crate) fn run_local_build(
    cfg: &BuildConfig,
    progress: &mut dyn Progress,
) -> Result<BuildSummary, PipelineError> {
    let started = Instant::now();
    let plan = cfg.resolve()?;
    let dir = open_root(cfg, &plan)?;
    let inputs = Inputs::list(
        &cfg.inputs(),
        &cfg.source,
        cfg.limit,
        plan.images_per_shard,
        cfg.part,
    )?;
    let encoder = LoadedEncoder::load(cfg)?;
    let job = Job::new(cfg, &plan, inputs, encoder);
    create_output_dirs(&plan)?;

    let mut state = if dir.resuming {
        resume_state(cfg, &plan, &job)?
    } else {
        fresh_state(cfg, &plan, &job)
    };
    let resumed_from_shard = dir.resuming.then(|| state.next_shard());
    record_run(cfg, &mut state, &plan, &job, dir.resuming)?;

    let todo = job.inputs.shards.images_from_shard(state.next_shard());
    let clock = encode_and_write(cfg, &plan, &job, &mut state, todo.clone(), progress)?;
    finish(cfg, &plan, &job, &mut state, clock)?;
    let run = ThisRun {
        started,
        resumed_from_shard,
        images: todo.len() as u64,
        clock,
    };
    Ok(summary(cfg, &plan, &state, &run))
}

/// The build's directory, locked for as long as this lives.
struct BuildDir {
    _lock: DirLock,
    /// `--resume` with a build state to resume from.
    resuming: bool,
}

/// Create and lock the build root. Refuses a part where a whole build is,
/// and a directory with content unless resuming the build that is there.
fn open_root(cfg: &BuildConfig, plan: &BuildPlan) -> Result<BuildDir, PipelineError> {
    let root = &plan.root;
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    let lock = lock::lock_dir(root, build_state::LOCK_FILE)?;
    if cfg.part.is_some() && cfg.out.join(build_state::MANIFEST_FILE).exists() {
        return Err(PipelineError::Invalid(format!(
            "{} already holds a whole (or merged) build; parts must go to a fresh directory",
            cfg.out.display()
        )));
    }
    let resuming = cfg.resume && root.join(build_state::BUILD_STATE_FILE).exists();
    if !resuming && has_content(root)? {
        return Err(if cfg.resume {
            PipelineError::NoManifest { path: root.clone() }
        } else {
            PipelineError::NotEmpty { path: root.clone() }
        });
    }
    Ok(BuildDir {
        _lock: lock,
        resuming,
    })
}

/// Anything in `dir` besides the lock file?
fn has_content(dir: &Path) -> Result<bool, PipelineError> {
    if !dir.exists() {
        return Ok(false);
    }
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        if e.file_name() != build_state::LOCK_FILE {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The encoder, on its device.
struct LoadedEncoder {
    /// Its spec carries the id and revision it was resolved from.
    encoder: Box<dyn Encoder>,
    device: Device,
    /// The encoder's compute dtype.
    compute: DType,
    /// Images per encoder call.
    batch_size: usize,
}

impl LoadedEncoder {
    fn load(cfg: &BuildConfig) -> Result<Self, PipelineError> {
        let resolved = crate::weights::resolve_model(&cfg.encoder, cfg.allow_download)?;
        let device = crate::device::parse_device(&cfg.device)?;
        let compute = cfg.precision.resolve(&device);
        if cfg.tf32 {
            crate::precision::set_tf32(true);
        }
        let encoder = crate::encoders::load_resolved(&resolved, &device, compute)?;
        let batch_size = cfg.batch_size_on(&device);
        Ok(Self {
            encoder,
            device,
            compute,
            batch_size,
        })
    }

    fn spec(&self) -> &EncoderSpec {
        self.encoder.spec()
    }
}

/// What this build encodes and how: the images, the encoder, and the
/// settings recorded in the build state and in every shard's footer.
struct Job {
    inputs: Inputs,
    encoder: LoadedEncoder,
    /// The arguments that decide the bytes (`--resume` must match them).
    settings: BuildSettings,
    preprocessing: Preprocessing,
    writer: WriterOptions,
}

impl Job {
    fn new(cfg: &BuildConfig, plan: &BuildPlan, inputs: Inputs, encoder: LoadedEncoder) -> Self {
        let spec = encoder.spec();
        let settings = BuildSettings {
            encoder_id: spec.id.clone(),
            encoder_kind: spec.kind.clone(),
            encoder_config_sha256: spec.config_hash.clone(),
            dtype: cfg.dtype,
            hflip: cfg.hflip,
            crop_size: spec.crop_size,
            rows_per_shard: plan.rows_per_shard,
            rows_per_group: cfg.rows_per_group,
            zstd_level: cfg.zstd_level,
            max_pixels: cfg.max_pixels,
            limit: cfg.limit,
            num_parts: cfg.part.map(|p| p.count),
            part: cfg.part.map(|p| p.index),
            image_list_sha256: image_list_sha256(inputs.entries()),
            num_images: inputs.entries().len(),
            source: inputs.source.clone(),
        };
        let preprocessing = preprocessing(spec, cfg.hflip);
        let writer = WriterOptions {
            dtype: cfg.dtype,
            tokens: spec.tokens,
            channels: spec.channels,
            zstd_level: cfg.zstd_level,
            rows_per_row_group: cfg.rows_per_group,
            metadata: shard_metadata(spec, &preprocessing),
        };
        Self {
            inputs,
            encoder,
            settings,
            preprocessing,
            writer,
        }
    }
}

fn preprocessing(spec: &EncoderSpec, hflip: HFlip) -> Preprocessing {
    Preprocessing {
        crop: "adm_center_crop (PIL BOX halving, BICUBIC to the short side, center crop), RGB8".into(),
        crop_size: spec.crop_size,
        encoder_input_size: spec.input_size,
        hflip,
        notes: match hflip {
            HFlip::Both => "the reference trains with random horizontal flips; both the crop (flip=false) and its \
                            left-right flip (flip=true) are stored, so sampling a flip at random reproduces it exactly"
                .into(),
            HFlip::None => "only the unflipped crop is stored; the reference's random flips are not reproduced".into(),
        },
    }
}

fn image_list_sha256(entries: &[ImageEntry]) -> String {
    let mut h = sha2::Sha256::new();
    for e in entries {
        h.update(e.key.as_bytes());
        h.update(b"\t");
        h.update(e.label.to_string().as_bytes());
        h.update(b"\n");
    }
    crate::fsutil::hex(&h.finalize())
}

/// Footer metadata every shard carries (no paths or times: shards must be
/// byte-identical across machines, resumes and parts).
fn shard_metadata(spec: &EncoderSpec, pre: &Preprocessing) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "rae_cache.encoder".into(),
        serde_json::to_string(spec).unwrap_or_default(),
    );
    m.insert(
        "rae_cache.preprocessing".into(),
        serde_json::to_string(pre).unwrap_or_default(),
    );
    m.insert(
        "rae_cache.tool_version".into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    m
}

fn create_output_dirs(plan: &BuildPlan) -> Result<(), PipelineError> {
    std::fs::create_dir_all(&plan.shards_dir).map_err(io_err(&plan.shards_dir))?;
    std::fs::create_dir_all(plan.root.join(build_state::STATE_DIR)).map_err(io_err(&plan.root))
}

/// The build state of a new build: nothing written yet.
fn fresh_state(cfg: &BuildConfig, plan: &BuildPlan, job: &Job) -> BuildManifest {
    let (images, shards, spec) = (&job.inputs.images, &job.inputs.shards, job.encoder.spec());
    BuildManifest {
        format: "rae-cache".into(),
        schema_version: crate::shards::SCHEMA_VERSION.into(),
        complete: false,
        dataset: build_state::Dataset {
            root: std::fs::canonicalize(&cfg.images)
                .unwrap_or(cfg.images.clone())
                .display()
                .to_string(),
            classes: images.classes.clone(),
            images: images.entries.len(),
        },
        encoder: spec.clone(),
        preprocessing: job.preprocessing.clone(),
        dtype: cfg.dtype,
        latent_shape: [spec.tokens, spec.channels],
        layout: build_state::Layout {
            rows_per_shard: plan.rows_per_shard,
            images_per_shard: plan.images_per_shard,
            rows_per_group: cfg.rows_per_group,
            zstd_level: cfg.zstd_level,
            first_shard: shards.shards.start,
            end_shard: shards.shards.end,
            total_shards: shards.total_shards(),
        },
        part: cfg.part,
        settings: job.settings.clone(),
        shards: Vec::new(),
        totals: Default::default(),
        rejected: Vec::new(),
        skipped: images.skipped.clone(),
        stats: None,
        truncated: job.inputs.truncated.clone(),
        build_log: build_state::BuildLog {
            tool_version: env!("CARGO_PKG_VERSION").into(),
            started_unix: build_state::unix_now(),
            ..Default::default()
        },
    }
}

/// The build state of the build in `--out`, refused unless it was made
/// with the same settings, and its directory cleaned for the next shard.
fn resume_state(
    cfg: &BuildConfig,
    plan: &BuildPlan,
    job: &Job,
) -> Result<BuildManifest, PipelineError> {
    let mut m = BuildManifest::load(&plan.root)?;
    let mut differences = m.settings.differences(&job.settings);
    if let (None, Some(cut)) = (&m.truncated, &job.inputs.truncated) {
        return Err(PipelineError::Invalid(format!(
            "cannot resume from a source cut short: {}: {}",
            cut.key, cut.reason
        )));
    }
    if m.truncated.is_some() {
        differences.retain(|d| !extends_listing(d));
        continue_truncated(&mut m, job)?;
    }
    if !differences.is_empty() {
        return Err(PipelineError::ResumeMismatch {
            path: cfg.out.clone(),
            differences,
        });
    }
    prepare_resume(&m, &plan.shards_dir, &cfg.out, &plan.root)?;
    Ok(m)
}

/// A settings difference that a longer listing of a source that was cut
/// short makes (checked by [`continue_truncated`]).
fn extends_listing(difference: &str) -> bool {
    difference.starts_with("num_images:") || difference.starts_with("image_list_sha256:")
}

/// Resuming a build whose source was cut short: this listing must begin
/// with the images that build planned (same keys and labels, in order);
/// the build state then takes the new listing's plan.
fn continue_truncated(m: &mut BuildManifest, job: &Job) -> Result<(), PipelineError> {
    let entries = job.inputs.entries();
    let n = m.settings.num_images;
    if entries.len() < n || image_list_sha256(&entries[..n]) != m.settings.image_list_sha256 {
        return Err(PipelineError::Invalid(format!(
            "cannot resume: the source no longer begins with the {n} images the build listed before it was cut short ({} listed now)",
            entries.len()
        )));
    }
    let shards = &job.inputs.shards;
    m.settings.num_images = job.settings.num_images;
    m.settings.image_list_sha256 = job.settings.image_list_sha256.clone();
    m.dataset.images = entries.len();
    m.dataset.classes = job.inputs.images.classes.clone();
    m.layout.end_shard = shards.shards.end;
    m.layout.total_shards = shards.total_shards();
    m.skipped = job.inputs.images.skipped.clone();
    m.truncated = job.inputs.truncated.clone();
    Ok(())
}

/// Before resuming: the last complete shard must hash as listed; shard and
/// temp files of this build's range past the manifest's end are leftovers
/// of the interrupted run and are removed.
fn prepare_resume(
    m: &BuildManifest,
    shards_dir: &Path,
    out: &Path,
    root: &Path,
) -> Result<(), PipelineError> {
    if let Some(last) = m.shards.iter().rev().find(|s| s.file.is_some()) {
        check_last_shard(out, last)?;
    }
    let next = m.next_shard();
    let end = m.layout.end_shard;
    for e in std::fs::read_dir(shards_dir).map_err(io_err(shards_dir))? {
        let e = e.map_err(io_err(shards_dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((idx, temp)) = plan::parse_shard_file_name(&name) {
            let ours = idx >= m.layout.first_shard && idx < end;
            if ours && (temp || idx >= next) {
                tracing::info!("removing leftover {}", e.path().display());
                std::fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
            }
        }
    }
    // Leftover atomic-write temp files of the manifest / stats states.
    for dir in [root.to_path_buf(), root.join(build_state::STATE_DIR)] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}

/// The last shard a resumed build lists must be there, with its sha256.
fn check_last_shard(out: &Path, last: &build_state::ShardEntry) -> Result<(), PipelineError> {
    let file = last.file.as_deref().unwrap_or_default();
    let path = out.join(file);
    if !path.exists() {
        return Err(PipelineError::DamagedShard {
            path,
            reason: "file missing".into(),
        });
    }
    let got = crate::fsutil::sha256_file(&path).map_err(io_err(&path))?;
    if Some(&got) != last.sha256.as_ref() {
        return Err(PipelineError::DamagedShard {
            path,
            reason: format!(
                "sha256 {got}, manifest {}",
                last.sha256.clone().unwrap_or_default()
            ),
        });
    }
    Ok(())
}

/// Record this run (machine, threads, precision) in the build state and
/// save it.
fn record_run(
    cfg: &BuildConfig,
    m: &mut BuildManifest,
    plan: &BuildPlan,
    job: &Job,
    resuming: bool,
) -> Result<(), PipelineError> {
    let enc = &job.encoder;
    m.build_log.runs += 1;
    m.build_log.threads = plan.threads;
    m.build_log.batch_size = enc.batch_size;
    m.build_log.device = crate::device::device_name(&enc.device);
    let precision = enc.compute.as_str().to_string();
    if resuming && !m.build_log.precision.is_empty() && m.build_log.precision != precision {
        // Not refused (like a device change), but the cache then mixes
        // latents computed at two precisions.
        tracing::warn!(
            "resuming a build encoded in {} with precision {precision}: earlier shards differ in precision",
            m.build_log.precision
        );
    }
    m.build_log.precision = precision;
    m.build_log.tf32 = crate::precision::tf32_enabled();
    m.refresh_totals();
    save(cfg, &plan.root, m)
}

/// Decode, encode and write the images `todo`, each shard entering the
/// build state as it completes. Returns this run's clock.
fn encode_and_write(
    cfg: &BuildConfig,
    plan: &BuildPlan,
    job: &Job,
    m: &mut BuildManifest,
    todo: Range<usize>,
    progress: &mut dyn Progress,
) -> Result<RunClock, PipelineError> {
    let enc = &job.encoder;
    tracing::info!(
        images = job.inputs.entries().len(),
        todo = todo.len(),
        shards = ?job.inputs.shards.shards,
        encoder = %enc.spec().id,
        device = %m.build_log.device,
        precision = %m.build_log.precision,
        "building {}",
        cfg.out.display()
    );
    progress.start(todo.len() as u64);
    let stage_opts = stages::StageOptions {
        f16_transfer: cfg.dtype == LatentDType::F16,
        threads: plan.threads,
        batch_size: enc.batch_size,
        crop_size: enc.spec().crop_size as u32,
        decode: DecodeOptions {
            max_pixels: cfg.max_pixels,
        },
        flips: plan.flips,
        device: &enc.device,
    };
    let clock = RunClock {
        seconds_before: m.build_log.seconds,
        start: Instant::now(),
    };
    let mut writer =
        sink::ShardSink::new(plan, &job.inputs, job.writer.clone(), m, clock, progress)
            .with_hook(cfg.on_save.clone());
    stages::run(
        job.inputs.entries(),
        job.inputs.reader.as_deref(),
        todo,
        enc.encoder.as_ref(),
        &stage_opts,
        |msg| writer.accept(msg),
    )?;
    writer.finish()?;
    progress.finish();
    Ok(clock)
}

/// Every planned shard is written: fold the statistics (a whole build; a
/// part leaves that to `merge`, which folds the same per-shard states the
/// same way) and mark the build complete.
fn finish(
    cfg: &BuildConfig,
    plan: &BuildPlan,
    job: &Job,
    m: &mut BuildManifest,
    clock: RunClock,
) -> Result<(), PipelineError> {
    let shards = &job.inputs.shards.shards;
    if let Some(cut) = &job.inputs.truncated {
        // Stop with the shards before the cut; `--resume` continues.
        tracing::warn!(
            "{}: {}; stopped after {} shards, rerun with --resume once the source is complete",
            cut.key,
            cut.reason,
            m.shards.len()
        );
        m.truncated = Some(cut.clone());
        m.build_log.stamp(clock);
        return save(cfg, &plan.root, m);
    }
    if m.next_shard() != shards.end {
        return Err(PipelineError::Invalid(format!(
            "build stopped at shard {} of {}..{}",
            m.next_shard(),
            shards.start,
            shards.end
        )));
    }
    if cfg.part.is_none() {
        let acc = merge::fold_states(&[(&plan.root, m)])?;
        if acc.count > 0 {
            acc.save_stats(&cfg.out.join(build_state::STATS_FILE))?;
            m.stats = Some(build_state::STATS_FILE.into());
        } else {
            tracing::warn!("no image could be encoded: no statistics written");
        }
    }
    m.complete = true;
    m.build_log.stamp(clock);
    save(cfg, &plan.root, m)
}

/// Save the build state under `root`, then tell the save hook.
fn save(cfg: &BuildConfig, root: &Path, m: &BuildManifest) -> Result<(), PipelineError> {
    m.save(root)?;
    match &cfg.on_save {
        Some(hook) => (hook.0)(root, m),
        None => Ok(()),
    }
}

/// This run's share of the build, for its summary.
struct ThisRun {
    started: Instant,
    resumed_from_shard: Option<usize>,
    images: u64,
    clock: RunClock,
}

fn summary(cfg: &BuildConfig, plan: &BuildPlan, m: &BuildManifest, run: &ThisRun) -> BuildSummary {
    let t = &m.totals;
    BuildSummary {
        cache_dir: cfg.out.clone(),
        manifest: plan.root.join(build_state::MANIFEST_FILE),
        stats: m
            .stats
            .is_some()
            .then(|| cfg.out.join(build_state::STATS_FILE)),
        complete: m.complete,
        truncated: m.truncated.clone(),
        part: cfg.part,
        resumed_from_shard: run.resumed_from_shard,
        shards: m.shards.iter().filter(|s| s.file.is_some()).count(),
        images_encoded: t.images_encoded,
        images_rejected: t.images_rejected,
        rows: t.rows,
        bytes: t.bytes,
        raw_f32_bytes: t.raw_f32_bytes,
        compression_ratio: if t.bytes > 0 {
            t.raw_f32_bytes as f64 / t.bytes as f64
        } else {
            0.0
        },
        images_this_run: run.images,
        seconds_this_run: run.started.elapsed().as_secs_f64(),
        images_per_second: run.images as f64 / run.clock.start.elapsed().as_secs_f64().max(1e-9),
        rejected: m.rejected.clone(),
    }
}
