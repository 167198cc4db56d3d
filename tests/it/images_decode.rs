//! Decoding (every supported path and every failure mode) and folder
//! discovery. Test images are written here with the `png` crate and the
//! `image` encoders; JPEG/WebP variants that Rust cannot write (progressive,
//! CMYK, lossy WebP) are small files written by PIL, embedded with PIL's own
//! decoded pixels as the expected values.

use std::path::{Path, PathBuf};

use image::{ImageEncoder, RgbImage};
use rae_cache::images::{DecodeOptions, ImageError, decode_rgb8, decode_rgb8_bytes, discover};

// ---------------------------------------------------------------- fixtures

/// PIL `save(quality=90)` of the 16x16 test gradient (baseline, 4:2:0).
const PIL_JPEG_BASELINE_420: &str = concat!(
    "ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404050a07",
    "0706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffdb0043010304",
    "0405040509050509140d0b0d141414141414141414141414141414141414141414141414141414141414141414141414",
    "1414141414141414141414141414ffc00011080010001003012200021101031101ffc4001f0000010501010101010100",
    "000000000000000102030405060708090a0bffc400b5100002010303020403050504040000017d010203000411051221",
    "31410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a",
    "434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a9293949596979899",
    "9aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1",
    "f2f3f4f5f6f7f8f9faffc4001f0100030101010101010101010000000000000102030405060708090a0bffc400b51100",
    "020102040403040705040400010277000102031104052131061241510761711322328108144291a1b1c109233352f015",
    "6272d10a162434e125f11718191a262728292a35363738393a434445464748494a535455565758595a63646566676869",
    "6a737475767778797a82838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4",
    "c5c6c7c8c9cad2d3d4d5d6d7d8d9dae2e3e4e5e6e7e8e9eaf2f3f4f5f6f7f8f9faffda000c03010002110311003f00f9",
    "7fc1ff000b7ee7ee7f4af71f07fc2dfb9fb9f4ed5ea1e0ff0085bf73f73fa57b8f83fe16f29fb9f4ed5dd86c518f0071",
    "dfc1ef9fffd9",
);
/// Same picture, `progressive=True`.
const PIL_JPEG_PROGRESSIVE_420: &str = concat!(
    "ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404050a07",
    "0706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffdb0043010304",
    "0405040509050509140d0b0d141414141414141414141414141414141414141414141414141414141414141414141414",
    "1414141414141414141414141414ffc20011080010001003012200021101031101ffc400150001010000000000000000",
    "0000000000000607ffc4001501010100000000000000000000000000000203ffda000c0301000210031000000197b850",
    "e6e3ffc400161000030000000000000000000000000000000405ffda00080101000105024e589cb1396272cfffc40017",
    "110100030000000000000000000000000005002131ffda0008010301013f0101dcb9ffc4001511010100000000000000",
    "000000000000000300ffda0008010201013f0135bfffc4001510010100000000000000000000000000000031ffda0008",
    "010100063f028888ffc4001510010100000000000000000000000000000031ffda0008010100013f218b162c5fffda00",
    "0c0301000200030000001063ffc40014110100000000000000000000000000000000ffda0008010301013f107fffc400",
    "14110100000000000000000000000000000000ffda0008010201013f105fffc400191001000203000000000000000000",
    "0000000041f12171a1ffda0008010100013f10a270a144c9aa1fffd9",
);
/// PIL's `convert("RGB")` of both JPEGs above (identical), 16x16x3.
const PIL_JPEG_RGB: &str = concat!(
    "0b141d14162223182931182e42163750163c6216456e16497c17538b185b9b1762a91667bb1770ca1775d5177be01c82",
    "101f2619222b27233236233746223e55214566214d73215281225a912362a0226bae2170c02279cf227edb2184e5278b",
    "132d2e1b2e3228313a373040472f4757304f683057742f5c832f6393316ca12f74b12f79c33081cf2f85dd308ce73492",
    "113a361a3c3b293e41363f48463d4e563c55663d5d733c63823d6a913e72a13d7baf3c81c13d88d03d8edb3d92e64299",
    "11493e184b42264d48354d4f454c56544b5c644c64734c6b804c72904f7a9f4c82ad4b88c04d90ce4c96da4b9ae550a1",
    "0f5743165947255b4e345b56455a5d535a64635a6b7159717f5a798e5c819c5a88ac598fbe5a96cd5a9dd95aa1e45ea7",
    "10664b18684f266957346a5c4469625468696468717169787f69808f6a899d698fab6894be6a9ecc68a4d968a8e46daf",
    "10745218755627775c34786344766a55757064767872767f7f76879078909e7796ac759cbf77a5cd76a9d976afe47bb6",
    "12805919835d27856336846a46846f56847766858074838682858e9186969e859bae83a1c084aacf83b1dc84b7e688bd",
    "138e5f19916328926a37927147917657927e67928874918d83929591949d9f92a3ae90a8c091b1cf91b8dd92bde795c3",
    "129d661a9f6a28a07237a27847a17e57a08567a08d74a09382a19c92a1a4a0a0aaaea0b1c1a1b9cfa0c0dca0c4e7a5cb",
    "11ab6d19ad7126af7735af7e45ae8557ae8c66af9473ae9a81afa491b0ab9faeb1adadb7bfaec0ceaec6dbaecbe5b2d1",
    "0fba7417bc7825be7e35be8644bc8c54bd9464be9b72bca180bdab8fbfb39dbdb8acbbbebfbdc8cdbccedabdd3e4c1d9",
    "0ec97c16ca8025cc8733cc8c44cb9354ca9a64caa270caa77fcbb18fccba9dcbc0abcac5bdcbcecccad5d8cadbe4cfe2",
    "10d58318d78727d98f36d99646d79c55d8a465d9ac73d7b182d8bb90dac39ed8c9add6cec0d8d8ced7dcdbd8e3e6dbe9",
    "15e18c1de2902be4983be59e4ae2a55ae3ab6be3b578e2ba86e4c295e5caa4e3d2b2e2d6c5e3e1d3e2e5e0e3eceae7f2",
);
/// PIL CMYK JPEG (Adobe APP14, transform 0, inverted samples), quality 95, four flat 8x8 quadrants.
const PIL_JPEG_CMYK: &str = concat!(
    "ffd8ffee000e41646f626500640000000000ffdb00430002010101010102010101020202020204030202020205040403",
    "04060506060605060606070908060709070606080b08090a0a0a0a0a06080b0c0b0a0c090a0a0affc000140800100010",
    "044311004d11005911004b1100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc4",
    "00b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c115",
    "52d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a63646566",
    "6768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2",
    "c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda000e0443004d005900",
    "4b00003f00fcdbafd84afdfcafd34afec82bde28afb22b97afc1fafe0fe8afcbfaf78afe962bf8dfafffd9",
);
/// PIL lossy WebP (quality 90) of the test gradient.
const PIL_WEBP_LOSSY: &str = concat!(
    "524946465800000057454250565038204c0000005002009d012a1000100000c01225b002745e802c0004ddcafc755000",
    "feff97c5d8b6ce4b3fdb6703e984baf06ca7ae8338f8bfe047a5fa48f597f107fff0bf7e867fff24dfefb7ffeb100000",
);
/// PIL's decode of that WebP (libwebp), 16x16x3.
const PIL_WEBP_RGB: &str = concat!(
    "09181e121925201b2c30193343193c52174261194b6d194e7d1a578a195d991b66a8196bba1a74c9177cd81985e01a88",
    "0c202516222a24243134223847224154214763235070215581235c8e22629d246bac2270be227bcc2081db228ae4238f",
    "0f2f2d18313228323a3631404a314c572f5167315873305e83326790306ca13273ae3179c23084cf2e89e03092e63298",
    "0e3b32173d37253e3f353d45473d50563b56653e5d723c62823d6c8f3c719e3f78ad3c7ebf3d89ce3a8edd3c97e53e9b",
    "0d4b3b184e41274f46354e4f474c56564a5b654c64724a6a814d718e4b769e4d7fab4b85bf4b90cc4995dd4b9ce34da2",
    "0d5841185b47255c4b365b53485a5d555863665a6c715971825b788f597e9e5c87ad598cbf5a97cd579ddc5aa4e55ba9",
    "10674919694e29695637695d4c6a675b676c6a6a7575697b866b82936987a36b90b06996c469a1d167a6e269afe86bb3",
    "0f724e18765426765b3573604b756c58747167767a74748085778790768ca17795ae769bc175a6ce73abdf75b4e776b8",
    "0f845816865b27876435856a4a867657847c66868573858884878f8f8695a0889cad86a3c186acce84b2de86bbe787c0",
    "0d905d15916024946933916f48927b55908164938a71918d8193948e929a9d95a1ac92a6be92b1cd90b7dc92c0e493c5",
    "0f9f6518a06b28a27235a0774aa184579f8968a19073a09684a29d91a1a2a1a2abaea0b1c2a1bacf9fbfe0a1c8e7a2ce",
    "0eaa6a17ab7026ae7735ad7e49ae8a57ac8f66af9673ad9c84afa391ada8a0b0b1afadb7c1aec0cfabc5deaecee7afd4",
    "0bb97016bc7625bd7e35bd864abe9258bb9867be9f74bda483bfab90beafa1c0b8aebebdc2bec8cfbccedfbed7e6bfdc",
    "0dc67817ca7e25cb8536cb8d4bcc9958ca9f69cca674cbab85cdb292ccb6a1cebfafccc4c1cccfd0cad5dfccdee7cde4",
    "0ed47f19d88528d88d36d8934bd8a05ad6a569d8ae74d8b285dab992d8bea2dac5afd8cbc3d8d6d0d6dbe1d8e4e8daea",
    "14e0861fe38e2be3953ae09a4fe1a55edeac6de1b578e0b989e2c096e1c3a5e4ccb3e1d2c5e2dbd4dfe2e3e1ebebe3ef",
);

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The 16x16 gradient the PIL fixtures were made from.
fn gradient16() -> RgbImage {
    RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([
            (x * 15 + 10) as u8,
            (y * 14 + 20) as u8,
            ((x + y) * 7 + 30) as u8,
        ])
    })
}

