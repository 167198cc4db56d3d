//! Crash safety and determinism of `rae-cache build`: kill + resume gives
//! the bytes of a clean build; refusals (non-empty directory, changed
//! arguments, held lock); thread-count independence; parts + merge.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, bin, run_ok};

/// Six fixture images, copied twice under new names so a build lasts long
/// enough to be interrupted.
fn dataset(dir: &Path) -> PathBuf {
    let src = common::fixture("images");
    let root = dir.join("images");
    for class in std::fs::read_dir(&src).unwrap() {
        let class = class.unwrap();
        let to = root.join(class.file_name());
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(class.path()).unwrap() {
            let f = f.unwrap();
            let name = f.file_name().to_string_lossy().into_owned();
            for copy in ["a", "b"] {
                std::fs::copy(f.path(), to.join(format!("{copy}_{name}"))).unwrap();
            }
        }
    }
    root
}

/// Build arguments: small shards and batches by default; `extra` adds to
/// or overrides them.
fn args(images: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let encoder = common::fixture("encoder-dinov2reg");
    let mut v: Vec<String> = [
        "build",
        images.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let defaults = [
        ("--encoder", encoder.to_str().unwrap()),
        ("--device", "cpu"),
        ("--batch-size", "2"),
        ("--rows-per-shard", "4"),
        ("--rows-per-group", "2"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.push(flag.into());
            v.push(value.into());
        }
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn build(images: &Path, out: &Path, extra: &[&str]) -> Output {
    bin().args(args(images, out, extra)).output().unwrap()
}

fn build_ok(images: &Path, out: &Path, extra: &[&str]) {
    run_ok(args(images, out, extra));
}

/// Every shard's bytes, by file name.
fn shard_bytes(cache: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(cache.join("shards"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The public manifest (no timings in it) and the builder's state minus
/// its clock/machine section.
fn manifest_without_log(cache: &Path) -> (String, serde_json::Value) {
    let manifest = std::fs::read_to_string(cache.join("manifest.json")).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cache.join("build-state.json")).unwrap())
            .unwrap();
    v.as_object_mut().unwrap().remove("build_log");
    (manifest, v)
}

fn assert_same_cache(a: &Path, b: &Path, what: &str) {
    let (sa, sb) = (shard_bytes(a), shard_bytes(b));
    assert_eq!(
        sa.keys().collect::<Vec<_>>(),
        sb.keys().collect::<Vec<_>>(),
        "{what}: shard files differ"
    );
    for (k, v) in &sa {
        assert!(v == &sb[k], "{what}: {k} differs");
    }
    assert!(!sa.is_empty());
    assert!(
        std::fs::read(a.join("stats.safetensors")).unwrap()
            == std::fs::read(b.join("stats.safetensors")).unwrap(),
        "{what}: stats.safetensors differs"
    );
}

#[test]
fn killed_build_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let images = dataset(tmp.path());
    let clean = tmp.path().join("clean");
    build_ok(&images, &clean, &["--threads", "1"]);

    let killed = tmp.path().join("killed");
    let mut child = bin()
        .args(args(&images, &killed, &["--threads", "1"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = killed.join("shards").join("part-00000.parquet");
    let t0 = Instant::now();
    while !first.exists() && t0.elapsed() < Duration::from_secs(300) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    let state = killed.join("build-state.json");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    if m["complete"] == true {
        // The build beat the kill: emulate a crash after shard 0 instead
        // (later shards and the final stats left behind, a stray temp file).
        eprintln!("build finished before the kill ({status}); emulating the crash");
        let mut m = m;
        let shards = m["shards"].as_array().unwrap()[..1].to_vec();
        m["shards"] = serde_json::Value::Array(shards);
        m["complete"] = false.into();
        std::fs::write(&state, serde_json::to_string_pretty(&m).unwrap()).unwrap();
        std::fs::write(
            killed.join("shards").join(".part-00001.parquet.tmp-1"),
            b"half a shard",
        )
        .unwrap();
    } else {
        assert!(!status.success());
    }

    // Without --resume: refused, pointing at --resume.
    let o = build(&images, &killed, &["--threads", "1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not empty") && err.contains("--resume"),
        "{err}"
    );

    // --resume with a different dtype / rows per shard: refused, naming them.
    let o = build(
        &images,
        &killed,
        &["--threads", "1", "--resume", "--dtype", "bf16"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dtype"), "{err}");

    build_ok(&images, &killed, &["--threads", "1", "--resume"]);
    assert_same_cache(&clean, &killed, "resumed build");
    assert_eq!(manifest_without_log(&clean), manifest_without_log(&killed));
    let leftovers: Vec<_> = std::fs::read_dir(killed.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn lock_held_refuses_a_second_build() {
    let tmp = tempfile::tempdir().unwrap();
    let images = common::fixture("images");
    let out = tmp.path().join("cache");
    std::fs::create_dir_all(&out).unwrap();
    let _held = rae_cache::pipeline::lock::lock_dir(&out, ".lock").unwrap();
    let o = build(&images, &out, &["--limit", "2"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("locked") && err.contains(".lock"), "{err}");
}

#[test]
fn thread_count_does_not_change_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let images = common::fixture("images");
    let (a, b) = (tmp.path().join("t1"), tmp.path().join("t3"));
    build_ok(&images, &a, &["--threads", "1", "--writers", "1"]);
    build_ok(
        &images,
        &b,
        &["--threads", "3", "--batch-size", "3", "--writers", "3"],
    );
    assert_same_cache(&a, &b, "--threads 3 --writers 3");
    assert_eq!(manifest_without_log(&a), manifest_without_log(&b));
}

#[test]
fn parts_and_merge_equal_a_single_build() {
    let tmp = tempfile::tempdir().unwrap();
    let images = common::fixture("images");
    let single = tmp.path().join("single");
    // 6 images, 1 per shard: parts of 3 shards each, so the merge folds
    // multi-shard parts.
    build_ok(&images, &single, &["--rows-per-shard", "2"]);

    let parts = tmp.path().join("parts");
    build_ok(
        &images,
        &parts,
        &["--rows-per-shard", "2", "--num-parts", "2", "--part", "1"],
    );
    // Merging with a part missing is refused, naming it.
    let o = bin()
        .args(["merge", parts.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("part 0"), "{err}");

    build_ok(
        &images,
        &parts,
        &["--rows-per-shard", "2", "--num-parts", "2", "--part", "0"],
    );
    let o = bin()
        .args(["merge", parts.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "merge failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_same_cache(&single, &parts, "2 parts + merge");
    let (a, b) = (
        manifest_without_log(&single).1,
        manifest_without_log(&parts).1,
    );
    assert_eq!(a["shards"], b["shards"]);
    assert_eq!(a["totals"], b["totals"]);
    // The public manifest holds no timings: the merged one is the single build's, byte for byte.
    assert_eq!(
        manifest_without_log(&single).0,
        manifest_without_log(&parts).0
    );
    let o = bin()
        .args(["verify", parts.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "verify after merge: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn launched_build_on_two_processes_equals_a_single_build() {
    // `launch -- build`: each process builds part RANK of WORLD_SIZE, and
    // rank 0 merges once every part is done.
    let tmp = tempfile::tempdir().unwrap();
    let images = common::fixture("images");
    let single = tmp.path().join("single");
    build_ok(&images, &single, &["--rows-per-shard", "2"]);
    let port = common::free_port().to_string();
    let job = tmp.path().join("job");
    let o = bin()
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--",
        ])
        .args(args(&images, &job, &["--rows-per-shard", "2", "--json"]))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "launch build: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["parts"], 2);
    assert_same_cache(&single, &job, "launch --nproc-per-node 2 -- build");
    assert_eq!(
        manifest_without_log(&single).0,
        manifest_without_log(&job).0
    );
}
