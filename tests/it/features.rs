//! Feature networks of the evaluation metrics against their references
//! (fixtures from scripts/make_feature_fixtures.py): the FID Inception vs
//! pytorch-fid's FID Inception (formula weights, see
//! `features/inception-weights.json`), the TF1 bilinear resize vs a numpy
//! transcription, the torch.save readers, FD-DINOv2 vs
//! facebookresearch/dinov2's hub model (small random config).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rae_cache::features::{Dinov2Fd, FeatureError, InceptionV3, read_weights, tf1_resize_bilinear};

use crate::common::{fixture, io, max_abs_diff, read_json, test_device};

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fixture's weight formula: `offset + scale * (2u - 1)` in f32 with
/// `u` the top 24 bits of `splitmix64(fnv1a64(name) ^ seed + i)` / 2^24.
fn formula(name: &str, n: usize, offset: f32, scale: f32, seed: u64) -> Vec<f32> {
    let base = fnv1a64(name) ^ seed;
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(base.wrapping_add(i)) >> 40) as f32 / (1u32 << 24) as f32;
            offset + scale * (2.0 * u - 1.0)
        })
        .collect()
}

/// The random Inception state dict described by inception-weights.json.
pub(crate) fn inception_weights() -> HashMap<String, Tensor> {
    let spec = read_json("features/inception-weights.json");
    let seed = spec["seed"].as_u64().unwrap();
    spec["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let name = t["name"].as_str().unwrap();
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let n = shape.iter().product();
            let off = t["offset"].as_f64().unwrap() as f32;
            let sc = t["scale"].as_f64().unwrap() as f32;
            let v = formula(name, n, off, sc, seed);
            (
                name.to_string(),
                Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
            )
        })
        .collect()
}

/// max |a - b| / max(1, |b|): absolute near zero, relative for large values.
fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

#[test]
fn tf1_resize_matches_numpy_transcription() {
    let cases = io("features/tf1-resize.safetensors");
    let mut names: Vec<_> = cases
        .keys()
        .filter_map(|k| k.strip_suffix(".input"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for c in names {
        let x = &cases[&format!("{c}.input")];
        let want = &cases[&format!("{c}.output")];
        let (_, _, oh, ow) = want.dims4().unwrap();
        let got = tf1_resize_bilinear(x, oh, ow).unwrap();
        let d = max_abs_diff(&got, want);
        println!(
            "tf1 resize {c} {:?} -> {:?}: max abs {d:e}",
            x.dims(),
            want.dims()
        );
        assert!(d <= 1e-4, "{c}: {d}");
    }
}

#[test]
fn torch_save_zip_and_legacy_read_alike() {
    let want = io("features/pth-expected.safetensors");
    for file in ["features/pth-zip.pth", "features/pth-legacy.pth"] {
        let got = read_weights(&fixture(file)).unwrap();
        for (k, w) in &want {
            let g = got.get(k).unwrap_or_else(|| panic!("{file}: {k} missing"));
            assert_eq!(g.dtype(), w.dtype(), "{file}: {k}");
            let d = max_abs_diff(g, w);
            assert_eq!(d, 0.0, "{file}: {k} differs by {d}");
        }
        let steps = got["Conv2d_1a_3x3.bn.num_batches_tracked"]
            .to_dtype(DType::I64)
            .unwrap()
            .to_scalar::<i64>()
            .unwrap();
        assert_eq!(steps, 7, "{file}");
    }
}

#[test]
fn inception_matches_pytorch_fid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inception.safetensors");
    candle_core::safetensors::save(&inception_weights(), &path).unwrap();
    // RAE_TEST_DEVICE=cuda runs the device path (candle's conv/pool ops).
    let net = InceptionV3::load(&path, &test_device()).unwrap();
    let want = io("features/inception-io.safetensors");
    let images = want["images"].to_dtype(DType::F32).unwrap();
    let t = std::time::Instant::now();
    let out = net.forward(&images).unwrap();
    println!("inception forward {:?}: {:.2?}", images.dims(), t.elapsed());
    for (name, got) in [
        ("pool", &out.pool),
        ("spatial", &out.spatial),
        ("logits", &out.logits),
    ] {
        let w = &want[name];
        let got = &got.to_device(&Device::Cpu).unwrap();
        let (abs, rel) = (max_abs_diff(got, w), max_rel(got, w));
        println!(
            "inception {name} {:?}: max abs {abs:e}, max rel {rel:e}",
            w.dims()
        );
        assert!(rel <= 1e-4, "{name}: max rel error {rel} (abs {abs})");
    }
    // Features do not depend on the batch: one image alone gives its row.
    let one = net.forward(&images.narrow(0, 1, 1).unwrap()).unwrap();
    let row = out.pool.narrow(0, 1, 1).unwrap();
    assert_eq!(
        max_abs_diff(&one.pool, &row),
        0.0,
        "batch-dependent features"
    );
}

/// The whole random Inception as `torch.save` files (zip and legacy), made
/// by `scripts/make_feature_fixtures.py --full-pth DIR` (95 MB each, so not
/// committed): `RAE_INCEPTION_PTH_DIR=DIR cargo test --test it
/// features::inception_from_pth -- --ignored`.
#[test]
#[ignore]
fn inception_from_pth() {
    let dir = std::env::var("RAE_INCEPTION_PTH_DIR").expect("set RAE_INCEPTION_PTH_DIR");
    let want = io("features/inception-io.safetensors");
    let images = want["images"].to_dtype(DType::F32).unwrap();
    for file in ["inception-zip.pth", "inception-legacy.pth"] {
        let net = InceptionV3::load(&Path::new(&dir).join(file), &Device::Cpu).unwrap();
        let out = net.forward(&images).unwrap();
        let rel = max_rel(&out.pool, &want["pool"]);
        println!("{file}: pool max rel {rel:e}");
        assert!(rel <= 1e-4, "{file}: {rel}");
    }
}

#[test]
fn inception_rejects_wrong_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = inception_weights();
    w.remove("Mixed_6d.branch1x1.bn.running_var");
    let path = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&w, &path).unwrap();
    let e = InceptionV3::load(&path, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains("Mixed_6d.branch1x1.bn.running_var"),
        "{e}"
    );

    let garbage = dir.path().join("pt_inception.pth");
    std::fs::write(&garbage, b"not a checkpoint at all").unwrap();
    let e = InceptionV3::load(&garbage, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("pt_inception.pth") && e.contains("not a safetensors"),
        "{e}"
    );

    let missing = dir.path().join("absent.pth");
    let e = InceptionV3::load(&missing, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("absent.pth") && e.contains("pytorch-fid"), "{e}");

    let net_err = |shape: &[usize]| {
        let x = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        matches!(
            InceptionV3::from_tensors(&inception_weights(), Path::new("w"), &Device::Cpu)
                .unwrap()
                .forward(&x),
            Err(FeatureError::Input(_))
        )
    };
    assert!(net_err(&[1, 1, 32, 32]) && net_err(&[0, 3, 32, 32]));
}

