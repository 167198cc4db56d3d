//! Caches in object storage, against a real S3-compatible server (moto's
//! standalone server on 127.0.0.1, see `common::s3`): a build to
//! `s3://bucket/cache` equals the local build byte for byte; training from
//! the store gives the local losses and downloads each shard once; a build
//! killed mid-upload resumes to the same bytes; a second build on the
//! prefix is refused; a missing bucket and wrong credentials are named.
//! Builds read their inputs from the store too (a nested tar, WebDataset
//! shards, a Parquet dataset, an image folder; a truncated object resumed;
//! parts), giving the local build's bytes; eval and sample read store URLs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::build_sources as bs;
use crate::common::s3::{self, S3Server};
use crate::common::{self, tiny_cache};

/// Twelve images (the six fixtures, twice) so a build lasts a few shards.
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

fn build_args(images: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let encoder = common::fixture("encoder-dinov2reg");
    let mut v: Vec<String> = ["build", images.to_str().unwrap(), "--out", out]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in [
        "--encoder",
        encoder.to_str().unwrap(),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--rows-per-shard",
        "4",
        "--rows-per-group",
        "2",
        "--threads",
        "1",
    ] {
        v.push(s.into());
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Every file under `dir` (relative name -> bytes), leaving out
/// `build-state.json` (its build_log holds timings and the machine).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out.remove("build-state.json");
    out.remove(".lock");
    out
}

fn assert_same_files(a: &Path, b: &Path, what: &str) {
    let (fa, fb) = (files(a), files(b));
    assert_eq!(
        fa.keys().collect::<Vec<_>>(),
        fb.keys().collect::<Vec<_>>(),
        "{what}: different files"
    );
    assert!(fa.keys().any(|k| k.ends_with(".parquet")));
    for (k, v) in &fa {
        assert!(v == &fb[k], "{what}: {k} differs");
    }
}

/// The build state without its build_log (timings, machine, runs).
fn state_without_log(dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("build-state.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("build_log");
    v
}

/// A bucket on `srv`, the test images and their local build (the bytes a
/// build to the store must equal).
fn bucket_and_local_build(srv: &S3Server, bucket: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    srv.create_bucket(bucket);
    let tmp = tempfile::tempdir().unwrap();
    let images = dataset(tmp.path());
    let local = tmp.path().join("local");
    common::run_ok(build_args(&images, local.to_str().unwrap(), &[]));
    (tmp, images, local)
}

#[test]
fn build_to_s3_equals_the_local_build_and_inspect_verify_read_it() {
    let Some(srv) = S3Server::start() else { return };
    let (tmp, images, local) = bucket_and_local_build(&srv, "rae-build");

    let url = "s3://rae-build/caches/imagenet";
    let staging = tmp.path().join("staging");
    let o = srv
        .command(&tmp.path().join("rc"))
        .args(build_args(
            &images,
            url,
            &["--staging-dir", staging.to_str().unwrap(), "--json"],
        ))
        .output()
        .unwrap();
    ok(&o, "build to s3");
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["cache_dir"], url);
    assert_eq!(summary["complete"], true);

    let remote = srv.remote(url);
    let names: Vec<String> = remote.list("").unwrap().into_iter().map(|n| n.0).collect();
    assert!(!names.iter().any(|n| n == ".lock"), "lock left: {names:?}");
    assert!(
        std::fs::read_dir(&staging).unwrap().next().is_none(),
        "staging directory left behind"
    );
    let got = tmp.path().join("downloaded");
    s3::download_all(&remote, &got);
    // Shards, state/, stats.safetensors and manifest.json: byte for byte.
    assert_same_files(&local, &got, "s3 build vs local build");
    assert_eq!(state_without_log(&local), state_without_log(&got));

    // inspect and verify read the store cache through the read-through cache.
    let rc = tmp.path().join("rc");
    let o = srv
        .command(&rc)
        .args(["verify", url, "--json"])
        .output()
        .unwrap();
    ok(&o, "verify s3");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let o = srv
        .command(&rc)
        .args(["inspect", url, "--json"])
        .output()
        .unwrap();
    ok(&o, "inspect s3");
    let o2 = common::run_ok(["inspect", local.to_str().unwrap(), "--json"]);
    let (a, b) = (common::json(&o), common::json(&o2));
    assert_eq!(a["totals"], b["totals"], "{a}\n{b}");
}

/// The fixture's DiT-DH shape and a tiny cache to match, uploaded to the
/// store; training args.
fn tiny_train_setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = common::read_json("ditdh.json");
    let side = model["input_size"].as_u64().unwrap() as usize;
    let spec = tiny_cache::Spec {
        images: 40,
        classes: (model["num_classes"].as_u64().unwrap() as usize).min(4),
        tokens: side * side,
        channels: model["in_channels"].as_u64().unwrap() as usize,
        shards: 3,
        rows_per_row_group: 6,
        both_flips: true,
        seed: 3,
        dtype: rae_cache::shards::LatentDType::F32,
    };
    let cache = dir.join("cache");
    tiny_cache::write(&cache, &spec);
    let model_path = dir.join("ditdh.json");
    std::fs::write(&model_path, model.to_string()).unwrap();
    (cache, model_path)
}

