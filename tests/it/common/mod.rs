//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod tiny_cache;

use std::path::PathBuf;

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
/// check can run these same test binaries.
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

/// A loopback port free right now (for rendezvous in multi-process tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