fn opts() -> DecodeOptions {
    DecodeOptions::default()
}

fn p(name: &str) -> PathBuf {
    PathBuf::from(name)
}

fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    decode_rgb8_bytes(bytes, &p("test-input"), &opts())
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn png_bytes(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
    png_bytes_with(w, h, color, depth, data, None, None)
}

fn png_bytes_with(
    w: u32,
    h: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
    palette: Option<&[u8]>,
    trns: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if let Some(pl) = palette {
            enc.set_palette(pl.to_vec());
        }
        if let Some(t) = trns {
            enc.set_trns(t.to_vec());
        }
        let mut wr = enc.write_header().expect("png header");
        wr.write_image_data(data).expect("png data");
    }
    out
}

/// Big-endian 16-bit samples, as stored in PNG.
fn be16(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

fn jpeg_bytes(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("jpeg encode");
    out
}

// ------------------------------------------------------------------- PNG

#[test]
fn png_rgb8_is_exact() {
    let img = gradient16();
    let bytes = png_bytes(
        16,
        16,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        img.as_raw(),
    );
    assert_eq!(decode(&bytes).unwrap(), img);
}

#[test]
fn png_rgba8_drops_alpha_without_compositing() {
    // Fully transparent pixels keep their colour (PIL convert("RGB")).
    let data = [10, 20, 30, 0, 200, 100, 50, 128, 1, 2, 3, 255];
    let bytes = png_bytes(3, 1, png::ColorType::Rgba, png::BitDepth::Eight, &data);
    assert_eq!(
        decode(&bytes).unwrap().into_raw(),
        vec![10, 20, 30, 200, 100, 50, 1, 2, 3]
    );
}

#[test]
fn png_gray8_and_gray_alpha8_replicate() {
    let bytes = png_bytes(
        3,
        1,
        png::ColorType::Grayscale,
        png::BitDepth::Eight,
        &[0, 77, 255],
    );
    assert_eq!(
        decode(&bytes).unwrap().into_raw(),
        vec![0, 0, 0, 77, 77, 77, 255, 255, 255]
    );
    let bytes = png_bytes(
        2,
        1,
        png::ColorType::GrayscaleAlpha,
        png::BitDepth::Eight,
        &[90, 0, 180, 255],
    );
    assert_eq!(
        decode(&bytes).unwrap().into_raw(),
        vec![90, 90, 90, 180, 180, 180]
    );
}

#[test]
fn png_low_bit_gray_scales_to_full_range() {
    // PIL unpacks "L;2" as 0, 85, 170, 255. Four 2-bit pixels in one byte.
    let bytes = png_bytes(
        4,
        1,
        png::ColorType::Grayscale,
        png::BitDepth::Two,
        &[0b00_01_10_11],
    );
    let got = decode(&bytes).unwrap().into_raw();
    assert_eq!(
        got.iter().step_by(3).copied().collect::<Vec<_>>(),
        vec![0, 85, 170, 255]
    );
}

/// Values chosen so that `>> 8`, rounding and clipping all disagree.
const V16: [u16; 6] = [0x0000, 0x00FF, 0x12FF, 0x8080, 0xFF7F, 0xFFFF];

#[test]
fn png_rgb16_and_rgba16_keep_the_high_byte() {
    // Checked against PIL 13: "RGB;16B"/"RGBA;16B" unpack the MSB.
    let bytes = png_bytes(
        2,
        1,
        png::ColorType::Rgb,
        png::BitDepth::Sixteen,
        &be16(&V16),
    );
    assert_eq!(
        decode(&bytes).unwrap().into_raw(),
        vec![0, 0, 18, 128, 255, 255]
    );
    let rgba = [V16[0], V16[1], V16[2], 0x1234, V16[3], V16[4], V16[5], 0];
    let bytes = png_bytes(
        2,
        1,
        png::ColorType::Rgba,
        png::BitDepth::Sixteen,
        &be16(&rgba),
    );
    assert_eq!(
        decode(&bytes).unwrap().into_raw(),
        vec![0, 0, 18, 128, 255, 255]
    );
}

#[test]
fn png_gray16_clips_and_gray_alpha16_keeps_the_high_byte() {
    // PIL opens 16-bit gray as "I;16"; I;16 -> RGB clips at 255.
    let bytes = png_bytes(
        6,
        1,
        png::ColorType::Grayscale,
        png::BitDepth::Sixteen,
        &be16(&V16),
    );
    let got: Vec<u8> = decode(&bytes)
        .unwrap()
        .into_raw()
        .into_iter()
        .step_by(3)
        .collect();
    assert_eq!(got, vec![0, 255, 255, 255, 255, 255]);
    // With a tRNS chunk it is still "I;16" for PIL: clipped too.
    let bytes = png_bytes_with(
        6,
        1,
        png::ColorType::Grayscale,
        png::BitDepth::Sixteen,
        &be16(&V16),
        None,
        Some(&[0, 0]),
    );
    let got: Vec<u8> = decode(&bytes)
        .unwrap()
        .into_raw()
        .into_iter()
        .step_by(3)
        .collect();
    assert_eq!(got, vec![0, 255, 255, 255, 255, 255]);
    // 16-bit gray+alpha opens as RGBA via "LA;16B": high byte.
    let la: Vec<u16> = V16.iter().flat_map(|&v| [v, 0x4000]).collect();
    let bytes = png_bytes(
        6,
        1,
        png::ColorType::GrayscaleAlpha,
        png::BitDepth::Sixteen,
        &be16(&la),
    );
    let got: Vec<u8> = decode(&bytes)
        .unwrap()
        .into_raw()
        .into_iter()
        .step_by(3)
        .collect();
    assert_eq!(got, vec![0, 0, 18, 128, 255, 255]);
}

#[test]
fn png_palette_with_and_without_transparency() {
    let palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 8, 7];
    let idx = [3, 2, 1, 0];
    let want = vec![9, 8, 7, 0, 0, 255, 0, 255, 0, 255, 0, 0];
    let bytes = png_bytes_with(
        4,
        1,
        png::ColorType::Indexed,
        png::BitDepth::Eight,
        &idx,
        Some(&palette),
        None,
    );
    assert_eq!(decode(&bytes).unwrap().into_raw(), want);
    // tRNS makes entries transparent; the palette colour stays.
    let bytes = png_bytes_with(
        4,
        1,
        png::ColorType::Indexed,
        png::BitDepth::Eight,
        &idx,
        Some(&palette),
        Some(&[0, 0, 0, 0]),
    );
    assert_eq!(decode(&bytes).unwrap().into_raw(), want);
    // 4-bit indices.
    let bytes = png_bytes_with(
        4,
        1,
        png::ColorType::Indexed,
        png::BitDepth::Four,
        &[0x32, 0x10],
        Some(&palette),
        None,
    );
    assert_eq!(decode(&bytes).unwrap().into_raw(), want);
}

