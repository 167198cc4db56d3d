//! Wall time of each phase of a DiT training step (forward, backward, clip,
//! AdamW, EMA), best of N, as `rae-cache bench train` runs it.
//!   cargo run --release --example step_phases -- <config> <batch> [iters]
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rae_cache::models::{DitConfig, DitModel, VelocityModel, is_frozen};
use rae_cache::train::ema::Ema;
use rae_cache::train::init::SeededVarMap;
use rae_cache::train::{AdamW, AdamWConfig, Gradients, ParamGroup};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let cfg = DitConfig::load(&a[1])?;
    let b: usize = a[2].parse()?;
    let iters: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = DitModel::new(&cfg, SeededVarMap::var_builder(&vm, 0, DType::F32, &dev))?;
    let mut all: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    all.sort_by(|x, y| x.0.cmp(&y.0));
    let trainable: Vec<(String, Var)> =
        all.iter().filter(|(k, _)| !is_frozen(k)).cloned().collect();
    let mut opt = AdamW::new(
        vec![ParamGroup::new(trainable.clone())],
        AdamWConfig::default(),
    )?;
    let mut ema = Ema::new(all.iter().map(|(k, v)| (k, v)), 0.9995)?;
    let (c, s) = (cfg.in_channels(), cfg.input_size());
    let x = Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?;
    let t = Tensor::rand(0f32, 1.0, b, &dev)?;
    let y = Tensor::from_vec((0..b as u32).map(|i| i % 4).collect::<Vec<_>>(), b, &dev)?;
    let target = Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?;
    let names = ["forward", "backward", "grads+clip", "adamw", "ema", "total"];
    let mut best = [f64::INFINITY; 6];
    let mut totals = Vec::new();
    for it in 0..iters + 2 {
        let mut ts = [0f64; 6];
        let t0 = Instant::now();
        let v = model.forward(&x, &t, &y)?;
        let loss = (v - &target)?.sqr()?.mean_all()?;
        let _ = loss.to_scalar::<f32>()?;
        ts[0] = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let store = loss.backward()?;
        ts[1] = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let mut grads = Gradients::from_store(&store, &trainable)?;
        drop(store);
        grads.clip_global_norm(1.0)?;
        ts[2] = t2.elapsed().as_secs_f64();
        let t3 = Instant::now();
        opt.step(&grads, 2e-4)?;
        ts[3] = t3.elapsed().as_secs_f64();
        let t4 = Instant::now();
        ema.update(trainable.iter().map(|(k, v)| (k, v)))?;
        ts[4] = t4.elapsed().as_secs_f64();
        ts[5] = t0.elapsed().as_secs_f64();
        if it >= 2 {
            totals.push(ts[5]);
            for i in 0..6 {
                best[i] = best[i].min(ts[i]);
            }
        }
    }
    for (n, v) in names.iter().zip(best) {
        println!("{n:>11}: {:7.1} ms", v * 1e3);
    }
    totals.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "     median: {:7.1} ms   mean: {:7.1} ms",
        totals[totals.len() / 2] * 1e3,
        totals.iter().sum::<f64>() / totals.len() as f64 * 1e3
    );
    Ok(())
}
