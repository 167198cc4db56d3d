//! Training learns something real, run as a user would: four classes of
//! visibly different synthetic images (made here) -> `build` with the
//! bundled tiny encoder -> `train` a small DiT-DH -> `sample` per class
//! with guidance from the run directory -> the generated latents are
//! classified as their class by a nearest-centroid classifier fitted on
//! the cache's real latents, well above chance (0.25).

use std::path::{Path, PathBuf};

use rae_cache::shards::ShardReader;

use crate::common;

const CLASSES: usize = 4;
const PER_CLASS: usize = 40;
const SIDE: u32 = 64;

/// `common::run_ok` with the time each stage took.
fn run_ok(args: &[&str]) {
    let start = std::time::Instant::now();
    common::run_ok(args);
    eprintln!("{} took {:.1} s", args[0], start.elapsed().as_secs_f64());
}

/// A small deterministic hash for per-image jitter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Class 0: red disc; 1: green square; 2: blue horizontal stripes;
/// 3: yellow diagonal cross. Position, size and background noise vary.
fn image(class: usize, i: usize) -> image::RgbImage {
    let h = mix((class * 1000 + i) as u64);
    let jitter = |k: u32, span: u32| ((h >> (8 * k)) % span as u64) as i32;
    let (cx, cy) = (24 + jitter(0, 16), 24 + jitter(1, 16));
    let r = 12 + jitter(2, 8);
    image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let n = (mix(h ^ (y * SIDE + x) as u64) % 40) as u8;
        let bg = image::Rgb([60 + n, 60 + n, 60 + n]);
        let (dx, dy) = (x as i32 - cx, y as i32 - cy);
        let inside = match class {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= r && dy.abs() <= r,
            2 => (y / 6) % 2 == 0,
            _ => (dx - dy).abs() <= 3 || (dx + dy).abs() <= 3,
        };
        let fg = [[220, 30, 30], [30, 200, 40], [30, 50, 230], [230, 220, 30]][class];
        if inside { image::Rgb(fg) } else { bg }
    })
}

fn write_images(dir: &Path) {
    for c in 0..CLASSES {
        let d = dir.join(format!("class{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..PER_CLASS {
            image(c, i).save(d.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

/// Every row of every shard under `dir/shards`: (label, latent).
fn rows(dir: &Path) -> Vec<(i32, Vec<f32>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let b = ShardReader::open(&f).unwrap().read_all().unwrap();
        let n = b.tokens * b.channels;
        for (i, &l) in b.labels.iter().enumerate() {
            out.push((l, b.latents[i * n..(i + 1) * n].to_vec()));
        }
    }
    out
}

fn dist2(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum()
}

/// Minutes of training: run it with a release build,
/// `cargo test --release --test it learning:: -- --ignored --nocapture`
/// (about 2 minutes on 2 cores; 0.635 class accuracy on 2026-12-03).
#[test]
#[ignore = "a 1,000-step training run: cargo test --release --test it learning:: -- --ignored"]
fn generated_latents_have_their_class() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s = |p: &Path| p.display().to_string();
    let images = t.join("images");
    write_images(&images);
    let cache = t.join("cache");
    common::cli::build_fixture_cache(&images, &cache, &["--device", "cpu"]);
    let real = rows(&cache);
    assert_eq!(real.len(), 2 * CLASSES * PER_CLASS);
    let dim = real[0].1.len();
    let channels = dim / 256;

    // A small DiT-DH (patch 2 over the 16x16 token grid).
    let model = t.join("model.json");
    let cfg = serde_json::json!({
        "input_size": 16, "patch_size": 2, "in_channels": channels,
        "hidden_size": [64, 96], "depth": [2, 1], "num_heads": [4, 6],
        "num_classes": CLASSES,
    });
    std::fs::write(&model, cfg.to_string()).unwrap();
    let run = t.join("run");
    run_ok(&[
        "train",
        "--data",
        &s(&cache),
        "--out",
        &s(&run),
        "--model-config",
        &s(&model),
        "--batch-size",
        "16",
        "--lr",
        "2e-3",
        "--steps",
        "1000",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--json",
    ]);

    // The run directory names its newest checkpoint and its model; a short
    // run samples from the raw weights (the EMA is still mostly the init).
    let samples = t.join("samples");
    let per_class = 24;
    let num = (CLASSES * per_class).to_string();
    run_ok(&[
        "sample",
        "--model",
        &s(&run),
        "--out",
        &s(&samples),
        "--labels",
        "all",
        "--num",
        &num,
        "--steps",
        "26",
        "--cfg-scale",
        "4.0",
        "--stats",
        &s(&cache.join("stats.safetensors")),
        "--seed",
        "5",
        "--device",
        "cpu",
        "--json",
    ]);
    let generated = rows(&samples);
    assert_eq!(generated.len(), CLASSES * per_class);

    let mut centroids = vec![vec![0f64; dim]; CLASSES];
    let mut counts = vec![0usize; CLASSES];
    for (l, x) in &real {
        counts[*l as usize] += 1;
        for (c, v) in centroids[*l as usize].iter_mut().zip(x) {
            *c += *v as f64;
        }
    }
    for (c, n) in centroids.iter_mut().zip(&counts) {
        c.iter_mut().for_each(|v| *v /= *n as f64);
    }
    let classify = |x: &[f32]| {
        (0..CLASSES)
            .min_by(|&a, &b| dist2(x, &centroids[a]).total_cmp(&dist2(x, &centroids[b])))
            .unwrap()
    };
    // The classifier itself works on the real latents.
    let real_acc = real
        .iter()
        .filter(|(l, x)| classify(x) == *l as usize)
        .count() as f64
        / real.len() as f64;
    assert!(
        real_acc > 0.95,
        "nearest centroid on real latents: {real_acc}"
    );
    let hits = generated
        .iter()
        .filter(|(l, x)| classify(x) == *l as usize)
        .count();
    let acc = hits as f64 / generated.len() as f64;
    eprintln!("class accuracy of generated latents: {acc:.3} (chance 0.25)");
    assert!(
        acc >= 0.6,
        "generated latents classified as their class: {acc:.3}"
    );
}