// ------------------------------------------------------------------ JPEG

/// zune-jpeg's IDCT and colour conversion agree with libjpeg-turbo to +-1
/// (4:4:4 files), but its 2x chroma upsampling rounds after the vertical and
/// again after the horizontal step, where libjpeg's "fancy" upsampling rounds
/// once: on 4:2:0 files a few pixels differ by up to 3 levels and chroma is
/// biased by ~+0.2 level. Measured on PIL-encoded photos this stays within
/// max 4 / mean 0.25 on the 256x256 ADM crop.
fn assert_close_to_pil_jpeg(got: &[u8]) {
    let want = unhex(PIL_JPEG_RGB);
    let d = max_diff(got, &want);
    let mean = got
        .iter()
        .zip(&want)
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / want.len() as f64;
    assert!(d <= 3 && mean < 0.5, "vs PIL: max {d} mean {mean:.3}");
}

#[test]
fn jpeg_baseline_matches_pil_closely() {
    let got = decode(&unhex(PIL_JPEG_BASELINE_420)).unwrap();
    assert_eq!(got.dimensions(), (16, 16));
    assert_close_to_pil_jpeg(got.as_raw());
}

#[test]
fn jpeg_progressive_matches_pil_closely() {
    let prog = unhex(PIL_JPEG_PROGRESSIVE_420);
    assert!(
        prog.windows(2).any(|w| w == [0xFF, 0xC2]),
        "fixture is progressive (SOF2)"
    );
    let got = decode(&prog).unwrap();
    assert_close_to_pil_jpeg(got.as_raw());
    // Same coefficients as the baseline file: identical pixels.
    assert_eq!(got, decode(&unhex(PIL_JPEG_BASELINE_420)).unwrap());
}

