//! Encoder parity with the reference fixtures (transformers 5.x, f32):
//! DINOv2 with registers, SigLIP2's vision tower and MAE on the 256x256
//! fixture crops (plain and flipped), from our own loaders and pipeline.
//!
//! The encoders run on `RAE_TEST_DEVICE` in `RAE_TEST_PRECISION` (default:
//! CPU, f32; see tests/it/common); the `*_bf16` tests always run in bf16.

use crate::common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{
    HalfTol, cosine, fixture, fixtures_dir, max_abs_diff, read_json, test_device, test_dtype,
};
use rae_cache::encoders::{Encoder, crops_to_tensor, crops_to_u8, load_encoder, u8_to_input};

const TOL: f32 = 2e-4;

/// bf16/f16 bound per latent against the f32 reference. The latent is the
/// final LayerNorm output (computed in f32 from the half residual stream),
/// values up to ~4. bf16 rounds weights and activations with relative error
/// <= 2^-9 ~ 2e-3 per op. Measured on CPU over the three fixture encoders
/// and both flips: max abs <= 4.0e-2, max abs relative to the latent's max
/// |value| <= 1.2e-2, cosine >= 0.99997. Bounds: rel max <= 3e-2 (2.5x
/// headroom for other accumulation orders, e.g. CUDA) and cosine >= 0.9995.
const HALF: HalfTol = HalfTol {
    rel_max: 3e-2,
    cosine: 0.9995,
};

struct Case {
    path: String,
    resized_by_reference: bool,
}

fn cases() -> Vec<Case> {
    let meta = read_json("encoder-expected.json");
    meta["images"]
        .as_array()
        .expect("images array")
        .iter()
        .map(|e| Case {
            path: e["path"].as_str().expect("path").to_string(),
            resized_by_reference: e["resized_by_reference"]
                .as_bool()
                .expect("resized_by_reference"),
        })
        .collect()
}

fn latent_shape() -> (usize, usize) {
    let meta = read_json("encoder-expected.json");
    let s: Vec<usize> = meta["latent_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    (s[0], s[1])
}

fn expected(file: &str) -> std::collections::HashMap<String, Tensor> {
    common::io(file)
}

/// The crops to encode, in fixture order: the 256x256 images decoded from
/// disk; for the photos the reference resized, its stored ADM crop.
fn crops() -> Vec<image::RgbImage> {
    let adm = expected("encoder-expected.safetensors")
        .remove("adm_crop_u8")
        .unwrap();
    let (_, h, w, _) = adm.dims4().unwrap();
    cases()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.resized_by_reference {
                let raw = adm
                    .i(i)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<u8>()
                    .unwrap();
                image::RgbImage::from_raw(w as u32, h as u32, raw).unwrap()
            } else {
                let img = image::open(fixtures_dir().join("images").join(&c.path))
                    .unwrap()
                    .to_rgb8();
                assert_eq!(
                    img.dimensions(),
                    (w as u32, h as u32),
                    "{} is not a ready crop",
                    c.path
                );
                img
            }
        })
        .collect()
}

fn check(encoder: &dyn Encoder, flip: bool, want: &Tensor, what: &str) {
    let imgs = crops();
    let refs: Vec<&image::RgbImage> = imgs.iter().collect();
    let dev = test_device();
    let x = crops_to_tensor(&refs, flip, &dev).unwrap();
    let got = encoder.encode(&x).unwrap();
    let (tokens, c) = latent_shape();
    assert_eq!(got.dims(), &[imgs.len(), tokens, c], "{what}");
    // the latent leaves the encoder as f32 whatever the compute dtype
    assert_eq!(got.dtype(), DType::F32);
    let half = rae_cache::precision::is_half(encoder.dtype());
    for (i, case) in cases().iter().enumerate() {
        let (g, w) = (got.i(i).unwrap(), want.i(i).unwrap());
        let err = max_abs_diff(&g, &w);
        let cos = cosine(&g, &w);
        let scale = w
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rel = err / scale;
        eprintln!(
            "{what} [{:?}] {} flip {flip}: max abs {err:.2e}, rel max {rel:.2e}, cosine {cos:.7}",
            encoder.dtype(),
            case.path
        );
        if half {
            assert!(
                rel <= HALF.rel_max && cos >= HALF.cosine,
                "{what} {} (flip {flip}): rel max {rel}, cosine {cos}; bound {HALF:?}",
                case.path
            );
            continue;
        }
        assert!(
            err <= TOL,
            "{what} {} (flip {flip}): max abs {err}",
            case.path
        );
        if case.resized_by_reference {
            assert!(
                cos >= 0.999,
                "{what} {} (flip {flip}): cosine {cos}",
                case.path
            );
        }
    }
}

fn load(dir: &str) -> Box<dyn Encoder> {
    let dev = test_device();
    load_encoder(&fixture(dir), &dev, test_dtype(&dev)).unwrap()
}

fn load_bf16(dir: &str) -> Box<dyn Encoder> {
    load_encoder(&fixture(dir), &test_device(), DType::BF16).unwrap()
}

