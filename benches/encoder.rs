//! Encoder throughput: DINOv2-B with registers (hidden 768, 12 layers,
//! 12 heads, 4 registers, p14, image_size 518 table, 224 input) with
//! random weights written in HF layout and loaded through `load_encoder`,
//! batch 16, f32 on CPU. Run with RAYON_NUM_THREADS=2 to compare with the
//! PyTorch + transformers figure (5.3 images/s on the dev machine).
//!
//! `encoder_parts` times the pieces of one layer at the same shapes to
//! show where the time goes.

// Shared with the `bench` subcommand; each bench uses a part of it.
#[allow(dead_code, unused_imports)]
mod support;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rae_cache::encoders::load_encoder;
use rand::SeedableRng;
use support::{Dinov2Shape, randn_cpu, random_crops, write_random_dinov2};

const HIDDEN: usize = Dinov2Shape::BASE.hidden;
const HEADS: usize = Dinov2Shape::BASE.heads;
const REGISTERS: usize = Dinov2Shape::BASE.registers;
const BATCH: usize = 16;

fn randn(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], std: f32) -> Tensor {
    randn_cpu(rng, shape, std).unwrap()
}

fn filled(shape: &[usize], v: f32) -> Tensor {
    Tensor::full(v, shape, &Device::Cpu).unwrap()
}

fn bench_encoder(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    write_random_dinov2(tmp.path(), &Dinov2Shape::BASE, 0).unwrap();
    let enc = load_encoder(tmp.path(), &Device::Cpu, DType::F32).unwrap();
    let x = random_crops(BATCH, 256, 1, &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("encoder");
    g.sample_size(10);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("dinov2b_reg_f32_b16", |b| {
        b.iter(|| enc.encode(&x).unwrap())
    });
    g.finish();
}

/// One layer's pieces at DINOv2-B shapes (B=16, 261 tokens).
fn bench_parts(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let n = 1 + REGISTERS + 256;
    let rows = BATCH * n;
    let d = HIDDEN / HEADS;
    let x = randn(&mut rng, &[rows, HIDDEN], 1.0);
    let w_qkv = randn(&mut rng, &[3 * HIDDEN, HIDDEN], 0.02);
    let w_fc1 = randn(&mut rng, &[4 * HIDDEN, HIDDEN], 0.02);
    let h = randn(&mut rng, &[rows, 4 * HIDDEN], 1.0);
    let w_fc2 = randn(&mut rng, &[HIDDEN, 4 * HIDDEN], 0.02);
    let q = randn(&mut rng, &[BATCH, HEADS, n, d], 1.0);
    let k = randn(&mut rng, &[BATCH, HEADS, n, d], 1.0);
    let v = randn(&mut rng, &[BATCH, HEADS, n, d], 1.0);
    let ones = filled(&[HIDDEN], 1.0);
    let zeros = filled(&[HIDDEN], 0.0);
    let mut g = c.benchmark_group("encoder_parts");
    g.sample_size(10);
    g.bench_function("qkv_matmul", |b| {
        b.iter(|| x.matmul(&w_qkv.t().unwrap()).unwrap())
    });
    g.bench_function("fc1_matmul", |b| {
        b.iter(|| x.matmul(&w_fc1.t().unwrap()).unwrap())
    });
    g.bench_function("fc2_matmul", |b| {
        b.iter(|| h.matmul(&w_fc2.t().unwrap()).unwrap())
    });
    g.bench_function("gelu_erf", |b| b.iter(|| h.gelu_erf().unwrap()));
    g.bench_function("attention_core", |b| {
        b.iter(|| {
            let s = q.matmul(&k.t().unwrap()).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
            p.matmul(&v).unwrap()
        })
    });
    g.bench_function("layernorm", |b| {
        b.iter(|| candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_encoder, bench_parts);
criterion_main!(benches);
