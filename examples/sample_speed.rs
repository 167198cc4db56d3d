//! Euler ODE sampling speed of a DiT with random weights, as `rae-cache
//! sample` runs it (fused inference kernels on), best of R runs.
//!   cargo run --release --example sample_speed -- <config> <batch> [steps] [cfg_scale] [runs]
#[allow(dead_code)]
#[path = "../benches/support/mod.rs"]
mod support;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rae_cache::diffusion::sampler::{Guidance, SamplerConfig, sample};
use rae_cache::models::{DitConfig, DitModel};
use rae_cache::train::init::SeededVarMap;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let cfg = DitConfig::load(&a[1])?;
    let b: usize = a[2].parse()?;
    let steps: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let scale: f64 = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    let runs: usize = a.get(5).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dev = Device::Cpu;
    let vm = VarMap::new();
    // creates the seeded variables in `vm`
    let _init = DitModel::new(&cfg, SeededVarMap::var_builder(&vm, 0, DType::F32, &dev))?;
    // Zero-initialised adaLN / output layers would make the blocks trivial:
    // give every weight random values so the work is that of a trained model.
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let mut names: Vec<_> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in names {
        if k.ends_with("weight") || k.ends_with("bias") {
            v.set(&support::randn_cpu(&mut rng, v.dims(), 0.05)?)?;
        }
    }
    // Inference as `rae-cache sample` loads it: plain tensors, not variables
    // (a model on Vars would record every step's graph).
    let tensors: std::collections::HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let mut model = DitModel::new(
        &cfg,
        candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev),
    )?;
    model.set_fused(true);
    let (c, s) = (cfg.in_channels(), cfg.input_size());
    let z0 = support::randn_cpu(&mut rng, &[b, c, s, s], 1.0)?;
    let y = Tensor::from_vec(
        (0..b as u32)
            .map(|i| i % cfg.num_classes() as u32)
            .collect::<Vec<_>>(),
        b,
        &dev,
    )?;
    let guidance = if scale > 1.0 {
        Guidance::Cfg {
            scale,
            t_min: 0.0,
            t_max: 1.0,
            null_class: cfg.num_classes() as u32,
        }
    } else {
        Guidance::None
    };
    let sc = SamplerConfig {
        num_steps: steps,
        guidance,
        ..Default::default()
    };
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..runs {
        let t0 = Instant::now();
        let x = sample(&model, None, &z0, &y, &sc)?;
        let _ = x.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t0.elapsed().as_secs_f64());
        out = Some(x);
    }
    let x = out.unwrap();
    println!(
        "euler {steps} grid points, batch {b}, cfg {scale}: best {:.3} s ({:.1} ms per model step), |x| mean {:.7}",
        best,
        best * 1e3 / (steps - 1) as f64,
        x.abs()?.mean_all()?.to_scalar::<f32>()?
    );
    Ok(())
}
