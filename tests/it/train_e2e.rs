//! End to end on a tiny cache and a tiny DiT-DH (the fixture's ditdh.json
//! shape): the loss falls, a run stopped at step k and resumed to n equals
//! an uninterrupted run bit for bit, the EMA differs from the raw weights;
//! data-parallel ranks (threads joined over TCP) train as one process with
//! the same global batch, and a run resumes on another number of ranks.

use crate::common;
use crate::common::tiny_cache;

use std::path::Path;

use candle_core::Device;
use rae_cache::dist::tcp::TcpGroup;
use rae_cache::dist::{DistEnv, InitMethod};
use rae_cache::train::checkpoint;
use rae_cache::train::trainer::Trainer;
use rae_cache::train::{ScheduleKind, TrainConfig};

/// The fixture's DiT-DH constructor arguments, the cache shaped to match.
fn setup(dir: &Path) -> TrainConfig {
    let model = common::read_json("ditdh.json");
    let side = model["input_size"].as_u64().unwrap() as usize;
    let channels = model["in_channels"].as_u64().unwrap() as usize;
    let classes = model["num_classes"].as_u64().unwrap() as usize;
    let spec = tiny_cache::Spec {
        images: 40,
        classes: classes.min(4),
        tokens: side * side,
        channels,
        shards: 2,
        rows_per_row_group: 6,
        both_flips: true,
        seed: 3,
        dtype: rae_cache::shards::LatentDType::F32,
    };
    let cache = dir.join("cache");
    tiny_cache::write(&cache, &spec);
    let model_path = dir.join("ditdh.json");
    std::fs::write(&model_path, model.to_string()).unwrap();
    TrainConfig {
        data: vec![cache],
        out: dir.join("run"),
        model: model_path.display().to_string(),
        batch_size: 8,
        accum: 1,
        lr: 1e-3,
        lr_schedule: ScheduleKind::Linear,
        final_lr: Some(1e-4),
        steps: Some(30),
        ema: 0.9,
        seed: 17,
        ckpt_every: 0,
        device: "cpu".into(),
        workers: 2,
        shuffle_window: 2,
        ..Default::default()
    }
}

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn loss_falls_and_ema_lags() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let mut tr = Trainer::new(cfg, &Device::Cpu, None).unwrap();
    let losses: Vec<f64> = (0..30).map(|_| tr.train_step().unwrap().loss).collect();
    let head: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(
        tail < 0.8 * head,
        "loss did not fall: first {head:.4}, last {tail:.4} ({losses:?})"
    );
    let ema = tr.ema().unwrap().tensors();
    let mut differ = 0;
    for (name, w) in tr.weights() {
        if bits(&w) != bits(&ema[&name]) {
            differ += 1;
        }
    }
    assert!(differ > 0, "EMA equals the raw weights");
    // log.jsonl is written by run(), not by train_step()
    tr.save_checkpoint().unwrap();
    assert!(checkpoint::latest(&tr.config().out).unwrap().is_some());
}

#[test]
fn resume_is_bit_exact() {
    let (k, n) = (7u64, 12u64);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path());
    cfg.steps = Some(n);
    cfg.accum = 2; // accumulation and the loader cursor both in play
    cfg.batch_size = 4;

    // uninterrupted
    let mut a_cfg = cfg.clone();
    a_cfg.out = tmp.path().join("a");
    let mut a = Trainer::new(a_cfg, &Device::Cpu, None).unwrap();
    let a_losses: Vec<u64> = (0..n)
        .map(|_| a.train_step().unwrap().loss.to_bits())
        .collect();

    // stopped at k, then resumed from its checkpoint
    let mut b_cfg = cfg.clone();
    b_cfg.out = tmp.path().join("b");
    let mut b = Trainer::new(b_cfg.clone(), &Device::Cpu, None).unwrap();
    let mut b_losses: Vec<u64> = (0..k)
        .map(|_| b.train_step().unwrap().loss.to_bits())
        .collect();
    let ck = b.save_checkpoint().unwrap().unwrap();
    drop(b);
    let mut b = Trainer::new(b_cfg, &Device::Cpu, Some(&ck)).unwrap();
    assert_eq!(b.step(), k);
    b_losses.extend((k..n).map(|_| b.train_step().unwrap().loss.to_bits()));

    assert_eq!(a_losses, b_losses, "losses differ after resume");
    let (wa, wb) = (a.weights(), b.weights());
    assert_eq!(wa.len(), wb.len());
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert_eq!(bits(ta), bits(tb), "{na} differs after resume");
    }
    for (name, t) in a.ema().unwrap().tensors() {
        assert_eq!(
            bits(t),
            bits(&b.ema().unwrap().tensors()[name]),
            "EMA {name} differs after resume"
        );
    }
}

