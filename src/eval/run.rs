//! One evaluation from its inputs to a JSON report, and the reference
//! statistics of `eval-ref`: input detection, feature extraction through
//! the [`ImageFeatures`] networks, latent scans, and every metric.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use super::features::{FeatureSet, ImageFeatures, ImageSource, Keep, SampleDecoder, extract};
use super::latent::{self, LatentOptions, LatentReference};
use super::reference::{FeatureRows, Reference};
use super::{EvalError, PrOptions, frechet_distance, inception_score, precision_recall};
use crate::progress::Progress;
use crate::shards::LatentStats;
use crate::shards::manifest::STATS_FILE;

/// A metric `eval` can compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// FID (Inception pool_3).
    Fid,
    /// sFID (Inception mixed_6/conv, first 7 channels).
    Sfid,
    /// Inception Score (ADM splits).
    Is,
    /// Precision and recall (Inception pool_3, k = 3).
    Pr,
    /// FD-DINOv2 (DINOv2 ViT-L/14 CLS).
    FdDinov2,
    /// Latent-space FD, P/R and drift from shards.
    Latent,
}

impl Metric {
    fn needs_inception(self) -> bool {
        matches!(self, Metric::Fid | Metric::Sfid | Metric::Is | Metric::Pr)
    }
}

/// Options of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Metrics to compute.
    pub metrics: Vec<Metric>,
    /// IS split size (ADM: 5000, in file order).
    pub is_split: usize,
    /// Precision/recall estimator.
    pub pr: PrOptions,
    /// Latent precision/recall too (k-NN on pooled latents).
    pub latent_pr: bool,
    /// Latent token-marginal FD (reads every token; costly).
    pub latent_tokens: bool,
    /// Images per network batch.
    pub batch: usize,
    /// Use at most this many samples.
    pub limit: Option<usize>,
    /// Reference cache: skip flipped rows.
    pub ref_unflipped_only: bool,
    /// Latent token FD and P/R on at most this many rows per side (evenly
    /// strided); the pooled FD uses every row.
    pub latent_subset: Option<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            metrics: vec![Metric::Latent],
            is_split: super::inception_score::ADM_SPLIT_SIZE,
            pr: PrOptions::default(),
            latent_pr: true,
            latent_tokens: true,
            batch: 50,
            limit: None,
            ref_unflipped_only: false,
            latent_subset: Some(10_000),
        }
    }
}

/// What an input path holds.
#[derive(Debug, Clone)]
pub enum Input {
    /// Latent shards (a cache or sample directory, a shard folder or file),
    /// with the directory's stats.safetensors when it has one.
    Shards {
        /// The shard files.
        shards: Vec<PathBuf>,
        /// The directory's per-element statistics.
        stats: Option<PathBuf>,
    },
    /// Images (`.npz` or a folder).
    Images(ImageSource),
    /// A reference statistics file from `eval-ref`.
    RefFile(PathBuf),
    /// An ADM reference / sample batch `.npz` with precomputed statistics.
    AdmNpz(PathBuf),
}

fn has_shards(dir: &Path) -> bool {
    let any_parquet = |d: &Path| {
        std::fs::read_dir(d).is_ok_and(|it| {
            it.filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "parquet"))
        })
    };
    dir.join(crate::shards::manifest::MANIFEST_FILE).is_file()
        || any_parquet(&dir.join(crate::shards::manifest::SHARDS_DIR))
        || any_parquet(dir)
}

impl Input {
    /// Detect what `path` is: `.safetensors` (eval-ref file), `.npz` (with
    /// `mu`: an ADM reference; else images), `.parquet` or a directory
    /// with shards, or a folder of images.
    pub fn detect(path: &Path) -> Result<Self, EvalError> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if path.is_file() {
            return match ext {
                "safetensors" => Ok(Input::RefFile(path.to_path_buf())),
                "npz" => {
                    let names = super::npz::names(path)?;
                    if names.iter().any(|n| n == "mu") {
                        Ok(Input::AdmNpz(path.to_path_buf()))
                    } else {
                        Ok(Input::Images(ImageSource::Npz(path.to_path_buf())))
                    }
                }
                "parquet" => Ok(Input::Shards {
                    shards: vec![path.to_path_buf()],
                    stats: None,
                }),
                _ => Err(EvalError::format(
                    path,
                    "expected a .npz, .safetensors (eval-ref) or .parquet file, or a directory",
                )),
            };
        }
        if !path.is_dir() {
            return Err(EvalError::format(path, "no such file or directory"));
        }
        if has_shards(path) {
            let shards = crate::generate::resolve_shards(path)
                .map_err(|e| EvalError::format(path, e.to_string()))?;
            let stats = Some(path.join(STATS_FILE)).filter(|p| p.is_file());
            return Ok(Input::Shards { shards, stats });
        }
        Ok(Input::Images(ImageSource::open(path)?))
    }

    fn kind(&self) -> &'static str {
        match self {
            Input::Shards { .. } => "latent-shards",
            Input::Images(ImageSource::Npz(_)) => "npz",
            Input::Images(ImageSource::Files(_)) => "image-folder",
            Input::Images(ImageSource::Decoded { .. }) => "decoded-shards",
            Input::RefFile(_) => "eval-ref",
            Input::AdmNpz(_) => "adm-npz",
        }
    }
}