fn train(cmd: &mut Command, data: &str, out: &Path, model: &Path) -> Vec<f64> {
    let o = cmd
        .args(["train", "--data", data, "--out", out.to_str().unwrap()])
        .args(["--model-config", model.to_str().unwrap()])
        .args(["--batch-size", "8", "--seed", "5", "--steps", "4"])
        .args(["--device", "cpu", "--json"])
        .output()
        .unwrap();
    ok(&o, "train");
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn training_from_s3_gives_the_local_losses_and_reads_each_shard_once() {
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-train");
    let tmp = tempfile::tempdir().unwrap();
    let (cache, model) = tiny_train_setup(tmp.path());
    let url = "s3://rae-train/tiny";
    s3::upload_all(&srv.remote(url), &cache);

    let local = train(
        &mut Command::new(common::exe()),
        cache.to_str().unwrap(),
        &tmp.path().join("run-local"),
        &model,
    );
    let rc = tmp.path().join("rc");
    let first = srv
        .command(&rc)
        .args(["train", "--data", url])
        .args(["--out", tmp.path().join("run-s3").to_str().unwrap()])
        .args(["--model-config", model.to_str().unwrap()])
        .args(["--batch-size", "8", "--seed", "5", "--steps", "4"])
        .args(["--device", "cpu", "--json"])
        .output()
        .unwrap();
    ok(&first, "train from s3");
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(err.contains("3 shards downloaded"), "{err}");
    let from_s3: Vec<f64> = std::fs::read_to_string(tmp.path().join("run-s3/log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(local.len(), 4);
    assert_eq!(local, from_s3, "losses from s3 differ from local");

    // A second run on this node reads no shard from the store.
    let again = train(
        &mut srv.command(&rc),
        url,
        &tmp.path().join("run-s3b"),
        &model,
    );
    assert_eq!(again, local);
}

/// Poll `remote` until `rel` exists or `child` ends; then kill -9 it.
fn kill_when_uploaded(
    child: &mut std::process::Child,
    remote: &rae_cache::store::Remote,
    rel: &str,
) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(300) {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if remote.head(rel).unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();
    !status.success()
}

#[test]
fn a_build_killed_mid_upload_resumes_to_the_same_bytes() {
    let Some(srv) = S3Server::start() else { return };
    let (tmp, images, local) = bucket_and_local_build(&srv, "rae-kill");

    let url = "s3://rae-kill/cache";
    let remote = srv.remote(url);
    let staging = tmp.path().join("staging");
    let staging_arg = ["--staging-dir", staging.to_str().unwrap()];
    let mut child = srv
        .command(&tmp.path().join("rc"))
        .args(build_args(&images, url, &staging_arg))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let killed = kill_when_uploaded(&mut child, &remote, "shards/part-00000.parquet");
    if !killed {
        // The build beat the kill: put the store back as a kill after
        // shard 0 leaves it (a state listing shard 0 only, later shards
        // uploaded past it, no manifest update, the dead build's lock).
        eprintln!("build finished before the kill; emulating it");
        let mut m: serde_json::Value =
            serde_json::from_slice(&remote.get("build-state.json").unwrap().unwrap()).unwrap();
        m["shards"] = serde_json::Value::Array(m["shards"].as_array().unwrap()[..1].to_vec());
        m["complete"] = false.into();
        m["stats"] = serde_json::Value::Null;
        remote
            .put("build-state.json", serde_json::to_vec(&m).unwrap().into())
            .unwrap();
        remote.delete("stats.safetensors").unwrap();
        let dead =
            serde_json::json!({"host": hostname(), "pid": 999_999_999u32, "started_unix": 0});
        remote
            .put(".lock", serde_json::to_vec(&dead).unwrap().into())
            .unwrap();
    }
    // The store's state lists only shards the store holds.
    let m: serde_json::Value =
        serde_json::from_slice(&remote.get("build-state.json").unwrap().unwrap()).unwrap();
    let objects: Vec<String> = remote.list("").unwrap().into_iter().map(|o| o.0).collect();
    eprintln!(
        "after the kill the store lists {} shards and holds {objects:?}",
        m["shards"].as_array().unwrap().len()
    );
    for s in m["shards"].as_array().unwrap() {
        if let Some(f) = s["file"].as_str() {
            assert!(remote.head(f).unwrap().is_some(), "{f} listed but missing");
        }
    }
    // Without --resume: refused.
    let o = srv
        .command(&tmp.path().join("rc"))
        .args(build_args(&images, url, &staging_arg))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    // The killed build's lock (this host, its process gone) is taken over,
    // then the prefix is found not empty.
    assert!(err.contains("took over"), "{err}");
    assert!(err.contains(url) && err.contains("--resume"), "{err}");
    assert!(
        remote.head(".lock").unwrap().is_none(),
        "the refused build kept the lock"
    );

    let mut resume_args = staging_arg.to_vec();
    resume_args.push("--resume");
    let o = srv
        .command(&tmp.path().join("rc"))
        .args(build_args(&images, url, &resume_args))
        .output()
        .unwrap();
    ok(&o, "resume");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("resuming") && err.contains("from the store"),
        "{err}"
    );
    let got = tmp.path().join("downloaded");
    s3::download_all(&remote, &got);
    assert_same_files(&local, &got, "resumed s3 build vs local build");
    assert_eq!(state_without_log(&local), state_without_log(&got));
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn a_second_build_on_the_same_prefix_is_refused() {
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-lock");
    let tmp = tempfile::tempdir().unwrap();
    let images = common::fixture("images");
    let url = "s3://rae-lock/cache";
    let remote = srv.remote(url);
    // A live build elsewhere holds the lock (created as a build creates it).
    let holder = serde_json::json!({"host": "node-17", "pid": 4242, "started_unix": 1});
    assert!(
        remote
            .create(".lock", serde_json::to_vec(&holder).unwrap().into())
            .unwrap()
    );
    // The conditional PUT refuses a second create.
    assert!(!remote.create(".lock", b"x".to_vec().into()).unwrap());
    let second = |extra: &[&str]| {
        srv.command(&tmp.path().join("rc"))
            .args(build_args(&images, url, extra))
            .args(["--limit", "2"])
            .output()
            .unwrap()
    };
    let o = second(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("s3://rae-lock/cache/.lock")
            && err.contains("node-17")
            && err.contains("4242"),
        "{err}"
    );
    assert!(
        remote.list("").unwrap().len() == 1,
        "the refused build wrote something"
    );

    // Two real builds started together: exactly one succeeds.
    remote.delete(".lock").unwrap();
    let spawn = |out: &str| {
        srv.command(&tmp.path().join("rc"))
            .args(build_args(&images, out, &[]))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(url), spawn(url));
    let (oa, ob) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let wins = [&oa, &ob].iter().filter(|o| o.status.success()).count();
    let refused: Vec<String> = [&oa, &ob]
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert_eq!(wins, 1, "{refused:?}");
    assert!(
        refused[0].contains("locked by another build"),
        "{}",
        refused[0]
    );
}

/// The lock's heartbeat: a build refreshes it while it runs; another
/// host's lock with a recent heartbeat is refused, one silent for longer
/// than `RAE_STORE_LOCK_STALE` is taken over with a warning naming it.
#[test]
fn a_stale_lock_is_taken_over_and_a_live_one_is_refreshed() {
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-beat");
    let tmp = tempfile::tempdir().unwrap();
    let images = common::fixture("images");
    let url = "s3://rae-beat/cache";
    let remote = srv.remote(url);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lock = |beat: u64| {
        let h = serde_json::json!({"host": "node-9", "pid": 77, "started_unix": 1, "heartbeat_unix": beat});
        remote
            .put(".lock", serde_json::to_vec(&h).unwrap().into())
            .unwrap();
    };
    let build = || {
        srv.command(&tmp.path().join("rc"))
            .args(build_args(&images, url, &["--limit", "2"]))
            .env("RAE_STORE_LOCK_STALE", "600")
            .env("RAE_STORE_LOCK_HEARTBEAT", "0.2")
            .env("RAE_LOG", "info,rae_cache::store=debug")
            .output()
            .unwrap()
    };
    lock(now - 30);
    let o = build();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("node-9"), "{err}");

    lock(now - 3600);
    let o = build();
    ok(&o, "build over a stale lock");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("took over s3://rae-beat/cache/.lock") && err.contains("node-9"),
        "{err}"
    );
    assert!(err.contains("refreshed s3://rae-beat/cache/.lock"), "{err}");
    assert!(remote.head(".lock").unwrap().is_none(), "lock left behind");
}

#[test]
fn a_missing_bucket_and_wrong_credentials_are_named() {
    let Some(srv) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let images = common::fixture("images");
    let o = srv
        .command(&tmp.path().join("rc"))
        .args(build_args(
            &images,
            "s3://no-such-bucket/cache",
            &["--limit", "2"],
        ))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("missing bucket, build: {err}");
    assert!(
        err.contains("s3://no-such-bucket/cache") && err.contains("NoSuchBucket"),
        "{err}"
    );
    let o = srv
        .command(&tmp.path().join("rc"))
        .args(["inspect", "s3://no-such-bucket/cache"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("missing bucket, inspect: {err}");
    assert!(
        err.contains("s3://no-such-bucket/cache/manifest.json") && err.contains("NoSuchBucket"),
        "{err}"
    );

    // A server that checks credentials (moto: after the first, unsigned,
    // bucket creation): an unknown key is refused, and said so.
    let Some(auth) = S3Server::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]) else {
        return;
    };
    auth.create_bucket("rae-auth");
    let o = auth
        .command(&tmp.path().join("rc"))
        .args(["inspect", "s3://rae-auth/cache"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("unknown key: {err}");
    assert!(
        err.contains("s3://rae-auth/cache/manifest.json")
            && (err.contains("InvalidAccessKeyId") || err.contains("403")),
        "{err}"
    );
}

/// Throughput of reading every row group of a cache (the loader's I/O and
/// decoding, `RowGroupSource::read`) from local disk, from the S3 server
/// through a cold read-through cache (every shard downloaded first), and
/// through the warm cache. A measurement, not a test:
/// `cargo test --test it store_s3::loader_throughput -- --ignored --nocapture`
/// (`RAE_S3_BENCH_IMAGES`, default 256 images of 256x768 f16, both flips).
#[test]
#[ignore]
fn loader_throughput_local_vs_s3() {
    use rae_cache::store::cache::{ReadCache, ReadCacheSettings};
    use rae_cache::train::loader::CacheSet;
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-bench");
    let tmp = tempfile::tempdir().unwrap();
    let images: usize = std::env::var("RAE_S3_BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let spec = tiny_cache::Spec {
        images,
        classes: 10,
        tokens: 256,
        channels: 768,
        shards: (images / 64).max(1),
        rows_per_row_group: 32,
        both_flips: true,
        seed: 1,
        dtype: rae_cache::shards::LatentDType::F16,
    };
    let cache = tmp.path().join("cache");
    tiny_cache::write(&cache, &spec);
    let url = "s3://rae-bench/cache";
    let remote = srv.remote(url);
    s3::upload_all(&remote, &cache);
    let read_all = |dir: &Path| {
        let set = CacheSet::open(&[dir.to_path_buf()]).unwrap();
        let src = set.source();
        for rg in 0..set.index().num_row_groups {
            src.read(rg).unwrap();
        }
        set.num_images()
    };
    let rc = ReadCache::new(ReadCacheSettings {
        dir: tmp.path().join("rc"),
        max_bytes: None,
    });
    let bytes: u64 = files(&cache).values().map(|v| v.len() as u64).sum();
    let mut report = Vec::new();
    for what in [
        "local disk",
        "s3, cold read-through cache",
        "s3, warm read-through cache",
    ] {
        let t = Instant::now();
        let n = match what {
            "local disk" => read_all(&cache),
            _ => {
                let (dir, r) = rc.open_with_report(&remote).unwrap();
                eprintln!("{what}: {r:?}");
                read_all(&dir)
            }
        };
        let s = t.elapsed().as_secs_f64();
        report.push(format!(
            "{what}: {n} images ({:.0} MB) in {s:.2} s = {:.0} images/s",
            bytes as f64 / 1e6,
            n as f64 / s
        ));
    }
    for r in &report {
        eprintln!("{r}");
    }
}

/// `rae-cache build INPUT_URL --out OUT` (the build_sources arguments)
/// against `srv`.
fn build_from(srv: &S3Server, rc: &Path, input: &str, out: &Path, extra: &[&str]) -> Output {
    srv.command(rc)
        .args(bs::args(&[Path::new(input)], out, extra))
        .output()
        .unwrap()
}

fn source_files(cache: &Path) -> serde_json::Value {
    bs::read_json(&cache.join("manifest.json"))["build_args"]["settings"]["source"]["files"].clone()
}

#[test]
fn builds_from_store_inputs_equal_the_local_builds() {
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-in");
    let tmp = tempfile::tempdir().unwrap();
    let (folder, images) = bs::dataset(tmp.path());
    let clean = tmp.path().join("folder-cache");
    bs::build_ok(&[&folder], &clean, &[]);
    let rc = tmp.path().join("rc");
    let bucket = srv.remote("s3://rae-in");

    // A tar of per-class tars, one object, read as a stream.
    let train = tmp.path().join("train.tar");
    std::fs::write(&train, bs::nested_tar(&images)).unwrap();
    bucket.upload_file("ilsvrc/train.tar", &train).unwrap();
    let out = tmp.path().join("tar");
    let url = "s3://rae-in/ilsvrc/train.tar";
    ok(
        &build_from(&srv, &rc, url, &out, &[]),
        "build from an s3 tar",
    );
    bs::assert_same_cache(&clean, &out, "nested tar from s3");
    assert_eq!(source_files(&out), serde_json::json!(["train.tar"]));
    assert_eq!(
        bs::read_json(&out.join("manifest.json"))["dataset_root"],
        url
    );

    // WebDataset shards under a prefix: named as the local directory's.
    let wds = tmp.path().join("wds");
    std::fs::create_dir_all(&wds).unwrap();
    bs::webdataset(&wds, &images, 5);
    s3::upload_all(&srv.remote("s3://rae-in/sets/wds"), &wds);
    let out = tmp.path().join("wds-cache");
    ok(
        &build_from(&srv, &rc, "s3://rae-in/sets/wds/", &out, &[]),
        "build from s3 webdataset shards",
    );
    assert!(
        bs::shard_bytes(&clean) == bs::shard_bytes(&out),
        "webdataset shards differ"
    );
    assert_eq!(
        source_files(&out),
        serde_json::json!([
            "wds/shard-000000.tar",
            "wds/shard-000001.tar",
            "wds/shard-000002.tar"
        ])
    );

    // A Parquet dataset under a prefix, read with range requests.
    let hf = tmp.path().join("hf");
    bs::parquet_dataset(&hf, &images, 7, &BTreeMap::new());
    s3::upload_all(&srv.remote("s3://rae-in/imagenet/data"), &hf);
    let out = tmp.path().join("parquet-cache");
    ok(
        &build_from(&srv, &rc, "s3://rae-in/imagenet/data/", &out, &[]),
        "build from s3 parquet",
    );
    bs::assert_same_cache(&clean, &out, "parquet from s3");
    assert_eq!(
        source_files(&out),
        serde_json::json!(["data/train-00000.parquet", "data/train-00001.parquet"])
    );

    // An image folder under a prefix.
    s3::upload_all(&srv.remote("s3://rae-in/folder/images"), &folder);
    let out = tmp.path().join("folder-from-s3");
    ok(
        &build_from(&srv, &rc, "s3://rae-in/folder/images/", &out, &[]),
        "build from an s3 image folder",
    );
    bs::assert_same_cache(&clean, &out, "image folder from s3");

    // A missing object names its URL.
    let o = build_from(
        &srv,
        &rc,
        "s3://rae-in/ilsvrc/val.tar",
        &tmp.path().join("x"),
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("s3://rae-in/ilsvrc/val.tar"), "{err}");
}

#[test]
fn a_truncated_store_archive_stops_then_resumes_once_complete() {
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-cut");
    let tmp = tempfile::tempdir().unwrap();
    let (_, images) = bs::dataset(tmp.path());
    let whole = bs::nested_tar(&images);
    let train = tmp.path().join("train.tar");
    std::fs::write(&train, &whole).unwrap();
    let clean = tmp.path().join("clean");
    bs::build_ok(&[&train], &clean, &[]);

    // The object cut inside the second class tar (as an upload still
    // running would leave a copy): the whole shards before it are built.
    let bucket = srv.remote("s3://rae-cut");
    std::fs::write(&train, &whole[..whole.len() * 11 / 20]).unwrap();
    bucket.upload_file("train.tar", &train).unwrap();
    let rc = tmp.path().join("rc");
    let out = tmp.path().join("cut");
    let url = "s3://rae-cut/train.tar";
    let o = build_from(&srv, &rc, url, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("truncated"), "{err}");
    let state = bs::read_json(&out.join("build-state.json"));
    assert!(state["shards"].as_array().unwrap().len() >= 2, "{state}");

    // Complete again: --resume streams from the first shard left and
    // gives the local bytes.
    std::fs::write(&train, &whole).unwrap();
    bucket.upload_file("train.tar", &train).unwrap();
    ok(
        &build_from(&srv, &rc, url, &out, &["--resume"]),
        "resume from s3",
    );
    bs::assert_same_cache(&clean, &out, "resumed from s3 after truncation");

    // Two parts from the store (part 1 first: its stream starts mid-archive)
    // and a local merge: the same shards and statistics.
    let parts = tmp.path().join("parts");
    for p in ["1", "0"] {
        let o = build_from(&srv, &rc, url, &parts, &["--num-parts", "2", "--part", p]);
        ok(&o, "a part from s3");
    }
    common::run_ok(["merge", parts.to_str().unwrap()]);
    assert!(
        bs::shard_bytes(&clean) == bs::shard_bytes(&parts),
        "parts: shards differ"
    );
    assert!(
        std::fs::read(clean.join("stats.safetensors")).unwrap()
            == std::fs::read(parts.join("stats.safetensors")).unwrap(),
        "parts: stats differ"
    );
}

/// Every sample latent under `dir/shards`, in file order.
fn sample_latents(dir: &Path) -> Vec<f32> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            rae_cache::shards::ShardReader::open(f)
                .unwrap()
                .read_all()
                .unwrap()
                .latents
        })
        .collect()
}

