//! `rae-cache eval` / `eval-ref` end to end: latent metrics of shards
//! against a tiny cache (itself: FD 0; shifted: a known FD), sample shards
//! written normalised, the reference file round trip, a stable `--json`
//! schema, the pixel path through a stand-in feature network, bad inputs.

use std::path::Path;

use rae_cache::eval::features::{FeatureBatch, ImageBatch, ImageFeatures};
use rae_cache::eval::run::{EvalOptions, Metric, Networks, evaluate};
use rae_cache::eval::{EvalError, Moments, frechet_distance};
use rae_cache::generate::npz::{NpzWriter, npy_header};
use rae_cache::progress::NoProgress;
use rae_cache::shards::{
    LatentDType, LatentRow, LatentStats, ShardReader, ShardWriter, WriterOptions,
};

use crate::common::cli::{bin, json, run_ok};
use crate::common::tiny_cache::{self, Spec};

fn spec() -> Spec {
    Spec {
        images: 24,
        classes: 3,
        tokens: 16,
        channels: 8,
        shards: 2,
        ..Spec::default()
    }
}

/// Rewrite every row of `cache` into `out/shards/part-00000.parquet`
/// through `f`, with footer metadata `meta`.
fn rewrite(cache: &Path, out: &Path, meta: &[(&str, &str)], f: impl Fn(usize, &mut [f32])) {
    let shards = rae_cache::generate::resolve_shards(cache).unwrap();
    std::fs::create_dir_all(out.join("shards")).unwrap();
    let first = ShardReader::open(&shards[0]).unwrap();
    let (t, c) = (first.tokens(), first.channels());
    let mut opts = WriterOptions::new(LatentDType::F32, t, c);
    opts.metadata = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut w = ShardWriter::create(&out.join("shards/part-00000.parquet"), opts).unwrap();
    for s in &shards {
        let mut b = ShardReader::open(s).unwrap().read_all().unwrap();
        for (i, row) in b.latents.chunks_exact_mut(t * c).enumerate() {
            f(i, row);
        }
        let rows: Vec<LatentRow> = (0..b.keys.len())
            .map(|i| LatentRow {
                key: &b.keys[i],
                label: b.labels[i],
                flip: b.flips[i],
                latent: &b.latents[i * t * c..(i + 1) * t * c],
            })
            .collect();
        w.write_rows(&rows).unwrap();
    }
    w.finish().unwrap();
}

pub(crate) fn metric(v: &serde_json::Value, k: &str) -> f64 {
    v["metrics"][k]
        .as_f64()
        .unwrap_or_else(|| panic!("{k}: {}", v["metrics"]))
}

