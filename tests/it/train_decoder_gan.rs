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
    let gan = gan_flags(tmp.path(), 1);
    let gan: Vec<&str> = gan.iter().map(String::as_str).collect();

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

/// The GAN flags of the tests: the fixture's small DINO backbone (its
/// weights, and a `--dino-config` written into `dir` from its `disc.json`),
/// D updates from epoch 0, the adversarial term from epoch `gan_start`.
fn gan_flags(dir: &Path, gan_start: u64) -> Vec<String> {
    let cfg = dir.join("dino.json");
    let backbone = read_json("stage1-disc/disc.json")["backbone"].clone();
    std::fs::write(&cfg, backbone.to_string()).unwrap();
    let dino = s(&fixture("stage1-disc/dino-tiny.safetensors"));
    let flags = ["--dino-weights", &dino, "--dino-config", &s(&cfg)];
    let mut out: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    out.extend(["--disc-start-epoch".into(), "0".into()]);
    out.extend(["--gan-start-epoch".into(), gan_start.to_string()]);
    out
}

fn read_manifest_images(cache: &Path) -> u64 {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("manifest.json")).unwrap()).unwrap();
    m["totals"]["images"].as_u64().unwrap()
}

/// `launch` with two processes of batch 1 trains as one process of batch 2
/// while the discriminator trains (the decoder's and the discriminator's
/// gradients averaged over the ranks, the DiffAug draws sliced from the
/// global batch's): the same logged losses and final weights within f32
/// reduction-order noise, and only rank 0 writes the run directory. (From
/// the GAN epoch each rank's adaptive weight is its own, as the
/// reference's, so the two layouts may part there.)
#[test]
fn train_decoder_launch_two_processes_match_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, dec) = setup(tmp.path());
    let mut extra = gan_flags(tmp.path(), 100);
    extra.push("--batch-size".into());
    let steps = 3;
    let run = |out: &Path, batch: &str, launch: &[&str]| {
        let mut args: Vec<String> = launch.iter().map(|a| a.to_string()).collect();
        let mut extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        extra.push(batch);
        let mut rest = train_args(&cache, &dec, out, steps, &extra);
        // drop train_args' `--batch-size 2`: this run's follows in `extra`
        let i = rest.iter().position(|a| a == "--batch-size").unwrap();
        rest.drain(i..i + 2);
        args.extend(rest);
        common::run_ok(args)
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run(&one, "2", &[]);
    let port = common::free_port().to_string();
    let mut launch: Vec<&str> = "launch --nproc-per-node 2 --master-port"
        .split(' ')
        .collect();
    launch.extend([port.as_str(), "--"]);
    run(&two, "1", &launch);
    let (a, b) = (log(&one), log(&two));
    // one log line per step: only rank 0 writes
    assert_eq!((a.len(), b.len()), (steps as usize, steps as usize));
    for (x, y) in a.iter().zip(&b) {
        for k in [
            "l1",
            "lpips",
            "total",
            "d_loss",
            "logits_real",
            "logits_fake",
        ] {
            let (u, v) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!(
                (u - v).abs() <= 1e-5 * u.abs().max(1.0),
                "step {}: {k} {u} vs {v}",
                x["step"]
            );
        }
    }
    // the final weights: decoder and the heads' conv weights (rank 0's).
    // Not the biases whose gradient is zero up to rounding (the attention
    // key bias: softmax is shift-invariant; a bias in front of a per-sample
    // norm), which AdamW scales up to full steps of either sign.
    let last = |run: &Path| tensors(&run.join(format!("checkpoints/step-{steps:08}.safetensors")));
    let (wa, wb) = (last(&one), last(&two));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    let f = |v: &[u32]| v.iter().map(|&x| f32::from_bits(x)).collect::<Vec<_>>();
    for (k, v) in &wa {
        let conv = k.starts_with("aux.disc.heads.") && k.ends_with("weight_orig");
        if !(k.starts_with("model.") && !k.ends_with("key.bias") || conv) {
            continue;
        }
        let (x, y) = (f(v), f(&wb[k]));
        let scale = x.iter().fold(1f32, |m, u| m.max(u.abs()));
        let err = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (u, v)| m.max((u - v).abs()));
        assert!(err <= 1e-5 * scale, "{k}: {err:e} apart");
    }
}
