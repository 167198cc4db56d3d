//! `rae-cache build` from tar archives and Parquet image datasets made
//! here from the fixture image folder: each cache equals the folder build
//! byte for byte (shards, statistics; manifest up to the recorded source),
//! damaged members and rows are rejected, a truncated archive stops with
//! its whole shards and resumes once complete, parts and resume work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::{self, bin, run_ok};

/// One image of the folder dataset: key (`class/file`), class, bytes.
pub(crate) struct Image {
    pub(crate) key: String,
    pub(crate) class: String,
    pub(crate) bytes: Vec<u8>,
}

/// The fixture images, each copied twice under new names (12 images, so
/// there are several shards), as a class-folder dataset under `dir`.
/// Returns the folder and its images in sorted key order.
pub(crate) fn dataset(dir: &Path) -> (PathBuf, Vec<Image>) {
    let root = dir.join("images");
    let mut images = Vec::new();
    for src in common::fixture_images() {
        let class = src
            .parent()
            .and_then(|p| p.file_name())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::create_dir_all(root.join(&class)).unwrap();
        for copy in ["a", "b"] {
            let file = format!("{copy}_{name}");
            std::fs::copy(&src, root.join(&class).join(&file)).unwrap();
            images.push(Image {
                key: format!("{class}/{file}"),
                class: class.clone(),
                bytes: std::fs::read(&src).unwrap(),
            });
        }
    }
    images.sort_by(|a, b| a.key.cmp(&b.key));
    (root, images)
}

pub(crate) fn classes(images: &[Image]) -> Vec<String> {
    let mut c: Vec<String> = images.iter().map(|i| i.class.clone()).collect();
    c.dedup();
    c
}

/// A tar of `(path, bytes)` members, in the order given, with the
/// end-of-archive blocks.
pub(crate) fn tar_bytes<'a>(members: impl IntoIterator<Item = (String, &'a [u8])>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append_data(&mut h, &path, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// `train.tar`: one `CLASS.tar` per class (as ILSVRC2012_img_train.tar),
/// members named by file.
pub(crate) fn nested_tar(images: &[Image]) -> Vec<u8> {
    let mut inner = Vec::new();
    for class in classes(images) {
        let members = images
            .iter()
            .filter(|i| i.class == class)
            .map(|i| (i.key[class.len() + 1..].to_string(), i.bytes.as_slice()));
        inner.push((format!("{class}.tar"), tar_bytes(members)));
    }
    // The stored order is the build's image order: sorted here, as the
    // folder listing (storing the classes in reverse fails the test).
    tar_bytes(inner.iter().map(|(n, b)| (n.clone(), b.as_slice())))
}

/// WebDataset shards of `per_shard` samples: `KEY.png|jpg` + `KEY.cls`.
pub(crate) fn webdataset(dir: &Path, images: &[Image], per_shard: usize) {
    let classes = classes(images);
    for (s, chunk) in images.chunks(per_shard).enumerate() {
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        for i in chunk {
            let label = classes.iter().position(|c| *c == i.class).unwrap();
            members.push((i.key.clone(), i.bytes.clone()));
            let stem = &i.key[..i.key.rfind('.').unwrap()];
            members.push((format!("{stem}.cls"), label.to_string().into_bytes()));
            members.push((format!("{stem}.json"), b"{}".to_vec()));
        }
        let t = tar_bytes(members.iter().map(|(n, b)| (n.clone(), b.as_slice())));
        std::fs::write(dir.join(format!("shard-{s:06}.tar")), t).unwrap();
    }
}

/// Parquet files in the Hugging Face layout: `image: struct<bytes, path>`,
/// `label: int64`, ClassLabel names in the `huggingface` footer metadata;
/// `rows_per_file` rows per file, row groups of 3 rows. `bad` replaces
/// image bytes by the row's value (`None`: a null).
pub(crate) fn parquet_dataset(
    dir: &Path,
    images: &[Image],
    rows_per_file: usize,
    bad: &BTreeMap<usize, Option<Vec<u8>>>,
) {
    parquet_dataset_grouped(dir, images, rows_per_file, 3, bad)
}

/// [`parquet_dataset`] with `group_rows` rows per row group.
pub(crate) fn parquet_dataset_grouped(
    dir: &Path,
    images: &[Image],
    rows_per_file: usize,
    group_rows: usize,
    bad: &BTreeMap<usize, Option<Vec<u8>>>,
) {
    use arrow::array::{ArrayRef, BinaryArray, Int64Array, StringArray, StructArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use parquet::arrow::ArrowWriter;
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;

    std::fs::create_dir_all(dir).unwrap();
    let classes = classes(images);
    let hf = serde_json::json!({"info": {"features": {
        "image": {"_type": "Image"},
        "label": {"_type": "ClassLabel", "names": classes},
    }}});
    let fields = vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Struct(fields.clone().into()), true),
        Field::new("label", DataType::Int64, true),
    ]));
    for (f, chunk) in images.chunks(rows_per_file).enumerate() {
        let first = f * rows_per_file;
        let bytes: Vec<Option<Vec<u8>>> = chunk
            .iter()
            .enumerate()
            .map(|(r, i)| {
                bad.get(&(first + r))
                    .cloned()
                    .unwrap_or(Some(i.bytes.clone()))
            })
            .collect();
        let bytes: ArrayRef = Arc::new(BinaryArray::from_iter(bytes.iter().map(|b| b.as_deref())));
        let paths: ArrayRef = Arc::new(StringArray::from_iter_values(chunk.iter().map(|i| &i.key)));
        let labels: ArrayRef =
            Arc::new(Int64Array::from_iter_values(chunk.iter().map(|i| {
                classes.iter().position(|c| *c == i.class).unwrap() as i64
            })));
        let image = StructArray::from(vec![
            (Arc::new(fields[0].clone()), bytes),
            (Arc::new(fields[1].clone()), paths),
        ]);
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(image), labels]).unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(group_rows))
            .set_key_value_metadata(Some(vec![KeyValue::new(
                "huggingface".into(),
                hf.to_string(),
            )]))
            .build();
        let file = std::fs::File::create(dir.join(format!("train-{f:05}.parquet"))).unwrap();
        let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
}

