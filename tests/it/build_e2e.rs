//! End-to-end `rae-cache build` on the reference fixture images with the
//! fixture encoder: stored latents against the reference encoder outputs,
//! quantised dtypes within their error, statistics, inspect and verify.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rae_cache::pipeline::build_state as manifest;
use rae_cache::shards::{LatentStats, Manifest, ShardReader};

use crate::common::{self, bin, run_ok};

fn build(out: &Path, dtype: &str) -> serde_json::Value {
    build_with(out, dtype, &[])
}

fn build_with(out: &Path, dtype: &str, extra: &[&str]) -> serde_json::Value {
    let images = common::fixture("images");
    let encoder = common::fixture("encoder-dinov2reg");
    let mut args = vec![
        "build",
        images.to_str().unwrap(),
        "--encoder",
        encoder.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        dtype,
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--rows-per-shard",
        "4",
        "--rows-per-group",
        "3",
        "--threads",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = run_ok(&args);
    serde_json::from_slice(&o.stdout).expect("build --json prints JSON")
}

fn build_log(cache: &Path) -> serde_json::Value {
    let p = cache.join(manifest::BUILD_STATE_FILE);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).unwrap()).expect("build-state.json");
    v["build_log"].clone()
}

#[test]
fn bf16_encoder_build_stays_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    build(&tmp.path().join("f32"), "f32");
    let (_, reference) = read_rows(&tmp.path().join("f32"));
    // `auto` is f32 on the CPU
    assert_eq!(build_log(&tmp.path().join("f32"))["precision"], "f32");
    let dir = tmp.path().join("bf16");
    build_with(&dir, "f32", &["--precision", "bf16", "--tf32"]);
    let log = build_log(&dir);
    assert_eq!(log["precision"], "bf16");
    // --tf32 is a no-op without CUDA
    if cfg!(not(feature = "cuda")) {
        assert_eq!(log["tf32"], false);
    }
    let (_, rows) = read_rows(&dir);
    assert_eq!(rows.len(), reference.len());
    for (key, (_, lats)) in &rows {
        for flip in 0..2 {
            // bound as tests/it/parity_encoders.rs (bf16 encoders)
            let c = cosine(&lats[flip], &reference[key].1[flip]);
            assert!(c >= 0.9995, "{key} flip {flip}: cosine {c}");
        }
    }
}

/// key -> (label, [unflipped latent, flipped latent])
type Rows = BTreeMap<String, (i32, [Vec<f32>; 2])>;

