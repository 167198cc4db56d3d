//! Encoder throughput: DINOv2-B with registers (hidden 768, 12 layers,
//! 12 heads, 4 registers, p14, image_size 518 table, 224 input) with
//! random weights written in HF layout and loaded through `load_encoder`,
//! batch 16, f32 on CPU. Run with RAYON_NUM_THREADS=2 to compare with the
//! PyTorch + transformers figure (5.3 images/s on the dev machine).
//!
//! `encoder_parts` times the pieces of one layer at the same shapes to
//! show where the time goes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rae_cache::encoders::load_encoder;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 768;
const LAYERS: usize = 12;
const HEADS: usize = 12;
const REGISTERS: usize = 4;
const PATCH: usize = 14;
const IMAGE: usize = 518;
const BATCH: usize = 16;

fn randn(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    // Sum of uniforms: cheap, deterministic, roughly normal; no denormals.
    let v: Vec<f32> = (0..n)
        .map(|_| {
            (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5) * 2.0 * std
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn filled(shape: &[usize], v: f32) -> Tensor {
    Tensor::full(v, shape, &Device::Cpu).unwrap()
}

/// A DINOv2-B-with-registers directory (config.json, model.safetensors,
/// preprocessor_config.json) with random weights.
fn write_model(dir: &Path) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let c = HIDDEN;
    let grid = IMAGE / PATCH;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "embeddings.cls_token".into(),
        randn(&mut rng, &[1, 1, c], 0.02),
    );
    t.insert("embeddings.mask_token".into(), filled(&[1, c], 0.0));
    t.insert(
        "embeddings.register_tokens".into(),
        randn(&mut rng, &[1, REGISTERS, c], 0.02),
    );
    t.insert(
        "embeddings.position_embeddings".into(),
        randn(&mut rng, &[1, 1 + grid * grid, c], 0.02),
    );
    t.insert(
        "embeddings.patch_embeddings.projection.weight".into(),
        randn(&mut rng, &[c, 3, PATCH, PATCH], 0.02),
    );
    t.insert(
        "embeddings.patch_embeddings.projection.bias".into(),
        filled(&[c], 0.0),
    );
    for i in 0..LAYERS {
        let p = format!("encoder.layer.{i}");
        for n in ["norm1", "norm2"] {
            t.insert(format!("{p}.{n}.weight"), filled(&[c], 1.0));
            t.insert(format!("{p}.{n}.bias"), filled(&[c], 0.0));
        }
        for n in ["query", "key", "value"] {
            t.insert(
                format!("{p}.attention.attention.{n}.weight"),
                randn(&mut rng, &[c, c], 0.02),
            );
            t.insert(
                format!("{p}.attention.attention.{n}.bias"),
                filled(&[c], 0.0),
            );
        }
        t.insert(
            format!("{p}.attention.output.dense.weight"),
            randn(&mut rng, &[c, c], 0.02),
        );
        t.insert(
            format!("{p}.attention.output.dense.bias"),
            filled(&[c], 0.0),
        );
        t.insert(format!("{p}.layer_scale1.lambda1"), filled(&[c], 0.1));
        t.insert(format!("{p}.layer_scale2.lambda1"), filled(&[c], 0.1));
        t.insert(
            format!("{p}.mlp.fc1.weight"),
            randn(&mut rng, &[4 * c, c], 0.02),
        );
        t.insert(format!("{p}.mlp.fc1.bias"), filled(&[4 * c], 0.0));
        t.insert(
            format!("{p}.mlp.fc2.weight"),
            randn(&mut rng, &[c, 4 * c], 0.02),
        );
        t.insert(format!("{p}.mlp.fc2.bias"), filled(&[c], 0.0));
    }
    t.insert("layernorm.weight".into(), filled(&[c], 1.0));
    t.insert("layernorm.bias".into(), filled(&[c], 0.0));
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["Dinov2WithRegistersModel"],
        "model_type": "dinov2_with_registers",
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "mlp_ratio": 4, "image_size": IMAGE, "patch_size": PATCH, "num_channels": 3,
        "num_register_tokens": REGISTERS, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
        "qkv_bias": true, "use_swiglu_ffn": false, "layerscale_value": 1.0
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    let pre = serde_json::json!({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]});
    std::fs::write(
        dir.join("preprocessor_config.json"),
        serde_json::to_vec(&pre).unwrap(),
    )
    .unwrap();
}

fn crops(rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
    let n = BATCH * 3 * 256 * 256;
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    Tensor::from_vec(v, (BATCH, 3, 256, 256), &Device::Cpu).unwrap()
}

fn bench_encoder(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path());
    let enc = load_encoder(tmp.path(), &Device::Cpu, DType::F32).unwrap();
    let x = crops(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
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