#[test]
fn jpeg_cmyk_adobe_converts_like_pil() {
    let got = decode(&unhex(PIL_JPEG_CMYK)).unwrap();
    assert_eq!(got.dimensions(), (16, 16));
    // PIL: quadrants of CMYK (200,30,0,50), (0,0,0,0), (10,120,240,0), (90,90,90,200).
    let want = [
        ((0, 0), [44, 181, 205]),
        ((8, 0), [255, 255, 255]),
        ((0, 8), [245, 135, 15]),
        ((8, 8), [36, 36, 36]),
    ];
    for ((x0, y0), rgb) in want {
        for y in y0..y0 + 8 {
            for x in x0..x0 + 8 {
                let px = got.get_pixel(x, y).0;
                let d = px
                    .iter()
                    .zip(rgb)
                    .map(|(a, b)| a.abs_diff(b))
                    .max()
                    .unwrap_or(0);
                assert!(d <= 1, "({x},{y}): {px:?} vs PIL {rgb:?}");
            }
        }
    }
}

#[test]
fn jpeg_written_by_image_crate_round_trips_closely() {
    let img = gradient16();
    let got = decode(&jpeg_bytes(&img, 95)).unwrap();
    assert!(max_diff(got.as_raw(), img.as_raw()) <= 12);
}

