//! Decode + ADM crop throughput on ImageNet-sized JPEGs (single thread).
//!
//! `cargo bench --bench preprocess` ; images/s per core = the reported
//! `thrpt` of `decode+crop` (one element = one image).

// Shared with the other benches and the `bench` subcommand.
#[allow(dead_code, unused_imports)]
mod support;

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use image::RgbImage;
use rae_cache::images::{DecodeOptions, adm_center_crop, decode_rgb8_bytes};
use support::synthetic_jpeg;

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
