//! Read + decode + crop throughput of the build's input stage from an
//! image folder, a tar of per-class tars, and a Parquet image dataset
//! holding the same synthetic ImageNet-sized JPEGs, at 1 and 2 threads.
//!
//! `cargo bench --bench sources [-- IMAGES ROUNDS]` (default 96 images, 5
//! rounds). It does what the build's decode stage does: a folder's images
//! are read by the decode threads; a tar's or Parquet dataset's are
//! streamed in order by one feeder thread (`ItemReader::stream`) to the
//! decode threads. Listing is timed too. The rounds interleave the sources
//! so that load from other processes hits them alike; each figure is the
//! median round, and the ratio to the folder in the same run is what to
//! compare. Files are in the page cache after the first round: this
//! measures the CPU cost of the source, not the disk.

// Shared with the other benches and the `bench` subcommand.
#[allow(dead_code, unused_imports)]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::bounded;
use rae_cache::images::{DecodeOptions, adm_center_crop, decode_rgb8, decode_rgb8_bytes};
use rae_cache::pipeline::Inputs;
use rae_cache::sources::SourceOptions;
use support::synthetic_jpeg;

/// (class, file, bytes), sorted.
type Images = Vec<(String, String, Vec<u8>)>;

fn tar_of<'a>(members: impl Iterator<Item = (String, &'a [u8])>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, &path, data).expect("tar");
    }
    b.into_inner().expect("tar")
}

fn write_sources(dir: &Path, images: &Images) -> (PathBuf, PathBuf, PathBuf) {
    let folder = dir.join("folder");
    for (class, file, bytes) in images {
        std::fs::create_dir_all(folder.join(class)).expect("mkdir");
        std::fs::write(folder.join(class).join(file), bytes).expect("write");
    }
    let mut classes: Vec<&String> = images.iter().map(|i| &i.0).collect();
    classes.dedup();
    let inner: Vec<(String, Vec<u8>)> = classes
        .iter()
        .map(|c| {
            let t = tar_of(
                images
                    .iter()
                    .filter(|i| &i.0 == *c)
                    .map(|i| (i.1.clone(), i.2.as_slice())),
            );
            (format!("{c}.tar"), t)
        })
        .collect();
    let tar = dir.join("train.tar");
    std::fs::write(
        &tar,
        tar_of(inner.iter().map(|(n, b)| (n.clone(), b.as_slice()))),
    )
    .expect("write");
    let parquet = dir.join("train.parquet");
    write_parquet(&parquet, images);
    (folder, tar, parquet)
}

fn write_parquet(path: &Path, images: &Images) {
    use arrow::array::{ArrayRef, BinaryArray, Int64Array, StringArray, StructArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let fields = vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Struct(fields.clone().into()), true),
        Field::new("label", DataType::Int64, true),
    ]));
    let bytes: ArrayRef = Arc::new(BinaryArray::from_iter_values(images.iter().map(|i| &i.2)));
    let paths: ArrayRef = Arc::new(StringArray::from_iter_values(
        images.iter().map(|i| format!("{}/{}", i.0, i.1)),
    ));
    let labels: ArrayRef = Arc::new(Int64Array::from_iter_values(
        images.iter().map(|i| i.0[1..].parse::<i64>().unwrap_or(0)),
    ));
    let image = StructArray::from(vec![
        (Arc::new(fields[0].clone()), bytes),
        (Arc::new(fields[1].clone()), paths),
    ]);
    let batch =
        arrow::record_batch::RecordBatch::try_new(schema.clone(), vec![Arc::new(image), labels])
            .expect("batch");
    // Row groups of 32 images (~4 MB), as image datasets are written.
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(32))
        .build();
    let f = std::fs::File::create(path).expect("create");
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, Some(props)).expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");
}

/// List `input`, then read, decode and crop every image on `threads`
/// threads; returns (images, seconds).
fn run(input: &Path, threads: usize) -> (usize, f64) {
    run_timed(input, threads).0
}

