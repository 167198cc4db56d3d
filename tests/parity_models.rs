//! Forward parity of LightningDiT, DiT-DH and the RAE decoder against the
//! reference fixtures (tests/fixtures/rae-ref), on the differentiable path
//! and on the fused path, from .safetensors and .pt.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff};
use rae_cache::models::checkpoint::{load_state_dict, var_builder};
use rae_cache::models::config::load_config;
use rae_cache::models::{
    DecoderConfig, DitConfig, DitDh, DitModel, LightningDit, RaeDecoder, VelocityModel, WeightsKey,
};

const TOL: f32 = 1e-4;

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).expect("io fixture")
}

fn weights(name: &str) -> HashMap<String, Tensor> {
    load_state_dict(&fixture(name), &WeightsKey::Auto, &Device::Cpu).expect("weights")
}

fn dit_config(json: &str) -> DitConfig {
    DitConfig::load(fixture(json).to_str().unwrap()).expect("config")
}

fn check_dit(model_json: &str, weight_files: &[&str], io_file: &str) {
    let cfg = dit_config(model_json);
    let io = io(io_file);
    for wf in weight_files {
        for fused in [false, true] {
            let vb = var_builder(weights(wf), DType::F32, &Device::Cpu);
            let mut m = DitModel::new(&cfg, vb).expect("build");
            m.set_fused(fused);
            let v = m.forward(&io["x"], &io["t"], &io["y"]).expect("forward");
            let err = max_abs_diff(&v, &io["v"]);
            eprintln!("{wf} fused={fused}: max abs err {err:e}");
            assert!(err <= TOL, "{wf} fused={fused}: max abs err {err} > {TOL}");
        }
    }
}

#[test]
fn ditdh_forward_matches_reference() {
    check_dit(
        "ditdh.json",
        &["ditdh.safetensors", "ditdh.pt"],
        "ditdh-io.safetensors",
    );
}

#[test]
fn lightningdit_forward_matches_reference() {
    let mut files = vec!["lightningdit.safetensors"];
    if fixture("lightningdit.pt").exists() {
        files.push("lightningdit.pt");
    }
    check_dit("lightningdit.json", &files, "lightningdit-io.safetensors");
}

#[test]
fn fixed_tables_match_checkpoint_buffers() {
    // the rope tables and sin-cos positions we compute equal the stored ones
    let w = weights("ditdh.safetensors");
    let DitConfig::DitDh(cfg) = dit_config("ditdh.json") else {
        panic!("ditdh.json is not a DiT-DH config")
    };
    let m = DitDh::new(&cfg, var_builder(w.clone(), DType::F32, &Device::Cpu)).unwrap();
    let (enc, dec) = m.ropes();
    for (rope, name) in [
        (enc.unwrap(), "enc_feat_rope"),
        (dec.unwrap(), "dec_feat_rope"),
    ] {
        let (c, s) = rope.tables();
        assert!(
            max_abs_diff(c, &w[&format!("{name}.freqs_cos")]) < 1e-6,
            "{name} cos"
        );
        assert!(
            max_abs_diff(s, &w[&format!("{name}.freqs_sin")]) < 1e-6,
            "{name} sin"
        );
    }
    // (the fixtures' pos_embed tables are perturbed on purpose: the models
    // use the stored table; the computed one is checked in the lib tests)

    let lw = weights("lightningdit.safetensors");
    let DitConfig::Lightning(lc) = dit_config("lightningdit.json") else {
        panic!("not a LightningDiT config")
    };
    let lm = LightningDit::new(&lc, var_builder(lw.clone(), DType::F32, &Device::Cpu)).unwrap();
    let (c, s) = lm.rope().unwrap().tables();
    assert!(max_abs_diff(c, &lw["feat_rope.freqs_cos"]) < 1e-6);
    assert!(max_abs_diff(s, &lw["feat_rope.freqs_sin"]) < 1e-6);
}

#[test]
fn decoder_forward_matches_reference() {
    let cfg: DecoderConfig = load_config(&fixture("decoder.json")).expect("decoder.json");
    let io = io("decoder-io.safetensors");
    for wf in ["decoder.safetensors", "decoder.pt"] {
        for fused in [false, true] {
            let vb = var_builder(weights(wf), DType::F32, &Device::Cpu);
            let mut m = RaeDecoder::new(&cfg, vb).expect("build");
            m.set_fused(fused);
            let px = m.forward(&io["z"]).expect("forward");
            let err = max_abs_diff(&px, &io["pixels"]);
            eprintln!("{wf} fused={fused}: max abs err {err:e}");
            assert!(err <= TOL, "{wf} fused={fused}: max abs err {err} > {TOL}");
        }
    }
}

#[test]
fn missing_and_mismatched_keys_are_named() {
    let cfg = dit_config("ditdh.json");
    let mut w = weights("ditdh.safetensors");
    w.remove("blocks.1.attn.qkv.weight");
    let err = DitModel::new(&cfg, var_builder(w, DType::F32, &Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(err.contains("blocks.1.attn.qkv.weight"), "{err}");

    let mut w = weights("ditdh.safetensors");
    w.insert(
        "final_layer.linear.weight".into(),
        Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = DitModel::new(&cfg, var_builder(w, DType::F32, &Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(err.contains("final_layer.linear.weight"), "{err}");

    let path = fixture("lightningdit.safetensors");
    let err = rae_cache::models::load_dit(
        &path,
        fixture("ditdh.json").to_str().unwrap(),
        &WeightsKey::Auto,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lightningdit.safetensors"), "{err}");
}

#[test]
fn wrapped_pt_checkpoint_prefers_ema() {
    // a safetensors file flattening {"model": ..., "ema": ...}
    let w = weights("ditdh.safetensors");
    let mut wrapped = HashMap::new();
    for (k, t) in &w {
        wrapped.insert(format!("ema.{k}"), t.clone());
        wrapped.insert(format!("model.{k}"), (t * 0.0).unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wrapped.safetensors");
    candle_core::safetensors::save(&wrapped, &p).unwrap();
    let sd = load_state_dict(&p, &WeightsKey::Auto, &Device::Cpu).unwrap();
    assert_eq!(sd.len(), w.len());
    assert!(max_abs_diff(&sd["pos_embed"], &w["pos_embed"]) == 0.0);
    let sd = load_state_dict(&p, &WeightsKey::Key("model".into()), &Device::Cpu).unwrap();
    assert_eq!(
        sd["t_embedder.W"]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}
