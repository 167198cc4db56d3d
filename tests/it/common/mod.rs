//! The harness shared by the integration tests: the binary under test
//! ([`cli`]), the reference fixtures, tolerances, loopback ports and a tiny
//! latent cache ([`tiny_cache`]).
//!
//! All tests run as threads of one process: nothing here (or in a test)
//! may set environment variables or change the current directory, and
//! every test writes under its own temporary directory.

pub mod cli;
pub mod s3;
pub mod tiny_cache;

pub use cli::{bin, exe, json, run_ok};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{Device, Tensor};

/// The reference fixtures: `$RAE_REF_FIXTURES`, else the copy in the repo.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("RAE_REF_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rae-ref"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// The tensors of a fixture `.safetensors` file, on the CPU.
pub fn io(name: &str) -> HashMap<String, Tensor> {
    io_on(name, &Device::Cpu)
}

/// The tensors of a fixture `.safetensors` file, on `device`.
pub fn io_on(name: &str, device: &Device) -> HashMap<String, Tensor> {
    let p = fixture(name);
    candle_core::safetensors::load(&p, device).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every image of the fixture image folder (`images/`, one sub-folder per
/// class), recursively, in sorted order.
pub fn fixture_images() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if has_ext(&p, &["png", "jpg", "jpeg", "webp"]) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&fixture("images"), &mut out);
    out.sort();
    out
}

/// The first fixture image (sorted order) with one of these extensions
/// (case-insensitive), if any.
pub fn first_fixture_image(exts: &[&str]) -> Option<PathBuf> {
    fixture_images().into_iter().find(|p| has_ext(p, exts))
}

fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

pub fn read_json(name: &str) -> serde_json::Value {
    let p = fixture(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Max abs difference between two tensors of equal shape (as f32).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The device the parity tests run on: `RAE_TEST_DEVICE` (`cpu` by
/// default; `cuda` / `cuda:N` in a build with the `cuda` feature), so a GPU
/// check can run this same test binary.
pub fn test_device() -> candle_core::Device {
    let spec = std::env::var("RAE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    rae_cache::device::parse_device(&spec)
        .unwrap_or_else(|e| panic!("RAE_TEST_DEVICE={spec:?}: {e}"))
}

/// `RAE_TEST_PRECISION` (`f32` by default; `bf16`, `f16`, `auto`).
pub fn test_precision() -> rae_cache::precision::Precision {
    let spec = std::env::var("RAE_TEST_PRECISION").unwrap_or_else(|_| "f32".into());
    spec.parse()
        .unwrap_or_else(|e| panic!("RAE_TEST_PRECISION={spec:?}: {e}"))
}

/// The compute dtype of the parity tests on `device`.
pub fn test_dtype(device: &candle_core::Device) -> candle_core::DType {
    test_precision().resolve(device)
}

/// Bounds for a half-precision forward against the f32 reference. An
/// absolute bound means nothing there (bf16 keeps 8 significant bits, so
/// every rounding is relative), so two scale-free ones: the largest error
/// relative to the largest reference value, and the cosine similarity.
#[derive(Debug, Clone, Copy)]
pub struct HalfTol {
    pub rel_max: f32,
    pub cosine: f32,
}

/// Cosine similarity of two tensors (flattened, f64 sums).
pub fn cosine(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let flat = |t: &candle_core::Tensor| {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb).max(f64::MIN_POSITIVE)) as f32
}

/// Assert `got` is close to the f32 reference `want`: within `f32_abs` max
/// abs error when computed in f32 (the tests' existing bounds), within
/// `half` when computed in bf16/f16. Returns a one-line report.
pub fn assert_close(
    got: &candle_core::Tensor,
    want: &candle_core::Tensor,
    dtype: candle_core::DType,
    f32_abs: f32,
    half: HalfTol,
    what: &str,
) -> String {
    let err = max_abs_diff(got, want);
    let scale = want
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let rel = err / scale.max(f32::MIN_POSITIVE);
    let cos = cosine(got, want);
    let line = format!("{what} [{dtype:?}]: max abs {err:.3e}, rel max {rel:.3e}, cosine {cos:.7}");
    eprintln!("{line}");
    if rae_cache::precision::is_half(dtype) {
        assert!(
            rel <= half.rel_max && cos >= half.cosine,
            "{line}: bound rel max {} / cosine {}",
            half.rel_max,
            half.cosine
        );
    } else {
        assert!(err <= f32_abs, "{line}: bound max abs {f32_abs}");
    }
    line
}

/// A loopback port free right now (for rendezvous in multi-process tests),
/// never one already handed to another test of this process (the tests run
/// in parallel threads; the port is only bound later, by the code under test).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    loop {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

/// Largest absolute value of a tensor (f32).
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A decoder for `tokens x channels` latents with `patch` pixels per token
/// (the rest of the fixture's `decoder.json`), random weights: the paths of
/// its weights and config written under `dir`, and the config.
pub fn random_decoder(
    dir: &Path,
    tokens: usize,
    channels: usize,
    patch: usize,
) -> (PathBuf, PathBuf, rae_cache::models::DecoderConfig) {
    let mut cfg: rae_cache::models::DecoderConfig =
        serde_json::from_value(read_json("decoder.json")).unwrap();
    cfg.latent_dim = channels;
    cfg.num_patches = tokens;
    cfg.patch_size = patch;
    let cfg_path = dir.join("decoder.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu);
    rae_cache::models::RaeDecoder::new(&cfg, vb).unwrap();
    let weights = dir.join("decoder.safetensors");
    vm.save(&weights).unwrap();
    (weights, cfg_path, cfg)
}
