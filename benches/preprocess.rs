//! Decode + ADM crop throughput on ImageNet-sized JPEGs (single thread).
//!
//! `cargo bench --bench preprocess` ; images/s per core = the reported
//! `thrpt` of `decode+crop` (one element = one image).

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use image::{ImageEncoder, RgbImage};
use rae_cache::images::{DecodeOptions, adm_center_crop, decode_rgb8_bytes};

/// Smooth colour field plus pseudo-random noise, JPEG quality 90: about the
/// entropy of a natural photo at ImageNet's typical 500x375.
fn synthetic_jpeg(seed: u64, w: u32, h: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let img = RgbImage::from_fn(w, h, |x, y| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let n = (s % 41) as f32 - 20.0;
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let k = seed as f32 * 0.7;
        let r = 128.0 + 90.0 * (6.0 * fx + k).sin() * (4.0 * fy).cos();
        let g = 128.0 + 80.0 * (5.0 * fy - k).sin();
        let b = 128.0 + 70.0 * (9.0 * (fx + fy) + k).cos();
        let c = |v: f32| (v + n).clamp(0.0, 255.0) as u8;
        image::Rgb([c(r), c(g), c(b)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .expect("encode");
    out
}

fn bench(c: &mut Criterion) {
    let opts = DecodeOptions::default();
    let path = Path::new("bench.jpg");
    let files: Vec<Vec<u8>> = (0..8).map(|i| synthetic_jpeg(i, 500, 375)).collect();
    let decoded: Vec<RgbImage> = files
        .iter()
        .map(|f| decode_rgb8_bytes(f, path, &opts).expect("decode"))
        .collect();

    let mut g = c.benchmark_group("imagenet_500x375_q90");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("decode+crop", |b| {
        b.iter(|| {
            i = (i + 1) % files.len();
            let img = decode_rgb8_bytes(black_box(&files[i]), path, &opts).expect("decode");
            black_box(adm_center_crop(&img, 256))
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            i = (i + 1) % files.len();
            black_box(decode_rgb8_bytes(black_box(&files[i]), path, &opts).expect("decode"))
        })
    });
    g.bench_function("crop", |b| {
        b.iter(|| {
            i = (i + 1) % decoded.len();
            black_box(adm_center_crop(black_box(&decoded[i]), 256))
        })
    });
    g.finish();

    // A large photo that takes the box-halving path (1200x900 -> 600x450).
    let big = synthetic_jpeg(99, 1200, 900);
    let mut g = c.benchmark_group("photo_1200x900_q90");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode+crop", |b| {
        b.iter(|| {
            let img = decode_rgb8_bytes(black_box(&big), path, &opts).expect("decode");
            black_box(adm_center_crop(&img, 256))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