#[test]
fn jpeg_gray_replicates() {
    let gray = image::GrayImage::from_fn(16, 16, |x, _| image::Luma([(x * 16) as u8]));
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
        .write_image(gray.as_raw(), 16, 16, image::ExtendedColorType::L8)
        .unwrap();
    let got = decode(&bytes).unwrap();
    assert!(got.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
}

// ------------------------------------------------------------------ WebP

#[test]
fn webp_lossless_is_exact_and_drops_alpha() {
    let img = gradient16();
    let mut bytes = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
        .encode(img.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    assert_eq!(decode(&bytes).unwrap(), img);

    let rgba: Vec<u8> = img
        .pixels()
        .flat_map(|p| [p.0[0], p.0[1], p.0[2], (p.0[0] / 2)])
        .collect();
    let mut bytes = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
        .encode(&rgba, 16, 16, image::ExtendedColorType::Rgba8)
        .unwrap();
    assert_eq!(decode(&bytes).unwrap(), img);
}

#[test]
fn webp_lossy_matches_pil_closely() {
    let got = decode(&unhex(PIL_WEBP_LOSSY)).unwrap();
    assert_eq!(got.dimensions(), (16, 16));
    let want = unhex(PIL_WEBP_RGB);
    let d = max_diff(got.as_raw(), &want);
    let mean = got
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / want.len() as f64;
    eprintln!("lossy WebP vs libwebp: max {d} mean {mean:.3}");
    assert!(d <= 1 && mean < 0.1, "max {d} mean {mean}");
}

#[test]
fn format_comes_from_content_not_extension() {
    let dir = tempfile::tempdir().unwrap();
    let img = gradient16();
    let path = dir.path().join("actually_png.JPEG");
    std::fs::write(
        &path,
        png_bytes(
            16,
            16,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            img.as_raw(),
        ),
    )
    .unwrap();
    assert_eq!(decode_rgb8(&path, &opts()).unwrap(), img);
}

// ---------------------------------------------------------------- errors

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn zero_byte_file_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "zero.JPEG", b"");
    match decode_rgb8(&path, &opts()) {
        Err(ImageError::Empty { path: p }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
}

#[test]
fn text_file_named_jpeg_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "n01440764_1.JPEG",
        b"<html>404 not found</html>\n",
    );
    let err = decode_rgb8(&path, &opts()).unwrap_err();
    assert!(matches!(err, ImageError::Unsupported { .. }), "{err:?}");
    assert!(
        err.to_string().contains("n01440764_1.JPEG"),
        "error names the file: {err}"
    );
}

