//! Euler ODE sampling with DiT-DH, without and with CFG, against the
//! reference (sampler.json / sampler-io.safetensors).
//!
//! Runs on `RAE_TEST_DEVICE`; the reference comparison uses the model in
//! `RAE_TEST_PRECISION` (default CPU, f32; see tests/it/common). The sampler
//! state stays f32 whatever the model computes in.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use common::{HalfTol, assert_close, fixture, max_abs_diff, read_json, test_device, test_dtype};
use rae_cache::diffusion::{Guidance, SamplerConfig, SamplerMethod, sample};
use rae_cache::models::{DitModel, WeightsKey, load_dit};

const TOL: f32 = 2e-4;

/// bf16/f16 bound for a whole Euler trajectory against the f32 reference.
/// The per-step velocity error (rel ~7e-3 for this DiT-DH in bf16, see
/// parity_models) is scaled by the step sizes and partly averages out over
/// the steps; the f32 sampler state adds no rounding of its own. Measured on
/// CPU in bf16: rel max 2.1e-3 (plain) and 3.0e-3 (CFG), cosine >= 0.999997.
/// Bound: rel max <= 3e-2 (as the single forward), cosine >= 0.9995.
const HALF: HalfTol = HalfTol {
    rel_max: 3e-2,
    cosine: 0.9995,
};

fn model_as(fused: bool, dtype: DType) -> DitModel {
    let spec = read_json("sampler.json");
    assert_eq!(spec["model"], "ditdh");
    let mut m = load_dit(
        &fixture("ditdh.safetensors"),
        fixture("ditdh.json").to_str().unwrap(),
        &WeightsKey::Auto,
        dtype,
        &test_device(),
    )
    .expect("load ditdh");
    m.set_fused(fused);
    m
}

/// The f32 model on the test device (for the structural checks).
fn model(fused: bool) -> DitModel {
    model_as(fused, DType::F32)
}

/// The fixture tensors on the test device.
fn io() -> HashMap<String, Tensor> {
    let dev = test_device();
    common::io("sampler-io.safetensors")
        .into_iter()
        .map(|(k, v)| (k, v.to_device(&dev).unwrap()))
        .collect()
}

fn config(with_cfg: bool) -> SamplerConfig {
    let spec = read_json("sampler.json");
    assert_eq!(spec["method"], "euler-ode");
    let guidance = if with_cfg {
        let iv = spec["cfg_interval"].as_array().unwrap();
        Guidance::Cfg {
            scale: spec["cfg_scale"].as_f64().unwrap(),
            t_min: iv[0].as_f64().unwrap(),
            t_max: iv[1].as_f64().unwrap(),
            null_class: spec["null_class"].as_u64().unwrap() as u32,
        }
    } else {
        Guidance::None
    };
    SamplerConfig {
        method: SamplerMethod::EulerOde,
        num_steps: spec["num_steps"].as_u64().unwrap() as usize,
        time_shift: spec["time_shift"].as_f64().unwrap(),
        guidance,
        ..Default::default()
    }
}

#[test]
fn euler_ode_matches_reference_with_and_without_cfg() {
    let io = io();
    let dtype = test_dtype(&test_device());
    for fused in [false, true] {
        let m = model_as(fused, dtype);
        for (with_cfg, key) in [(false, "sample"), (true, "sample_cfg")] {
            let out = sample(&m, None, &io["z0"], &io["y"], &config(with_cfg)).unwrap();
            assert_eq!(out.dtype(), DType::F32, "the sampler state is f32");
            assert_close(
                &out,
                &io[key],
                dtype,
                TOL,
                HALF,
                &format!("{key} fused={fused}"),
            );
        }
    }
    // guidance must matter on this fixture, else the CFG check proves nothing
    assert!(max_abs_diff(&io["sample"], &io["sample_cfg"]) > 10.0 * TOL);
}

#[test]
fn euler_ode_bf16_model_matches_reference() {
    let io = io();
    let m = model_as(true, DType::BF16);
    for (with_cfg, key) in [(false, "sample"), (true, "sample_cfg")] {
        let out = sample(&m, None, &io["z0"], &io["y"], &config(with_cfg)).unwrap();
        assert_eq!(out.dtype(), DType::F32, "the sampler state is f32");
        assert_close(&out, &io[key], DType::BF16, TOL, HALF, key);
    }
}

#[test]
fn autoguidance_with_itself_is_plain_sampling_and_sde_is_seeded() {
    let io = io();
    let m = model(true);
    let mut cfg = config(false);
    cfg.guidance = Guidance::Auto {
        scale: 3.0,
        t_min: 0.0,
        t_max: 1.0,
    };
    // v_g + s (v - v_g) with the guide = the model itself is v
    let out = sample(&m, Some(&m), &io["z0"], &io["y"], &cfg).unwrap();
    assert!(max_abs_diff(&out, &io["sample"]) <= TOL);
    // AutoGuidance without a guide is an error, not a panic
    assert!(sample(&m, None, &io["z0"], &io["y"], &cfg).is_err());

    let mut sde = config(false);
    sde.method = SamplerMethod::EulerMaruyama;
    sde.seed = 7;
    let a = sample(&m, None, &io["z0"], &io["y"], &sde).unwrap();
    let b = sample(&m, None, &io["z0"], &io["y"], &sde).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let finite = a
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite());
    assert!(finite, "SDE sample has non-finite values");
    sde.seed = 8;
    let c = sample(&m, None, &io["z0"], &io["y"], &sde).unwrap();
    assert!(max_abs_diff(&a, &c) > 0.0);
}

#[test]
fn heun_is_second_order_on_the_reference_grid() {
    // against a fine Euler solution of the same ODE, Heun with few steps is
    // much closer than Euler with the same number of grid points
    let io = io();
    let m = model(true);
    let mut cfg = config(false);
    cfg.num_steps = 400;
    let fine = sample(&m, None, &io["z0"], &io["y"], &cfg).unwrap();
    cfg.num_steps = 12;
    let euler = sample(&m, None, &io["z0"], &io["y"], &cfg).unwrap();
    cfg.method = SamplerMethod::HeunOde;
    let heun = sample(&m, None, &io["z0"], &io["y"], &cfg).unwrap();
    let (ee, eh) = (max_abs_diff(&euler, &fine), max_abs_diff(&heun, &fine));
    eprintln!("euler err {ee:e}, heun err {eh:e}");
    assert!(eh * 3.0 < ee, "heun {eh} vs euler {ee}");
}