#[test]
fn latent_metrics_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let sp = spec();
    tiny_cache::write(&cache, &sp);

    // itself: FD 0 (to numerics), precision = recall = 1, no drift
    let out = run_ok([
        "eval".as_ref(),
        cache.as_os_str(),
        "--ref".as_ref(),
        cache.as_os_str(),
        "--json".as_ref(),
    ]);
    let r = json(&out);
    assert!(
        metric(&r, "latent_fd_pooled").abs() < 1e-9,
        "{}",
        r["metrics"]
    );
    assert!(
        metric(&r, "latent_fd_tokens").abs() < 1e-9,
        "{}",
        r["metrics"]
    );
    assert_eq!(metric(&r, "latent_precision"), 1.0);
    assert_eq!(metric(&r, "latent_recall"), 1.0);
    assert!(r["latent"]["drift"]["mean_shift_abs_max"].as_f64().unwrap() < 1e-5);
    assert_eq!(r["counts"]["samples"], (sp.images * 2) as u64);

    // stable schema
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&r),
        [
            "counts",
            "is_splits",
            "latent",
            "metrics",
            "pr",
            "protocol",
            "ref",
            "samples",
            "timings_s",
            "tool_version"
        ]
    );
    assert_eq!(
        keys(&r["metrics"]),
        [
            "fd_dinov2",
            "fid",
            "is",
            "latent_fd_pooled",
            "latent_fd_tokens",
            "latent_precision",
            "latent_recall",
            "precision",
            "recall",
            "sfid"
        ]
    );

    // every element shifted by 0.25: FD = C * 0.25^2 for pooled and tokens
    let shifted = dir.path().join("shifted");
    rewrite(&cache, &shifted, &[], |_, row| {
        row.iter_mut().for_each(|x| *x += 0.25)
    });
    let r = json(&run_ok([
        "eval".as_ref(),
        shifted.as_os_str(),
        "--ref".as_ref(),
        cache.as_os_str(),
        "--json".as_ref(),
    ]));
    let want = sp.channels as f64 * 0.0625;
    for k in ["latent_fd_pooled", "latent_fd_tokens"] {
        let got = metric(&r, k);
        assert!((got - want).abs() < 1e-6 * want, "{k}: {got} vs {want}");
    }

    // token FD and P/R on an evenly strided subset: 48 rows, at most 10
    let r3 = json(&run_ok([
        "eval".as_ref(),
        shifted.as_os_str(),
        "--ref".as_ref(),
        cache.as_os_str(),
        "--latent-subset".as_ref(),
        "10".as_ref(),
        "--json".as_ref(),
    ]));
    assert_eq!(r3["latent"]["samples_subset"], 10);
    assert_eq!(r3["latent"]["token_rows_samples"], 10 * sp.tokens as u64);
    assert_eq!(r3["latent"]["token_rows_reference"], 10 * sp.tokens as u64);
    assert_eq!(r3["latent"]["pr"]["real"], 10);
    assert_eq!(r3["latent"]["samples"], 48);
    let got = metric(&r3, "latent_fd_tokens");
    assert!(
        (got - want).abs() < 1e-6 * want,
        "subset token FD {got} vs {want}"
    );

    // the reference as a file gives the same numbers
    let refp = dir.path().join("ref.safetensors");
    run_ok([
        "eval-ref".as_ref(),
        cache.as_os_str(),
        "--out".as_ref(),
        refp.as_os_str(),
    ]);
    let r2 = json(&run_ok([
        "eval".as_ref(),
        shifted.as_os_str(),
        "--ref".as_ref(),
        refp.as_os_str(),
        "--json".as_ref(),
    ]));
    for k in [
        "latent_fd_pooled",
        "latent_fd_tokens",
        "latent_precision",
        "latent_recall",
    ] {
        assert!((metric(&r, k) - metric(&r2, k)).abs() < 1e-9, "{k}");
    }
    assert_eq!(r2["ref"]["kind"], "eval-ref");
}

