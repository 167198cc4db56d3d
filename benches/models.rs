//! Model throughput on CPU, f32, random weights from the presets:
//! RAE decoder ViT-B (batch 16, 256 px) and DiT-DH-S (batch 8, 16x16x768).
//! Run: RAYON_NUM_THREADS=2 cargo bench --bench models [-- --quick fused]
//! (`--profile dev` also works: the math lives in dependencies built at opt-level 3.)

// Shared with the `bench` subcommand; each bench uses a part of it.
#[allow(dead_code, unused_imports)]
mod support;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rae_cache::models::{DecoderConfig, DitDh, DitDhConfig, DitModel, VelocityModel};
use support::random_decoder;

fn decoder(c: &mut Criterion) {
    let dev = Device::Cpu;
    let cfg = DecoderConfig::preset("ViT-B", 16).expect("preset");
    let mut m = random_decoder(&cfg, DType::F32, &dev).expect("build");
    let b = 16;
    let z = Tensor::randn(0f32, 1.0, (b, cfg.num_patches, cfg.latent_dim), &dev).expect("z");
    let mut g = c.benchmark_group("decoder_vitb_b16");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(b as u64));
    for fused in [true, false] {
        m.set_fused(fused);
        g.bench_function(if fused { "fused" } else { "differentiable" }, |bch| {
            bch.iter(|| black_box(m.forward(&z).expect("forward")))
        });
    }
    g.finish();
}

fn ditdh(c: &mut Criterion) {
    let dev = Device::Cpu;
    let cfg = DitDhConfig::preset("DiT-DH-S").expect("preset");
    let vm = VarMap::new();
    let mut m = DitModel::DitDh(
        DitDh::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).expect("build"),
    );
    let b = 8;
    let s = cfg.input_size;
    let x = Tensor::randn(0f32, 1.0, (b, cfg.in_channels, s, s), &dev).expect("x");
    let t = Tensor::full(0.5f32, b, &dev).expect("t");
    let y = Tensor::zeros(b, DType::U32, &dev).expect("y");
    let mut g = c.benchmark_group("ditdh_s_b8");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .throughput(Throughput::Elements(b as u64));
    for fused in [true, false] {
        m.set_fused(fused);
        g.bench_function(if fused { "fused" } else { "differentiable" }, |bch| {
            bch.iter(|| black_box(m.forward(&x, &t, &y).expect("forward")))
        });
    }
    g.finish();
}

criterion_group!(benches, decoder, ditdh);
criterion_main!(benches);
