//! `eval-recon`: the reconstruction metrics against the reference code
//! (fixtures from scripts/make_recon_fixtures.py: RAE's `ref_iqa.py` PSNR /
//! SSIM / LPIPS, an rFID from pytorch-fid's Inception and ADM's FD), and the
//! command end to end with the tiny bundled encoder and a small decoder: a
//! cache (both flips) and an image folder round trip, each against PSNRs
//! computed here from `decode`'s PNGs and the crops.

use std::path::Path;

use candle_core::Device;
use rae_cache::eval::features::ImageBatch;
use rae_cache::eval::networks::InceptionFeatures;
use rae_cache::eval::recon_run::{ReconAccumulator, ReconMetric, ReconNets};
use rae_cache::stage1::Lpips;

use crate::common::{fixture, fixtures_dir, io, json, read_json, run_ok};

fn bytes(t: &candle_core::Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn recon_metrics_match_the_reference() {
    let fx = io("../eval/recon.safetensors");
    let want = read_json("../eval/recon.json");
    let m = &want["means"];
    let (n, h, w, _) = fx["original"].dims4().unwrap();
    let (orig, recon) = (bytes(&fx["original"]), bytes(&fx["recon"]));
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("inception.safetensors");
    candle_core::safetensors::save(&super::features::inception_weights(), &weights).unwrap();
    let mut inception = InceptionFeatures::load(&weights, &Device::Cpu).unwrap();
    let d = fixtures_dir();
    let lpips = Lpips::load(
        &d.join(want["lpips"]["vgg"].as_str().unwrap()),
        &d.join(want["lpips"]["lin"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    let mut nets = ReconNets {
        inception: Some(&mut inception),
        lpips: Some((&lpips, Device::Cpu)),
    };
    let all = [
        ReconMetric::Psnr,
        ReconMetric::Ssim,
        ReconMetric::Lpips,
        ReconMetric::Rfid,
    ];
    let mut acc = ReconAccumulator::new(&all);
    // two batches of unequal size: the means are over images
    let per = h * w * 3;
    let split = n * 2 / 3;
    for (a, b) in [(0, split), (split, n)] {
        let (x, y) = (&orig[a * per..b * per], &recon[a * per..b * per]);
        let (x, y) = (
            ImageBatch {
                pixels: x,
                n: b - a,
                height: h,
                width: w,
            },
            ImageBatch {
                pixels: y,
                n: b - a,
                height: h,
                width: w,
            },
        );
        acc.push(&x, &y, &mut nets).unwrap();
    }
    let r = acc.finish().unwrap();
    assert_eq!(r.images, n);
    let got = |v: Option<f64>| v.unwrap();
    let f = |k: &str| m[k].as_f64().unwrap();
    let checks = [
        // (name, ours, reference, tolerance)
        // pixels go through f32 x / 255 as torchvision's to_tensor: 1e-7 off f64
        ("psnr vs f64 formula", got(r.psnr), f("psnr_f64"), 1e-6),
        ("psnr vs RAE (f32)", got(r.psnr), f("psnr"), 1e-4),
        (
            "ssim vs torchmetrics (f64)",
            got(r.ssim),
            f("ssim_f64"),
            1e-8,
        ),
        (
            "ssim vs RAE/torchmetrics (f32)",
            got(r.ssim),
            f("ssim"),
            1e-5,
        ),
        ("lpips vs RAE LPIPS (f32)", got(r.lpips), f("lpips"), 1e-7),
        (
            "rfid vs pytorch-fid + ADM FD",
            got(r.rfid),
            f("rfid"),
            1e-4 * f("rfid"),
        ),
    ];
    for (name, ours, reference, tol) in checks {
        let d = (ours - reference).abs();
        println!("{name}: ours {ours} reference {reference} |diff| {d:e}");
        assert!(
            d <= tol,
            "{name}: {ours} vs {reference} (tolerance {tol:e})"
        );
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn mean_psnr(pairs: &[(Vec<u8>, Vec<u8>)]) -> f64 {
    let v: Vec<f64> = pairs
        .iter()
        .map(|(a, b)| {
            let mse = a
                .iter()
                .zip(b)
                .map(|(x, y)| ((*x as f64 - *y as f64) / 255.0).powi(2))
                .sum::<f64>()
                / a.len() as f64;
            -10.0 * mse.max(1e-10).log10()
        })
        .collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn eval_recon_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let images = fixture("images");
    let encoder = fixture("encoder-dinov2reg");
    crate::common::cli::build_fixture_cache(&images, &cache, &["--dtype", "f32"]);
    let shards = rae_cache::generate::resolve_shards(&cache).unwrap();
    let first = rae_cache::shards::ShardReader::open(&shards[0]).unwrap();
    // images of the crop size, so they compare with the crops
    let (t, c) = (first.tokens(), first.channels());
    let patch = rae_cache::encoders::CROP_SIZE / (t as f64).sqrt() as usize;
    let (weights, cfg, _) = crate::common::random_decoder(tmp.path(), t, c, patch);
    let (weights, cfg) = (s(&weights), s(&cfg));
    let dec = ["--decoder", &weights, "--decoder-config", &cfg];
    let common = ["--device", "cpu", "--batch-size", "4", "--json"];
    let lp = fixtures_dir().join("stage1-gen");
    let (vgg, lin) = (
        s(&lp.join("vgg16-small.pth")),
        s(&lp.join("lpips-lin-small.pth")),
    );
    let lpips = [
        "--metrics",
        "psnr,ssim,lpips",
        "--lpips-vgg",
        &vgg,
        "--lpips-lin",
        &lin,
    ];
    let eval = |input: &Path, extra: &[&str]| {
        let mut a = vec!["eval-recon", &s(input)]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        for x in dec.iter().chain(&common).chain(&lpips).chain(extra) {
            a.push(x.to_string());
        }
        json(&run_ok(&a))
    };
    let from_cache = eval(&cache, &[]);
    let from_images = eval(&images, &["--encoder", &s(&encoder)]);
    assert_eq!(from_cache["input"]["kind"], "cache");
    assert_eq!(from_images["input"]["kind"], "round-trip");

    // the same pairs, by hand: decode's PNGs against the ADM crops
    let png = tmp.path().join("png");
    let mut a: Vec<String> = vec!["decode".into(), s(&cache), "--out".into(), s(&png)];
    a.extend(dec.iter().map(|x| x.to_string()));
    a.extend(["--device".into(), "cpu".into()]);
    run_ok(&a);
    let side = rae_cache::encoders::CROP_SIZE as u32;
    let (mut all, mut unflipped) = (Vec::new(), Vec::new());
    for e in rae_cache::images::discover(&images).unwrap().entries {
        let crop = rae_cache::images::load_crop(&e.path, side, &Default::default()).unwrap();
        let stem = rae_cache::generate::pixels::image_stem(&png, &e.key, false);
        let read = |p: std::path::PathBuf| image::open(p).unwrap().to_rgb8().into_raw();
        let rec = read(stem.with_extension("png"));
        let rec_flip = read(stem.with_file_name(format!(
            "{}_flip.png",
            stem.file_name().unwrap().to_string_lossy()
        )));
        let mirrored = image::imageops::flip_horizontal(&crop).into_raw();
        unflipped.push((crop.clone().into_raw(), rec.clone()));
        all.push((crop.into_raw(), rec));
        all.push((mirrored, rec_flip));
    }
    let n = unflipped.len();
    assert_eq!(from_cache["counts"]["samples"], 2 * n as u64);
    assert_eq!(from_images["counts"]["samples"], n as u64);
    let want_cache = mean_psnr(&all);
    let want_images = mean_psnr(&unflipped);
    let got = |r: &serde_json::Value, k: &str| r["metrics"][k].as_f64().unwrap();
    println!(
        "psnr cache {} (by hand {want_cache}), round trip {} (by hand {want_images})",
        got(&from_cache, "psnr"),
        got(&from_images, "psnr")
    );
    // (by hand in f64; the tool divides by 255 in f32 as torchvision does)
    assert!((got(&from_cache, "psnr") - want_cache).abs() < 1e-5);
    // the round trip re-encodes at f32 as build did: the same latents up to
    // batch-composition rounding, hence the same images up to a few bytes
    assert!((got(&from_images, "psnr") - want_images).abs() < 1e-3);
    for k in ["ssim", "lpips"] {
        let v = got(&from_cache, k);
        assert!(v.is_finite() && v > 0.0, "{k}: {v}");
    }
    // an image folder without --encoder: a clear error
    let out = crate::common::bin()
        .args([
            "eval-recon",
            &s(&images),
            "--decoder",
            &weights,
            "--decoder-config",
            &cfg,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --encoder"));
}
