//! One reference training step without a model: the stored gradients of
//! `trainstep-grads` go through our global-norm clipping and AdamW, and the
//! result must be `trainstep-theta1`. Every hyper-parameter comes from
//! trainstep.json.

use crate::common;

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use rae_cache::train::{AdamW, AdamWConfig, Gradients, ParamGroup};

fn load(name: &str) -> HashMap<String, Tensor> {
    common::io(name)
}

fn f64_at(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("trainstep.json: {path:?} is not a number"))
}

/// "global L2 norm clipped to 1.0 (...)" -> 1.0
fn clip_max_norm(spec: &serde_json::Value) -> f64 {
    if let Some(x) = spec.as_f64() {
        return x;
    }
    let s = spec.as_str().expect("grad_clip is a number or a sentence");
    let rest = s
        .split("clipped to")
        .nth(1)
        .expect("grad_clip names the max norm");
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.trim_end_matches('.').parse().expect("max norm parses")
}

#[test]
fn trainstep_clip_and_adamw_match_reference() {
    let cfg = common::read_json("trainstep.json");
    let opt_cfg = &cfg["optimizer"];
    assert_eq!(opt_cfg["name"].as_str(), Some("AdamW"));
    let betas = opt_cfg["betas"].as_array().expect("betas");
    let adamw = AdamWConfig {
        lr: f64_at(opt_cfg, &["lr"]),
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: f64_at(opt_cfg, &["eps"]),
        weight_decay: f64_at(opt_cfg, &["weight_decay"]),
    };
    let max_norm = clip_max_norm(&cfg["grad_clip"]);

    let theta0 = load("trainstep-theta0.safetensors");
    let theta1 = load("trainstep-theta1.safetensors");
    let grads_ref = load("trainstep-grads.safetensors");
    let io = load("trainstep-io.safetensors");

    // Every tensor is a Var; only those with a stored gradient are trained.
    let vars: HashMap<String, Var> = theta0
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let mut trainable: Vec<(String, Var)> = grads_ref
        .keys()
        .map(|k| (k.clone(), vars[k].clone()))
        .collect();
    trainable.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        trainable.len() < vars.len(),
        "the fixture has frozen tensors"
    );

    let mut grads = Gradients::new();
    for (k, g) in &grads_ref {
        grads.insert(k.clone(), g.clone()).unwrap();
    }
    let want_norm = io["grad_norm"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let norm = grads.clip_global_norm(max_norm).unwrap();
    assert!(
        (norm - want_norm).abs() <= 1e-5 * want_norm,
        "grad norm {norm} vs reference {want_norm}"
    );
    if want_norm > max_norm {
        let after = grads.global_norm().unwrap();
        assert!(
            (after - max_norm).abs() < 1e-4,
            "norm after clipping {after}"
        );
    }

    let lr = adamw.lr;
    let mut opt = AdamW::new(vec![ParamGroup::new(trainable)], adamw).unwrap();
    opt.step(&grads, lr).unwrap();

    for (name, want) in &theta1 {
        let got = vars[name].as_tensor();
        let before = &theta0[name];
        if !grads_ref.contains_key(name) {
            let same = got.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == before.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "{name} is frozen but changed");
            continue;
        }
        // Weights to 1e-4 relative to the tensor's scale, and the update itself
        // (theta1 - theta0, ~lr) to 1e-3 of its own scale so a wrong step shows.
        let err = common::max_abs_diff(got, want);
        let scale = common::max_abs(want).max(1e-6);
        assert!(
            err <= 1e-4 * scale,
            "{name}: weights differ by {err} (scale {scale})"
        );
        let d_got = (got - before).unwrap();
        let d_want = (want - before).unwrap();
        let derr = common::max_abs_diff(&d_got, &d_want);
        let dscale = common::max_abs(&d_want).max(1e-12);
        assert!(
            derr <= 1e-3 * dscale,
            "{name}: update differs by {derr} (update scale {dscale})"
        );
    }
    assert_eq!(opt.state().step, 1);
    assert_eq!(opt.state().params.len(), grads_ref.len());
}
