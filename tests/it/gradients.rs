//! One DiT-DH training step's gradients against the reference
//! (trainstep.json, trainstep-theta0/-io/-grads). Catches any op on the
//! training path that drops gradients (a fused kernel without backward).

use crate::common;

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{fixture, io_on, max_abs, read_json};
use rae_cache::diffusion::{interpolate, velocity_target};
use rae_cache::models::state_dict::{fill_varmap, is_frozen, load_state_dict, trainable_vars};
use rae_cache::models::{DitConfig, DitDh, WeightsKey};

/// The fixture's DiT-DH config and its trainstep starting weights (f32).
fn fixture_model_vars(dev: &Device) -> (rae_cache::models::DitDhConfig, VarMap) {
    let DitConfig::DitDh(cfg) = DitConfig::load(fixture("ditdh.json").to_str().unwrap()).unwrap()
    else {
        panic!("ditdh.json is not a DiT-DH config")
    };
    let theta0 = load_state_dict(
        &fixture("trainstep-theta0.safetensors"),
        &WeightsKey::Root,
        dev,
    )
    .unwrap();
    let varmap = VarMap::new();
    fill_varmap(&varmap, &theta0, DType::F32).unwrap();
    (cfg, varmap)
}

#[test]
fn trainstep_gradients_match_reference() {
    let spec = read_json("trainstep.json");
    assert_eq!(spec["x_t"], "(1-t)*x0 + t*eps");
    assert_eq!(spec["target"], "eps - x0");
    let dev = Device::Cpu;
    let (cfg, varmap) = fixture_model_vars(&dev);
    let model = DitDh::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();

    let io: HashMap<String, Tensor> = io_on("trainstep-io.safetensors", &dev);
    let (x0, eps, t, y) = (&io["x0"], &io["eps"], &io["t"], &io["y"]);
    let xt = interpolate(x0, eps, t).unwrap();
    let target = velocity_target(x0, eps).unwrap();
    let pred = model.forward(&xt, t, y).unwrap();
    let loss = (pred - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let loss_v = loss.to_scalar::<f32>().unwrap();
    let loss_ref = io["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!(
        (loss_v - loss_ref).abs() <= 1e-4 * loss_ref.abs().max(1.0),
        "loss {loss_v} vs {loss_ref}"
    );

    let grads = loss.backward().unwrap();
    let reference: HashMap<String, Tensor> = io_on("trainstep-grads.safetensors", &dev);

    // the trainable set is exactly the reference's gradient set
    let ours: BTreeSet<String> = trainable_vars(&varmap)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let theirs: BTreeSet<String> = reference.keys().cloned().collect();
    assert_eq!(ours, theirs, "trainable names differ from trainstep-grads");

    let vars = varmap.data().lock().unwrap();
    let mut sq = 0f64;
    for (name, g_ref) in &reference {
        let var = &vars[name];
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let scale = max_abs(g_ref);
        let err = common::max_abs_diff(g, g_ref);
        assert!(
            scale == 0.0 || max_abs(g) > 0.0,
            "{name}: zero gradient, reference max {scale}"
        );
        assert!(
            err <= 1e-4 * scale.max(1e-6),
            "{name}: grad max abs err {err} vs ref max {scale}"
        );
        sq += g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    // frozen tensors receive no gradient
    for (name, var) in vars.iter() {
        if is_frozen(name) {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "frozen {name} got a gradient"
            );
        }
    }
    let norm = sq.sqrt() as f32;
    let norm_ref = io["grad_norm"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(
        (norm - norm_ref).abs() <= 1e-4 * norm_ref,
        "grad norm {norm} vs {norm_ref}"
    );
}

#[test]
fn fresh_varmap_model_has_reference_trainables_and_zero_output() {
    // training from scratch: every trainable tensor is created in the VarMap
    // under its reference name, frozen ones are kept out of training
    let dev = Device::Cpu;
    let DitConfig::DitDh(cfg) = DitConfig::load(fixture("ditdh.json").to_str().unwrap()).unwrap()
    else {
        panic!("ditdh.json is not a DiT-DH config")
    };
    let varmap = VarMap::new();
    let model = DitDh::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let reference = io_on("trainstep-grads.safetensors", &dev);
    let ours: BTreeSet<String> = trainable_vars(&varmap)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let theirs: BTreeSet<String> = reference.keys().cloned().collect();
    assert_eq!(ours, theirs);
    for (name, var) in trainable_vars(&varmap) {
        assert_eq!(var.dims(), reference[&name].dims(), "{name}");
    }
    // the reference zero-initialises the output layer: v = 0 at init
    let io = io_on("trainstep-io.safetensors", &dev);
    let v = model.forward(&io["x0"], &io["t"], &io["y"]).unwrap();
    assert_eq!(max_abs(&v), 0.0);
}

/// Relative L2 error ||a - b|| / ||b||.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let n = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    (n(&(a - b).unwrap()) / n(b).max(1e-30)).sqrt()
}

#[test]
fn bf16_autocast_step_reaches_every_f32_master_weight() {
    // Training in bf16 keeps f32 variables and builds the model from their
    // bf16 casts (CastVars): every trainable variable must still receive an
    // f32 gradient close to the reference's.
    use rae_cache::train::init::CastVars;
    let dev = Device::Cpu;
    let (cfg, varmap) = fixture_model_vars(&dev);
    let vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    use rae_cache::models::VelocityModel;
    let model = rae_cache::models::DitModel::DitDh(
        DitDh::new(&cfg, CastVars::var_builder(&vars, DType::BF16, &dev)).unwrap(),
    );
    assert_eq!(model.dtype(), DType::BF16);

    let io: HashMap<String, Tensor> = io_on("trainstep-io.safetensors", &dev);
    let (x0, eps, t, y) = (&io["x0"], &io["eps"], &io["t"], &io["y"]);
    let xt = interpolate(x0, eps, t).unwrap();
    let pred = model.forward(&xt, t, y).unwrap();
    assert_eq!(
        pred.dtype(),
        DType::F32,
        "velocity comes back in the input dtype"
    );
    let loss = (pred - velocity_target(x0, eps).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let loss_v = loss.to_scalar::<f32>().unwrap();
    let loss_ref = io["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!(
        (loss_v - loss_ref).abs() <= 1e-2 * loss_ref.abs(),
        "bf16 loss {loss_v} vs {loss_ref}"
    );
    let grads = loss.backward().unwrap();
    let reference: HashMap<String, Tensor> = io_on("trainstep-grads.safetensors", &dev);
    let mut worst = (0f64, String::new());
    for (name, g_ref) in &reference {
        let var = &vars.iter().find(|(k, _)| k == name).unwrap().1;
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient through the bf16 cast"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        if max_abs(g_ref) > 0.0 {
            let e = rel_l2(g, g_ref);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
    }
    // bf16 keeps 8 mantissa bits: relative errors of a few 1e-3 per op,
    // accumulating through the blocks; 5e-2 is far below what a wrong or
    // missing path gives (~1).
    eprintln!(
        "bf16 autocast: loss {loss_v} vs {loss_ref}; worst relative gradient error {:.3e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 5e-2,
        "worst relative gradient error {:.3e} at {}",
        worst.0,
        worst.1
    );
}