/// The feature networks an evaluation may use.
#[derive(Default)]
pub struct Networks<'a> {
    /// Inception-v3 (FID, sFID, IS, P/R).
    pub inception: Option<&'a mut dyn ImageFeatures>,
    /// DINOv2 ViT-L/14 (FD-DINOv2).
    pub dinov2: Option<&'a mut dyn ImageFeatures>,
    /// Decodes sample shards for the pixel metrics.
    pub decoder: Option<Arc<SampleDecoder>>,
}

impl<'a> Networks<'a> {
    fn inception_net(&mut self) -> Result<&mut (dyn ImageFeatures + 'a), EvalError> {
        self.inception
            .as_deref_mut()
            .ok_or_else(|| no_net("Inception-v3"))
    }

    fn dinov2_net(&mut self) -> Result<&mut (dyn ImageFeatures + 'a), EvalError> {
        self.dinov2.as_deref_mut().ok_or_else(|| no_net("DINOv2-L"))
    }
}

fn load_stats(p: &Option<PathBuf>) -> Result<Option<LatentStats>, EvalError> {
    p.as_ref()
        .map(|p| LatentStats::load(p).map_err(EvalError::from))
        .transpose()
}

/// The latent reference of a cache: pooled and token statistics, pooled
/// rows for P/R, its stats.safetensors.
pub fn latent_reference_of_cache(
    shards: &[PathBuf],
    stats: Option<LatentStats>,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<LatentReference, EvalError> {
    let lo = LatentOptions {
        tokens: opts.latent_tokens,
        keep_pooled: opts.latent_pr,
        elements: false,
        limit: None,
        unflipped_only: opts.ref_unflipped_only,
        subset_rows: opts.latent_subset,
    };
    let set = latent::scan(shards, stats.as_ref(), &lo, progress)?;
    set.into_reference(stats, opts.latent_pr)
}

/// The latent reference `--ref` names: a cache (scanned) or an eval-ref
/// file made from one.
pub fn latent_reference_of(
    reference: &Input,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<LatentReference, EvalError> {
    match reference {
        Input::Shards { shards: rs, stats } => {
            latent_reference_of_cache(rs, load_stats(stats)?, opts, progress)
        }
        Input::RefFile(p) => Reference::load(p)?.latent().ok_or_else(|| {
            EvalError::format(
                p,
                "has no latent statistics (make it with eval-ref from a cache)",
            )
        }),
        _ => Err(EvalError::Invalid(
            "latent metrics need a latent cache or an eval-ref file made from one as --ref".into(),
        )),
    }
}

/// Latent metrics of sample `shards` against `refl`, as report JSON.
pub fn latent_against(
    shards: &[PathBuf],
    refl: &LatentReference,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<Value, EvalError> {
    if shards.is_empty() {
        return Err(EvalError::Invalid("no sample shards".into()));
    }
    let first = crate::shards::ShardReader::open(&shards[0])?;
    if (first.tokens(), first.channels()) != (refl.token_count, refl.channels) {
        return Err(EvalError::Invalid(format!(
            "{}: samples are [{}, {}] latents (tokens, channels), the reference [{}, {}]",
            first.path().display(),
            first.tokens(),
            first.channels(),
            refl.token_count,
            refl.channels
        )));
    }
    let lo = LatentOptions {
        tokens: refl.tokens.is_some(),
        keep_pooled: opts.latent_pr && refl.pooled_rows.is_some(),
        elements: refl.stats.is_some(),
        limit: opts.limit,
        unflipped_only: false,
        subset_rows: opts.latent_subset,
    };
    let set = latent::scan(shards, refl.stats.as_ref(), &lo, progress)?;
    let denorm = set.denormalised_shards;
    let pr = lo.keep_pooled.then_some(&opts.pr);
    let m = latent::compare(set, refl, pr)?;
    let mut v = serde_json::to_value(&m).map_err(|e| EvalError::Invalid(e.to_string()))?;
    v["denormalised_shards"] = json!(denorm);
    Ok(v)
}

fn latent_metrics(
    samples: &Input,
    reference: &Input,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<Value, EvalError> {
    let Input::Shards { shards, .. } = samples else {
        return Err(EvalError::Invalid(
            "latent metrics need sample shards (a sample or cache directory)".into(),
        ));
    };
    if shards.is_empty() {
        return Err(EvalError::Invalid("no sample shards".into()));
    }
    let refl = latent_reference_of(reference, opts, progress)?;
    latent_against(shards, &refl, opts, progress)
}

/// Reference-side pixel statistics: Gaussians by set and P/R features.
struct PixelRef {
    reference: Reference,
    kind: &'static str,
}

fn inception_keep(metrics: &[Metric]) -> Keep {
    Keep {
        pool_stats: metrics.contains(&Metric::Fid),
        spatial_stats: metrics.contains(&Metric::Sfid),
        pool_rows: metrics.contains(&Metric::Pr),
        logits: metrics.contains(&Metric::Is),
    }
}

fn store(reference: &mut Reference, set: FeatureSet, pool_name: &str) -> Result<(), EvalError> {
    if let Some(m) = set.pool {
        reference
            .sets
            .insert(pool_name.into(), m.finish(pool_name)?);
    }
    if let Some(m) = set.spatial {
        reference.sets.insert("sfid".into(), m.finish("sfid")?);
    }
    if let Some(rows) = set.pool_rows {
        let dim = rows.len() / set.images.max(1);
        reference
            .features
            .insert("pr".into(), FeatureRows { dim, data: rows });
    }
    Ok(())
}

fn no_net(what: &str) -> EvalError {
    EvalError::Invalid(format!(
        "the {what} network is needed for the metrics asked (see --help)"
    ))
}

/// DINOv2 CLS statistics of `source`.
fn dinov2_set(
    source: &ImageSource,
    nets: &mut Networks<'_>,
    opts: &EvalOptions,
    limit: Option<usize>,
    progress: &mut dyn Progress,
) -> Result<(FeatureSet, Value), EvalError> {
    let net = nets.dinov2_net()?;
    let keep = Keep {
        pool_stats: true,
        ..Keep::default()
    };
    let set = extract(source, net, keep, opts.batch, limit, progress)?;
    Ok((set, net.provenance()))
}

/// An ADM reference batch: its precomputed statistics, and with `pr` the
/// Inception features of its images (what precision/recall compares to).
fn adm_reference(
    p: &Path,
    pr: bool,
    nets: &mut Networks<'_>,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<Reference, EvalError> {
    let mut r = Reference::from_adm_npz(p)?;
    if pr {
        let src = ImageSource::Npz(p.to_path_buf());
        let imgs = reference_of_images(&src, nets, &[Metric::Pr], opts, progress)?;
        r.features.extend(imgs.features);
    }
    Ok(r)
}

/// Statistics of images through the networks, as a [`Reference`].
pub fn reference_of_images(
    source: &ImageSource,
    nets: &mut Networks<'_>,
    metrics: &[Metric],
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<Reference, EvalError> {
    let mut r = Reference::default();
    if metrics.iter().any(|m| m.needs_inception()) {
        let net = nets.inception_net()?;
        let keep = Keep {
            logits: false,
            ..inception_keep(metrics)
        };
        let set = extract(source, net, keep, opts.batch, None, progress)?;
        r.provenance.insert("inception".into(), net.provenance());
        r.provenance.insert("images".into(), json!(set.images));
        store(&mut r, set, "fid")?;
    }
    if metrics.contains(&Metric::FdDinov2) {
        let (set, prov) = dinov2_set(source, nets, opts, None, progress)?;
        r.provenance.insert("dinov2".into(), prov);
        store(&mut r, set, "fd_dinov2")?;
    }
    r.provenance.insert("source".into(), source.describe());
    Ok(r)
}

fn pixel_reference(
    reference: &Input,
    nets: &mut Networks<'_>,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<PixelRef, EvalError> {
    let pixel: Vec<Metric> = opts
        .metrics
        .iter()
        .copied()
        .filter(|m| *m != Metric::Latent)
        .collect();
    match reference {
        Input::RefFile(p) => Ok(PixelRef { reference: Reference::load(p)?, kind: "eval-ref" }),
        Input::AdmNpz(p) => Ok(PixelRef {
            reference: adm_reference(p, pixel.contains(&Metric::Pr), nets, opts, progress)?,
            kind: "adm-npz",
        }),
        Input::Images(src) => Ok(PixelRef { reference: reference_of_images(src, nets, &pixel, opts, progress)?, kind: "images" }),
        Input::Shards { .. } => Err(EvalError::Invalid(
            "pixel metrics against a latent cache need decoded images: give an image folder, an npz or an eval-ref file as --ref".into(),
        )),
    }
}

fn ref_set<'a>(r: &'a Reference, name: &str) -> Result<&'a super::Gaussian, EvalError> {
    r.sets
        .get(name)
        .ok_or_else(|| EvalError::Invalid(format!("the reference has no {name} statistics")))
}

/// The images of the sample side: images as they are, sample shards
/// through the decoder.
fn sample_images(samples: &Input, nets: &Networks<'_>) -> Result<ImageSource, EvalError> {
    match (samples, &nets.decoder) {
        (Input::Images(src), _) => Ok(src.clone()),
        (Input::Shards { shards, stats }, Some(d)) => Ok(ImageSource::Decoded {
            shards: shards.clone(),
            stats: load_stats(stats)?.or_else(|| d.stats.clone()),
            decoder: d.clone(),
        }),
        (Input::Shards { .. }, None) => Err(EvalError::Invalid(
            "pixel metrics of sample shards need their decoder (--decoder with --decoder-config or --preset)".into(),
        )),
        _ => Err(EvalError::Invalid(
            "pixel metrics need images: sample shards with --decoder, an npz or an image folder".into(),
        )),
    }
}

fn pixel_metrics(
    samples: &Input,
    reference: &Input,
    nets: &mut Networks<'_>,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
    report: &mut Value,
) -> Result<(), EvalError> {
    let src = sample_images(samples, nets)?;
    report["samples"]["images"] = src.describe();
    let ms = &opts.metrics;
    // fail early on a missing network, before reading anything
    if ms.iter().any(|m| m.needs_inception()) && nets.inception.is_none() {
        return Err(no_net("Inception-v3"));
    }
    if ms.contains(&Metric::FdDinov2) && nets.dinov2.is_none() {
        return Err(no_net("DINOv2-L"));
    }
    let t0 = Instant::now();
    let pref = pixel_reference(reference, nets, opts, progress)?;
    let r = &pref.reference;
    report["ref"]["kind"] = json!(pref.kind);
    report["ref"]["provenance"] = Value::Object(r.provenance.clone());
    let t1 = Instant::now();
    if ms.iter().any(|m| m.needs_inception()) {
        let net = nets.inception_net()?;
        let set = extract(
            &src,
            net,
            inception_keep(ms),
            opts.batch,
            opts.limit,
            progress,
        )?;
        report["protocol"]["inception"] = net.provenance();
        report["counts"]["samples"] = json!(set.images);
        if let Some(m) = &set.pool {
            report["metrics"]["fid"] =
                json!(frechet_distance(&m.finish("samples")?, ref_set(r, "fid")?)?);
        }
        if let Some(m) = &set.spatial {
            report["metrics"]["sfid"] = json!(frechet_distance(
                &m.finish("samples")?,
                ref_set(r, "sfid")?
            )?);
        }
        if let Some((logits, classes)) = &set.logits {
            let is = inception_score(logits, *classes, opts.is_split)?;
            report["metrics"]["is"] = json!(is.mean);
            report["is_splits"] = json!(is.splits);
        }
        if let Some(rows) = &set.pool_rows {
            let real = r.features.get("pr").ok_or_else(|| {
                EvalError::Invalid("the reference has no precision/recall features".into())
            })?;
            let pr = precision_recall(&real.data, rows, real.dim, &opts.pr)?;
            report["metrics"]["precision"] = json!(pr.precision);
            report["metrics"]["recall"] = json!(pr.recall);
            report["counts"]["ref_pr"] = json!(pr.real);
            report["pr"] = serde_json::to_value(&pr).unwrap_or(Value::Null);
        }
    }
    if ms.contains(&Metric::FdDinov2) {
        let (set, prov) = dinov2_set(&src, nets, opts, opts.limit, progress)?;
        report["protocol"]["dinov2"] = prov;
        if let Some(m) = &set.pool {
            report["metrics"]["fd_dinov2"] = json!(frechet_distance(
                &m.finish("samples")?,
                ref_set(r, "fd_dinov2")?
            )?);
        }
    }
    report["timings_s"]["reference"] = json!((t1 - t0).as_secs_f64());
    report["timings_s"]["samples"] = json!(t1.elapsed().as_secs_f64());
    Ok(())
}

/// The report skeleton: every key present, `null` until computed.
pub fn empty_report(
    samples: &Path,
    s: &Input,
    reference: &Path,
    r: &Input,
    opts: &EvalOptions,
) -> Value {
    json!({
        "metrics": {
            "fid": null, "sfid": null, "is": null, "precision": null, "recall": null,
            "fd_dinov2": null, "latent_fd_pooled": null, "latent_fd_tokens": null,
            "latent_precision": null, "latent_recall": null,
        },
        "counts": {"samples": null, "ref_pr": null},
        "protocol": {
            "metrics": opts.metrics,
            "fd": "f64, trace sqrt via symmetric eigen of S1^1/2 S2 S1^1/2 (faer)",
            "is": {"mode": "adm", "split_size": opts.is_split, "order": "file", "softmax": "logits without bias"},
            "pr": {"k": opts.pr.k, "distance": opts.pr.distance, "block": opts.pr.block},
            "tf32": false,
            "inception": null,
            "dinov2": null,
        },
        "samples": {"path": samples.display().to_string(), "kind": s.kind(), "limit": opts.limit},
        "ref": {"path": reference.display().to_string(), "kind": r.kind(), "provenance": null},
        "is_splits": null,
        "pr": null,
        "latent": null,
        "timings_s": {},
        "tool_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Evaluate `samples` against `reference`; the JSON report.
pub fn evaluate(
    samples: &Path,
    reference: &Path,
    nets: &mut Networks<'_>,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<Value, EvalError> {
    if opts.metrics.is_empty() {
        return Err(EvalError::Invalid("no metrics asked".into()));
    }
    let s = Input::detect(samples)?;
    let r = Input::detect(reference)?;
    let mut report = empty_report(samples, &s, reference, &r, opts);
    if opts.metrics.iter().any(|m| *m != Metric::Latent) {
        pixel_metrics(&s, &r, nets, opts, progress, &mut report)?;
    }
    if opts.metrics.contains(&Metric::Latent) {
        let t = Instant::now();
        let l = latent_metrics(&s, &r, opts, progress)?;
        report["metrics"]["latent_fd_pooled"] = l["fd_pooled"].clone();
        report["metrics"]["latent_fd_tokens"] = l["fd_tokens"].clone();
        report["metrics"]["latent_precision"] = l["pr"]["precision"].clone();
        report["metrics"]["latent_recall"] = l["pr"]["recall"].clone();
        if report["counts"]["samples"].is_null() {
            report["counts"]["samples"] = l["samples"].clone();
        }
        report["latent"] = l;
        report["timings_s"]["latent"] = json!(t.elapsed().as_secs_f64());
    }
    Ok(report)
}

/// The statistics `eval-ref` writes for `source` (a cache: latent
/// statistics; images or an npz: the networks' statistics).
pub fn build_reference(
    source: &Path,
    nets: &mut Networks<'_>,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<Reference, EvalError> {
    let input = Input::detect(source)?;
    let mut r = match &input {
        Input::Shards { shards, stats } => {
            let stats = load_stats(stats)?;
            let l = latent_reference_of_cache(shards, stats, opts, progress)?;
            let mut r = Reference::default();
            r.provenance.insert("rows".into(), json!(l.pooled.count));
            r.provenance.insert(
                "flips".into(),
                json!(if opts.ref_unflipped_only {
                    "unflipped"
                } else {
                    "all"
                }),
            );
            r.set_latent(l);
            r
        }
        Input::Images(src) => reference_of_images(src, nets, &opts.metrics, opts, progress)?,
        Input::AdmNpz(p) => {
            adm_reference(p, opts.metrics.contains(&Metric::Pr), nets, opts, progress)?
        }
        Input::RefFile(p) => {
            return Err(EvalError::format(
                p,
                "is already a reference statistics file",
            ));
        }
    };
    r.provenance.insert("kind".into(), json!(input.kind()));
    r.provenance
        .insert("source".into(), json!(source.display().to_string()));
    r.provenance
        .insert("tool_version".into(), json!(env!("CARGO_PKG_VERSION")));
    Ok(r)
}
