//! Shards must be readable by the real Arrow ecosystem: writes one shard per
//! dtype and runs tests/arrow_readers.py (pyarrow, polars, DuckDB) on them.
//! Needs `pip install -r scripts/requirements-test.txt`; set
//! RAE_SKIP_PYTHON_TESTS=1 to skip explicitly.

use std::path::Path;
use std::process::Command;

use rae_cache::shards::{LatentDType, LatentRow, ShardReader, ShardWriter, WriterOptions};
use rand::{Rng, SeedableRng};

const INSTALL: &str =
    "run `pip install -r scripts/requirements-test.txt` (or set RAE_SKIP_PYTHON_TESTS=1 to skip)";

/// Minimal .npy (v1.0, little-endian f32, C order).
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims = shape.iter().map(|d| format!("{d},")).collect::<String>();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // magic(6) + version(2) + len(2) + header + '\n' must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

fn python_ready() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import pyarrow, polars, duckdb, numpy"])
        .output()
        .map_err(|e| format!("cannot run python3 ({e}): install Python 3 and {INSTALL}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "python3 lacks a module ({}): {INSTALL}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[test]
fn pyarrow_polars_duckdb_read_our_shards() {
    if std::env::var("RAE_SKIP_PYTHON_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: RAE_SKIP_PYTHON_TESTS=1 (Arrow reader compatibility NOT checked)");
        return;
    }
    if let Err(e) = python_ready() {
        panic!("{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let (tokens, channels, rows) = (16usize, 12usize, 37usize);
    let n = tokens * channels;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let original: Vec<f32> = (0..rows * n)
        .map(|i| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (z + (i % channels) as f64 * 0.25) as f32
        })
        .collect();
    let keys: Vec<String> = (0..rows)
        .map(|i| format!("n{:03}/{i}.png", i % 4))
        .collect();
    let labels: Vec<i32> = (0..rows).map(|i| (i % 4) as i32 - 1).collect();
    let flips: Vec<bool> = (0..rows).map(|i| i % 2 == 0).collect();

    let mut cases = Vec::new();
    for dtype in [
        LatentDType::F16,
        LatentDType::F32,
        LatentDType::Bf16,
        LatentDType::Int8,
    ] {
        let file = format!("part-{dtype}.parquet");
        let path = dir.path().join(&file);
        let mut opts = WriterOptions::new(dtype, tokens, channels);
        opts.rows_per_row_group = 16;
        opts.metadata
            .insert("rae_cache.encoder_id".into(), "test/encoder".into());
        let mut w = ShardWriter::create(&path, opts).unwrap();
        let batch: Vec<LatentRow> = (0..rows)
            .map(|i| LatentRow {
                key: &keys[i],
                label: labels[i],
                flip: flips[i],
                latent: &original[i * n..(i + 1) * n],
            })
            .collect();
        w.write_rows(&batch).unwrap();
        w.finish().unwrap();

        let expected = ShardReader::open(&path)
            .unwrap()
            .read_all()
            .unwrap()
            .latents;
        write_npy(
            &dir.path().join(format!("{dtype}-expected.npy")),
            &[rows, tokens, channels],
            &expected,
        );
        write_npy(
            &dir.path().join(format!("{dtype}-original.npy")),
            &[rows, tokens, channels],
            &original,
        );
        cases.push(serde_json::json!({
            "file": file, "dtype": dtype.as_str(), "rows": rows, "tokens": tokens, "channels": channels,
            "keys": keys, "labels": labels, "flips": flips,
            "expected": format!("{dtype}-expected.npy"), "original": format!("{dtype}-original.npy"),
        }));
    }
    std::fs::write(
        dir.path().join("cases.json"),
        serde_json::to_string(&cases).unwrap(),
    )
    .unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/arrow_readers.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{stderr}",
        script.display()
    );
    assert!(stdout.trim_end().ends_with("OK"), "{stdout}");

    // The user-facing example scripts run on every dtype.
    for case in &cases {
        let shard = dir.path().join(case["file"].as_str().unwrap());
        for name in ["read_pyarrow.py", "read_polars.py", "read_duckdb.py"] {
            let script = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts")
                .join(name);
            let out = Command::new("python3")
                .arg(&script)
                .arg(&shard)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name} on {}:\n{}\n{}",
                shard.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
