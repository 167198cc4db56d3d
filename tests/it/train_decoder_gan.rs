//! `rae-cache train-decoder` with the discriminator, end to end: the small
//! DINO backbone of the stage-1 discriminator fixtures (the reference's
//! ViT/8 architecture at width 32, shape from its `disc.json`), D updates
//! from epoch 0 and the adversarial term from epoch 1, so both phases run.
//! The D loss is finite at every step, every head parameter receives a
//! gradient (its AdamW second moment is non-zero), the adaptive weight is on
//! exactly from the second epoch, and a run stopped inside the GAN phase and
//! resumed equals an uninterrupted one bit for bit (decoder, EMA, both
//! optimizers, heads and spectral-norm buffers, every logged loss); the
//! checkpoint decodes through `decode`.

use crate::common::{self, fixture, read_json};
use crate::train_decoder_e2e::{assert_decodes, log, setup, tensors, train, train_args};

use std::path::Path;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn train_decoder_with_discriminator_trains_both_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, dec) = setup(tmp.path());
    let dino_cfg = tmp.path().join("dino.json");
    let backbone = read_json("stage1-disc/disc.json")["backbone"].clone();
    std::fs::write(&dino_cfg, backbone.to_string()).unwrap();
    let dino = s(&fixture("stage1-disc/dino-tiny.safetensors"));
    let dino_cfg = s(&dino_cfg);
    let gan: Vec<&str> = vec![
        "--dino-weights",
        &dino,
        "--dino-config",
        &dino_cfg,
        "--disc-start-epoch",
        "0",
        "--gan-start-epoch",
        "1",
    ];

    // no weights where --dino-weights points: an error naming the place
    let missing = tmp.path().join("no-dino");
    std::fs::create_dir(&missing).unwrap();
    let x = tmp.path().join("x");
    let o = common::bin()
        .args(train_args(
            &cache,
            &dec,
            &x,
            1,
            &["--dino-weights", &s(&missing)],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&s(&missing)) && err.contains("DINO"),
        "unclear error: {err}"
    );

    // one epoch of D only (images / batch 2 steps), then two with both
    let n = read_manifest_images(&cache) / 2 + 2;
    let full = tmp.path().join("full");
    let summary = train(&cache, &dec, &full, n, &gan);
    assert_eq!(summary["steps"], n);
    let lines = log(&full);
    let spe = lines.iter().filter(|l| l["epoch"] == 0).count() as u64;
    assert!(spe >= 2 && spe + 1 < n, "{spe} steps per epoch");
    assert_eq!(lines.len() as u64, n);
    for (i, l) in lines.iter().enumerate() {
        let d = l["d_loss"].as_f64().unwrap_or(f64::NAN);
        assert!(d.is_finite() && d >= 0.0, "step {i}: D loss {d}");
        for k in ["logits_real", "logits_fake", "disc_lr", "d_accuracy"] {
            assert!(l[k].as_f64().is_some_and(f64::is_finite), "step {i}: {k}");
        }
        let lambda = l["adaptive_weight"].as_f64().unwrap();
        if (i as u64) < spe {
            assert_eq!(lambda, 0.0, "step {i}: adversarial term before its epoch");
            assert_eq!(l["gan"].as_f64().unwrap(), 0.0);
        } else {
            assert!(
                lambda > 0.0,
                "step {i}: no adaptive weight in the GAN phase"
            );
            assert!(l["gan"].as_f64().unwrap() != 0.0);
        }
    }
    // the default clock: D's lr is the decoder's at the same step
    assert_eq!(lines[2]["disc_lr"], lines[2]["lr"]);

    let ck = tensors(Path::new(summary["checkpoint"].as_str().unwrap()));
    let params: Vec<&String> = ck
        .keys()
        .filter(|k| {
            k.starts_with("aux.disc.heads.") && !k.contains("weight_u") && !k.contains("weight_v")
        })
        .collect();
    assert_eq!(params.len(), 5 * 10, "{params:?}");
    for p in &params {
        let name = p.trim_start_matches("aux.disc.");
        let v = &ck[&format!("aux.disc.optim.v.{name}")];
        assert!(
            v.iter().any(|&b| f32::from_bits(b) > 0.0),
            "{name} never received a gradient"
        );
    }
    assert!(
        ck.keys().any(|k| k.ends_with("weight_u")) && ck.keys().any(|k| k.ends_with("weight_v"))
    );

    // stopped inside the GAN phase, resumed: the same bits and losses
    let part = tmp.path().join("part");
    let k = spe + 1;
    train(&cache, &dec, &part, k, &gan);
    let resumed = train(&cache, &dec, &part, n, &["--resume"]);
    assert_eq!(resumed["steps"], n);
    let b = tensors(Path::new(resumed["checkpoint"].as_str().unwrap()));
    assert_eq!(ck.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, v) in &ck {
        assert!(v == &b[name], "{name} differs after resume");
    }
    let again = log(&part);
    assert_eq!(again.len() as u64, n);
    for (i, (x, y)) in lines.iter().zip(&again).enumerate() {
        for key in [
            "l1",
            "lpips",
            "gan",
            "adaptive_weight",
            "total",
            "d_loss",
            "logits_real",
            "logits_fake",
            "disc_lr",
        ] {
            assert_eq!(x[key], y[key], "step {i}: {key} differs after resume");
        }
    }

    // the discriminator's tensors do not get in the way of `decode`
    assert_decodes(&cache, &full, &tmp.path().join("png"));
}

fn read_manifest_images(cache: &Path) -> u64 {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("manifest.json")).unwrap()).unwrap();
    m["totals"]["images"].as_u64().unwrap()
}