#[test]
fn other_formats_are_unsupported() {
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
    assert!(matches!(decode(gif), Err(ImageError::Unsupported { .. })));
}

#[test]
fn missing_file_is_io_error_naming_it() {
    let err = decode_rgb8(Path::new("/nonexistent/dir/x.jpg"), &opts()).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/dir/x.jpg"));
}

#[test]
fn truncated_jpeg_is_corrupt() {
    let full = jpeg_bytes(
        &RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 99])
        }),
        90,
    );
    for cut in [full.len() / 2, full.len() - 40, 200] {
        let err = decode(&full[..cut]).unwrap_err();
        assert!(
            matches!(err, ImageError::Corrupt { .. }),
            "cut {cut}: {err:?}"
        );
    }
    let prog = unhex(PIL_JPEG_PROGRESSIVE_420);
    let err = decode(&prog[..prog.len() * 2 / 3]).unwrap_err();
    assert!(
        matches!(err, ImageError::Corrupt { .. }),
        "progressive: {err:?}"
    );
}

#[test]
fn truncated_png_and_webp_are_corrupt() {
    let img = gradient16();
    let full = png_bytes(
        16,
        16,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        img.as_raw(),
    );
    let err = decode(&full[..full.len() / 2]).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
    let webp = unhex(PIL_WEBP_LOSSY);
    let err = decode(&webp[..webp.len() - 30]).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
}

