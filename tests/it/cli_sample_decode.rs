//! `rae-cache sample` and `rae-cache decode` through the binary, against the
//! reference fixtures (sampler-io, decoder-io). Shapes and hyper-parameters
//! come from the fixture JSONs and tensors.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rae_cache::shards::{
    LatentDType, LatentRow, LatentStats, ShardReader, ShardWriter, WriterOptions,
};

use crate::common::{self, bin, fixture, io, json, max_abs_diff, read_json, run_ok};

const SAMPLER_TOL: f32 = 2e-4;
const MODEL_TOL: f32 = 1e-4;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// All rows of the shards of a sample/cache dir: latents `[N, T, C]`, labels, keys.
fn read_dir_shards(dir: &Path) -> (Tensor, Vec<i32>, Vec<String>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("shards"))
        .expect("shards dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    let (mut lat, mut labels, mut keys, mut tc) = (vec![], vec![], vec![], (0, 0));
    for f in files {
        let b = ShardReader::open(&f).unwrap().read_all().unwrap();
        tc = (b.tokens, b.channels);
        lat.extend_from_slice(&b.latents);
        labels.extend(b.labels);
        keys.extend(b.keys);
    }
    let n = keys.len();
    (
        Tensor::from_vec(lat, (n, tc.0, tc.1), &Device::Cpu).unwrap(),
        labels,
        keys,
    )
}

/// `[N,C,H,W]` -> token-major `[N,H*W,C]`, the shard layout.
fn to_tokens(x: &Tensor) -> Tensor {
    let (n, c, h, w) = x.dims4().unwrap();
    x.permute((0, 2, 3, 1))
        .unwrap()
        .reshape((n, h * w, c))
        .unwrap()
}

