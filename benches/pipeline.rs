//! Whole-build throughput against the encoder alone on the same images:
//! the pipeline's overhead (decode, crop, reorder, quantise, compress,
//! write, statistics) that is not hidden behind encoding.
//!
//! `cargo bench --bench pipeline` — settings through the environment:
//! RAE_BENCH_IMAGES (image folder; default the fixture images, copied
//! RAE_BENCH_REPEAT times, default 4), RAE_BENCH_ENCODER (default the tiny
//! fixture encoder; use a real DINOv2-B directory for meaningful numbers),
//! RAE_BENCH_DEVICE (cpu), RAE_BENCH_BATCH (16), RAE_BENCH_DTYPE (f16).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use rae_cache::encoders::{crops_to_tensor, load_encoder};
use rae_cache::images::{DecodeOptions, adm_center_crop, decode_rgb8, discover};
use rae_cache::pipeline::{BuildConfig, HFlip, run_build};
use rae_cache::progress::NoProgress;
use rae_cache::shards::LatentDType;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn fixtures() -> PathBuf {
    std::env::var_os("RAE_REF_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rae-ref"))
}

fn replicate(src: &Path, dst: &Path, times: usize) {
    for class in std::fs::read_dir(src).expect("image folder") {
        let class = class.unwrap();
        if !class.path().is_dir() {
            continue;
        }
        let to = dst.join(class.file_name());
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(class.path()).unwrap() {
            let f = f.unwrap();
            for i in 0..times {
                std::fs::copy(
                    f.path(),
                    to.join(format!("{i:03}_{}", f.file_name().to_string_lossy())),
                )
                .unwrap();
            }
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else is understood.
    let tmp = tempfile::tempdir().unwrap();
    let images = match std::env::var_os("RAE_BENCH_IMAGES") {
        Some(p) => PathBuf::from(p),
        None => {
            let dst = tmp.path().join("images");
            let repeat: usize = env_or("RAE_BENCH_REPEAT", "4").parse().unwrap();
            replicate(&fixtures().join("images"), &dst, repeat);
            dst
        }
    };
    let encoder_dir = env_or(
        "RAE_BENCH_ENCODER",
        fixtures().join("encoder-dinov2reg").to_str().unwrap(),
    );
    let device_s = env_or("RAE_BENCH_DEVICE", "cpu");
    let batch: usize = env_or("RAE_BENCH_BATCH", "16").parse().unwrap();
    let device = rae_cache::device::parse_device(&device_s).unwrap();

    // Encoder alone: crops prepared beforehand, both flips per batch, as the pipeline does.
    let disc = discover(&images).unwrap();
    let encoder = load_encoder(Path::new(&encoder_dir), &device, DType::F32).unwrap();
    let crop = encoder.spec().crop_size as u32;
    let crops: Vec<image::RgbImage> = disc
        .entries
        .iter()
        .filter_map(|e| decode_rgb8(&e.path, &DecodeOptions::default()).ok())
        .map(|img| adm_center_crop(&img, crop))
        .collect();
    let n = crops.len();
    let encode_all = || {
        for chunk in crops.chunks(batch) {
            let refs: Vec<&image::RgbImage> = chunk.iter().collect();
            let a = crops_to_tensor(&refs, false, &device).unwrap();
            let b = crops_to_tensor(&refs, true, &device).unwrap();
            let z = encoder
                .encode(&candle_core::Tensor::cat(&[a, b], 0).unwrap())
                .unwrap();
            let _ = z.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        }
    };
    encode_all(); // warm-up
    let t = Instant::now();
    encode_all();
    let enc_ips = n as f64 / t.elapsed().as_secs_f64();

    // Whole pipeline, same images and batch size.
    let mut cfg = BuildConfig::new(&images, tmp.path().join("cache"));
    cfg.encoder = encoder_dir.clone();
    cfg.device = device_s.clone();
    cfg.batch_size = batch;
    cfg.hflip = HFlip::Both;
    cfg.dtype = match env_or("RAE_BENCH_DTYPE", "f16").as_str() {
        "f32" => LatentDType::F32,
        "bf16" => LatentDType::Bf16,
        "int8" => LatentDType::Int8,
        _ => LatentDType::F16,
    };
    let s = run_build(&cfg, &mut NoProgress).unwrap();
    let pipe_ips = s.images_per_second;

    println!(
        "images: {n} from {} | encoder: {encoder_dir} | device: {device_s} | batch {batch}",
        images.display()
    );
    println!("encoder alone : {enc_ips:9.2} images/s");
    println!(
        "whole build   : {pipe_ips:9.2} images/s  ({} rows, {:.2}x compression)",
        s.rows, s.compression_ratio
    );
    println!(
        "overhead      : {:+.1}% (target: within 10%)",
        (enc_ips / pipe_ips - 1.0) * 100.0
    );
}
