//! Timings of the evaluation maths on random data: FD of d-dim statistics,
//! streaming moments of N x d features, ADM precision/recall, and the
//! latent metrics of a cache of RAE-shaped rows (256 tokens x 768, f16).
//!   cargo run --example eval_speed -- [dim=2048] [rows=10000] [cache_rows=2000]
use std::time::Instant;

use rae_cache::eval::run::{EvalOptions, Metric, Networks, evaluate};
use rae_cache::eval::{Moments, PrOptions, frechet_distance, precision_recall};
use rae_cache::progress::NoProgress;
use rae_cache::shards::{LatentDType, LatentRow, ShardWriter, WriterOptions};
use rand::{Rng, SeedableRng};

/// Process CPU seconds (user + system) from /proc/self/stat: on a shared
/// machine wall time says more about the neighbours than about this code.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // fields 14 and 15 (utime, stime) are at 11, 12 after the command name
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

struct Clock(Instant, f64);

impl Clock {
    fn start() -> Self {
        Clock(Instant::now(), cpu_s())
    }
    fn show(&self) -> String {
        format!(
            "{:.2} s wall, {:.2} s CPU",
            self.0.elapsed().as_secs_f64(),
            cpu_s() - self.1
        )
    }
}

fn main() -> anyhow::Result<()> {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (dim, rows, cache_rows) = (
        *a.first().unwrap_or(&2048),
        *a.get(1).unwrap_or(&10_000),
        *a.get(2).unwrap_or(&2000),
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let feats: Vec<f32> = (0..rows * dim).map(|_| rng.random::<f32>() * 4.0).collect();
    let t = Clock::start();
    let mut m = Moments::new(dim);
    for c in feats.chunks(dim * 1000) {
        m.push("x", c)?;
    }
    let g1 = m.finish("x")?;
    println!("moments {rows} x {dim}: {}", t.show());
    let mut g2 = g1.clone();
    g2.mu.iter_mut().for_each(|x| *x += 0.01);
    let t = Clock::start();
    let fd = frechet_distance(&g1, &g2)?;
    println!("FD {dim}-d: {} (value {fd:.6})", t.show());
    let n = rows / 2;
    let t = Clock::start();
    let pr = precision_recall(
        &feats[..n * dim],
        &feats[n * dim..2 * n * dim],
        dim,
        &PrOptions::default(),
    );
    if let Ok(pr) = pr {
        println!(
            "P/R {n} vs {n} x {dim} (adm-f16): {} (P {:.4} R {:.4})",
            t.show(),
            pr.precision,
            pr.recall
        );
    }
    // latent cache: cache_rows x 256 x 768 f16
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("shards"))?;
    let (tok, ch) = (256, 768);
    let t = Clock::start();
    let mut w = ShardWriter::create(
        &dir.path().join("shards/part-00000.parquet"),
        WriterOptions::new(LatentDType::F16, tok, ch),
    )?;
    let key = "k".to_string();
    for _ in 0..cache_rows.div_ceil(100) {
        let lat: Vec<f32> = (0..100 * tok * ch)
            .map(|_| rng.random::<f32>() - 0.5)
            .collect();
        let rows: Vec<LatentRow> = (0..100)
            .map(|i| LatentRow {
                key: &key,
                label: 0,
                flip: false,
                latent: &lat[i * tok * ch..(i + 1) * tok * ch],
            })
            .collect();
        w.write_rows(&rows)?;
    }
    w.finish()?;
    println!("wrote a {cache_rows}-row cache: {}", t.show());
    for tokens in [false, true] {
        let opts = EvalOptions {
            metrics: vec![Metric::Latent],
            latent_tokens: tokens,
            latent_pr: true,
            ..EvalOptions::default()
        };
        let t = Clock::start();
        let r = evaluate(
            dir.path(),
            dir.path(),
            &mut Networks::default(),
            &opts,
            &mut NoProgress,
        )?;
        println!(
            "latent eval of the cache against itself (both sides read; tokens={tokens}, pr on): {}, fd_pooled {}, fd_tokens {}",
            t.show(),
            r["metrics"]["latent_fd_pooled"],
            r["metrics"]["latent_fd_tokens"]
        );
    }
    Ok(())
}
