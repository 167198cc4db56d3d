//! Training-step cost of DiT-DH-S (backbone 384/12/6, head 2048/2/16,
//! 768 channels, 16x16 tokens, 1000 classes), batch 8, f32: forward,
//! backward, global-norm clipping, AdamW. Prints seconds per step, peak RSS
//! (VmHWM) and the ratio to the reference PyTorch figures; then the loader's
//! throughput alone on a cache written here.
//!
//! Last, the per-sample noise the loader draws.
//!
//! `cargo bench --bench train` (env: BENCH_STEPS, default 3; BENCH_DEVICE,
//! default cpu; BENCH_LOADER_IMAGES, default 256; BENCH_SKIP_STEP=1;
//! BENCH_NOISE_SAMPLES, default 64).

// Shared with the `bench` subcommand; each bench uses a part of it.
#[allow(dead_code, unused_imports)]
mod support;

use std::time::Instant;

use candle_core::{DType, Device};
use rae_cache::memory::peak_rss_bytes;
use rae_cache::models::{DitConfig, DitDhConfig};
use rae_cache::shards::LatentDType;
use rae_cache::train::checkpoint::LoaderCursor;
use rae_cache::train::loader::{CacheSet, Loader, LoaderConfig};
use support::{BenchError, TrainStep, time_iters};

/// The tiny latent cache writer of the tests.
#[path = "../tests/it/common/tiny_cache.rs"]
mod tiny_cache;

const REF_S_PER_STEP: f64 = 11.2;
const REF_PEAK_GB: f64 = 7.2;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn bench_step(device: &Device, steps: usize) -> Result<(), BenchError> {
    let Some(cfg) = DitDhConfig::preset("ditdh-s") else {
        panic!("no ditdh-s preset")
    };
    // The trainer's step without the EMA update (as this bench always measured).
    let mut step = TrainStep::new(&DitConfig::DitDh(cfg), 0, DType::F32, device, false)?;
    let n_params = step.trainable_params();
    let b = 8;
    step.set_batch(b)?;
    let warm = time_iters(device, 0, 1, || step.step().map(|_| ()))?.mean_s;
    let times = time_iters(device, 0, steps, || step.step().map(|_| ()))?.seconds;
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let peak_gb = peak_rss_bytes().unwrap_or(0) as f64 / 1024.0 / 1024.0 / 1024.0;
    println!(
        "DiT-DH-S train step, batch {b}, f32, {device:?}: {:.2}M trainable params",
        n_params as f64 / 1e6
    );
    println!(
        "  warm-up step {warm:.2} s; {steps} steps: mean {mean:.2} s/step (min {:.2}, max {:.2})",
        times.iter().cloned().fold(f64::INFINITY, f64::min),
        times.iter().cloned().fold(0.0, f64::max)
    );
    println!("  peak RSS (VmHWM) {peak_gb:.2} GB");
    println!(
        "  vs reference PyTorch ({REF_S_PER_STEP} s/step, {REF_PEAK_GB} GB): time x{:.2}, memory x{:.2}",
        mean / REF_S_PER_STEP,
        peak_gb / REF_PEAK_GB
    );
    Ok(())
}

fn bench_loader(images: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (tokens, channels) = (256, 768);
    // The tests' tiny cache writer at DINOv2-B shape: f16, 2 classes, both
    // flips, shards of <= 64 images, row groups of 32 rows.
    let spec = tiny_cache::Spec {
        images,
        classes: 2,
        tokens,
        channels,
        shards: images.div_ceil(64).max(1),
        rows_per_row_group: 32,
        both_flips: true,
        seed: 0,
        dtype: LatentDType::F16,
    };
    let start = Instant::now();
    tiny_cache::write(dir.path(), &spec);
    println!(
        "loader: wrote {images} images x 2 flips (f16, 256x768) in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let set = CacheSet::open(&[dir.path().to_path_buf()]).unwrap();
    let cfg = LoaderConfig {
        batch_size: 32,
        seed: 0,
        shuffle_window: 16,
        workers: env_usize("BENCH_LOADER_WORKERS", 2),
        prefetch: 4,
        rank: 0,
        world_size: 1,
        accum: 1,
        noise: false,
        raw: false,
    };
    let mut l = Loader::new(&set, &cfg, LoaderCursor::default(), &Device::Cpu).unwrap();
    let steps = l.steps_per_epoch() * 2;
    let start = Instant::now();
    for _ in 0..steps {
        l.next_batch().unwrap();
    }
    let dt = start.elapsed().as_secs_f64();
    let n = steps * cfg.batch_size;
    println!(
        "loader: {n} images (2 epochs, batch 32, {} workers) in {dt:.2} s = {:.0} images/s, {:.0} tokens/s",
        cfg.workers,
        n as f64 / dt,
        (n * tokens) as f64 / dt
    );
}

fn main() {
    let device = rae_cache::device::parse_device(
        &std::env::var("BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )
    .expect("BENCH_DEVICE");
    if std::env::var("BENCH_SKIP_STEP").ok().as_deref() != Some("1") {
        bench_step(&device, env_usize("BENCH_STEPS", 3)).expect("train step");
    }
    bench_loader(env_usize("BENCH_LOADER_IMAGES", 256));
    bench_noise(env_usize("BENCH_NOISE_SAMPLES", 64));
}

/// The per-sample flow-matching noise the loader draws for every batch
/// (256x768 normals per sample, samples in parallel over the rayon pool).
fn bench_noise(samples: usize) {
    let ids: Vec<u64> = (0..samples as u64).collect();
    let row = 256 * 768;
    let _ = rae_cache::train::loader::sample_noise(0, &ids[..1], row); // warm the pool
    let start = Instant::now();
    let v = rae_cache::train::loader::sample_noise(0, &ids, row);
    let s = start.elapsed().as_secs_f64();
    println!(
        "noise: {samples} samples x 256x768 in {s:.3} s = {:.0} samples/s ({:.1} M normals/s, {} rayon threads)",
        samples as f64 / s,
        v.len() as f64 / s / 1e6,
        rayon::current_num_threads()
    );
}