#[test]
fn normalised_samples_are_denormalised_with_the_cache_stats() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let sp = spec();
    tiny_cache::write(&cache, &sp);
    let stats = LatentStats::load(&cache.join("stats.safetensors")).unwrap();
    let (t, c) = (sp.tokens, sp.channels);
    let samples = dir.path().join("samples");
    // what `sample` without --stats writes: (x - mean) / sqrt(var + eps)
    rewrite(
        &cache,
        &samples,
        &[("rae_cache.denormalised", "false")],
        |_, row| {
            for (e, x) in row.iter_mut().enumerate() {
                let i = (e % c) * t + e / c;
                *x = ((*x as f64 - stats.mean[i] as f64) / (stats.var[i] as f64 + 1e-5).sqrt())
                    as f32;
            }
        },
    );
    let r = json(&run_ok([
        "eval".as_ref(),
        samples.as_os_str(),
        "--ref".as_ref(),
        cache.as_os_str(),
        "--json".as_ref(),
    ]));
    assert_eq!(r["latent"]["denormalised_shards"], 1);
    assert!(
        metric(&r, "latent_fd_pooled").abs() < 1e-6,
        "{}",
        r["metrics"]
    );
    // without the cache statistics they cannot be compared
    let refp = dir.path().join("nostats.safetensors");
    std::fs::remove_file(cache.join("stats.safetensors")).unwrap();
    run_ok([
        "eval-ref".as_ref(),
        cache.as_os_str(),
        "--out".as_ref(),
        refp.as_os_str(),
    ]);
    let out = bin()
        .args([
            "eval".as_ref(),
            samples.as_os_str(),
            "--ref".as_ref(),
            refp.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("normalised latents"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fails_with(args: &[&std::ffi::OsStr], needle: &str) {
    let out = bin().arg("eval").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(
        !out.status.success() && err.contains(needle),
        "expected {needle:?} in:\n{err}"
    );
}

#[test]
fn bad_inputs_give_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    tiny_cache::write(&cache, &spec());
    let os = |p: &Path| p.as_os_str().to_owned();
    // one sample row: no covariance
    let shards = rae_cache::generate::resolve_shards(&cache).unwrap();
    let b = ShardReader::open(&shards[0]).unwrap().read_all().unwrap();
    let per = b.tokens * b.channels;
    let single = dir.path().join("single");
    std::fs::create_dir_all(single.join("shards")).unwrap();
    let mut w = ShardWriter::create(
        &single.join("shards/a.parquet"),
        WriterOptions::new(LatentDType::F32, b.tokens, b.channels),
    )
    .unwrap();
    w.write_rows(&[LatentRow {
        key: "a",
        label: 0,
        flip: false,
        latent: &b.latents[..per],
    }])
    .unwrap();
    w.finish().unwrap();
    fails_with(
        &[
            &os(&single),
            "--ref".as_ref(),
            &os(&cache),
            "--no-latent-pr".as_ref(),
        ],
        "a covariance needs at least 2",
    );
    // NaN latents
    let nan = dir.path().join("nan");
    rewrite(&cache, &nan, &[], |i, row| {
        if i == 3 {
            row[5] = f32::NAN
        }
    });
    fails_with(&[&os(&nan), "--ref".as_ref(), &os(&cache)], "non-finite");
    // mismatched latent shapes
    let other = dir.path().join("other");
    tiny_cache::write(
        &other,
        &Spec {
            channels: 4,
            ..spec()
        },
    );
    fails_with(
        &[&os(&other), "--ref".as_ref(), &os(&cache)],
        "samples are [16, 4] latents (tokens, channels), the reference [16, 8]",
    );
    // pixel metrics without the network
    let npz = dir.path().join("s.npz");
    let mut z = NpzWriter::create(&npz, 2, 4, 4).unwrap();
    z.push(&[1u8; 48]).unwrap();
    z.push(&[2u8; 48]).unwrap();
    z.finish().unwrap();
    fails_with(
        &[&os(&npz), "--ref".as_ref(), &os(&npz)],
        "inception weights needed: --inception FILE (pytorch-fid pt_inception-2015-12-05-6726825d.pth",
    );
    let missing = dir.path().join("nope.pth");
    fails_with(
        &[
            &os(&npz),
            "--ref".as_ref(),
            &os(&npz),
            "--inception".as_ref(),
            &os(&missing),
        ],
        "nope.pth: no such file",
    );
    // eval-ref that fails leaves no file behind
    let out = dir.path().join("bad.safetensors");
    let r = bin()
        .args([&"eval-ref".into(), &os(&nan), &"--out".into(), &os(&out)])
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(!out.exists());
}

/// A stand-in feature network: per image, 6 channel statistics (pool),
/// 4 (spatial) and 5 logits, all simple functions of the pixels.
pub(crate) struct Toy;

impl ImageFeatures for Toy {
    fn id(&self) -> String {
        "toy".into()
    }
    fn provenance(&self) -> serde_json::Value {
        serde_json::json!({"extractor": "toy"})
    }
    fn extract(&mut self, b: &ImageBatch<'_>) -> Result<FeatureBatch, EvalError> {
        let per = b.height * b.width * 3;
        let mut pool = Vec::new();
        let mut spatial = Vec::new();
        let mut logits = Vec::new();
        for img in b.pixels.chunks_exact(per) {
            let f = toy_features(img);
            pool.extend_from_slice(&f);
            spatial.extend_from_slice(&f[..4]);
            logits.extend(f[..5].iter().map(|x| x / 50.0));
        }
        Ok(FeatureBatch {
            pool: Some(pool),
            spatial: Some(spatial),
            logits: Some(logits),
        })
    }
}

pub(crate) fn toy_features(img: &[u8]) -> Vec<f32> {
    let mut f = vec![0f32; 6];
    for (i, p) in img.iter().enumerate() {
        f[i % 3] += *p as f32;
        f[3 + (i / 3) % 3] += (*p as f32).sqrt();
    }
    let n = (img.len() / 3) as f32;
    f.iter_mut().for_each(|x| *x /= n);
    f
}

pub(crate) fn write_npz(p: &Path, n: usize, seed: u64) -> Vec<Vec<u8>> {
    let (h, w) = (6, 5);
    let mut z = NpzWriter::create(p, n, h, w).unwrap();
    let mut imgs = Vec::new();
    let mut s = seed;
    for _ in 0..n {
        let img: Vec<u8> = (0..h * w * 3)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        z.push(&img).unwrap();
        imgs.push(img);
    }
    z.finish().unwrap();
    imgs
}

fn moments_of(imgs: &[Vec<u8>], f: impl Fn(&[u8]) -> Vec<f32>) -> rae_cache::eval::Gaussian {
    let rows: Vec<f32> = imgs.iter().flat_map(|i| f(i)).collect();
    let mut m = Moments::new(rows.len() / imgs.len());
    m.push("x", &rows).unwrap();
    m.finish("x").unwrap()
}

#[test]
fn pixel_metrics_through_a_feature_network() {
    let dir = tempfile::tempdir().unwrap();
    let (sp, rp) = (dir.path().join("samples.npz"), dir.path().join("ref.npz"));
    let simgs = write_npz(&sp, 30, 1);
    let rimgs = write_npz(&rp, 25, 2);
    let mut toy = Toy;
    let opts = EvalOptions {
        metrics: vec![Metric::Fid, Metric::Sfid, Metric::Is, Metric::Pr],
        is_split: 7,
        batch: 4,
        ..EvalOptions::default()
    };
    let mut nets = Networks {
        inception: Some(&mut toy),
        ..Networks::default()
    };
    let r = evaluate(&sp, &rp, &mut nets, &opts, &mut NoProgress).unwrap();
    let fid = frechet_distance(
        &moments_of(&simgs, toy_features),
        &moments_of(&rimgs, toy_features),
    )
    .unwrap();
    assert!(
        (metric(&r, "fid") - fid).abs() < 1e-9 * fid,
        "{} vs {fid}",
        r["metrics"]
    );
    let sfid = frechet_distance(
        &moments_of(&simgs, |i| toy_features(i)[..4].to_vec()),
        &moments_of(&rimgs, |i| toy_features(i)[..4].to_vec()),
    )
    .unwrap();
    assert!((metric(&r, "sfid") - sfid).abs() < 1e-9 * sfid);
    let logits: Vec<f32> = simgs
        .iter()
        .flat_map(|i| {
            toy_features(i)[..5]
                .iter()
                .map(|x| x / 50.0)
                .collect::<Vec<_>>()
        })
        .collect();
    let is = rae_cache::eval::inception_score(&logits, 5, 7).unwrap();
    assert!((metric(&r, "is") - is.mean).abs() < 1e-12);
    assert_eq!(r["is_splits"].as_array().unwrap().len(), 5); // 30 rows, splits of 7
    assert!(
        r["metrics"]["precision"].as_f64().is_some() && r["metrics"]["recall"].as_f64().is_some()
    );
    assert_eq!(r["counts"]["samples"], 30);

    // an ADM-style reference npz: its precomputed mu/sigma are used as-is
    let adm = dir.path().join("adm.npz");
    let g = moments_of(&rimgs, toy_features);
    let gs = moments_of(&rimgs, |i| toy_features(i)[..4].to_vec());
    {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::fs::File::create(&adm).unwrap());
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, v, shape) in [
            ("mu", &g.mu, vec![6]),
            ("sigma", &g.sigma, vec![6, 6]),
            ("mu_s", &gs.mu, vec![4]),
            ("sigma_s", &gs.sigma, vec![4, 4]),
        ] {
            z.start_file(format!("{name}.npy"), o).unwrap();
            z.write_all(&npy_header("<f8", &shape)).unwrap();
            v.iter()
                .for_each(|x| z.write_all(&x.to_le_bytes()).unwrap());
        }
        z.finish().unwrap();
    }
    let opts = EvalOptions {
        metrics: vec![Metric::Fid, Metric::Sfid],
        ..opts
    };
    let mut toy = Toy;
    let mut nets = Networks {
        inception: Some(&mut toy),
        ..Networks::default()
    };
    let r2 = evaluate(&sp, &adm, &mut nets, &opts, &mut NoProgress).unwrap();
    assert_eq!(r2["ref"]["kind"], "adm-npz");
    assert!((metric(&r2, "fid") - fid).abs() < 1e-9 * fid);
    assert!((metric(&r2, "sfid") - sfid).abs() < 1e-9 * sfid);
}