#[test]
fn fd_dinov2_matches_hub_model() {
    let dir = fixture("features/dinov2-small");
    let net = Dinov2Fd::load(dir.to_str().unwrap(), &test_device()).unwrap();
    let want = io("features/fd-dinov2-io.safetensors");
    let images = want["images"].to_dtype(DType::F32).unwrap();

    // The PIL resize step alone: byte-exact.
    let resized = rae_cache::features::dinov2_fd::pil_bicubic(&images, 224).unwrap();
    let d = max_abs_diff(&resized, &want["resized"].to_dtype(DType::F32).unwrap());
    assert_eq!(d, 0.0, "PIL bicubic resize differs by {d}");

    let got = net
        .forward(&images)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let w = &want["features"];
    let d = max_abs_diff(&got, w);
    let d_hf = max_abs_diff(&got, &want["features_hf_pos"]);
    println!(
        "fd-dinov2 {:?}: max abs {d:e} (vs HF-style position resize: {d_hf:e})",
        w.dims()
    );
    assert_eq!(net.dim(), w.dim(1).unwrap());
    assert!(d <= 1e-4, "CLS features differ by {d}");
}

/// CPU seconds used by this process so far (user + system, all threads),
/// from /proc/self/stat (Linux; clock ticks at 100 Hz): on a shared
/// machine throughput per CPU-second is steadier than per wall second.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3,
    // utime/stime are fields 14/15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Wall and CPU seconds (medians) of `iters` runs of `f` after one warm-up.
fn time_runs(iters: usize, f: impl Fn()) -> (f64, f64) {
    f();
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..iters {
        let (t, c) = (std::time::Instant::now(), cpu_secs());
        f();
        wall.push(t.elapsed().as_secs_f64());
        cpu.push(cpu_secs() - c);
    }
    wall.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    (wall[wall.len() / 2], cpu[cpu.len() / 2])
}

/// Throughput at batch 50 on 256x256 inputs (resize included), f32 on the
/// CPU, beside `scripts/feature_ref_bench.py` in the same sitting:
/// `RAYON_NUM_THREADS=2 cargo test --test it features::throughput -- --ignored --nocapture`
/// (`FEATURE_BENCH_BATCH` / `FEATURE_BENCH_ITERS` change the batch and runs).
#[test]
#[ignore]
fn throughput_inception() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (batch, iters) = (
        env("FEATURE_BENCH_BATCH", 50),
        env("FEATURE_BENCH_ITERS", 3),
    );
    let net = InceptionV3::from_tensors(&inception_weights(), Path::new("formula"), &Device::Cpu)
        .unwrap();
    let x = (Tensor::rand(0f32, 255f32, (batch, 3, 256, 256), &Device::Cpu).unwrap())
        .round()
        .unwrap();
    let (s, cpu) = time_runs(iters, || {
        net.forward(&x).unwrap();
    });
    println!(
        "{{\"workload\": \"inception\", \"impl\": \"rae-cache\", \"batch\": {batch}, \"seconds\": {s:.3}, \"images_per_s\": {:.2}, \"cpu_seconds\": {cpu:.2}, \"images_per_cpu_s\": {:.3}}}",
        batch as f64 / s,
        batch as f64 / cpu
    );
}