#[test]
fn eval_sample_and_merge_take_store_urls() {
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-read");
    let tmp = tempfile::tempdir().unwrap();
    let (cache, _) = tiny_train_setup(tmp.path());
    let url = "s3://rae-read/tiny";
    s3::upload_all(&srv.remote(url), &cache);
    let rc = tmp.path().join("rc");
    let c = cache.to_str().unwrap();

    // eval: a store cache (samples and reference) gives the local metrics.
    let local = common::json(&common::run_ok(["eval", c, "--ref", c, "--json"]));
    let o = srv
        .command(&rc)
        .args(["eval", url, "--ref", url, "--json"])
        .output()
        .unwrap();
    ok(&o, "eval from s3");
    let remote = common::json(&o);
    assert!(local["metrics"].as_object().is_some_and(|m| !m.is_empty()));
    assert_eq!(local["metrics"], remote["metrics"]);

    // sample: --stats as a store object de-normalises as the local file.
    let sample = |stats: &str, out: &Path, cmd: &mut Command| {
        let o = cmd
            .args(["sample", "--model"])
            .arg(common::fixture("ditdh.safetensors"))
            .arg("--model-config")
            .arg(common::fixture("ditdh.json"))
            .args(["--num", "2", "--steps", "3", "--device", "cpu", "--json"])
            .args(["--stats", stats, "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        ok(&o, "sample");
        common::json(&o)
    };
    let a = tmp.path().join("sample-local");
    let b = tmp.path().join("sample-s3");
    let stats = cache.join("stats.safetensors");
    sample(
        stats.to_str().unwrap(),
        &a,
        &mut Command::new(common::exe()),
    );
    let s = sample(
        &format!("{url}/stats.safetensors"),
        &b,
        &mut srv.command(&rc),
    );
    assert_eq!(s["denormalised"], true, "{s}");
    let (la, lb) = (sample_latents(&a), sample_latents(&b));
    assert!(!la.is_empty() && la == lb, "sample latents differ");
    // A missing object is named.
    let o = srv
        .command(&rc)
        .args(["sample", "--model"])
        .arg(common::fixture("ditdh.safetensors"))
        .arg("--model-config")
        .arg(common::fixture("ditdh.json"))
        .args(["--num", "1", "--steps", "2", "--device", "cpu"])
        .args(["--stats", &format!("{url}/nope.safetensors")])
        .args(["--out", tmp.path().join("x").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("nope.safetensors"),
        "{err}"
    );

    // merge works on a directory: a URL is refused, naming it.
    let o = srv.command(&rc).args(["merge", url]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(url), "{err}");
}

/// A cache built from a tar in the store records its URL; `train-decoder`
/// reads its targets from there (streamed, nothing extracted): the losses
/// of the cache of the local folder, step for step.
#[test]
fn train_decoder_reads_targets_from_the_store_tar_the_cache_was_built_from() {
    use crate::train_decoder_e2e as td;
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-td");
    let tmp = tempfile::tempdir().unwrap();
    let (_, dec) = td::setup(tmp.path());
    let (folder, images) = bs::dataset(tmp.path());
    let tar = tmp.path().join("train.tar");
    std::fs::write(&tar, bs::nested_tar(&images)).unwrap();
    srv.remote("s3://rae-td")
        .upload_file("train.tar", &tar)
        .unwrap();
    let url = "s3://rae-td/train.tar";
    let (folder_cache, tar_cache) = (tmp.path().join("fc"), tmp.path().join("tc"));
    td::build(&folder, &folder_cache);
    let rc = tmp.path().join("rc");
    let o = srv
        .command(&rc)
        .args(["build", url, "--out", tar_cache.to_str().unwrap()])
        .arg("--encoder")
        .arg(common::fixture("encoder-dinov2reg"))
        .args(["--dtype", "f32", "--device", "cpu", "--batch-size", "2"])
        .args(["--rows-per-group", "4"])
        .output()
        .unwrap();
    ok(&o, "build from the s3 tar");
    assert_eq!(
        bs::read_json(&tar_cache.join("manifest.json"))["dataset_root"],
        url
    );
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let steps = 3;
    td::train(&folder_cache, &dec, &a, steps, td::NO_GAN);
    let o = srv
        .command(&rc)
        .args(td::train_args(&tar_cache, &dec, &b, steps, td::NO_GAN))
        .output()
        .unwrap();
    ok(&o, "train-decoder on the s3-built cache");
    let (la, lb) = (td::log(&a), td::log(&b));
    assert_eq!(la.len() as u64, steps);
    for (x, y) in la.iter().zip(&lb) {
        for k in ["l1", "lpips", "total"] {
            assert_eq!(x[k], y[k], "step {}: {k}", x["step"]);
        }
    }
}

/// Throughput of listing and streaming every image's bytes (no decoding)
/// from a tar of per-class tars and a Parquet dataset, local files vs the
/// same objects on the S3 server (the build's feeder: `Inputs::list`, then
/// `ItemReader::stream` over all images). A measurement, not a test:
/// `cargo test --test it store_s3::source_read_throughput -- --ignored
/// --nocapture` (`RAE_S3_BENCH_IMAGES`, default 1000 images of 100 kB).
#[test]
#[ignore]
fn source_read_throughput_local_vs_s3() {
    use rae_cache::pipeline::Inputs;
    use rae_cache::sources::SourceOptions;
    let Some(srv) = S3Server::start() else { return };
    srv.create_bucket("rae-srcbench");
    // The library reads the store's settings from the environment; this
    // test runs alone (ignored, by name).
    for (k, v) in srv.env() {
        unsafe { std::env::set_var(k, v) };
    }
    let n: usize = std::env::var("RAE_S3_BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let tmp = tempfile::tempdir().unwrap();
    // Incompressible members (as JPEGs are), 10 classes.
    let mut seed = 1u64;
    let mut members: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let bytes = (0..100_000)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 56) as u8
                })
                .collect();
            (format!("c{}/img{i:06}.jpg", i % 10), bytes)
        })
        .collect();
    members.sort();
    let mut inner = Vec::new();
    for c in 0..10 {
        let prefix = format!("c{c}/");
        let t = bs::tar_bytes(
            members
                .iter()
                .filter(|m| m.0.starts_with(&prefix))
                .map(|m| (m.0[prefix.len()..].to_string(), m.1.as_slice())),
        );
        inner.push((format!("c{c}.tar"), t));
    }
    let tar = tmp.path().join("train.tar");
    std::fs::write(
        &tar,
        bs::tar_bytes(inner.iter().map(|(n, b)| (n.clone(), b.as_slice()))),
    )
    .unwrap();
    let bucket = srv.remote("s3://rae-srcbench");
    bucket.upload_file("train.tar", &tar).unwrap();
    let mb = std::fs::metadata(&tar).unwrap().len() as f64 / 1e6;
    let mut report = Vec::new();
    for input in [tar.to_str().unwrap(), "s3://rae-srcbench/train.tar"] {
        let t = Instant::now();
        let inputs = Inputs::list(
            &[PathBuf::from(input)],
            &SourceOptions::default(),
            None,
            64,
            None,
        )
        .unwrap();
        let listed = t.elapsed().as_secs_f64();
        let reader = inputs.reader.clone().unwrap();
        let mut bytes = 0usize;
        for item in reader.stream(0..inputs.entries().len()) {
            bytes += item.unwrap().1.unwrap().len();
        }
        let s = t.elapsed().as_secs_f64();
        assert_eq!(bytes, n * 100_000);
        report.push(format!(
            "{input}: {} images, {mb:.0} MB: listed in {listed:.2} s, listed + read in {s:.2} s = {:.0} images/s, {:.0} MB/s",
            inputs.entries().len(),
            inputs.entries().len() as f64 / s,
            mb / s
        ));
    }
    for r in report {
        eprintln!("{r}");
    }
}