/// `train --eval-every 2`: a probe line (latent FD, drift) in log.jsonl at
/// steps 2 and 4, and the last probe's samples score the same through
/// `eval` against the cache.
#[test]
fn train_probe_logs_latent_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::common::read_json("ditdh.json");
    let side = model["input_size"].as_u64().unwrap() as usize;
    let sp = Spec {
        images: 16,
        classes: (model["num_classes"].as_u64().unwrap() as usize).min(4),
        tokens: side * side,
        channels: model["in_channels"].as_u64().unwrap() as usize,
        shards: 1,
        ..Spec::default()
    };
    let cache = dir.path().join("cache");
    tiny_cache::write(&cache, &sp);
    let mpath = dir.path().join("ditdh.json");
    std::fs::write(&mpath, model.to_string()).unwrap();
    let run = dir.path().join("run");
    let os = |p: &Path| p.display().to_string();
    run_ok([
        "train",
        "--data",
        &os(&cache),
        "--out",
        &os(&run),
        "--model-config",
        &os(&mpath),
        "--batch-size",
        "4",
        "--steps",
        "4",
        "--ckpt-every",
        "0",
        "--device",
        "cpu",
        "--eval-every",
        "2",
        "--eval-samples",
        "6",
        "--eval-sampler-steps",
        "3",
        "--json",
    ]);
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let probes: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("probe").is_some())
        .collect();
    let steps: Vec<u64> = probes.iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4]);
    // the trainer's own lines are intact around them
    assert_eq!(log.lines().count(), 4 + 2);
    let last = &probes[1]["probe"];
    assert_eq!(last["samples"], 6);
    let fd = last["fd_pooled"].as_f64().unwrap();
    assert!(fd.is_finite() && fd > 0.0, "{last}");
    assert!(last["drift"]["var_ratio_mean"].as_f64().unwrap() > 0.0);
    let r = json(&run_ok([
        "eval",
        &os(&run.join("probe-samples")),
        "--ref",
        &os(&cache),
        "--no-latent-tokens",
        "--no-latent-pr",
        "--json",
    ]));
    let again = metric(&r, "latent_fd_pooled");
    assert!((again - fd).abs() <= 1e-9 * fd, "{again} vs {fd}");
}