/// Seconds to list `input`.
fn list_seconds(input: &Path) -> f64 {
    run_timed(input, 0).1
}

/// ((images, seconds), listing seconds); `threads` 0: list only.
fn run_timed(input: &Path, threads: usize) -> ((usize, f64), f64) {
    let t0 = Instant::now();
    let inputs = Inputs::list(
        &[input.to_path_buf()],
        &SourceOptions::default(),
        None,
        1024,
        None,
    )
    .expect("list");
    let listed = t0.elapsed().as_secs_f64();
    if threads == 0 {
        return ((0, 0.0), listed);
    }
    let entries = inputs.entries();
    let opts = DecodeOptions::default();
    let (tx, rx) = bounded::<(usize, Option<Vec<u8>>)>(4 * threads);
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let reader = inputs.reader.clone();
        s.spawn(move || match reader {
            Some(r) => {
                for item in r.stream(0..entries.len()) {
                    let (idx, bytes) = item.expect("read");
                    tx.send((idx, Some(bytes.expect("bytes")))).expect("send");
                }
            }
            None => {
                for idx in 0..entries.len() {
                    tx.send((idx, None)).expect("send");
                }
            }
        });
        for _ in 0..threads {
            let rx = rx.clone();
            let (done, opts) = (&done, &opts);
            s.spawn(move || {
                for (idx, bytes) in rx.iter() {
                    let e = &entries[idx];
                    let img = match bytes {
                        Some(b) => decode_rgb8_bytes(&b, &e.path, opts),
                        None => decode_rgb8(&e.path, opts),
                    }
                    .expect("decode");
                    std::hint::black_box(adm_center_crop(&img, 256));
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        drop(rx);
    });
    ((done.into_inner(), t0.elapsed().as_secs_f64()), listed)
}

/// CPU seconds used by this process so far (all threads), from
/// /proc/self/stat; 0 where there is none. Unlike wall time, not inflated
/// by other processes' load.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the `(comm)`: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0 // USER_HZ
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(96);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let images: Images = (0..n)
        .map(|i| {
            let class = format!("n{:08}", i % 4);
            (
                class,
                format!("img_{i:05}.JPEG"),
                synthetic_jpeg(i as u64, 500, 375),
            )
        })
        .collect();
    let mut images = images;
    images.sort();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (folder, tar, parquet) = write_sources(tmp.path(), &images);
    let sources = [
        ("folder", &folder),
        ("nested tar", &tar),
        ("parquet", &parquet),
    ];
    println!(
        "{n} JPEGs 500x375 q90, {rounds} interleaved rounds, median images/s and total CPU per image (read+decode+crop, listing included)"
    );
    for (name, path) in &sources {
        let s = median((0..rounds).map(|_| list_seconds(path)).collect());
        println!(
            "listing     {name:<10}  {:8.1} us/image",
            1e6 * s / n as f64
        );
    }
    for threads in [1usize, 2] {
        let mut rates = vec![Vec::new(); sources.len()];
        let mut cpu = vec![0f64; sources.len()];
        for _ in 0..rounds {
            for (k, (_, path)) in sources.iter().enumerate() {
                let c0 = cpu_seconds();
                let (count, secs) = run(path, threads);
                cpu[k] += cpu_seconds() - c0;
                assert_eq!(count, n);
                rates[k].push(count as f64 / secs);
            }
        }
        let base = median(rates[0].clone());
        for (k, (name, _)) in sources.iter().enumerate() {
            let m = median(rates[k].clone());
            let ms = 1e3 * cpu[k] / (rounds * n) as f64;
            println!(
                "threads {threads}  {name:<10}  {m:8.1} images/s  {:.3}x folder   CPU {ms:.2} ms/image ({:.3}x folder)",
                m / base,
                cpu[k] / cpu[0]
            );
        }
    }
}