#[test]
fn encoders_bf16_match_reference() {
    let exp = expected("encoder-expected.safetensors");
    let enc = load_bf16("encoder-dinov2reg");
    assert_eq!(enc.dtype(), DType::BF16);
    check(enc.as_ref(), false, &exp["latents"], "dinov2reg");
    check(enc.as_ref(), true, &exp["latents_hflip"], "dinov2reg");
    let exp = expected("encoder-expected-siglip2-mae.safetensors");
    check(
        load_bf16("encoder-siglip2").as_ref(),
        false,
        &exp["latents_siglip2"],
        "siglip2",
    );
    check(
        load_bf16("encoder-mae").as_ref(),
        false,
        &exp["latents_mae"],
        "mae",
    );
}

#[test]
fn one_u8_upload_gives_both_flips_exactly() {
    // The build's path (one u8 batch, both flips made on the device) gives
    // exactly the per-flip tensors.
    let imgs = crops();
    let refs: Vec<&image::RgbImage> = imgs.iter().collect();
    let dev = test_device();
    let both = u8_to_input(&crops_to_u8(&refs, &dev).unwrap(), &[false, true]).unwrap();
    let plain = crops_to_tensor(&refs, false, &Device::Cpu).unwrap();
    let flipped = crops_to_tensor(&refs, true, &Device::Cpu).unwrap();
    let want = Tensor::cat(&[&plain, &flipped], 0).unwrap();
    assert_eq!(max_abs_diff(&both, &want), 0.0);
}

#[test]
fn dinov2_with_registers_matches_reference() {
    let enc = load("encoder-dinov2reg");
    let spec = enc.spec();
    assert_eq!(spec.kind, "dinov2-reg");
    assert_eq!((spec.tokens, spec.channels), latent_shape());
    let pre: serde_json::Value = read_json("encoder-dinov2reg/preprocessor_config.json");
    let cfg: serde_json::Value = read_json("encoder-dinov2reg/config.json");
    assert_eq!(spec.patch_size as u64, cfg["patch_size"].as_u64().unwrap());
    assert_eq!(
        spec.image_mean[0],
        pre["image_mean"][0].as_f64().unwrap() as f32
    );
    // 256 crops -> 16x16 tokens of patch 14 -> 224 input: the token grid's
    // side (from the fixture's latent shape) times the patch.
    let side = (latent_shape().0 as f64).sqrt().round() as usize;
    assert_eq!(spec.input_size, side * spec.patch_size);
    let exp = expected("encoder-expected.safetensors");
    check(enc.as_ref(), false, &exp["latents"], "dinov2reg");
    check(enc.as_ref(), true, &exp["latents_hflip"], "dinov2reg");
}

#[test]
fn siglip2_matches_reference() {
    let enc = load("encoder-siglip2");
    assert_eq!(enc.spec().kind, "siglip2");
    assert_eq!(enc.spec().image_std, [0.5, 0.5, 0.5]);
    let exp = expected("encoder-expected-siglip2-mae.safetensors");
    check(enc.as_ref(), false, &exp["latents_siglip2"], "siglip2");
}

#[test]
fn mae_matches_reference() {
    let enc = load("encoder-mae");
    assert_eq!(enc.spec().kind, "mae");
    let exp = expected("encoder-expected-siglip2-mae.safetensors");
    check(enc.as_ref(), false, &exp["latents_mae"], "mae");
}

#[test]
fn batch_rows_are_independent() {
    // One image alone gives the same latent as inside the batch.
    let enc = load("encoder-dinov2reg");
    let imgs = crops();
    let dev = test_device();
    let one = crops_to_tensor(&[&imgs[1]], false, &dev).unwrap();
    let got = enc.encode(&one).unwrap();
    if rae_cache::precision::is_half(enc.dtype()) {
        // rounding may differ with the batch shape; compare with the batch
        let refs: Vec<&image::RgbImage> = imgs.iter().collect();
        let all = enc
            .encode(&crops_to_tensor(&refs, false, &dev).unwrap())
            .unwrap();
        assert!(cosine(&got, &all.i(1..2).unwrap()) >= HALF.cosine);
        return;
    }
    let exp = expected("encoder-expected.safetensors");
    let want = exp["latents"].i(1..2).unwrap();
    assert!(max_abs_diff(&got, &want) <= TOL);
}

#[test]
fn config_hash_is_sha256_of_config_json() {
    use sha2::Digest;
    let enc = load("encoder-mae");
    let bytes = std::fs::read(fixture("encoder-mae/config.json")).unwrap();
    let want: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(enc.spec().config_hash, want);
}

#[test]
fn wrong_crop_size_is_an_error() {
    let enc = load("encoder-siglip2");
    // 224 for the fixture's 256 crops: any size but the crop size.
    let wrong = enc.spec().crop_size * 7 / 8;
    let x = Tensor::zeros((1, 3, wrong, wrong), DType::F32, &test_device()).unwrap();
    assert!(enc.encode(&x).is_err());
}