#[test]
fn corrupt_headers_are_corrupt() {
    // A JPEG frame header claiming zero components.
    let mut jpeg = jpeg_bytes(&gradient16(), 90);
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 9] = 0; // Nf
    assert!(
        matches!(decode(&jpeg), Err(ImageError::Corrupt { .. })),
        "{:?}",
        decode(&jpeg)
    );
    // A PNG whose pixel data was overwritten (CRC and zlib stream broken).
    let mut png = png_bytes(
        16,
        16,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        gradient16().as_raw(),
    );
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
    for b in &mut png[idat + 4..idat + 24] {
        *b ^= 0xA5;
    }
    assert!(
        matches!(decode(&png), Err(ImageError::Corrupt { .. })),
        "{:?}",
        decode(&png)
    );
}

#[test]
fn over_limit_images_are_refused_before_decoding() {
    let small = DecodeOptions { max_pixels: 100 };
    let img = gradient16();
    let png = png_bytes(
        16,
        16,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        img.as_raw(),
    );
    match decode_rgb8_bytes(&png, &p("big.png"), &small) {
        Err(ImageError::TooLarge {
            width: 16,
            height: 16,
            pixels: 256,
            limit: 100,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let jpeg = jpeg_bytes(&img, 90);
    assert!(matches!(
        decode_rgb8_bytes(&jpeg, &p("big.jpg"), &small),
        Err(ImageError::TooLarge { .. })
    ));
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .encode(img.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    assert!(matches!(
        decode_rgb8_bytes(&webp, &p("big.webp"), &small),
        Err(ImageError::TooLarge { .. })
    ));

    // Decompression bombs: headers claiming huge sizes over tiny bodies are
    // refused from the header alone (no giant allocation, no decode).
    let mut bomb = png.clone();
    bomb[16..20].copy_from_slice(&60_000u32.to_be_bytes()); // IHDR width
    bomb[20..24].copy_from_slice(&60_000u32.to_be_bytes()); // IHDR height
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    match decode(&bomb) {
        Err(ImageError::TooLarge {
            width: 60_000,
            height: 60_000,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let mut jbomb = jpeg.clone();
    let sof = jbomb.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jbomb[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes()); // height
    jbomb[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes()); // width
    match decode(&jbomb) {
        Err(ImageError::TooLarge {
            width: 60_000,
            height: 60_000,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// CRC-32 (PNG chunk checksum), bitwise.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn mutated_files_never_panic() {
    // Deterministic byte mutations of every valid fixture: each decode must
    // return (Ok or a typed error), never unwind out of the library.
    let img = gradient16();
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .encode(img.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    let seeds = [
        unhex(PIL_JPEG_BASELINE_420),
        unhex(PIL_JPEG_PROGRESSIVE_420),
        unhex(PIL_JPEG_CMYK),
        unhex(PIL_WEBP_LOSSY),
        webp,
        png_bytes(
            16,
            16,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            img.as_raw(),
        ),
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for seed in &seeds {
        for _ in 0..150 {
            let mut b = seed.clone();
            for _ in 0..1 + next() % 6 {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            if next() % 4 == 0 {
                let keep = 2 + (next() as usize) % (b.len() - 2);
                b.truncate(keep);
            }
            let r = std::panic::catch_unwind(|| decode(&b));
            let r = r.expect("decode_rgb8_bytes let a panic escape");
            if r.is_err() {
                errors += 1;
            }
        }
    }
    assert!(errors > 0, "mutations should break at least some files");
}

// ------------------------------------------------------------- discovery

fn touch(root: &Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b"x").unwrap();
}

#[test]
fn discovers_imagenet_layout() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for f in [
        "n02/b.JPEG",
        "n01/z.jpeg",
        "n01/a.PNG",
        "n01/sub/deep.webp",
        "n01/.hidden.jpg",
        "n01/notes.txt",
        "n03/x.Jpg",
        ".ipynb_checkpoints/c.jpg",
        "loose.jpg",
    ] {
        touch(r, f);
    }
    std::fs::create_dir_all(r.join("n04_empty")).unwrap();
    let d = discover(r).unwrap();
    assert_eq!(d.classes, vec!["n01", "n02", "n03", "n04_empty"]);
    let got: Vec<(&str, i32)> = d
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.label))
        .collect();
    assert_eq!(
        got,
        vec![
            ("n01/a.PNG", 0),
            ("n01/sub/deep.webp", 0),
            ("n01/z.jpeg", 0),
            ("n02/b.JPEG", 1),
            ("n03/x.Jpg", 2)
        ]
    );
    for e in &d.entries {
        assert_eq!(e.path, r.join(&e.key));
    }
    let skipped: Vec<&str> = d.skipped.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        skipped,
        vec![
            ".ipynb_checkpoints",
            "loose.jpg",
            "n01/.hidden.jpg",
            "n01/notes.txt"
        ]
    );
    assert!(d.skipped.iter().all(|s| !s.reason.is_empty()));
}

#[test]
fn discovers_flat_folder() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for f in ["b.png", "a.JPG", "c.webp", ".DS_Store", "readme.md"] {
        touch(r, f);
    }
    let d = discover(r).unwrap();
    assert!(d.classes.is_empty());
    let got: Vec<(&str, i32)> = d
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.label))
        .collect();
    assert_eq!(got, vec![("a.JPG", -1), ("b.png", -1), ("c.webp", -1)]);
    assert_eq!(d.skipped.len(), 2);
}

#[cfg(unix)]
#[test]
fn follows_symlinks_once_and_survives_loops() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    touch(r, "cls/a.jpg");
    let other = tempfile::tempdir().unwrap();
    touch(other.path(), "ext.png");
    symlink(other.path(), r.join("cls/linked")).unwrap(); // followed
    symlink(r, r.join("cls/loop_to_root")).unwrap(); // loop
    symlink(r.join("cls"), r.join("cls/loop_to_self")).unwrap(); // loop
    symlink(r.join("cls/a.jpg"), r.join("cls/b.jpg")).unwrap(); // file link: taken
    symlink(r.join("missing.jpg"), r.join("cls/dangling.jpg")).unwrap();
    let d = discover(r).unwrap();
    let keys: Vec<&str> = d.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, vec!["cls/a.jpg", "cls/b.jpg", "cls/linked/ext.png"]);
    let skipped: Vec<&str> = d.skipped.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        skipped,
        vec!["cls/dangling.jpg", "cls/loop_to_root", "cls/loop_to_self"]
    );
}

#[test]
fn missing_root_is_an_error_naming_it() {
    let err = discover(Path::new("/nonexistent/dataset")).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/dataset"));
}

#[cfg(unix)]
#[test]
fn unreadable_directory_is_an_error_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    touch(dir.path(), "cls/a.jpg");
    let locked = dir.path().join("cls");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let readable_anyway = std::fs::read_dir(&locked).is_ok(); // root ignores modes
    let result = discover(dir.path());
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    if readable_anyway {
        eprintln!("running with permission overrides (root): cannot make a directory unreadable");
        return;
    }
    let err = result.unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("cls"), "{err}");
}