/// FD-DINOv2 throughput: ViT-L/14 (random weights in HF `Dinov2Model`
/// layout) on 256x256 inputs (PIL resize to 224 included), f32 CPU, batch
/// `FEATURE_BENCH_BATCH` (default 8), beside `scripts/feature_ref_bench.py
/// --what fd-dinov2`:
/// `RAYON_NUM_THREADS=2 cargo test --release --test it features::throughput_fd -- --ignored --nocapture`
#[test]
#[ignore]
fn throughput_fd_dinov2() {
    use crate::bench_support::{Dinov2Shape, write_random_dinov2};
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (batch, iters) = (env("FEATURE_BENCH_BATCH", 8), env("FEATURE_BENCH_ITERS", 3));
    let dir = tempfile::tempdir().unwrap();
    let large = Dinov2Shape {
        hidden: 1024,
        layers: 24,
        heads: 16,
        registers: 0,
        ..Dinov2Shape::BASE
    };
    write_random_dinov2(dir.path(), &large, 0).unwrap();
    // The writer makes a registers model (with 0 registers); FD-DINOv2
    // takes plain DINOv2: relabel the config.
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = "dinov2".into();
    cfg["architectures"] = serde_json::json!(["Dinov2Model"]);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let net = Dinov2Fd::load(dir.path().to_str().unwrap(), &Device::Cpu).unwrap();
    let x = Tensor::rand(0f32, 255f32, (batch, 3, 256, 256), &Device::Cpu)
        .unwrap()
        .round()
        .unwrap();
    let (s, cpu) = time_runs(iters, || {
        net.forward(&x).unwrap();
    });
    println!(
        "{{\"workload\": \"fd-dinov2\", \"impl\": \"rae-cache\", \"batch\": {batch}, \"seconds\": {s:.3}, \"images_per_s\": {:.2}, \"cpu_seconds\": {cpu:.2}, \"images_per_cpu_s\": {:.3}}}",
        batch as f64 / s,
        batch as f64 / cpu
    );
}

/// `rae-cache eval` with the real Inception wired in (formula weights as a
/// safetensors file): a set against itself gives FID ~0 and the protocol
/// records the weights' sha256; against another set a positive FID; IS is
/// finite and at least 1.
#[test]
fn eval_cli_runs_the_inception() {
    use rae_cache::generate::npz::NpzWriter;
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("inception.safetensors");
    candle_core::safetensors::save(&inception_weights(), &w).unwrap();
    let write = |name: &str, seed: u64| {
        let p = dir.path().join(name);
        let (n, h, wd) = (4, 20, 24);
        let mut z = NpzWriter::create(&p, n, h, wd).unwrap();
        let mut s = seed;
        for _ in 0..n {
            let img: Vec<u8> = (0..h * wd * 3)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (s >> 56) as u8
                })
                .collect();
            z.push(&img).unwrap();
        }
        z.finish().unwrap();
        p
    };
    let (a, b) = (write("a.npz", 1), write("b.npz", 2));
    let eval = |s: &Path, r: &Path| {
        crate::common::cli::json(&crate::common::cli::run_ok(&[
            "eval".as_ref(),
            s.as_os_str(),
            "--ref".as_ref(),
            r.as_os_str(),
            "--inception".as_ref(),
            w.as_os_str(),
            "--metrics".as_ref(),
            "fid,is".as_ref(),
            "--is-split".as_ref(),
            "2".as_ref(),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--json".as_ref(),
        ]))
    };
    let same = eval(&a, &a);
    let fid = same["metrics"]["fid"].as_f64().unwrap();
    let other = eval(&a, &b)["metrics"]["fid"].as_f64().unwrap();
    assert!(other > 1e-3, "FID of two different sets: {other}");
    // 4 images in 2048 dims: rank-3 covariances, so "zero" is zero to the
    // rounding of traces much larger than the distances.
    assert!(
        fid.abs() < 1e-4 * other,
        "FID of a set with itself: {fid} (other {other})"
    );
    let sha = rae_cache::fsutil::sha256_file(&w).unwrap();
    assert_eq!(same["protocol"]["inception"]["sha256"], sha.as_str());
    let is = same["metrics"]["is"].as_f64().unwrap();
    assert!(is.is_finite() && is >= 1.0 - 1e-9, "IS {is}");
}