fn read_rows(cache: &Path) -> (Manifest, Rows) {
    let m = Manifest::load(&cache.join(manifest::MANIFEST_FILE)).unwrap();
    let mut rows: Rows = BTreeMap::new();
    for s in &m.shards {
        let r = ShardReader::open(&cache.join(&s.file)).unwrap();
        assert_eq!(r.num_rows(), s.rows);
        for g in 0..r.num_row_groups() {
            let b = r.read_row_group(g).unwrap();
            let per = b.tokens * b.channels;
            for i in 0..b.keys.len() {
                let e = rows
                    .entry(b.keys[i].clone())
                    .or_insert((b.labels[i], [Vec::new(), Vec::new()]));
                assert_eq!(e.0, b.labels[i]);
                e.1[b.flips[i] as usize] = b.latents[i * per..(i + 1) * per].to_vec();
            }
        }
    }
    (m, rows)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn expected() -> (Vec<serde_json::Value>, Vec<String>, Tensor, Tensor) {
    let meta = common::read_json("encoder-expected.json");
    let images = meta["images"].as_array().unwrap().clone();
    let classes: Vec<String> = meta["classes_sorted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let t = common::io("encoder-expected.safetensors");
    (
        images,
        classes,
        t["latents"].clone(),
        t["latents_hflip"].clone(),
    )
}

#[test]
fn f32_build_reproduces_the_reference_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let summary = build(&cache, "f32");
    let (images, classes, lat, lat_flip) = expected();
    let shape = common::read_json("encoder-expected.json")["latent_shape"].clone();
    let (tokens, channels) = (
        shape[0].as_u64().unwrap() as usize,
        shape[1].as_u64().unwrap() as usize,
    );
    assert_eq!(
        summary["images_encoded"].as_u64(),
        Some(images.len() as u64)
    );
    assert_eq!(summary["rows"].as_u64(), Some(2 * images.len() as u64));
    assert_eq!(summary["images_rejected"].as_u64(), Some(0));

    let (m, rows) = read_rows(&cache);
    assert_eq!((m.encoder.tokens, m.encoder.channels), (tokens, channels));
    assert_eq!(m.classes, classes);
    assert_eq!(m.totals.images, images.len() as u64);
    assert_eq!(rows.len(), images.len());
    for (i, img) in images.iter().enumerate() {
        let key = img["path"].as_str().unwrap();
        let (label, lats) = rows
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the shards"));
        let class = img["class"].as_str().unwrap();
        assert_eq!(
            *label as usize,
            classes.iter().position(|c| c == class).unwrap(),
            "{key}"
        );
        for (flip, want) in [(0usize, &lat), (1, &lat_flip)] {
            let want = want
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = &lats[flip];
            assert_eq!(got.len(), tokens * channels, "{key}");
            if img["resized_by_reference"].as_bool().unwrap() {
                let c = cosine(got, &want);
                assert!(c >= 0.999, "{key} flip={flip}: cosine {c}");
            } else {
                let d = max_abs(got, &want);
                assert!(d <= 2e-4, "{key} flip={flip}: max abs {d}");
            }
        }
    }

    // Statistics equal a direct two-pass computation over the stored rows.
    let st = LatentStats::load(&cache.join(manifest::STATS_FILE)).unwrap();
    let n = rows.len() * 2;
    assert_eq!(st.count as usize, n);
    let side = (tokens as f64).sqrt() as usize;
    assert_eq!([st.channels, st.height, st.width], [channels, side, side]);
    let all: Vec<&Vec<f32>> = rows.values().flat_map(|(_, l)| l.iter()).collect();
    let mut worst = 0f64;
    for t in 0..tokens {
        for c in 0..channels {
            let mean = all.iter().map(|r| r[t * channels + c] as f64).sum::<f64>() / n as f64;
            let var = all
                .iter()
                .map(|r| (r[t * channels + c] as f64 - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            let j = c * tokens + t;
            worst = worst.max((st.mean[j] as f64 - mean).abs() / (1.0 + mean.abs()));
            worst = worst.max((st.var[j] as f64 - var).abs() / (1e-6 + var));
        }
    }
    assert!(
        worst < 1e-5,
        "stats differ from a direct computation by {worst}"
    );

    // inspect (cache and one shard) and verify.
    let o = run_ok(["inspect", cache.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["rows"].as_u64(), Some(n as u64));
    assert_eq!(v["classes"].as_u64(), Some(classes.len() as u64));
    assert_eq!(v["dtype"], "f32");
    assert!(v["compression_ratio"].as_f64().unwrap() > 0.5);
    assert!(v["bytes_per_image"].as_f64().unwrap() > 0.0);
    let shard0 = cache.join(&m.shards[0].file);
    let o = run_ok(["inspect", shard0.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["rows"].as_u64(), Some(m.shards[0].rows));

    let o = run_ok(["verify", cache.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["rows_checked"].as_u64(), Some(n as u64));

    // One flipped byte in a shard: verify fails and names the file.
    let target: PathBuf = cache.join(&m.shards[1].file);
    let mut bytes = std::fs::read(&target).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&target, &bytes).unwrap();
    let o = bin()
        .args(["verify", cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success(), "verify accepted a corrupted shard");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(m.shards[1].file.as_str()), "{err}");
}

#[test]
fn quantised_dtypes_stay_within_their_error() {
    let tmp = tempfile::tempdir().unwrap();
    build(&tmp.path().join("f32"), "f32");
    let (_, reference) = read_rows(&tmp.path().join("f32"));
    let channels = common::read_json("encoder-expected.json")["latent_shape"][1]
        .as_u64()
        .unwrap() as usize;
    // Relative to each token's largest magnitude: f16 keeps 11 significant
    // bits, bf16 8, int8 a per-token scale of max/127.
    for (dtype, rel) in [
        ("f16", 1.0 / 2048.0),
        ("bf16", 1.0 / 256.0),
        ("int8", 0.5 / 127.0 + 1e-6),
    ] {
        let dir = tmp.path().join(dtype);
        build(&dir, dtype);
        let (m, rows) = read_rows(&dir);
        assert_eq!(serde_json::to_value(m.dtype).unwrap(), dtype);
        assert_eq!(rows.len(), reference.len());
        for (key, (_, lats)) in &rows {
            for flip in 0..2 {
                let want = &reference[key].1[flip];
                for (t, (g, w)) in lats[flip]
                    .chunks(channels)
                    .zip(want.chunks(channels))
                    .enumerate()
                {
                    let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let d = max_abs(g, w);
                    assert!(
                        d <= scale * rel as f32 * 1.01,
                        "{dtype} {key} flip {flip} token {t}: error {d}, max {scale}"
                    );
                }
            }
        }
    }
}
