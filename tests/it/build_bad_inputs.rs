//! `rae-cache build` on a folder mixing good images with broken and odd
//! ones: broken files are recorded with a reason and skipped (exit 0, or
//! non-zero with --strict); odd but valid images are encoded.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common;

/// A 16x12 CMYK JPEG (Adobe marker), as Pillow writes it.
const CMYK_JPEG_HEX: &str = "ffd8ffee000e41646f626500640000000000ffdb0043000302020302020303030304030304050805050404050a070706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffc0001408000c0010044311004d11005911004b1100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda000e0443004d0059004b00003f00fb1ff689ff0097afc6be98ff0086b6ff00a7dffc7abebdf893f127fd6fef7d7bd7ea2d7e5ffed13ff2f5f8d1ff000d6dff004fbff8f57cabf127e24ffadfdefaf7a2bf503f689ff97afc6bf25ffe164ebdff003f7fa1ff001adaf893aede7ef7f79eb457e5ff00ed13ff002f5f8d1ff0b275eff9fbfd0ff8d7cabf1275dbcfdefef3d68affd9";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The bytes of the first fixture image (sorted order) with one of these
/// extensions, else of a 96x64 noise image encoded here in `format`.
fn fixture_or_made(exts: &[&str], format: image::ImageFormat) -> Vec<u8> {
    if let Some(p) = common::first_fixture_image(exts) {
        return std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let noise = image::RgbImage::from_fn(96, 64, |x, y| {
        let v = (x * 7919 + y * 104_729).wrapping_mul(2_654_435_761);
        image::Rgb([(v >> 24) as u8, (v >> 16) as u8, (v >> 8) as u8])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    noise.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

/// Writes the dataset; returns (broken keys, odd-but-valid keys, good keys).
/// The good images are the first two of the fixture image folder (distinct
/// file names), the broken PNG and JPEG are made from its first PNG and
/// first JPEG (or from images made here when it has none): any fixture set
/// will do.
fn dataset(root: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    let good_dir = root.join("good");
    let odd_dir = root.join("odd");
    let bad_dir = root.join("bad");
    for d in [&good_dir, &odd_dir, &bad_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut good = Vec::new();
    for src in common::fixture_images() {
        if good.len() == 2 {
            break;
        }
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        let key = format!("good/{name}");
        if !good.contains(&key) {
            std::fs::copy(&src, good_dir.join(&name)).unwrap();
            good.push(key);
        }
    }

    // Broken.
    let mut png = fixture_or_made(&["png"], image::ImageFormat::Png);
    let n = png.len();
    for b in &mut png[n / 4..n / 2] {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    std::fs::write(bad_dir.join("corrupt.png"), &png).unwrap();
    let jpg = fixture_or_made(&["jpg", "jpeg"], image::ImageFormat::Jpeg);
    std::fs::write(bad_dir.join("truncated.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    std::fs::write(bad_dir.join("zero.JPEG"), b"").unwrap();
    std::fs::write(
        bad_dir.join("text.JPEG"),
        b"this is not an image, just text\n",
    )
    .unwrap();

    // Odd but valid.
    std::fs::write(odd_dir.join("cmyk.jpg"), hex(CMYK_JPEG_HEX)).unwrap();
    let png16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 1600) as u16, (y * 2100) as u16, 40000])
    });
    png16.save(odd_dir.join("deep16.png")).unwrap();
    let gray =
        image::GrayImage::from_fn(64, 48, |x, y| image::Luma([((x * 3 + y * 5) % 256) as u8]));
    gray.save(odd_dir.join("gray.png")).unwrap();
    image::RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 50]))
        .save(odd_dir.join("tiny1x1.png"))
        .unwrap();
    let wide = image::RgbImage::from_fn(2000, 20, |x, y| {
        image::Rgb([(x % 256) as u8, (y * 12) as u8, 128])
    });
    wide.save(odd_dir.join("wide2000x20.png")).unwrap();

    let keys = |v: &[&str]| v.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    (
        keys(&[
            "bad/corrupt.png",
            "bad/text.JPEG",
            "bad/truncated.jpg",
            "bad/zero.JPEG",
        ]),
        keys(&[
            "odd/deep16.png",
            "odd/gray.png",
            "odd/tiny1x1.png",
            "odd/wide2000x20.png",
        ]),
        good,
    )
}

fn build(images: &Path, out: &Path, strict: bool) -> std::process::Output {
    let encoder = common::fixture("encoder-dinov2reg");
    let mut c = common::bin();
    c.env("RAE_LOG", "error").args([
        "build",
        images.to_str().unwrap(),
        "--encoder",
        encoder.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--rows-per-shard",
        "6",
        "--json",
    ]);
    if strict {
        c.arg("--strict");
    }
    c.output().unwrap()
}

#[test]
fn bad_inputs_are_recorded_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let (broken, odd, good) = dataset(&images);

    let out = tmp.path().join("cache");
    let o = build(&images, &out, false);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "build failed:\n{stderr}");
    assert!(
        stderr.contains("warning"),
        "no warning about rejected inputs:\n{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();

    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let rejected: BTreeMap<String, String> = m["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for k in &broken {
        let reason = rejected
            .get(k)
            .unwrap_or_else(|| panic!("{k} not rejected; rejected: {rejected:?}"));
        assert!(!reason.trim().is_empty(), "{k}: empty reason");
        assert!(
            !reason.contains(tmp.path().to_str().unwrap()),
            "{k}: reason leaks the machine path: {reason}"
        );
    }

    // Every listed image is either encoded or rejected, never both.
    let mut encoded = std::collections::BTreeSet::new();
    for s in m["shards"].as_array().unwrap() {
        let Some(f) = s["file"].as_str() else {
            continue;
        };
        let r = rae_cache::shards::ShardReader::open(&out.join(f)).unwrap();
        for g in 0..r.num_row_groups() {
            let b = r.read_row_group(g).unwrap();
            assert!(b.latents.iter().all(|v| v.is_finite()));
            encoded.extend(b.keys);
        }
    }
    for k in good.iter().chain(&odd) {
        assert!(
            encoded.contains(k),
            "{k} was not encoded (rejected: {:?})",
            rejected.get(k)
        );
    }
    // CMYK: encoded (converted to RGB) or rejected with a reason — but accounted for.
    assert!(encoded.contains("odd/cmyk.jpg") ^ rejected.contains_key("odd/cmyk.jpg"));
    for k in rejected.keys() {
        assert!(!encoded.contains(k), "{k} both encoded and rejected");
    }
    assert_eq!(
        summary["images_encoded"].as_u64(),
        Some(encoded.len() as u64)
    );
    assert_eq!(
        summary["images_rejected"].as_u64(),
        Some(rejected.len() as u64)
    );

    // The cache verifies; --strict turns the rejections into a failure.
    let v = common::bin()
        .args(["verify", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let o = build(&images, &tmp.path().join("strict"), true);
    assert!(!o.status.success(), "--strict accepted rejected inputs");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--strict"));
}
