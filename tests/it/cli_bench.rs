//! `rae-cache bench` on the CPU with tiny shapes: every mode prints its JSON
//! line, and synthetic images go through a whole `build`.

use std::path::Path;

use crate::common::{fixture, json, run_ok};

/// `rae-cache ARGS`: `bench` prints one JSON line, `build --json` one
/// pretty-printed object.
fn rae(args: &[&str]) -> serde_json::Value {
    json(&run_ok(args))
}

fn timed(v: &serde_json::Value, what: &str, batch: u64) {
    assert_eq!(v["what"], what, "{v}");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["batch"], batch);
    assert!(v["seconds_per_iter"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["params"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn bench_encoder_decoder_train_tiny() {
    let v = rae(&[
        "bench",
        "encoder",
        "--shape",
        "tiny",
        "--batch",
        "2",
        "--iters",
        "1",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--precision",
        "bf16",
    ]);
    timed(&v, "encoder", 2);
    assert_eq!(v["precision"], "bf16");

    let dec = fixture("decoder.json");
    let v = rae(&[
        "bench",
        "decoder",
        "--decoder-config",
        dec.to_str().unwrap(),
        "--batch",
        "3",
        "--iters",
        "1",
        "--device",
        "cpu",
    ]);
    timed(&v, "decoder", 3);
    assert_eq!(v["precision"], "f32");

    // the stage-1 step (L1 + LPIPS with a random full-width VGG16, AdamW)
    let v = rae(&[
        "bench",
        "decoder-train",
        "--decoder-config",
        dec.to_str().unwrap(),
        "--batch",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
    ]);
    timed(&v, "decoder-train", 2);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);

    let dit = fixture("ditdh.json");
    let v = rae(&[
        "bench",
        "train",
        "--preset",
        dit.to_str().unwrap(),
        "--batch",
        "1",
        "--find-max-batch",
        "--max-batch",
        "4",
        "--iters",
        "1",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]);
    timed(&v, "train", 4);
    let tried = v["max_batch_search"].as_array().unwrap();
    assert_eq!(tried.len(), 3, "{v}");
    assert!(tried.iter().all(|t| t["ok"] == true));
}

#[test]
fn synth_images_then_build() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let enc = tmp.path().join("enc");
    let cache = tmp.path().join("cache");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let v = rae(&[
        "bench",
        "synth-images",
        "--out",
        &s(&img),
        "--count",
        "6",
        "--size",
        "64x48",
        "--classes",
        "2",
    ]);
    assert_eq!(v["count"], 6);
    assert_eq!(std::fs::read_dir(&img).unwrap().count(), 2);
    // Same seed, same bytes.
    let again = tmp.path().join("img2");
    rae(&[
        "bench",
        "synth-images",
        "--out",
        &s(&again),
        "--count",
        "6",
        "--size",
        "64x48",
        "--classes",
        "2",
    ]);
    let f = "n00000001/synth_00000003.JPEG";
    assert_eq!(
        std::fs::read(img.join(f)).unwrap(),
        std::fs::read(again.join(f)).unwrap()
    );

    let v = rae(&[
        "bench",
        "random-encoder",
        "--shape",
        "tiny",
        "--out",
        &s(&enc),
    ]);
    assert_eq!(v["what"], "random-encoder");
    let v = rae(&[
        "build",
        &s(&img),
        "--encoder",
        &s(&enc),
        "--out",
        &s(&cache),
        "--device",
        "cpu",
        "--json",
    ]);
    assert_eq!(v["images_encoded"], 6, "{v}");
    assert_eq!(v["rows"], 12, "{v}");
}