fn sample_args(out: &Path, noise: &Path, labels: &str, extra: &[&str]) -> Vec<String> {
    let spec = read_json("sampler.json");
    let mut a: Vec<String> = [
        "sample",
        "--model",
        &s(&fixture("ditdh.safetensors")),
        "--model-config",
        &s(&fixture("ditdh.json")),
        "--noise",
        &s(noise),
        "--labels",
        labels,
        "--steps",
        &spec["num_steps"].as_u64().unwrap().to_string(),
        "--shift",
        &spec["time_shift"].as_f64().unwrap().to_string(),
        "--dtype",
        "f32",
        "--device",
        "cpu",
        "--out",
        &s(out),
        "--json",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn write_noise(dir: &Path, z0: &Tensor) -> PathBuf {
    let p = dir.join("z0.safetensors");
    candle_core::safetensors::save(&HashMap::from([("z0".to_string(), z0.clone())]), &p).unwrap();
    p
}

fn fixture_labels(y: &Tensor) -> String {
    let y: Vec<i64> = y.to_dtype(DType::I64).unwrap().to_vec1().unwrap();
    y.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn sample_cli_matches_reference_with_and_without_cfg() {
    let spec = read_json("sampler.json");
    assert_eq!(spec["model"], "ditdh");
    assert_eq!(spec["method"], "euler-ode");
    assert_eq!(
        spec["null_class"],
        read_json("ditdh.json")["num_classes"],
        "the CLI uses num_classes as the null class"
    );
    let io = io("sampler-io.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let noise = write_noise(tmp.path(), &io["z0"]);
    let labels = fixture_labels(&io["y"]);
    let n = io["z0"].dim(0).unwrap();
    let iv = spec["cfg_interval"].as_array().unwrap();
    let cfg_scale = spec["cfg_scale"].as_f64().unwrap().to_string();
    let cfg_iv = format!("{},{}", iv[0], iv[1]);
    for (key, extra) in [
        ("sample", vec!["--batch-size", "1"]),
        (
            "sample_cfg",
            vec!["--cfg-scale", &cfg_scale, "--cfg-interval", &cfg_iv],
        ),
    ] {
        let out = tmp.path().join(key);
        let summary = json(&run_ok(sample_args(&out, &noise, &labels, &extra)));
        assert_eq!(summary["samples"], n);
        assert_eq!(summary["denormalised"], false);

        let (lat, got_labels, keys) = read_dir_shards(&out);
        let err = max_abs_diff(&lat, &to_tokens(&io[key]));
        eprintln!("{key}: max abs err {err:e}");
        assert!(err <= SAMPLER_TOL, "{key}: {err} > {SAMPLER_TOL}");
        assert_eq!(
            fixture_labels(&Tensor::new(got_labels.as_slice(), &Device::Cpu).unwrap()),
            labels
        );
        assert_eq!(keys[0], "sample/000000");

        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["build_args"]["source"], "sample");
        assert_eq!(m["preprocessing"]["denormalised"], false);
        assert_eq!(m["totals"]["rows"], n);
        let shard = ShardReader::open(&out.join("shards/part-00000.parquet")).unwrap();
        assert_eq!(shard.dtype(), LatentDType::F32);
        assert_eq!(shard.metadata()["rae_cache.source"], "sample");
        assert_eq!(shard.metadata()["rae_cache.denormalised"], "false");
    }
}

/// Seeded noise: the same samples whatever the batch size; --stats
/// de-normalises exactly as z * sqrt(var + 1e-5) + mean.
#[test]
fn sample_is_seeded_batch_independent_and_denormalised_with_stats() {
    let cfg = read_json("ditdh.json");
    let (c, h) = (
        cfg["in_channels"].as_u64().unwrap() as usize,
        cfg["input_size"].as_u64().unwrap() as usize,
    );
    let tmp = tempfile::tempdir().unwrap();
    let common = |out: &Path, bs: &str, seed: &str| -> Vec<String> {
        [
            "sample",
            "--model",
            &s(&fixture("ditdh.safetensors")),
            "--model-config",
            &s(&fixture("ditdh.json")),
            "--num",
            "3",
            "--labels",
            "equal",
            "--steps",
            "3",
            "--seed",
            seed,
            "--batch-size",
            bs,
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--out",
            &s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let (a, b, d) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("d"),
    );
    run_ok(common(&a, "1", "5"));
    run_ok(common(&b, "3", "5"));
    run_ok(common(&d, "3", "6"));
    let (la, ya, _) = read_dir_shards(&a);
    let (lb, yb, _) = read_dir_shards(&b);
    let (ld, _, _) = read_dir_shards(&d);
    assert_eq!(ya, yb);
    assert!(
        max_abs_diff(&la, &lb) <= 1e-5,
        "batch size changed the samples"
    );
    assert!(
        max_abs_diff(&la, &ld) > 1e-2,
        "the seed did not change the samples"
    );

    // stats: mean = 0.5 + 0.01 i, var = 1 + 0.1 i over [C,H,W]
    let k = c * h * h;
    let stats = LatentStats {
        mean: (0..k).map(|i| 0.5 + 0.01 * i as f32).collect(),
        var: (0..k).map(|i| 1.0 + 0.1 * i as f32).collect(),
        count: 10,
        channels: c,
        height: h,
        width: h,
    };
    let sp = tmp.path().join("stats.safetensors");
    stats.save(&sp).unwrap();
    let e = tmp.path().join("e");
    let mut args = common(&e, "3", "5");
    args.extend(["--stats".to_string(), s(&sp)]);
    run_ok(&args);
    let (le, _, _) = read_dir_shards(&e);
    let std = Tensor::from_vec(
        stats
            .var
            .iter()
            .map(|v| (v + 1e-5).sqrt())
            .collect::<Vec<f32>>(),
        (1, c, h, h),
        &Device::Cpu,
    )
    .unwrap();
    let mean = Tensor::from_vec(stats.mean.clone(), (1, c, h, h), &Device::Cpu).unwrap();
    let norm = lb
        .reshape((3, h, h, c))
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let want = to_tokens(
        &norm
            .broadcast_mul(&std)
            .unwrap()
            .broadcast_add(&mean)
            .unwrap(),
    );
    assert!(max_abs_diff(&le, &want) <= 1e-4);
    let shard = ShardReader::open(&e.join("shards/part-00000.parquet")).unwrap();
    assert_eq!(shard.metadata()["rae_cache.denormalised"], "true");
}

/// A shard with the decoder fixture's input latents (rows 1.. flipped-free,
/// small row groups so batches cross them).
fn decoder_shard(dir: &Path, with_flip: bool) -> (PathBuf, Vec<String>) {
    let io = io("decoder-io.safetensors");
    let z = &io["z"];
    let (b, t, c) = z.dims3().unwrap();
    let lat: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
    let mut opts = WriterOptions::new(LatentDType::F32, t, c);
    opts.rows_per_row_group = 2;
    let p = dir.join("part-00000.parquet");
    let mut w = ShardWriter::create(&p, opts).unwrap();
    let keys: Vec<String> = (0..b)
        .map(|i| format!("n0000{}/img{i}.JPEG", i % 2))
        .collect();
    for i in 0..b {
        w.write_rows(&[LatentRow {
            key: &keys[i],
            label: i as i32,
            flip: with_flip && i == b - 1,
            latent: &lat[i * t * c..(i + 1) * t * c],
        }])
        .unwrap();
    }
    w.finish().unwrap();
    (p, keys)
}

fn decode_args(input: &Path, out: &Path, format: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "decode",
        &s(input),
        "--decoder",
        &s(&fixture("decoder.safetensors")),
        "--decoder-config",
        &s(&fixture("decoder.json")),
        "--format",
        format,
        "--batch-size",
        "3",
        "--device",
        "cpu",
        "--out",
        &s(out),
        "--json",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

#[test]
fn decode_safetensors_matches_reference() {
    let io = io("decoder-io.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let (shard, _) = decoder_shard(tmp.path(), false);
    let out = tmp.path().join("out");
    let summary = json(&run_ok(decode_args(&shard, &out, "safetensors", &[])));
    let b = io["z"].dim(0).unwrap();
    assert_eq!(summary["images"], b);
    let got = candle_core::safetensors::load(out.join("pixels.safetensors"), &Device::Cpu).unwrap();
    let err = max_abs_diff(&got["pixels"], &io["pixels"]);
    eprintln!("decode pixels: max abs err {err:e}");
    assert!(err <= MODEL_TOL, "{err} > {MODEL_TOL}");
    let labels: Vec<i32> = got["labels"].to_vec1().unwrap();
    assert_eq!(labels, (0..b as i32).collect::<Vec<_>>());
    let keys = std::fs::read_to_string(out.join("keys.txt")).unwrap();
    assert_eq!(keys.lines().count(), b);

    // --limit
    let out2 = tmp.path().join("out2");
    run_ok(decode_args(&shard, &out2, "safetensors", &["--limit", "2"]));
    let got2 =
        candle_core::safetensors::load(out2.join("pixels.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got2["pixels"].dim(0).unwrap(), 2.min(b));
}

/// Expected bytes: clamp(0,1) * 255, truncated (the reference's uint8 cast).
fn expected_u8(pixels: &Tensor, i: usize) -> Vec<u8> {
    let img = pixels
        .get(i)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap();
    img.to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0) as u8)
        .collect()
}

fn close_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.abs_diff(*y) <= 1)
}

#[test]
fn decode_png_and_grid() {
    let io = io("decoder-io.safetensors");
    let (b, _, _) = io["z"].dims3().unwrap();
    let (_, _, hh, ww) = io["pixels"].dims4().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (shard, keys) = decoder_shard(tmp.path(), true);
    let out = tmp.path().join("png");
    run_ok(decode_args(tmp.path(), &out, "png", &["--grid", "4"]));
    for (i, k) in keys.iter().enumerate() {
        let stem = k.trim_end_matches(".JPEG");
        let name = if i == b - 1 {
            format!("{stem}_flip.png")
        } else {
            format!("{stem}.png")
        };
        let img = image::open(out.join(&name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .to_rgb8();
        assert_eq!((img.width() as usize, img.height() as usize), (ww, hh));
        assert!(
            close_bytes(img.as_raw(), &expected_u8(&io["pixels"], i)),
            "{name}: pixels differ"
        );
    }
    let g = image::open(out.join("grid.png")).unwrap();
    let n = 4.min(b);
    let cols = (n as f64).sqrt().ceil() as usize;
    assert_eq!(
        (g.width() as usize, g.height() as usize),
        (cols * ww, n.div_ceil(cols) * hh)
    );
    drop(shard);
}

#[test]
fn decode_npz_is_what_the_adm_evaluator_reads() {
    let io = io("decoder-io.safetensors");
    let (b, _, _) = io["z"].dims3().unwrap();
    let (_, _, hh, ww) = io["pixels"].dims4().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (shard, _) = decoder_shard(tmp.path(), false);
    let out = tmp.path().join("npz");
    run_ok(decode_args(&shard, &out, "npz", &[]));
    let f = std::fs::File::open(out.join("images.npz")).unwrap();
    let mut zip = zip::ZipArchive::new(f).unwrap();
    assert_eq!(zip.len(), 1);
    let mut member = zip.by_name("arr_0.npy").unwrap();
    let mut bytes = Vec::new();
    member.read_to_end(&mut bytes).unwrap();
    // npy v1.0: magic, version, u16 header length, python dict literal
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + hl) % 64, 0, "npy header must be 64-byte aligned");
    let header = std::str::from_utf8(&bytes[10..10 + hl]).unwrap();
    assert!(header.contains("'descr': '|u1'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let want_shape = format!("'shape': ({b}, {hh}, {ww}, 3)");
    assert!(header.contains(&want_shape), "{header}");
    let data = &bytes[10 + hl..];
    assert_eq!(data.len(), b * hh * ww * 3);
    for i in 0..b {
        let img = &data[i * hh * ww * 3..(i + 1) * hh * ww * 3];
        assert!(
            close_bytes(img, &expected_u8(&io["pixels"], i)),
            "image {i} differs"
        );
    }
}

/// sample -> decode: the sampler fixture's model and the decoder fixture
/// share the latent grid, so decoding a sample directory (found through its
/// manifest) must equal the library decoder on the reference samples.
#[test]
fn decode_reads_sample_directories() {
    let dit = read_json("ditdh.json");
    let dec = read_json("decoder.json");
    let grid = dit["input_size"].as_u64().unwrap();
    if dit["in_channels"] != dec["latent_dim"]
        || grid * grid != dec["num_patches"].as_u64().unwrap()
    {
        eprintln!("skipped: sampler and decoder fixtures have different latent shapes");
        return;
    }
    let io = io("sampler-io.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let noise = write_noise(tmp.path(), &io["z0"]);
    let spl = tmp.path().join("samples");
    run_ok(sample_args(&spl, &noise, &fixture_labels(&io["y"]), &[]));
    let out = tmp.path().join("dec");
    run_ok(decode_args(&spl, &out, "safetensors", &[]));
    let got = candle_core::safetensors::load(out.join("pixels.safetensors"), &Device::Cpu).unwrap();

    let cfg: rae_cache::models::DecoderConfig =
        rae_cache::models::config::load_config(&fixture("decoder.json")).unwrap();
    let decoder = rae_cache::models::load_decoder(
        &fixture("decoder.safetensors"),
        &cfg,
        &rae_cache::models::WeightsKey::Auto,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let want = decoder
        .forward(&to_tokens(&io["sample"]).contiguous().unwrap())
        .unwrap();
    let err = max_abs_diff(&got["pixels"], &want);
    assert!(err <= 1e-3, "sample -> decode: {err}");
}

/// build -> decode round trip.
///
/// The fixture decoder (latent_dim 24, 16 tokens) does not fit the fixture
/// DINOv2 cache (its channels, 256 tokens), so the test derives a decoder
/// config from the cache's shards, saves random weights for it, and checks
/// that every row decodes to an image of the right size.
#[test]
fn build_then_decode_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    common::cli::build_fixture_cache(
        &fixture("images"),
        &cache,
        &["--dtype", "f32", "--hflip", "none"],
    );
    let shards = rae_cache::generate::resolve_shards(&cache).unwrap();
    let first = ShardReader::open(&shards[0]).unwrap();
    let (tokens, channels) = (first.tokens(), first.channels());
    let rows: u64 = shards
        .iter()
        .map(|p| ShardReader::open(p).unwrap().num_rows())
        .sum();
    // keep the test light: 2 px per token
    let (weights, cfg_path, cfg) = common::random_decoder(tmp.path(), tokens, channels, 2);

    let out = tmp.path().join("png");
    let summary = json(&run_ok([
        "decode".into(),
        s(&cache),
        "--decoder".into(),
        s(&weights),
        "--decoder-config".into(),
        s(&cfg_path),
        "--out".into(),
        s(&out),
        "--device".into(),
        "cpu".into(),
        "--json".into(),
    ]));
    assert_eq!(summary["images"], rows);
    let side = cfg.image_size() as u32;
    let mut pngs = 0;
    for class in std::fs::read_dir(&out).unwrap() {
        for f in std::fs::read_dir(class.unwrap().path()).unwrap() {
            let img = image::open(f.unwrap().path()).unwrap();
            assert_eq!((img.width(), img.height()), (side, side));
            pngs += 1;
        }
    }
    assert_eq!(pngs as u64, rows);
}

#[test]
fn sample_and_decode_in_bf16() {
    // --precision bf16 (and the CPU no-op --tf32): the model computes in
    // bf16, the stored samples and pixels stay within the bf16 bounds of
    // tests/it/parity_sampler.rs and tests/it/parity_models.rs (cosine >= 0.9995).
    let sio = io("sampler-io.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let noise = write_noise(tmp.path(), &sio["z0"]);
    let labels = fixture_labels(&sio["y"]);
    let out = tmp.path().join("sample");
    run_ok(sample_args(
        &out,
        &noise,
        &labels,
        &["--precision", "bf16", "--tf32"],
    ));
    let (lat, _, _) = read_dir_shards(&out);
    let cos = common::cosine(&lat, &to_tokens(&sio["sample"]));
    assert!(cos >= 0.9995, "bf16 samples: cosine {cos}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["build_args"]["provenance"]["precision"], "bf16");

    let dio = io("decoder-io.safetensors");
    let (shard, _) = decoder_shard(tmp.path(), false);
    let dout = tmp.path().join("decoded");
    run_ok(decode_args(
        &shard,
        &dout,
        "safetensors",
        &["--precision", "bf16"],
    ));
    let got =
        candle_core::safetensors::load(dout.join("pixels.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got["pixels"].dtype(), DType::F32);
    let cos = common::cosine(&got["pixels"], &dio["pixels"]);
    assert!(cos >= 0.9995, "bf16 pixels: cosine {cos}");

    // an unknown precision is refused by the CLI
    let bad = bin()
        .args(decode_args(
            &shard,
            &dout,
            "safetensors",
            &["--precision", "f8"],
        ))
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn launched_sampling_on_two_processes_equals_one_process() {
    // `launch -- sample`: each process samples a range of whole shards;
    // rank 0 lists every shard in the manifest. Per-sample noise and
    // shard-aligned batches make the output the single process's, byte for
    // byte.
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "sample",
            "--model",
            &s(&fixture("ditdh.safetensors")),
            "--model-config",
            &s(&fixture("ditdh.json")),
            "--num",
            "7",
            "--labels",
            "equal",
            "--steps",
            "3",
            "--seed",
            "5",
            "--batch-size",
            "2",
            "--shard-rows",
            "2",
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--out",
            &s(out),
            "--json",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run_ok(args(&one));
    let port = common::free_port().to_string();
    let mut launch: Vec<String> = [
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    launch.extend(args(&two));
    let summary = json(&run_ok(&launch));
    assert_eq!(summary["samples"], 7);
    assert_eq!(summary["shards"].as_array().unwrap().len(), 4);
    for i in 0..4 {
        let name = format!("shards/part-{i:05}.parquet");
        assert!(
            std::fs::read(one.join(&name)).unwrap() == std::fs::read(two.join(&name)).unwrap(),
            "{name} differs"
        );
    }
    let m = |d: &Path| std::fs::read_to_string(d.join("manifest.json")).unwrap();
    assert_eq!(m(&one), m(&two));
}
