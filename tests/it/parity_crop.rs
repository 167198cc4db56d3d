//! ADM center crop parity with the reference (PIL) crops in
//! `encoder-expected.safetensors` (`adm_crop_u8`, order of
//! `encoder-expected.json` `images`).

use crate::common;

use rae_cache::images::{DecodeOptions, load_crop};

struct Stats {
    max: u8,
    mean: f64,
}

fn diff(a: &[u8], b: &[u8]) -> Stats {
    assert_eq!(a.len(), b.len());
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    Stats {
        max,
        mean: sum as f64 / a.len() as f64,
    }
}

#[test]
fn adm_crop_matches_reference() {
    let meta = common::read_json("encoder-expected.json");
    let images = meta["images"].as_array().expect("images list");
    let path = common::fixture("encoder-expected.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let crops = st.tensor("adm_crop_u8").expect("adm_crop_u8");
    assert_eq!(crops.dtype(), safetensors::Dtype::U8);
    let shape = crops.shape().to_vec();
    assert_eq!(shape.len(), 4);
    assert_eq!(shape[0], images.len(), "one crop per listed image");
    assert_eq!(shape[1], shape[2], "square crops");
    assert_eq!(shape[3], 3);
    let size = shape[1];
    let per = size * size * 3;
    let data = crops.data();

    let mut resized_seen = 0;
    let mut failures = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let rel = img["path"].as_str().expect("path");
        let resized = img["resized_by_reference"].as_bool().expect("flag");
        let file = common::fixture("images").join(rel);
        let ours = load_crop(&file, size as u32, &DecodeOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ours.dimensions(), (size as u32, size as u32));
        let want = &data[i * per..(i + 1) * per];
        let s = diff(ours.as_raw(), want);
        eprintln!("{rel}: resized={resized} max={} mean={:.4}", s.max, s.mean);
        if resized {
            resized_seen += 1;
            // A faithful reimplementation stays within 2/255 (fixture README);
            // JPEG decoders differ from libjpeg by IDCT/upsampling rounding.
            if s.max > 2 || s.mean >= 0.5 {
                failures.push(format!("{rel}: max {} mean {:.4}", s.max, s.mean));
            }
        } else if s.max != 0 {
            failures.push(format!(
                "{rel}: not exact (max {} mean {:.4})",
                s.max, s.mean
            ));
        }
    }
    assert!(resized_seen > 0, "fixture lists no resized photo");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The crop of a PNG photo goes through no lossy decoder, so the resampler
/// alone decides the result: it must be byte-exact with Pillow.
#[test]
fn adm_crop_of_png_photos_is_exact() {
    let meta = common::read_json("encoder-expected.json");
    let images = meta["images"].as_array().expect("images list");
    let bytes = std::fs::read(common::fixture("encoder-expected.safetensors")).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let crops = st.tensor("adm_crop_u8").expect("adm_crop_u8");
    let size = crops.shape()[1];
    let per = size * size * 3;
    let mut checked = 0;
    for (i, img) in images.iter().enumerate() {
        let rel = img["path"].as_str().expect("path");
        if !img["resized_by_reference"].as_bool().expect("flag")
            || !rel.to_ascii_lowercase().ends_with(".png")
        {
            continue;
        }
        let ours = load_crop(
            &common::fixture("images").join(rel),
            size as u32,
            &DecodeOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = diff(ours.as_raw(), &crops.data()[i * per..(i + 1) * per]);
        assert_eq!(s.max, 0, "{rel}: mean {:.4}", s.mean);
        checked += 1;
    }
    assert!(checked > 0, "fixture has no resized PNG");
}
