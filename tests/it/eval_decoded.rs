//! `eval` of sample shards through the decoder: the images decoded
//! in-process must be the bytes `decode` writes, so every pixel metric of
//! the shards equals that of the PNG folder `decode` makes from them
//! (identical features, identical numbers). Normalised shards are
//! de-normalised with the latent statistics first, as `sample --stats`
//! would have.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use rae_cache::eval::features::SampleDecoder;
use rae_cache::eval::run::{EvalOptions, Metric, Networks, evaluate};
use rae_cache::generate::{DecodeFormat, DecodeOptions, Rounding, decode_shards};
use rae_cache::models::{DecoderConfig, RaeDecoder, WeightsKey, load_decoder};
use rae_cache::progress::NoProgress;
use rae_cache::shards::{LatentDType, LatentRow, LatentStats, ShardWriter, WriterOptions};

use super::eval::{Toy, metric, write_npz};
use crate::common::{fixture, io, json, run_ok};

/// Rows of the decoder fixture's latents, scaled so they differ.
const ROWS: usize = 7;
/// Decoder batch of both `decode` and `eval` (the decoder's gemm may round
/// differently at another batch size).
const BATCH: usize = 3;

fn decoder() -> RaeDecoder {
    let cfg: DecoderConfig =
        rae_cache::models::config::load_config(&fixture("decoder.json")).unwrap();
    load_decoder(
        &fixture("decoder.safetensors"),
        &cfg,
        &WeightsKey::Auto,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// Latents `[ROWS, T, C]` from the fixture's `z`, row i scaled by 1 + i/10.
fn latents() -> (Vec<f32>, usize, usize) {
    let z = &io("decoder-io.safetensors")["z"];
    let (b, t, c) = z.dims3().unwrap();
    let base: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
    let per = t * c;
    let rows = (0..ROWS)
        .flat_map(|i| {
            let s = 1.0 + i as f32 / 10.0;
            base[(i % b) * per..(i % b + 1) * per]
                .iter()
                .map(move |x| x * s)
                .collect::<Vec<_>>()
        })
        .collect();
    (rows, t, c)
}

/// A sample directory `dir/shards/part-00000.parquet`, keys `s/00000i`
/// (sorted = row order), row groups of 2; `normalise` writes
/// `(x - mean) / sqrt(var + eps)` and marks the shard normalised.
fn sample_dir(dir: &Path, normalise: Option<&LatentStats>) -> PathBuf {
    let (mut lat, t, c) = latents();
    let mut opts = WriterOptions::new(LatentDType::F32, t, c);
    opts.rows_per_row_group = 2;
    if let Some(s) = normalise {
        opts.metadata
            .insert("rae_cache.denormalised".into(), "false".into());
        for row in lat.chunks_exact_mut(t * c) {
            for (e, x) in row.iter_mut().enumerate() {
                let i = (e % c) * t + e / c;
                *x = ((*x as f64 - s.mean[i] as f64) / (s.var[i] as f64 + 1e-5).sqrt()) as f32;
            }
        }
    }
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    let mut w = ShardWriter::create(&dir.join("shards/part-00000.parquet"), opts).unwrap();
    let keys: Vec<String> = (0..ROWS).map(|i| format!("s/{i:06}")).collect();
    for (i, k) in keys.iter().enumerate() {
        w.write_rows(&[LatentRow {
            key: k,
            label: i as i32,
            flip: false,
            latent: &lat[i * t * c..(i + 1) * t * c],
        }])
        .unwrap();
    }
    w.finish().unwrap();
    dir.to_path_buf()
}

/// Statistics `[C, H, W]` with distinct means and variances per element.
fn stats(t: usize, c: usize) -> LatentStats {
    let side = (t as f64).sqrt() as usize;
    LatentStats {
        mean: (0..t * c).map(|i| ((i % 11) as f32 - 5.0) / 20.0).collect(),
        var: (0..t * c).map(|i| 0.5 + (i % 7) as f32 / 4.0).collect(),
        count: 100,
        channels: c,
        height: side,
        width: side,
    }
}

fn pixel_opts() -> EvalOptions {
    EvalOptions {
        metrics: vec![Metric::Fid, Metric::Sfid, Metric::Is, Metric::Pr],
        is_split: 3,
        batch: BATCH,
        ..EvalOptions::default()
    }
}

fn eval_with(
    samples: &Path,
    reference: &Path,
    dec: Option<Arc<SampleDecoder>>,
) -> serde_json::Value {
    let mut toy = Toy;
    let mut nets = Networks {
        inception: Some(&mut toy),
        decoder: dec,
        ..Networks::default()
    };
    evaluate(
        samples,
        reference,
        &mut nets,
        &pixel_opts(),
        &mut NoProgress,
    )
    .unwrap()
}

fn sample_decoder(stats: Option<LatentStats>) -> Arc<SampleDecoder> {
    Arc::new(SampleDecoder {
        decoder: decoder(),
        device: Device::Cpu,
        rounding: Rounding::Trunc,
        stats,
        provenance: serde_json::json!({"checkpoint": "fixture"}),
    })
}

#[test]
fn decoded_shards_score_like_the_png_folder_decode_writes() {
    let dir = tempfile::tempdir().unwrap();
    let samples = sample_dir(&dir.path().join("samples"), None);
    let pngs = dir.path().join("png");
    let shards = rae_cache::generate::resolve_shards(&samples).unwrap();
    let opts = DecodeOptions {
        out_dir: pngs.clone(),
        format: DecodeFormat::Png,
        batch_size: BATCH,
        limit: None,
        grid: 0,
        rounding: Rounding::Trunc,
    };
    decode_shards(&decoder(), &shards, &opts, &Device::Cpu, &mut NoProgress).unwrap();
    let reference = dir.path().join("ref.npz");
    write_npz(&reference, 9, 5);

    let from_png = eval_with(&pngs, &reference, None);
    let from_shards = eval_with(&samples, &reference, Some(sample_decoder(None)));
    assert_eq!(from_shards["samples"]["images"]["kind"], "decoded-shards");
    assert_eq!(from_shards["counts"]["samples"], ROWS as u64);
    for k in ["fid", "sfid", "is", "precision", "recall"] {
        let (a, b) = (metric(&from_shards, k), metric(&from_png, k));
        eprintln!("{k}: shards {a} png {b}");
        assert_eq!(a, b, "{k}");
    }
    assert!(metric(&from_png, "fid") > 0.0);

    // normalised shards with the statistics give the same images, up to
    // the rounding of z through normalise + de-normalise: a pixel may land
    // on the neighbouring 8-bit level (one such pixel moves FID ~3e-7).
    let (_, t, c) = latents();
    let st = stats(t, c);
    let norm = sample_dir(&dir.path().join("norm"), Some(&st));
    let r = eval_with(&norm, &reference, Some(sample_decoder(Some(st))));
    for k in ["fid", "is"] {
        let (a, b) = (metric(&r, k), metric(&from_png, k));
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{k}: {a} vs {b}");
    }
    // ... and without them, a clear error
    let mut toy = Toy;
    let mut nets = Networks {
        inception: Some(&mut toy),
        decoder: Some(sample_decoder(None)),
        ..Networks::default()
    };
    let e = evaluate(&norm, &reference, &mut nets, &pixel_opts(), &mut NoProgress).unwrap_err();
    assert!(e.to_string().contains("holds normalised latents"), "{e}");
    // shards without a decoder: the error names the flag
    let mut toy = Toy;
    let mut nets = Networks {
        inception: Some(&mut toy),
        ..Networks::default()
    };
    let e = evaluate(
        &samples,
        &reference,
        &mut nets,
        &pixel_opts(),
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--decoder"), "{e}");
}

/// Through the binary with the FID Inception (formula weights): `eval
/// SHARDS --decoder ...` and `eval PNGS` against the same reference give
/// the same FID and IS.
#[test]
fn cli_eval_of_sample_shards_with_the_inception() {
    let dir = tempfile::tempdir().unwrap();
    let samples = sample_dir(&dir.path().join("samples"), None);
    let inception = dir.path().join("inception.safetensors");
    candle_core::safetensors::save(&super::features::inception_weights(), &inception).unwrap();
    let s = |p: &Path| p.display().to_string();
    let dec = [
        "--decoder".to_string(),
        s(&fixture("decoder.safetensors")),
        "--decoder-config".into(),
        s(&fixture("decoder.json")),
    ];
    let pngs = dir.path().join("png");
    let bs = BATCH.to_string();
    let mut a = vec!["decode".to_string(), s(&samples), "--out".into(), s(&pngs)];
    a.extend(dec.iter().cloned());
    a.extend([
        "--batch-size".into(),
        bs.clone(),
        "--device".into(),
        "cpu".into(),
    ]);
    run_ok(&a);
    let reference = dir.path().join("ref.npz");
    write_npz(&reference, 3, 9);
    // the first 4 rows each (the PNG names sort in row order): Inception
    // forwards are the slow part
    let common = [
        "--limit".to_string(),
        "4".into(),
        "--ref".into(),
        s(&reference),
        "--inception".into(),
        s(&inception),
        "--metrics".into(),
        "fid,is".into(),
        "--is-split".into(),
        "2".into(),
        "--batch-size".into(),
        bs,
        "--device".into(),
        "cpu".into(),
        "--json".into(),
    ];
    let mut a = vec!["eval".to_string(), s(&pngs)];
    a.extend(common.iter().cloned());
    let from_png = json(&run_ok(&a));
    let mut a = vec!["eval".to_string(), s(&samples)];
    a.extend(common.iter().cloned());
    a.extend(dec.iter().cloned());
    let from_shards = json(&run_ok(&a));
    for k in ["fid", "is"] {
        let (x, y) = (metric(&from_shards, k), metric(&from_png, k));
        eprintln!("{k}: shards {x} png {y}");
        assert_eq!(x, y, "{k}");
    }
    assert_eq!(
        from_shards["samples"]["images"]["decoder"]["rounding"],
        "trunc"
    );
}