#[test]
fn run_writes_log_and_final_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path());
    cfg.steps = Some(4);
    cfg.ckpt_every = 2;
    let mut tr = Trainer::new(cfg.clone(), &Device::Cpu, None).unwrap();
    let mut seen = 0;
    let last = tr.run(|_| seen += 1).unwrap().unwrap();
    assert_eq!((seen, last.step), (4, 4));
    let log = std::fs::read_to_string(cfg.out.join("log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for key in ["loss", "grad_norm", "lr", "images_per_s", "tokens_per_s"] {
        assert!(lines[3][key].is_number(), "log line lacks {key}");
    }
    let steps: Vec<u64> = checkpoint::list_checkpoints(&cfg.out)
        .unwrap()
        .iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(steps, vec![2, 4]);
    // running again to the same step count does nothing more
    let latest = checkpoint::latest(&cfg.out).unwrap().unwrap();
    let mut again = Trainer::new(cfg, &Device::Cpu, Some(&latest)).unwrap();
    assert!(again.run(|_| {}).unwrap().is_none());
}

#[test]
fn cli_trains_resumes_and_refuses_to_clobber() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(common::exe());
        cmd.arg("train")
            .arg("--data")
            .arg(&cfg.data[0])
            .arg("--out")
            .arg(&cfg.out);
        cmd.args([
            "--model-config",
            &cfg.model,
            "--batch-size",
            "8",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--json",
        ]);
        cmd.args(extra);
        cmd.output().unwrap()
    };
    let out = run(&["--steps", "3", "--ckpt-every", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"], 3);
    let refused = run(&["--steps", "5"]);
    assert!(
        !refused.status.success(),
        "an existing run dir needs --resume"
    );
    let out = run(&["--steps", "5", "--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"], 5);
    let log = std::fs::read_to_string(cfg.out.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 5);
}

fn close(a: &[(String, candle_core::Tensor)], b: &[(String, candle_core::Tensor)], tol: f32) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d = (ta - tb)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= tol, "{na}: max |diff| {d:e} > {tol:e}");
    }
}

/// Run `steps` optimizer steps of `cfg` on `world` ranks (threads joined
/// over loopback TCP), optionally resuming; rank 0's losses and weights,
/// and the checkpoint it writes at the end.
fn run_ranks(
    world: usize,
    cfg: &TrainConfig,
    resume: Option<std::path::PathBuf>,
    steps: u64,
) -> (
    Vec<f64>,
    Vec<(String, candle_core::Tensor)>,
    std::path::PathBuf,
) {
    let port = common::free_port();
    let hs: Vec<_> = (0..world)
        .map(|rank| {
            let (cfg, resume) = (cfg.clone(), resume.clone());
            std::thread::spawn(move || {
                let env = DistEnv {
                    rank,
                    world_size: world,
                    local_rank: rank,
                    init: InitMethod::Tcp {
                        addr: "127.0.0.1".into(),
                        port,
                    },
                    timeout: std::time::Duration::from_secs(60),
                    advertise_host: None,
                    backend: None,
                };
                let comm = TcpGroup::connect(&env).unwrap();
                let mut tr =
                    Trainer::with_collective(cfg, &Device::Cpu, resume.as_deref(), Box::new(comm))
                        .unwrap();
                let losses: Vec<f64> = (0..steps).map(|_| tr.train_step().unwrap().loss).collect();
                let ck = tr.save_checkpoint().unwrap();
                assert_eq!(ck.is_some(), rank == 0, "only rank 0 writes checkpoints");
                assert_eq!(tr.ema().is_some(), rank == 0);
                (losses, tr.weights(), ck)
            })
        })
        .collect();
    let mut out: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    // every rank ends with the same weights
    for o in &out[1..] {
        close(&out[0].1, &o.1, 0.0);
        assert_eq!(o.0, out[0].0, "ranks disagree on the mean loss");
    }
    let (losses, weights, ck) = out.swap_remove(0);
    (losses, weights, ck.unwrap())
}

#[test]
fn data_parallel_matches_one_process_and_resumes_on_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path());
    cfg.steps = Some(4);
    cfg.global_batch = Some(8);

    // reference: one process, micro-batch 8
    let mut one = cfg.clone();
    one.out = tmp.path().join("one");
    let mut tr = Trainer::new(one, &Device::Cpu, None).unwrap();
    let want: Vec<f64> = (0..4).map(|_| tr.train_step().unwrap().loss).collect();
    let want_w = tr.weights();

    // two ranks x micro-batch 4: the same global batches, gradients averaged
    let mut two = cfg.clone();
    two.out = tmp.path().join("two");
    two.batch_size = 4;
    let (got, got_w, _) = run_ranks(2, &two, None, 4);
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "losses {got:?} vs {want:?}"
        );
    }
    close(&want_w, &got_w, 2e-5);

    // 2 steps on 4 ranks x 2, resumed for 2 steps on 2 ranks x 2 with
    // accumulation 2 (derived from the global batch)
    let mut four = cfg.clone();
    four.out = tmp.path().join("four");
    four.batch_size = 2;
    let (first, _, ck) = run_ranks(4, &four, None, 2);
    let (rest, end_w, _) = run_ranks(2, &four, Some(ck), 2);
    let all: Vec<f64> = first.into_iter().chain(rest).collect();
    for (g, w) in all.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "losses {all:?} vs {want:?}"
        );
    }
    close(&want_w, &end_w, 2e-5);
}

