//! The shard contract: writer/reader round trips for every dtype, Parquet
//! encodings, determinism, crash safety, errors, stats and the manifest,
//! checked against schemas/*.json.

use std::path::{Path, PathBuf};

use parquet::basic::{Compression, Encoding};
use rae_cache::error::FileError;
use rae_cache::shards::manifest::{HFlip, MANIFEST_FORMAT};
use rae_cache::shards::schema::{self, META_DTYPE, META_SCHEMA_VERSION};
use rae_cache::shards::*;
use rand::{Rng, SeedableRng};
use sha2::Digest;

const DTYPES: [LatentDType; 4] = [
    LatentDType::F16,
    LatentDType::Bf16,
    LatentDType::F32,
    LatentDType::Int8,
];

/// Deterministic LayerNorm-output-like latents: ~N(0,1) per element with a
/// per-channel offset and scale; token 1 of row 0 is all zeros (int8 scale 0).
fn latents(rows: usize, tokens: usize, channels: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(rows * tokens * channels);
    for _ in 0..rows * tokens {
        for c in 0..channels {
            // Box-Muller.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            v.push((z * (0.5 + (c % 3) as f64 * 0.5) + (c % 5) as f64 * 0.3 - 0.6) as f32);
        }
    }
    if tokens > 1 {
        v[channels..2 * channels].iter_mut().for_each(|x| *x = 0.0);
    }
    v
}

fn keys(rows: usize) -> Vec<String> {
    (0..rows)
        .map(|i| format!("n{:04}/img_{:05}.JPEG", i % 7, i / 2))
        .collect()
}

fn rows<'a>(keys: &'a [String], lat: &'a [f32], n: usize) -> Vec<LatentRow<'a>> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| LatentRow {
            key: k,
            label: (i % 7) as i32 - 1,
            flip: i % 2 == 1,
            latent: &lat[i * n..(i + 1) * n],
        })
        .collect()
}

fn opts(dtype: LatentDType, tokens: usize, channels: usize) -> WriterOptions {
    let mut o = WriterOptions::new(dtype, tokens, channels);
    o.metadata.insert(
        "rae_cache.encoder_id".into(),
        "facebook/dinov2-with-registers-base".into(),
    );
    o.metadata.insert(
        "rae_cache.preprocessing".into(),
        r#"{"crop":"adm_center_crop","size":256}"#.into(),
    );
    o
}

/// Write `nrows` rows in two calls (to cross row-group boundaries mid-call).
fn write_shard(
    path: &Path,
    o: WriterOptions,
    nrows: usize,
    seed: u64,
) -> (ShardInfo, Vec<String>, Vec<f32>) {
    let n = o.tokens * o.channels;
    let lat = latents(nrows, o.tokens, o.channels, seed);
    let k = keys(nrows);
    let all = rows(&k, &lat, n);
    let mut w = ShardWriter::create(path, o).unwrap();
    let split = nrows / 3;
    w.write_rows(&all[..split]).unwrap();
    w.write_rows(&all[split..]).unwrap();
    (w.finish().unwrap(), k, lat)
}

