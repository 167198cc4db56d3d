//! FD, Inception Score, precision/recall, PSNR and SSIM against the numpy /
//! scipy transcription of the ADM evaluator (scripts/make_eval_fixtures.py,
//! tests/fixtures/eval/).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use rae_cache::eval::manifold::{Prepared, manifold_radii};
use rae_cache::eval::recon::SsimBorder;
use rae_cache::eval::{Distance, Moments, PrOptions, frechet_distance, inception_score};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval")
}

fn tensors() -> HashMap<String, Tensor> {
    let p = dir().join("eval.safetensors");
    candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn expected() -> serde_json::Value {
    let p = dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// (rows, dim, row-major f32) of a 2-D fixture tensor.
fn rows(t: &HashMap<String, Tensor>, name: &str) -> (usize, usize, Vec<f32>) {
    let x = &t[name];
    let (r, d) = x.dims2().unwrap();
    let v = x
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (r, d, v)
}

fn gaussian(t: &HashMap<String, Tensor>, name: &str) -> rae_cache::eval::Gaussian {
    let (_, d, v) = rows(t, name);
    let mut m = Moments::new(d);
    // uneven batches: the result must not depend on them
    for c in v.chunks(d * 37) {
        m.push(name, c).unwrap();
    }
    m.finish(name).unwrap()
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn frechet_distance_matches_scipy_sqrtm() {
    let (t, e) = (tensors(), expected());
    let (a, b, small) = (
        gaussian(&t, "fd.a"),
        gaussian(&t, "fd.b"),
        gaussian(&t, "fd.small"),
    );
    // moments against np.mean / np.cov in f64
    let mu: Vec<f64> = t["fd.mu_a"].to_vec1().unwrap();
    let sigma: Vec<f64> = t["fd.sigma_a"].flatten_all().unwrap().to_vec1().unwrap();
    let err = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f64, f64::max)
    };
    assert!(err(&a.mu, &mu) < 1e-12, "mean {}", err(&a.mu, &mu));
    assert!(
        err(&a.sigma, &sigma) < 1e-12,
        "cov {}",
        err(&a.sigma, &sigma)
    );
    for (key, x, y) in [("a_b", &a, &b), ("b_a", &b, &a)] {
        let want = num(&e["fd"][key]);
        let got = frechet_distance(x, y).unwrap();
        let rel = (got - want).abs() / want.abs();
        eprintln!("FD {key}: {got} vs scipy {want} (rel {rel:.2e})");
        assert!(rel < 1e-6, "FD {key}: {got} vs {want}");
    }
    let self_fd = frechet_distance(&a, &a).unwrap();
    assert!(self_fd.abs() < 1e-9, "FD(a, a) = {self_fd}");
    // n < d: a singular covariance; sqrtm is less accurate there, 1e-6 still holds
    let want = num(&e["fd"]["a_small"]);
    let got = frechet_distance(&a, &small).unwrap();
    eprintln!("FD a_small: {got} vs scipy {want}");
    assert!((got - want).abs() / want < 1e-6, "{got} vs {want}");
}

#[test]
fn inception_score_matches_adm() {
    let (t, e) = (tensors(), expected());
    let (_, classes, logits) = rows(&t, "is.logits");
    let split = e["is"]["split_size"].as_u64().unwrap() as usize;
    let got = inception_score(&logits, classes, split).unwrap();
    let want64 = num(&e["is"]["f64"]);
    let want_adm = num(&e["is"]["adm_f32"]);
    eprintln!("IS {} vs f64 oracle {want64}, ADM f32 {want_adm}", got.mean);
    assert!((got.mean - want64).abs() / want64 < 1e-10);
    assert!((got.mean - want_adm).abs() / want_adm < 1e-5);
    let splits = e["is"]["splits_f64"].as_array().unwrap();
    assert_eq!(got.splits.len(), splits.len());
    for (g, w) in got.splits.iter().zip(splits) {
        assert!((g - num(w)).abs() / num(w) < 1e-10);
    }
}

fn check_pr(t: &HashMap<String, Tensor>, e: &serde_json::Value, set: &str, mode: Distance) {
    let (real_name, fake_name) = match set {
        "quant" => ("pr.real".to_string(), "pr.fake".to_string()),
        s => (format!("pr.real_{s}"), format!("pr.fake_{s}")),
    };
    let (_, d, real) = rows(t, &real_name);
    let (_, d2, fake) = rows(t, &fake_name);
    assert_eq!(d, d2);
    let m = match mode {
        Distance::AdmF16 => "f16",
        Distance::F32 => "f32",
    };
    let key = format!("{set}_{m}");
    let opts = PrOptions {
        k: e["pr"]["k"].as_u64().unwrap() as usize,
        block: e["pr"]["block"].as_u64().unwrap() as usize,
        distance: mode,
    };
    let got = rae_cache::eval::precision_recall(&real, &fake, d, &opts).unwrap();
    let want = &e["pr"][&key];
    eprintln!(
        "P/R {key}: {:.6} {:.6} (fallback tiles {}) vs {want}",
        got.precision, got.recall, got.fallback_tiles
    );
    // radii: the f16 values exactly (quantised sets) or up to rare
    // summation-order flips (continuous set)
    let radii = manifold_radii(&Prepared::new("r", &real, d).unwrap(), &opts)
        .unwrap()
        .0;
    let want_r: Vec<f32> = t[&format!("pr.{key}.radii_real")].to_vec1().unwrap();
    let differ = radii.iter().zip(&want_r).filter(|(a, b)| a != b).count();
    let exact = set != "cont";
    if exact {
        assert_eq!(differ, 0, "{key}: {differ} radii differ");
        assert_eq!(got.precision, num(&want["precision"]), "{key} precision");
        assert_eq!(got.recall, num(&want["recall"]), "{key} recall");
        assert_eq!(
            got.fallback_tiles as u64,
            want["fallback_tiles"].as_u64().unwrap()
        );
    } else {
        if mode == Distance::F32 {
            // plain f32 sums: the order differs from numpy's, ulps apart
            let rel = radii
                .iter()
                .zip(&want_r)
                .map(|(a, b)| ((a - b) / b).abs())
                .fold(0f32, f32::max);
            assert!(rel < 1e-5, "{key}: radii rel err {rel}");
        } else {
            assert!(differ <= 2, "{key}: {differ} radii differ");
        }
        assert!((got.precision - num(&want["precision"])).abs() <= 2.0 / got.fake as f64);
        assert!((got.recall - num(&want["recall"])).abs() <= 2.0 / got.real as f64);
    }
}

#[test]
fn precision_recall_matches_adm_manifold_estimator() {
    let (t, e) = (tensors(), expected());
    for set in ["quant", "big", "cont"] {
        for mode in [Distance::AdmF16, Distance::F32] {
            check_pr(&t, &e, set, mode);
        }
    }
    // ADM's own block size: one tile
    let (_, d, real) = rows(&t, "pr.real");
    let (_, _, fake) = rows(&t, "pr.fake");
    let got = rae_cache::eval::precision_recall(&real, &fake, d, &PrOptions::default()).unwrap();
    let want = &e["pr"]["quant_f16_block10000"];
    assert_eq!(got.precision, num(&want["precision"]));
    assert_eq!(got.recall, num(&want["recall"]));
}

#[test]
fn precision_recall_bad_inputs() {
    let opts = PrOptions::default();
    let few = vec![0f32; 3 * 2];
    let many = vec![1f32; 10 * 2];
    let err = rae_cache::eval::precision_recall(&few, &many, 2, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 4"), "{err}");
    let mut nan = many.clone();
    nan[5] = f32::NAN;
    let err = rae_cache::eval::precision_recall(&many, &nan, 2, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite") && err.contains("row 2"), "{err}");
    assert!(rae_cache::eval::precision_recall(&many, &many[..9], 2, &opts).is_err());
}

#[test]
fn psnr_and_ssim_match_the_numpy_oracle() {
    let (t, e) = (tensors(), expected());
    let x = &t["rec.x"];
    let (n, c, h, w) = x.dims4().unwrap();
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let yv: Vec<f32> = t["rec.y"].flatten_all().unwrap().to_vec1().unwrap();
    let p = rae_cache::eval::recon::psnr(&xv, &yv, n).unwrap();
    assert!(
        (p - num(&e["rec"]["psnr"])).abs() < 1e-9,
        "PSNR {p} vs {}",
        e["rec"]["psnr"]
    );
    for (border, key) in [
        (SsimBorder::Full, "ssim_per_image"),
        (SsimBorder::Valid, "ssim_valid_per_image"),
    ] {
        let s = rae_cache::eval::recon::ssim_per_image(&xv, &yv, n, (c, h, w), border).unwrap();
        eprintln!("SSIM {border:?} {s:?} vs {}", e["rec"][key]);
        for (g, want) in s.iter().zip(e["rec"][key].as_array().unwrap()) {
            assert!((g - num(want)).abs() < 1e-9, "{g} vs {want}");
        }
    }
    let mean = rae_cache::eval::recon::ssim(&xv, &yv, n, (c, h, w), SsimBorder::Full).unwrap();
    assert!((mean - num(&e["rec"]["ssim"])).abs() < 1e-9);
    assert!(rae_cache::eval::recon::ssim(&xv, &yv[1..], n, (c, h, w), SsimBorder::Full).is_err());
}
