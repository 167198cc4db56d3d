//! Time of one stage-1 generator step (decoder forward, L1 + LPIPS,
//! backward, AdamW, EMA) with random weights: a ViT-B decoder (256 tokens x
//! 768 -> 256 px) and a full-width VGG16 LPIPS. Compare with
//! `scripts/torch_stage1_step.py` (the reference's code) in the same sitting.
//!
//! `cargo run --release --example stage1_step [BATCH] [REPS]`

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rae_cache::models::DecoderConfig;
use rae_cache::stage1::generator::GeneratorConfig;
use rae_cache::stage1::vgg::{CONV_INDICES, Vgg16Features};
use rae_cache::stage1::{GenBatch, GenLossConfig, GeneratorState, Lpips, NoiseAug, NoiseDraws};

fn randn(shape: &[usize], scale: f64, seed: u64, dev: &Device) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * 3.46 * scale) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let b: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let reps: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let dev = Device::Cpu;
    let widths = [
        64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
    ];
    let mut sd = HashMap::new();
    let mut cin = 3;
    for (k, (&i, &c)) in CONV_INDICES.iter().zip(&widths).enumerate() {
        let std = (2.0 / (cin * 9) as f64).sqrt();
        sd.insert(
            format!("features.{i}.weight"),
            randn(&[c, cin, 3, 3], std, k as u64, &dev),
        );
        sd.insert(
            format!("features.{i}.bias"),
            randn(&[c], 0.01, 100 + k as u64, &dev),
        );
        cin = c;
    }
    let vgg = Vgg16Features::from_state_dict(&sd, std::path::Path::new("random")).unwrap();
    let lin: HashMap<String, Tensor> = [64, 128, 256, 512, 512]
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            (
                format!("lin{k}.model.1.weight"),
                randn(&[1, c, 1, 1], 0.01, 200 + k as u64, &dev)
                    .abs()
                    .unwrap(),
            )
        })
        .collect();
    let lpips = Lpips::new(vgg, &lin, std::path::Path::new("random")).unwrap();
    let dcfg = DecoderConfig::preset("ViT-B", 16).unwrap();
    let mut st = GeneratorState::new(&dcfg, &GeneratorConfig::default(), None, &dev).unwrap();
    let z = randn(&[b, 256, 768], 1.0, 7, &dev);
    let images = (randn(&[b, 3, 256, 256], 0.2, 8, &dev) + 0.5).unwrap();
    let noise =
        NoiseDraws::for_samples(0, &(0..b as u64).collect::<Vec<_>>(), &[256, 768], &dev).unwrap();
    let batch = GenBatch {
        images,
        z,
        noise: Some(noise),
    };
    {
        let x = batch.images.affine(2.0, -1.0).unwrap();
        let y = candle_core::Var::from_tensor(&(x.clone() + 0.05).unwrap()).unwrap();
        let t0 = Instant::now();
        let v = lpips.forward(&x, y.as_tensor()).unwrap();
        let tf = t0.elapsed().as_secs_f64();
        let _g = v.backward().unwrap();
        println!(
            "LPIPS alone, batch {b}: forward {tf:.2} s, backward {:.2} s",
            t0.elapsed().as_secs_f64() - tf
        );
    }
    for r in 0..reps + 1 {
        let t0 = Instant::now();
        let (l, g) = st
            .grads(
                Some(&lpips),
                &batch,
                NoiseAug::default(),
                &GenLossConfig::default(),
                None,
            )
            .unwrap();
        let t1 = t0.elapsed().as_secs_f64();
        st.update(g, 1e-4).unwrap();
        let t = t0.elapsed().as_secs_f64();
        println!(
            "{}rep {r}: batch {b}: forward+backward {t1:.2} s, step {t:.2} s ({:.2} img/s), L1 {:.4} LPIPS {:.4}, rss {:.0} MB",
            if r == 0 { "(warm-up) " } else { "" },
            b as f64 / t,
            l.l1,
            l.lpips,
            rae_cache::memory::rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }
}