/// Largest deviation allowed for element `i` of `src` after a round trip.
fn tolerance(dtype: LatentDType, src: &[f32], channels: usize, i: usize) -> f32 {
    let x = src[i];
    match dtype {
        LatentDType::F32 => 0.0,
        // Round to nearest: half an ulp (10 / 7 mantissa bits).
        LatentDType::F16 => (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
        LatentDType::Bf16 => x.abs() * 2f32.powi(-8),
        LatentDType::Int8 => {
            let t = i / channels;
            let absmax = src[t * channels..(t + 1) * channels]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            absmax / 127.0 * 0.5 * (1.0 + 1e-5)
        }
    }
}

#[test]
fn round_trip_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let (tokens, channels, nrows) = (4, 6, 70);
    for dtype in DTYPES {
        let path = dir.path().join(format!("{dtype}.parquet"));
        let (info, k, lat) = write_shard(&path, opts(dtype, tokens, channels), nrows, 7);
        assert_eq!(info.rows, nrows as u64);
        assert_eq!(info.file, format!("{dtype}.parquet"));

        let r = ShardReader::open(&path).unwrap();
        assert_eq!(
            (r.dtype(), r.tokens(), r.channels()),
            (dtype, tokens, channels)
        );
        assert_eq!(r.num_rows(), nrows as u64);
        assert_eq!(r.num_row_groups(), 3, "70 rows in groups of 32");
        assert_eq!(
            (0..3).map(|g| r.row_group_rows(g)).collect::<Vec<_>>(),
            vec![32, 32, 6]
        );
        assert_eq!(r.metadata()[META_DTYPE], dtype.as_str());
        assert_eq!(
            r.metadata()["rae_cache.encoder_id"],
            "facebook/dinov2-with-registers-base"
        );

        let all = r.read_all().unwrap();
        assert_eq!(all.keys, k);
        assert_eq!(
            all.labels,
            (0..nrows).map(|i| (i % 7) as i32 - 1).collect::<Vec<_>>()
        );
        assert_eq!(
            all.flips,
            (0..nrows).map(|i| i % 2 == 1).collect::<Vec<_>>()
        );
        assert_eq!(all.latents.len(), lat.len());
        for (i, (&a, &b)) in lat.iter().zip(&all.latents).enumerate() {
            let tol = tolerance(dtype, &lat, channels, i);
            assert!(
                (a - b).abs() <= tol,
                "{dtype} element {i}: wrote {a}, read {b}, tolerance {tol}"
            );
        }
        match dtype {
            LatentDType::F16 => assert!(
                lat.iter()
                    .zip(&all.latents)
                    .all(|(a, b)| half::f16::from_f32(*a).to_f32() == *b)
            ),
            LatentDType::Bf16 => assert!(
                lat.iter()
                    .zip(&all.latents)
                    .all(|(a, b)| half::bf16::from_f32(*a).to_f32() == *b)
            ),
            LatentDType::Int8 => assert!(
                all.latents[channels..2 * channels]
                    .iter()
                    .all(|x| *x == 0.0),
                "zero token"
            ),
            LatentDType::F32 => {}
        }

        let g1 = r.read_row_group(1).unwrap();
        assert_eq!(g1.keys, k[32..64]);
        assert_eq!(g1.latent(0), all.latent(32));
        assert!(r.read_row_group(3).is_err());

        let idx = r.read_index().unwrap();
        assert_eq!(
            (idx.keys, idx.labels, idx.flips),
            (all.keys.clone(), all.labels.clone(), all.flips.clone())
        );
    }
}

#[test]
fn writer_side_round_trip_is_what_readers_return() {
    // The build takes its statistics from quant::round_trip instead of
    // reading the shard back: both readers must return exactly that.
    let dir = tempfile::tempdir().unwrap();
    let (tokens, channels, nrows) = (4, 6, 40);
    for dtype in DTYPES {
        let path = dir.path().join(format!("rt-{dtype}.parquet"));
        let (_, _, lat) = write_shard(&path, opts(dtype, tokens, channels), nrows, 11);
        let r = ShardReader::open(&path).unwrap();
        let per = tokens * channels;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut row = 0;
        for g in 0..r.num_row_groups() {
            let fast = r.read_row_group(g).unwrap();
            let generic = r.read_row_group_arrow(g).unwrap();
            for j in 0..fast.keys.len() {
                let want = quant::round_trip(dtype, &lat[row * per..(row + 1) * per], channels);
                let got = |b: &LatentBatch| bits(&b.latents[j * per..(j + 1) * per]);
                assert_eq!(got(&fast), bits(&want), "{dtype} row {row}");
                assert_eq!(got(&generic), bits(&want), "{dtype} row {row} (generic)");
                row += 1;
            }
        }
        assert_eq!(row, nrows);
    }
}

