//! `rae-cache train-decoder` end to end: a cache built from the fixture
//! images with the bundled tiny encoder, a tiny decoder (config written
//! here, shaped by the cache), LPIPS with the stage-1 fixture's small VGG16:
//! the losses fall, a run stopped and resumed equals an uninterrupted one bit
//! for bit, and the checkpoint decodes through `rae-cache decode`.

use crate::common::{self, json, run_ok};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn stage1(name: &str) -> PathBuf {
    crate::common::fixture("stage1-gen").join(name)
}

/// The cache (both flips) of the fixture images and a decoder config
/// fitted to it.
pub(crate) fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let cache = dir.join("cache");
    build(&common::fixture("images"), &cache);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("manifest.json")).unwrap()).unwrap();
    let tokens = manifest["encoder"]["tokens"].as_u64().unwrap();
    let channels = manifest["encoder"]["channels"].as_u64().unwrap();
    let dec = serde_json::json!({
        "latent_dim": channels, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 2,
        "decoder_num_attention_heads": 4, "decoder_intermediate_size": 64,
        "patch_size": 2, "num_patches": tokens,
    });
    let dec_path = dir.join("decoder.json");
    std::fs::write(&dec_path, dec.to_string()).unwrap();
    (cache, dec_path)
}

/// Build a cache of `input` (a folder or a source) with the bundled tiny
/// encoder.
pub(crate) fn build(input: &Path, cache: &Path) {
    run_ok([
        "build",
        &s(input),
        "--encoder",
        &s(&common::fixture("encoder-dinov2reg")),
        "--out",
        &s(cache),
        "--dtype",
        "f32",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--rows-per-group",
        "4",
        "--json",
    ]);
}

/// `train-decoder` arguments of the tests' runs (tiny decoder, the
/// stage-1 fixture's LPIPS, seed 5, CPU), then `extra`.
pub(crate) fn train_args(
    cache: &Path,
    dec: &Path,
    out: &Path,
    steps: u64,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![
        "train-decoder".to_string(),
        "--data".into(),
        s(cache),
        "--decoder-config".into(),
        s(dec),
        "--out".into(),
        s(out),
        "--batch-size".into(),
        "2".into(),
        "--steps".into(),
        steps.to_string(),
        "--lr".into(),
        "2e-3".into(),
        "--lpips-vgg".into(),
        s(&stage1("vgg16-small.pth")),
        "--lpips-lin".into(),
        s(&stage1("lpips-lin-small.pth")),
        "--seed".into(),
        "5".into(),
        "--device".into(),
        "cpu".into(),
        "--preview-every".into(),
        "8".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Run [`train_args`]; its JSON summary.
pub(crate) fn train(
    cache: &Path,
    dec: &Path,
    out: &Path,
    steps: u64,
    extra: &[&str],
) -> serde_json::Value {
    json(&run_ok(train_args(cache, dec, out, steps, extra)))
}

pub(crate) fn tensors(path: &Path) -> BTreeMap<String, Vec<u32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t): (String, Tensor)| {
            let v = t
                .flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            (
                k,
                v.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

pub(crate) fn log(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// L1 + LPIPS only (the discriminator is `train_decoder_gan`'s).
pub(crate) const NO_GAN: &[&str] = &["--disc-weight", "0"];

#[test]
fn train_decoder_learns_resumes_exactly_and_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, dec) = setup(tmp.path());
    let n = 24;

    // uninterrupted
    let full = tmp.path().join("full");
    let summary = train(&cache, &dec, &full, n, NO_GAN);
    assert_eq!(summary["steps"], n);
    let lines = log(&full);
    assert_eq!(lines.len() as u64, n);
    let mean = |xs: &[serde_json::Value], k: &str| {
        xs.iter().map(|l| l[k].as_f64().unwrap()).sum::<f64>() / xs.len() as f64
    };
    let (first, last) = (&lines[..6], &lines[lines.len() - 6..]);
    eprintln!(
        "L1 {:.4} -> {:.4}, LPIPS {:.4} -> {:.4}",
        mean(first, "l1"),
        mean(last, "l1"),
        mean(first, "lpips"),
        mean(last, "lpips")
    );
    assert!(
        mean(last, "total") < 0.8 * mean(first, "total"),
        "the loss did not fall"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["images_per_s"].as_f64().unwrap() > 0.0)
    );

    // stopped at 10, resumed to n: the same bits (weights, EMA, moments)
    let part = tmp.path().join("part");
    train(&cache, &dec, &part, 10, NO_GAN);
    let resumed = train(&cache, &dec, &part, n, &["--resume"]);
    assert_eq!(resumed["steps"], n);
    let a = tensors(Path::new(summary["checkpoint"].as_str().unwrap()));
    let b = tensors(Path::new(resumed["checkpoint"].as_str().unwrap()));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert!(v == &b[k], "{k} differs after resume");
    }
    assert!(a.keys().any(|k| k.starts_with("ema.")) && a.keys().any(|k| k.starts_with("optim.")));

    // an existing run is not overwritten without --resume
    let o = common::bin()
        .args([
            "train-decoder",
            "--data",
            &s(&cache),
            "--decoder-config",
            &s(&dec),
            "--out",
            &s(&full),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());

    // the run decodes through `decode` (EMA weights, the run's decoder.json)
    assert_decodes(&cache, &full, &tmp.path().join("png"));
}

/// `decode` reads the run's checkpoint (EMA weights, its decoder.json) and
/// writes one 32 px image per cache row.
pub(crate) fn assert_decodes(cache: &Path, run: &Path, pngs: &Path) {
    let d = json(&run_ok([
        "decode",
        &s(cache),
        "--decoder",
        &s(run),
        "--decoder-config",
        &s(&run.join("decoder.json")),
        "--out",
        &s(pngs),
        "--device",
        "cpu",
        "--json",
    ]));
    let rows = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(cache.join("manifest.json")).unwrap(),
    )
    .unwrap()["totals"]["rows"]
        .as_u64()
        .unwrap();
    assert_eq!(d["images"].as_u64().unwrap(), rows);
    assert_eq!(d["width"].as_u64().unwrap(), 32);
}

/// A cache built from a tar of per-class tars trains on targets read from
/// that tar (through `rae_cache::sources`, nothing extracted): the same
/// losses and the same preview (originals included) as the cache of the
/// extracted folder, with the folder gone.
#[test]
fn train_decoder_reads_targets_from_the_tar_the_cache_was_built_from() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dec) = setup(tmp.path());
    let (folder, images) = crate::build_sources::dataset(tmp.path());
    let tar = tmp.path().join("train.tar");
    std::fs::write(&tar, crate::build_sources::nested_tar(&images)).unwrap();
    let (folder_cache, tar_cache) = (tmp.path().join("fc"), tmp.path().join("tc"));
    build(&folder, &folder_cache);
    build(&tar, &tar_cache);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let steps = 3;
    train(&folder_cache, &dec, &a, steps, NO_GAN);
    std::fs::remove_dir_all(&folder).unwrap();
    train(&tar_cache, &dec, &b, steps, NO_GAN);
    let (la, lb) = (log(&a), log(&b));
    assert_eq!(la.len() as u64, steps);
    for (x, y) in la.iter().zip(&lb) {
        for k in ["l1", "lpips", "total", "psnr"] {
            assert_eq!(x[k], y[k], "step {}: {k}", x["step"]);
        }
    }
    let png =
        |run: &Path| std::fs::read(run.join(format!("previews/step-{steps:08}.png"))).unwrap();
    assert!(png(&a) == png(&b), "the previews differ");
}