#[test]
fn resuming_with_another_global_batch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path());
    cfg.steps = Some(4);
    let mut tr = Trainer::new(cfg.clone(), &Device::Cpu, None).unwrap();
    tr.train_step().unwrap();
    let ck = tr.save_checkpoint().unwrap().unwrap();
    drop(tr);
    let mut other = cfg.clone();
    other.accum = 2; // global batch 16 instead of 8
    let e = Trainer::new(other, &Device::Cpu, Some(&ck))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("global batch 8"), "{e}");
    // the same global batch as micro-batches of 4 x 2 resumes
    let mut same = cfg;
    same.batch_size = 4;
    same.global_batch = Some(8);
    assert_eq!(
        Trainer::new(same, &Device::Cpu, Some(&ck)).unwrap().step(),
        1
    );
}

#[test]
fn a_global_batch_the_layout_cannot_split_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path());
    cfg.global_batch = Some(12);
    cfg.batch_size = 8;
    let e = Trainer::new(cfg, &Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("global batch 12"), "{e}");
}

#[test]
fn cli_launch_trains_on_two_processes_like_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let port = common::free_port().to_string();
    let train = |out: &Path, launch: &[&str], batch: &str| {
        let mut cmd = std::process::Command::new(common::exe());
        cmd.args(launch);
        cmd.arg("train")
            .arg("--data")
            .arg(&cfg.data[0])
            .arg("--out")
            .arg(out)
            .args(["--model-config", &cfg.model, "--batch-size", batch])
            .args(["--global-batch", "8", "--seed", "5", "--steps", "3"])
            .args(["--device", "cpu", "--json"]);
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        s["last"]["loss"].as_f64().unwrap()
    };
    let one = train(&tmp.path().join("one"), &[], "8");
    let two = train(
        &tmp.path().join("two"),
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--",
        ],
        "4",
    );
    assert!((one - two).abs() <= 1e-5 * one.abs(), "{one} vs {two}");
    // only rank 0 wrote the run directory's files
    let log = std::fs::read_to_string(tmp.path().join("two/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
}

#[test]
fn bf16_autocast_training_tracks_f32_and_keeps_f32_masters() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path());
    cfg.steps = Some(12);
    let mut f = cfg.clone();
    f.out = tmp.path().join("f32");
    let mut b = cfg.clone();
    b.out = tmp.path().join("bf16");
    b.precision = rae_cache::precision::Precision::Bf16;
    let mut tf = Trainer::new(f, &Device::Cpu, None).unwrap();
    let mut tb = Trainer::new(b, &Device::Cpu, None).unwrap();
    let lf: Vec<f64> = (0..12).map(|_| tf.train_step().unwrap().loss).collect();
    let lb: Vec<f64> = (0..12).map(|_| tb.train_step().unwrap().loss).collect();
    // same data, noise and initial weights: the first loss differs by bf16
    // rounding only, and the runs stay together
    assert!((lb[0] - lf[0]).abs() <= 1e-2 * lf[0], "{lb:?} vs {lf:?}");
    for (x, y) in lb.iter().zip(&lf) {
        assert!((x - y).abs() <= 0.05 * y, "{lb:?} vs {lf:?}");
    }
    assert!(
        lb[9..].iter().sum::<f64>() < lb[..3].iter().sum::<f64>(),
        "{lb:?}"
    );
    for (name, w) in tb.weights() {
        assert_eq!(w.dtype(), candle_core::DType::F32, "{name} master weight");
    }
    // the weights moved with the updates (the model is rebuilt from them)
    let moved = tb
        .weights()
        .iter()
        .zip(tf.weights().iter())
        .filter(|((_, a), (_, b))| bits(a) != bits(b))
        .count();
    assert!(moved > 0);
}

#[test]
fn cli_launch_stops_the_job_when_a_rank_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::free_port().to_string();
    let missing = tmp.path().join("no-such-cache");
    let o = std::process::Command::new(common::exe())
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--",
            "train",
        ])
        .arg("--data")
        .arg(&missing)
        .arg("--out")
        .arg(tmp.path().join("run"))
        .args(["--steps", "1", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("exited with status"), "{err}");
    assert!(
        err.contains("no-such-cache"),
        "the rank's own error is shown: {err}"
    );
}