#[test]
fn page_fast_path_equals_generic_arrow_reader() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in DTYPES {
        let path = dir.path().join(format!("{dtype}.parquet"));
        // > 1 MB per column chunk, so every dtype spans several data pages.
        let mut o = opts(dtype, 256, 96);
        o.rows_per_row_group = 24;
        write_shard(&path, o, 30, 13);
        let r = ShardReader::open(&path).unwrap();
        for g in 0..r.num_row_groups() {
            let fast = r.read_row_group(g).unwrap();
            let slow = r.read_row_group_arrow(g).unwrap();
            assert_eq!(fast.keys, slow.keys);
            assert_eq!((&fast.labels, &fast.flips), (&slow.labels, &slow.flips));
            assert!(
                fast.latents == slow.latents,
                "{dtype} group {g}: fast path differs"
            );
            // The fast path really is taken (not silently declined).
            let mut direct = vec![0f32; slow.latents.len()];
            r.latents_from_pages(g, &mut direct).unwrap();
            assert!(direct == slow.latents);
        }
    }
}

#[test]
fn reader_shared_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("part-00000.parquet");
    let (_, _, lat) = write_shard(&path, opts(LatentDType::F32, 4, 6), 70, 3);
    let r = ShardReader::open(&path).unwrap();
    let got: Vec<LatentBatch> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|g| {
                s.spawn({
                    let r = &r;
                    move || r.read_row_group(g).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let joined: Vec<f32> = got.iter().flat_map(|b| b.latents.iter().copied()).collect();
    assert_eq!(joined, lat);
}

#[test]
fn latent_columns_use_byte_stream_split_zstd_no_dictionary_no_stats() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in DTYPES {
        let path = dir.path().join(format!("{dtype}.parquet"));
        write_shard(&path, opts(dtype, 4, 6), 40, 1);
        let r = ShardReader::open(&path).unwrap();
        let md = r.parquet_metadata();
        assert_eq!(
            md.file_metadata().created_by(),
            Some(rae_cache::shards::writer::created_by().as_str())
        );
        let mut seen = 0;
        for rg in md.row_groups() {
            for col in rg.columns() {
                assert!(
                    matches!(col.compression(), Compression::ZSTD(_)),
                    "{}: {:?}",
                    col.column_path(),
                    col.compression()
                );
                let top = col.column_path().parts()[0].as_str();
                if top == "latent" || top == "scale" {
                    seen += 1;
                    let enc: Vec<Encoding> = col.encodings().collect();
                    assert!(
                        enc.contains(&Encoding::BYTE_STREAM_SPLIT),
                        "{dtype} {}: {enc:?}",
                        col.column_path()
                    );
                    assert!(
                        !enc.contains(&Encoding::RLE_DICTIONARY)
                            && !enc.contains(&Encoding::PLAIN_DICTIONARY)
                    );
                    assert!(col.dictionary_page_offset().is_none());
                    assert!(
                        col.statistics().is_none(),
                        "{dtype}: statistics on {}",
                        col.column_path()
                    );
                }
            }
        }
        let per_group = if dtype == LatentDType::Int8 { 2 } else { 1 };
        assert_eq!(seen, per_group * md.num_row_groups());
    }
}

#[test]
fn identical_rows_give_identical_bytes_and_true_sha256() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in DTYPES {
        let a = dir.path().join(format!("a-{dtype}.parquet"));
        let b = dir.path().join(format!("b-{dtype}.parquet"));
        let (ia, _, _) = write_shard(&a, opts(dtype, 4, 6), 50, 9);
        let (ib, _, _) = write_shard(&b, opts(dtype, 4, 6), 50, 9);
        let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(ba == bb, "{dtype}: two writes of the same rows differ");
        assert_eq!(ia.sha256, ib.sha256);
        let hex: String = sha2::Sha256::digest(&ba)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        assert_eq!(ia.sha256, hex);
        assert_eq!(ia.bytes, ba.len() as u64);
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn shard_appears_only_when_finished() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("part-00003.parquet");
    let lat = latents(40, 4, 6, 2);
    let k = keys(40);
    let mut w = ShardWriter::create(&path, opts(LatentDType::F16, 4, 6)).unwrap();
    w.write_rows(&rows(&k, &lat, 24)).unwrap();
    assert!(!path.exists(), "final name visible before finish");
    assert_eq!(
        dir_names(dir.path()).len(),
        1,
        "one temp file while writing"
    );
    assert!(dir_names(dir.path())[0].starts_with('.'));
    w.finish().unwrap();
    assert_eq!(
        dir_names(dir.path()),
        vec!["part-00003.parquet".to_string()]
    );

    // An abandoned writer leaves nothing behind.
    let other = dir.path().join("part-00004.parquet");
    let mut w = ShardWriter::create(&other, opts(LatentDType::F16, 4, 6)).unwrap();
    w.write_rows(&rows(&k, &lat, 24)).unwrap();
    drop(w);
    assert_eq!(
        dir_names(dir.path()),
        vec!["part-00003.parquet".to_string()]
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.parquet");
    let mut w = ShardWriter::create(&path, opts(LatentDType::F16, 4, 6)).unwrap();
    let short = vec![0.5f32; 23];
    let err = w
        .write_rows(&[LatentRow {
            key: "x/y.png",
            label: 0,
            flip: false,
            latent: &short,
        }])
        .unwrap_err();
    assert!(
        matches!(err, ShardError::File(FileError::Format { .. })),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("bad.parquet") && msg.contains("x/y.png") && msg.contains("24"),
        "{msg}"
    );
    // The writer is still usable and wrote nothing for the bad call.
    let good = vec![0.5f32; 24];
    w.write_rows(&[LatentRow {
        key: "ok",
        label: 1,
        flip: true,
        latent: &good,
    }])
    .unwrap();
    assert_eq!(w.finish().unwrap().rows, 1);

    assert!(
        ShardWriter::create(&dir.path().join("z.parquet"), opts(LatentDType::F16, 0, 6)).is_err()
    );
    let mut o = opts(LatentDType::F16, 4, 6);
    o.zstd_level = 99;
    assert!(ShardWriter::create(&dir.path().join("z.parquet"), o).is_err());
    assert!(!dir.path().join("z.parquet").exists());

    // Not parquet at all.
    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, b"definitely not parquet").unwrap();
    let msg = ShardReader::open(&junk)
        .err()
        .expect("junk opened")
        .to_string();
    assert!(msg.contains("junk.parquet"), "{msg}");
    // Missing file.
    assert!(matches!(
        ShardReader::open(&dir.path().join("nope.parquet")),
        Err(ShardError::File(FileError::Io { .. }))
    ));

    // Parquet, but not ours / another schema version.
    use arrow::array::Int32Array;
    let plain = |name: &str, kv: Vec<(&str, &str)>| -> PathBuf {
        let p = dir.path().join(name);
        let batch = arrow::record_batch::RecordBatch::try_from_iter([(
            "x",
            std::sync::Arc::new(Int32Array::from(vec![1, 2])) as arrow::array::ArrayRef,
        )])
        .unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_key_value_metadata(Some(
                kv.into_iter()
                    .map(|(k, v)| parquet::file::metadata::KeyValue::new(k.into(), v.to_string()))
                    .collect(),
            ))
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&p).unwrap(),
            batch.schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        p
    };
    let foreign = plain("foreign.parquet", vec![]);
    let msg = ShardReader::open(&foreign).err().unwrap().to_string();
    assert!(
        msg.contains("foreign.parquet") && msg.contains("not a rae-cache shard"),
        "{msg}"
    );
    let future = plain(
        "future.parquet",
        vec![
            (META_SCHEMA_VERSION, "999"),
            (META_DTYPE, "f16"),
            ("rae_cache.tokens", "4"),
            ("rae_cache.channels", "6"),
            ("rae_cache.tool_version", "9"),
        ],
    );
    let msg = ShardReader::open(&future).err().unwrap().to_string();
    assert!(
        msg.contains("future.parquet") && msg.contains("999"),
        "{msg}"
    );
    let wrong_cols = plain(
        "cols.parquet",
        vec![
            (META_SCHEMA_VERSION, SCHEMA_VERSION),
            (META_DTYPE, "f16"),
            ("rae_cache.tokens", "4"),
            ("rae_cache.channels", "6"),
            ("rae_cache.tool_version", "9"),
        ],
    );
    let msg = ShardReader::open(&wrong_cols).err().unwrap().to_string();
    assert!(msg.contains("missing column"), "{msg}");
}

