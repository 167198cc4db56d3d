//! Shard write/read throughput and size per dtype on DINOv2-B-shaped
//! latents (256 tokens x 768 channels), one thread.
//!
//! `cargo bench --bench shards` (add `-- --quick` for a short run). Before
//! criterion's figures it prints a table: bytes per latent, and write/read
//! MB/s (of f32 latent data) and latents/s from a few timed passes.

use std::path::Path;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput};
use rae_cache::shards::{
    LatentDType, LatentRow, ShardReader, ShardWriter, StatsAccumulator, WriterOptions, quant,
};
use rand::{Rng, SeedableRng};

const TOKENS: usize = 256;
const CHANNELS: usize = 768;
const ROWS: usize = 64;
const DTYPES: [LatentDType; 4] = [
    LatentDType::F16,
    LatentDType::Bf16,
    LatentDType::F32,
    LatentDType::Int8,
];

/// LayerNorm-output-like latents: per element ~N(0,1) around a per-channel
/// offset and scale (a few "massive" channels, as ViT features have), with
/// a per-image shared component so rows are not independent noise.
fn latents(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut normal = move || {
        let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    let offset: Vec<f32> = (0..CHANNELS).map(|_| 0.3 * normal()).collect();
    let scale: Vec<f32> = (0..CHANNELS)
        .map(|c| {
            if c % 97 == 0 {
                4.0
            } else {
                0.6 + 0.4 * normal().abs()
            }
        })
        .collect();
    let mut v = Vec::with_capacity(rows * TOKENS * CHANNELS);
    for _ in 0..rows {
        let image: Vec<f32> = (0..CHANNELS).map(|_| 0.5 * normal()).collect();
        for _ in 0..TOKENS {
            for c in 0..CHANNELS {
                v.push(offset[c] + image[c] + scale[c] * normal());
            }
        }
    }
    v
}

fn write(path: &Path, dtype: LatentDType, lat: &[f32], keys: &[String]) -> u64 {
    let n = TOKENS * CHANNELS;
    let rows: Vec<LatentRow> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| LatentRow {
            key: k,
            label: i as i32,
            flip: i % 2 == 1,
            latent: &lat[i * n..(i + 1) * n],
        })
        .collect();
    let mut w =
        ShardWriter::create(path, WriterOptions::new(dtype, TOKENS, CHANNELS)).expect("create");
    w.write_rows(&rows).expect("write");
    w.finish().expect("finish").bytes
}

fn read(path: &Path) -> usize {
    let r = ShardReader::open(path).expect("open");
    (0..r.num_row_groups())
        .map(|g| r.read_row_group(g).expect("read").latents.len())
        .sum()
}

fn summary(dir: &Path, lat: &[f32], keys: &[String]) {
    let f32_mb = (TOKENS * CHANNELS * 4) as f64 / 1e6;
    println!(
        "shards: {TOKENS}x{CHANNELS} latents, {ROWS} rows, one thread; MB/s counts f32 latent bytes ({f32_mb:.3} MB each)"
    );
    println!(
        "{:>5} {:>14} {:>8} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "dtype",
        "bytes/latent",
        "ratio",
        "write MB/s",
        "write lat/s",
        "read MB/s",
        "read lat/s",
        "stats lat/s"
    );
    for dtype in DTYPES {
        let path = dir.join(format!("summary-{dtype}.parquet"));
        let passes = 3;
        let t = Instant::now();
        let mut bytes = 0;
        for _ in 0..passes {
            bytes = write(&path, dtype, lat, keys);
        }
        let w = (passes * ROWS) as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..passes {
            std::hint::black_box(read(&path));
        }
        let r = (passes * ROWS) as f64 / t.elapsed().as_secs_f64();
        // What a build also does per row: the stored values' statistics.
        let t = Instant::now();
        let mut acc = StatsAccumulator::new(TOKENS, CHANNELS);
        for _ in 0..passes {
            for row in lat.chunks_exact(TOKENS * CHANNELS) {
                let stored = quant::round_trip(dtype, row, CHANNELS);
                acc.push_rows(&stored, 1).expect("stats");
            }
        }
        let st = (passes * ROWS) as f64 / t.elapsed().as_secs_f64();
        let per = bytes as f64 / ROWS as f64;
        println!(
            "{:>5} {:>14.0} {:>8.3} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
            dtype.as_str(),
            per,
            per / (f32_mb * 1e6),
            w * f32_mb,
            w,
            r * f32_mb,
            r,
            st
        );
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lat = latents(ROWS, 1);
    let keys: Vec<String> = (0..ROWS)
        .map(|i| format!("n{:08}/img_{i:06}.JPEG", i % 10))
        .collect();
    summary(dir.path(), &lat, &keys);

    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let mut g = c.benchmark_group("shard_write");
    g.throughput(Throughput::Elements(ROWS as u64));
    for dtype in DTYPES {
        let path = dir.path().join(format!("w-{dtype}.parquet"));
        g.bench_with_input(BenchmarkId::from_parameter(dtype), &dtype, |b, &d| {
            b.iter(|| write(&path, d, &lat, &keys))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("shard_read");
    g.throughput(Throughput::Elements(ROWS as u64));
    for dtype in DTYPES {
        let path = dir.path().join(format!("r-{dtype}.parquet"));
        write(&path, dtype, &lat, &keys);
        g.bench_with_input(BenchmarkId::from_parameter(dtype), &path, |b, p| {
            b.iter(|| read(p))
        });
    }
    g.finish();
    c.final_summary();
}