/// `rae-cache build INPUTS --out OUT` with the tiny encoder, small shards
/// (2 images each) and batches; `extra` adds to or overrides them.
pub(crate) fn args(inputs: &[&Path], out: &Path, extra: &[&str]) -> Vec<String> {
    let encoder = common::fixture("encoder-dinov2reg");
    let mut v = vec!["build".to_string()];
    v.extend(inputs.iter().map(|p| p.to_str().unwrap().to_string()));
    v.extend(["--out", out.to_str().unwrap()].map(String::from));
    let defaults = [
        ("--encoder", encoder.to_str().unwrap()),
        ("--device", "cpu"),
        ("--batch-size", "2"),
        ("--rows-per-shard", "4"),
        ("--rows-per-group", "2"),
        ("--threads", "2"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.extend([flag, value].map(String::from));
        }
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub(crate) fn build_ok(inputs: &[&Path], out: &Path, extra: &[&str]) {
    run_ok(args(inputs, out, extra));
}

pub(crate) fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every shard's bytes, by file name.
pub(crate) fn shard_bytes(cache: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(cache.join("shards"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// The manifest without what records the source: `dataset_root` (the
/// path given) and `build_args.settings.source` (format, files, options).
pub(crate) fn manifest_sans_source(cache: &Path) -> serde_json::Value {
    let mut m = read_json(&cache.join("manifest.json"));
    m.as_object_mut().unwrap().remove("dataset_root");
    let settings = m["build_args"]["settings"].as_object_mut().unwrap();
    settings.remove("source");
    m
}

/// Shards and statistics byte for byte, manifest up to the source.
pub(crate) fn assert_same_cache(folder: &Path, other: &Path, what: &str) {
    let (a, b) = (shard_bytes(folder), shard_bytes(other));
    assert!(a.len() > 1, "{what}: expected several shards");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: shard files differ"
    );
    for (k, v) in &a {
        assert!(v == &b[k], "{what}: {k} differs");
    }
    assert!(
        std::fs::read(folder.join("stats.safetensors")).unwrap()
            == std::fs::read(other.join("stats.safetensors")).unwrap(),
        "{what}: stats.safetensors differs"
    );
    assert_eq!(
        manifest_sans_source(folder),
        manifest_sans_source(other),
        "{what}: manifest differs beyond the source"
    );
}

#[test]
fn tar_webdataset_and_parquet_build_the_folder_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (folder, images) = dataset(tmp.path());
    let clean = tmp.path().join("folder-cache");
    build_ok(&[&folder], &clean, &[]);
    // A folder build records nothing new (its bytes are as before sources).
    let state = read_json(&clean.join("build-state.json"));
    assert!(state["settings"].get("source").is_none());
    assert!(state.get("truncated").is_none());

    // A tar of per-class tars.
    let train = tmp.path().join("train.tar");
    std::fs::write(&train, nested_tar(&images)).unwrap();
    let out = tmp.path().join("tar-cache");
    build_ok(&[&train], &out, &[]);
    assert_same_cache(&clean, &out, "nested tar");
    let m = read_json(&out.join("manifest.json"));
    assert_eq!(
        m["build_args"]["settings"]["source"]["format"],
        "nested-tar"
    );

    // A flat tar with a labels file of class names (keys without extension).
    let flat = tmp.path().join("val.tar");
    std::fs::write(
        &flat,
        tar_bytes(images.iter().map(|i| (i.key.clone(), i.bytes.as_slice()))),
    )
    .unwrap();
    let labels = tmp.path().join("labels.csv");
    let mut text = String::from("ImageId,PredictionString\n");
    for i in images.iter().rev() {
        text += &format!(
            "{},{} 1 2 3 4\n",
            &i.key[..i.key.rfind('.').unwrap()],
            i.class
        );
    }
    std::fs::write(&labels, text).unwrap();
    let out = tmp.path().join("flat-cache");
    build_ok(&[&flat], &out, &["--labels", labels.to_str().unwrap()]);
    assert_same_cache(&clean, &out, "flat tar + --labels");

    // WebDataset shards (with .json sidecars), given as a pattern.
    let wds = tmp.path().join("wds");
    std::fs::create_dir_all(&wds).unwrap();
    webdataset(&wds, &images, 5);
    let out = tmp.path().join("wds-cache");
    build_ok(&[&wds.join("shard-*.tar")], &out, &[]);
    // `.cls` members hold indices, not names: no class list.
    let mut folder_manifest = manifest_sans_source(&clean);
    folder_manifest["classes"] = serde_json::json!([]);
    let mut wds_manifest = manifest_sans_source(&out);
    assert_eq!(wds_manifest["classes"], serde_json::json!([]));
    wds_manifest["classes"] = serde_json::json!([]);
    assert_eq!(folder_manifest, wds_manifest, "webdataset manifest");
    let (a, b) = (shard_bytes(&clean), shard_bytes(&out));
    assert!(a == b, "webdataset shards differ");

    // Parquet files in the Hugging Face layout, as a directory.
    let pq = tmp.path().join("hf");
    parquet_dataset(&pq, &images, 7, &BTreeMap::new());
    let out = tmp.path().join("parquet-cache");
    build_ok(&[&pq], &out, &[]);
    assert_same_cache(&clean, &out, "parquet");
}

#[test]
fn damaged_members_and_rows_are_rejected_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, images) = dataset(tmp.path());
    let images = &images[..4];
    let garbage = b"\xff\xd8\xff\xe0 not really a jpeg".to_vec();

    // A flat tar with a corrupt member and a non-image member.
    let mut members: Vec<(String, &[u8])> = images
        .iter()
        .map(|i| (i.key.clone(), i.bytes.as_slice()))
        .collect();
    members.insert(1, ("n01440764/broken.jpg".into(), garbage.as_slice()));
    members.push(("README.txt".into(), b"hello".as_slice()));
    let t = tmp.path().join("bad.tar");
    std::fs::write(&t, tar_bytes(members)).unwrap();
    let out = tmp.path().join("tar-cache");
    build_ok(&[&t], &out, &[]);
    let m = read_json(&out.join("manifest.json"));
    let rejected = m["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["key"], "n01440764/broken.jpg");
    assert_eq!(m["totals"]["images"], 4);
    let skipped = m["build_args"]["skipped"].as_array().unwrap();
    assert!(
        skipped.iter().any(|s| s["key"] == "bad.tar/README.txt"),
        "{skipped:?}"
    );

    // Parquet: one row with bytes that are no image, one null.
    let bad = BTreeMap::from([(1, Some(garbage.clone())), (2, None)]);
    let pq = tmp.path().join("hf");
    parquet_dataset(&pq, images, 4, &bad);
    let out = tmp.path().join("parquet-cache");
    build_ok(&[&pq], &out, &[]);
    let m = read_json(&out.join("manifest.json"));
    let rejected: Vec<(String, String)> = m["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().into(),
                r["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(rejected[0].0, images[1].key);
    assert_eq!(
        rejected[1],
        (images[2].key.clone(), "image bytes are null".into())
    );
    assert_eq!(m["totals"]["images"], 2);
}

#[test]
fn truncated_archive_stops_then_resumes_once_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, images) = dataset(tmp.path());
    let whole = nested_tar(&images);
    let train = tmp.path().join("train.tar");
    std::fs::write(&train, &whole).unwrap();
    let clean = tmp.path().join("clean");
    build_ok(&[&train], &clean, &[]);

    // Cut inside the second class tar: the first class (4 images = 2
    // whole shards) and part of the second are there.
    std::fs::write(&train, &whole[..whole.len() * 11 / 20]).unwrap();
    let out = tmp.path().join("cut");
    let o = bin().args(args(&[&train], &out, &[])).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("truncated") && err.contains("--resume"),
        "{err}"
    );
    let state = read_json(&out.join("build-state.json"));
    assert_eq!(state["complete"], false);
    assert!(
        state["truncated"]["reason"]
            .as_str()
            .unwrap()
            .contains("truncated")
    );
    let written = state["shards"].as_array().unwrap().len();
    assert!(written >= 2, "{written} shards before the cut");
    assert!(!out.join("stats.safetensors").exists());
    let m = read_json(&out.join("manifest.json"));
    let skipped = m["build_args"]["skipped"].as_array().unwrap();
    assert!(
        skipped
            .iter()
            .any(|s| s["reason"].as_str().unwrap().contains("truncated")),
        "{skipped:?}"
    );

    // Still cut: resuming stops again at the same place, nothing lost.
    let o = bin()
        .args(args(&[&train], &out, &["--resume"]))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Complete again: --resume finishes the same bytes as a clean build.
    std::fs::write(&train, &whole).unwrap();
    build_ok(&[&train], &out, &["--resume"]);
    assert_same_cache(&clean, &out, "resumed after truncation");
    let state = read_json(&out.join("build-state.json"));
    assert_eq!(state["complete"], true);
    assert!(state.get("truncated").is_none());

    // A different archive under the same name is refused.
    let mut other: Vec<Image> = images
        .iter()
        .skip(1)
        .map(|i| Image {
            key: i.key.clone(),
            class: i.class.clone(),
            bytes: i.bytes.clone(),
        })
        .collect();
    other.truncate(8);
    std::fs::write(&train, nested_tar(&other)).unwrap();
    let cut = tmp.path().join("cut2");
    std::fs::write(&train, &whole[..whole.len() * 11 / 20]).unwrap();
    let _ = bin().args(args(&[&train], &cut, &[])).output().unwrap();
    std::fs::write(&train, nested_tar(&other)).unwrap();
    let o = bin()
        .args(args(&[&train], &cut, &["--resume"]))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no longer begins"), "{err}");
}

#[test]
fn resume_and_parts_from_a_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, images) = dataset(tmp.path());
    let train = tmp.path().join("train.tar");
    std::fs::write(&train, nested_tar(&images)).unwrap();
    let clean = tmp.path().join("clean");
    build_ok(&[&train], &clean, &[]);
    // One decode thread (the others use two): the same bytes.
    let one = tmp.path().join("one-thread");
    build_ok(&[&train], &one, &["--threads", "1", "--batch-size", "3"]);
    assert_same_cache(&clean, &one, "--threads 1");

    // A crash after shard 1: the state keeps two shards, a stray temp file.
    let resumed = tmp.path().join("resumed");
    build_ok(&[&train], &resumed, &[]);
    let state_path = resumed.join("build-state.json");
    let mut state = read_json(&state_path);
    let kept = state["shards"].as_array().unwrap()[..2].to_vec();
    state["shards"] = serde_json::Value::Array(kept);
    state["complete"] = false.into();
    state["stats"] = serde_json::Value::Null;
    std::fs::write(&state_path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
    std::fs::remove_file(resumed.join("stats.safetensors")).unwrap();
    std::fs::write(resumed.join("shards/.part-00002.parquet.tmp-1"), b"half").unwrap();
    std::fs::remove_file(resumed.join("shards/part-00004.parquet")).unwrap();
    build_ok(&[&train], &resumed, &["--resume"]);
    assert_same_cache(&clean, &resumed, "resumed tar build");

    // Two parts and a merge.
    let parts = tmp.path().join("parts");
    for p in ["1", "0"] {
        build_ok(&[&train], &parts, &["--num-parts", "2", "--part", p]);
    }
    run_ok(["merge", parts.to_str().unwrap()]);
    let (a, b) = (shard_bytes(&clean), shard_bytes(&parts));
    assert!(a == b, "parts: shards differ");
    assert!(
        std::fs::read(clean.join("stats.safetensors")).unwrap()
            == std::fs::read(parts.join("stats.safetensors")).unwrap(),
        "parts: stats differ"
    );
}