// ---------------------------------------------------------------- stats

fn direct_stats(lat: &[f32], rows: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0f64; n];
    for r in 0..rows {
        for i in 0..n {
            mean[i] += lat[r * n + i] as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    let mut var = vec![0f64; n];
    for r in 0..rows {
        for i in 0..n {
            let d = lat[r * n + i] as f64 - mean[i];
            var[i] += d * d;
        }
    }
    var.iter_mut().for_each(|v| *v /= rows as f64); // population variance
    (mean, var)
}

#[test]
fn stats_match_direct_computation_in_chw_layout() {
    let (t, c, rows) = (9, 5, 101);
    let lat = latents(rows, t, c, 11);
    let mut acc = StatsAccumulator::new(t, c);
    acc.push_rows(&lat, rows).unwrap();
    let (mean, var) = direct_stats(&lat, rows, t * c);
    let s = acc.finalize().unwrap();
    assert_eq!(
        (s.channels, s.height, s.width, s.count),
        (c, 3, 3, rows as u64)
    );
    for tok in 0..t {
        let (h, w) = (tok / 3, tok % 3);
        for ch in 0..c {
            let chw = ch * 9 + h * 3 + w;
            assert!(
                (s.mean[chw] as f64 - mean[tok * c + ch]).abs() <= 1e-6,
                "mean ({ch},{h},{w})"
            );
            let rel = (s.var[chw] as f64 - var[tok * c + ch]).abs() / var[tok * c + ch].max(1e-12);
            assert!(
                rel <= 1e-6,
                "var ({ch},{h},{w}): {} vs {}",
                s.var[chw],
                var[tok * c + ch]
            );
        }
    }
    // f64 state itself agrees to ~1e-12.
    for i in 0..t * c {
        assert!((acc.mean[i] - mean[i]).abs() < 1e-12);
        assert!((acc.m2[i] / rows as f64 - var[i]).abs() < 1e-12 * var[i].max(1.0));
    }
    assert!(acc.push_rows(&lat[..10], 1).is_err());
    assert!(StatsAccumulator::new(8, 2).finalize().is_err(), "empty");
    let mut nonsquare = StatsAccumulator::new(8, 2);
    nonsquare.push_rows(&[1.0; 16], 1).unwrap();
    assert!(nonsquare.finalize().is_err(), "8 tokens is not a square");
}

#[test]
fn stats_merge_equals_single_pass_and_batching_does_not_matter() {
    let (t, c, rows) = (4, 6, 90);
    let n = t * c;
    let lat = latents(rows, t, c, 5);
    let mut one = StatsAccumulator::new(t, c);
    one.push_rows(&lat, rows).unwrap();

    let mut chunked = StatsAccumulator::new(t, c);
    for chunk in lat.chunks(7 * n) {
        chunked.push_rows(chunk, chunk.len() / n).unwrap();
    }
    assert_eq!(
        (chunked.mean.clone(), chunked.m2.clone()),
        (one.mean.clone(), one.m2.clone()),
        "bitwise"
    );

    let mut a = StatsAccumulator::new(t, c);
    let mut b = StatsAccumulator::new(t, c);
    a.push_rows(&lat[..37 * n], 37).unwrap();
    b.push_rows(&lat[37 * n..], rows - 37).unwrap();
    let mut empty = StatsAccumulator::new(t, c);
    a.merge(&empty).unwrap();
    empty.merge(&b).unwrap();
    a.merge(&empty).unwrap();
    assert_eq!(a.count, rows as u64);
    for i in 0..n {
        assert!((a.mean[i] - one.mean[i]).abs() < 1e-12);
        assert!((a.m2[i] - one.m2[i]).abs() < 1e-9 * one.m2[i].max(1.0));
    }
    assert!(a.merge(&StatsAccumulator::new(2, 6)).is_err());
}

#[test]
fn stats_files_round_trip_and_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (t, c, rows) = (16, 3, 40);
    let n = t * c;
    let lat = latents(rows, t, c, 21);
    let mut full = StatsAccumulator::new(t, c);
    full.push_rows(&lat, rows).unwrap();
    let stats_a = dir.path().join("a.safetensors");
    let s = full.save_stats(&stats_a).unwrap();
    let back = LatentStats::load(&stats_a).unwrap();
    assert_eq!(back, s);
    assert_eq!((back.channels, back.height, back.width), (3, 4, 4));

    // Interrupted build: save state after 15 rows, load, continue.
    let mut first = StatsAccumulator::new(t, c);
    first.push_rows(&lat[..15 * n], 15).unwrap();
    let state = dir.path().join("state.safetensors");
    first.save_state(&state).unwrap();
    let mut resumed = StatsAccumulator::load_state(&state).unwrap();
    assert_eq!(
        (resumed.count, resumed.tokens, resumed.channels),
        (15, t, c)
    );
    resumed.push_rows(&lat[15 * n..], rows - 15).unwrap();
    let stats_b = dir.path().join("b.safetensors");
    resumed.save_stats(&stats_b).unwrap();
    assert_eq!(
        std::fs::read(&stats_a).unwrap(),
        std::fs::read(&stats_b).unwrap(),
        "resumed stats differ"
    );

    // stats.safetensors is readable by a generic safetensors reader with the reference names.
    let bytes = std::fs::read(&stats_a).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("mean").unwrap().shape(), &[3, 4, 4]);
    assert_eq!(st.tensor("var").unwrap().dtype(), safetensors::Dtype::F32);
    assert_eq!(st.tensor("count").unwrap().dtype(), safetensors::Dtype::I64);
    assert!(
        LatentStats::load(&state).is_err(),
        "state file is not a stats file"
    );
}

// ---------------------------------------------------------------- schemas

fn schema_json(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A small JSON Schema validator for the keywords schemas/*.json use:
/// type, const, enum, required, properties, additionalProperties, items,
/// minimum, pattern (anchored prefix/suffix subset), $ref to #/$defs.
fn validate(
    root: &serde_json::Value,
    schema: &serde_json::Value,
    v: &serde_json::Value,
    at: &str,
    errs: &mut Vec<String>,
) {
    use serde_json::Value as J;
    if let Some(r) = schema.get("$ref").and_then(J::as_str) {
        let name = r.strip_prefix("#/$defs/").expect("only local $defs refs");
        return validate(root, &root["$defs"][name], v, at, errs);
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            J::String(s) => vec![s.as_str()],
            J::Array(a) => a.iter().filter_map(J::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            other => panic!("unsupported type {other}"),
        });
        if !ok {
            errs.push(format!("{at}: {v} is not {types:?}"));
            return;
        }
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            errs.push(format!("{at}: {v} != const {c}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(J::as_array) {
        if !e.contains(v) {
            errs.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let (Some(m), Some(x)) = (schema.get("minimum").and_then(J::as_f64), v.as_f64()) {
        if x < m {
            errs.push(format!("{at}: {x} < {m}"));
        }
    }
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(J::as_str), v.as_str()) {
        let ok = match p {
            "^[1-9][0-9]*$" => {
                !s.is_empty() && !s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit())
            }
            "^[0-9a-f]{64}$" => {
                s.len() == 64
                    && s.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            }
            "^[^/]+\\.parquet$" => !s.contains('/') && s.len() > 8 && s.ends_with(".parquet"),
            "^(shards/)?[^/]+\\.parquet$" => {
                let name = s.strip_prefix("shards/").unwrap_or(s);
                !name.contains('/') && name.len() > 8 && name.ends_with(".parquet")
            }
            other => panic!("pattern {other} not supported by the test validator"),
        };
        if !ok {
            errs.push(format!("{at}: {s:?} does not match {p}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in schema
            .get("required")
            .and_then(J::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                errs.push(format!("{at}: missing required {r}"));
            }
        }
        let props = schema.get("properties").and_then(J::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(root, s, val, &format!("{at}.{k}"), errs),
                None => match schema.get("additionalProperties") {
                    Some(J::Bool(false)) => errs.push(format!("{at}: unexpected property {k}")),
                    Some(s @ J::Object(_)) => validate(root, s, val, &format!("{at}.{k}"), errs),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(root, items, x, &format!("{at}[{i}]"), errs);
        }
    }
}

fn check(schema: &serde_json::Value, v: &serde_json::Value) -> Vec<String> {
    let mut errs = Vec::new();
    validate(schema, schema, v, "$", &mut errs);
    errs
}

fn arrow_type_name(dt: &arrow::datatypes::DataType) -> &'static str {
    use arrow::datatypes::DataType as D;
    match dt {
        D::Utf8 => "utf8",
        D::Int32 => "int32",
        D::Boolean => "bool",
        D::Float16 => "float16",
        D::Float32 => "float32",
        D::UInt16 => "uint16",
        D::Int8 => "int8",
        D::FixedSizeList(..) => "fixed_size_list",
        _ => "other",
    }
}

#[test]
fn written_shards_match_schemas_shard_schema_json() {
    let spec = schema_json("shard.schema.json");
    let dir = tempfile::tempdir().unwrap();
    let (tokens, channels) = (4, 6);
    for dtype in DTYPES {
        let path = dir.path().join(format!("{dtype}.parquet"));
        write_shard(&path, opts(dtype, tokens, channels), 5, 1);
        let r = ShardReader::open(&path).unwrap();
        // Footer metadata against the JSON Schema part.
        let meta = serde_json::to_value(r.metadata()).unwrap();
        let errs = check(&spec, &meta);
        assert!(errs.is_empty(), "{dtype}: {errs:?}");
        for k in schema::REQUIRED_METADATA {
            assert!(
                spec["required"].as_array().unwrap().iter().any(|x| x == k),
                "{k} not in shard.schema.json"
            );
        }

        // Columns against x-rae-cache-columns, in order.
        let file = std::fs::File::open(&path).unwrap();
        let arrow_schema =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .schema()
                .clone();
        let cols: Vec<&serde_json::Value> = spec["x-rae-cache-columns"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                c.get("only_for_dtype")
                    .is_none_or(|d| d.as_array().unwrap().iter().any(|x| x == dtype.as_str()))
            })
            .collect();
        assert_eq!(
            arrow_schema.fields().len(),
            cols.len(),
            "{dtype}: column count"
        );
        for (f, c) in arrow_schema.fields().iter().zip(cols) {
            assert_eq!(f.name(), c["name"].as_str().unwrap());
            assert_eq!(
                arrow_type_name(f.data_type()),
                c["arrow_type"].as_str().unwrap(),
                "{}",
                f.name()
            );
            assert_eq!(
                f.is_nullable(),
                c["nullable"].as_bool().unwrap(),
                "{} nullability",
                f.name()
            );
            if let arrow::datatypes::DataType::FixedSizeList(item, len) = f.data_type() {
                let expected_len = match c["list_size"].as_str().unwrap() {
                    "tokens*channels" => tokens * channels,
                    "tokens" => tokens,
                    other => panic!("list_size {other}"),
                };
                assert_eq!(*len as usize, expected_len);
                assert_eq!(item.name(), c["item_name"].as_str().unwrap());
                assert_eq!(item.is_nullable(), c["item_nullable"].as_bool().unwrap());
                let want = c
                    .get("item_type")
                    .or_else(|| c["item_type_by_dtype"].get(dtype.as_str()))
                    .and_then(|v| v.as_str())
                    .unwrap();
                assert_eq!(
                    arrow_type_name(item.data_type()),
                    want,
                    "{dtype} {} item",
                    f.name()
                );
            }
            if let Some(ext) = c.get("extension") {
                let name = ext["ARROW:extension:name"].as_str().unwrap();
                assert_eq!(
                    f.metadata().get("ARROW:extension:name").map(String::as_str),
                    Some(name)
                );
                let got: serde_json::Value =
                    serde_json::from_str(&f.metadata()["ARROW:extension:metadata"]).unwrap();
                assert_eq!(got, serde_json::json!({"shape": [tokens, channels]}));
            }
        }
    }
}

fn sample_manifest() -> Manifest {
    let encoder = EncoderInfo {
        kind: "dinov2-reg".into(),
        id: "facebook/dinov2-with-registers-base".into(),
        revision: None,
        config_hash: "ab".repeat(32),
        tokens: 256,
        channels: 768,
        crop_size: 256,
        input_size: 224,
        patch_size: 14,
    };
    let mut m = Manifest::new(
        "/data/imagenet/train",
        vec!["n01440764".into(), "n01443537".into()],
        encoder,
        LatentDType::F16,
        HFlip::Both,
    );
    m.preprocessing =
        serde_json::json!({"crop": "adm_center_crop", "size": 256, "resize": "bicubic"});
    m.shards.push(ShardInfo {
        file: "part-00000.parquet".into(),
        rows: 64,
        bytes: 1234,
        sha256: "0f".repeat(32),
    });
    m.shards.push(ShardInfo {
        file: "part-00001.parquet".into(),
        rows: 6,
        bytes: 99,
        sha256: "a0".repeat(32),
    });
    m.totals.images = 35;
    m.update_totals();
    m.rejected.push(RejectedInput {
        key: "n01440764/broken.JPEG".into(),
        reason: "decode error: truncated".into(),
    });
    m.build_args = serde_json::json!({"batch_size": 64, "dtype": "f16"});
    m.part = PartInfo {
        num_parts: 2,
        part: 1,
    };
    m
}

#[test]
fn manifest_round_trips_and_matches_its_json_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(manifest::MANIFEST_FILE);
    let m = sample_manifest();
    assert_eq!((m.totals.rows, m.totals.bytes), (70, 1333));
    m.save(&path).unwrap();
    assert_eq!(Manifest::load(&path).unwrap(), m);
    assert_eq!(dir_names(dir.path()), vec!["manifest.json".to_string()]);

    let spec = schema_json("manifest.schema.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let errs = check(&spec, &json);
    assert!(errs.is_empty(), "{errs:?}");
    // Every struct field is described by the schema, and the validator does reject.
    let mut bad = json.clone();
    bad["shards"][0]["sha256"] = "xyz".into();
    bad.as_object_mut().unwrap().remove("classes");
    bad["surprise"] = 1.into();
    assert_eq!(check(&spec, &bad).len(), 3, "{:?}", check(&spec, &bad));

    // Clear load errors.
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"format": "something-else"}"#).unwrap();
    let msg = Manifest::load(&other).unwrap_err().to_string();
    assert!(
        msg.contains("other.json") && msg.contains(MANIFEST_FORMAT),
        "{msg}"
    );
    std::fs::write(&other, "{ not json").unwrap();
    assert!(
        Manifest::load(&other)
            .unwrap_err()
            .to_string()
            .contains("not valid JSON")
    );
    let mut v = json.clone();
    v.as_object_mut().unwrap().remove("encoder");
    std::fs::write(&other, v.to_string()).unwrap();
    let msg = Manifest::load(&other).unwrap_err().to_string();
    assert!(msg.contains("encoder"), "{msg}");
}
