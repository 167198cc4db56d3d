//! `rae-cache demo`: the whole RAE pipeline on images the binary makes
//! itself, from nothing to a page with generated pictures. Every stage is
//! an ordinary subcommand run as a child process of this binary with
//! ordinary arguments; the demo prints each command line so any stage can be
//! rerun by hand, and reads the stage's `--json` summary.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use rae_cache::demo::report::{self, Curve, Page};
use rae_cache::demo::shapes::ShapeSet;
use rae_cache::eval::centroid::{LabelledRows, NearestCentroid};

/// How big a run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// 4 classes, a few minutes on 2 CPU cores (what the tests run).
    Tiny,
    /// 6 classes, more images and steps: under 15 minutes on 2 cores.
    Small,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder (created; refused when it exists and is not empty,
    /// unless --force).
    #[arg(long, default_value = "rae-demo")]
    pub out: PathBuf,
    /// Run size.
    #[arg(long, value_enum, default_value_t = Size::Tiny)]
    pub size: Size,
    /// cpu | cuda | cuda:N | auto, passed to every stage.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Remove an existing output folder first.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON on stdout (stage logs stay on stderr).
    #[arg(long)]
    pub json: bool,
}

/// The numbers of one run size.
struct Plan {
    images: ShapeSet,
    decoder: Value,
    decoder_steps: u32,
    model: fn(usize, usize) -> Value,
    train_steps: u32,
    samples_per_class: usize,
}

impl Plan {
    fn new(size: Size) -> Self {
        let decoder = |hidden: usize, layers: usize| {
            json!({
                "latent_dim": 48, "decoder_hidden_size": hidden,
                "decoder_num_hidden_layers": layers, "decoder_num_attention_heads": 4,
                "decoder_intermediate_size": 2 * hidden, "patch_size": 4, "num_patches": 256,
            })
        };
        // A small DiT-DH, patch 2 over the 16x16 token grid.
        fn model(channels: usize, classes: usize) -> Value {
            json!({
                "input_size": 16, "patch_size": 2, "in_channels": channels,
                "hidden_size": [64, 96], "depth": [2, 1], "num_heads": [4, 6],
                "num_classes": classes,
            })
        }
        match size {
            Size::Tiny => Self {
                images: ShapeSet {
                    classes: 4,
                    per_class: 40,
                    side: 64,
                },
                decoder: decoder(64, 2),
                decoder_steps: 300,
                model,
                train_steps: 1000,
                samples_per_class: 16,
            },
            Size::Small => Self {
                images: ShapeSet {
                    classes: 6,
                    per_class: 80,
                    side: 64,
                },
                // The decoder's step dominates on a CPU: the same width as
                // tiny, trained three times longer.
                decoder: decoder(64, 2),
                decoder_steps: 900,
                model,
                train_steps: 2000,
                samples_per_class: 24,
            },
        }
    }
}

/// One stage's command line, its JSON summary and its time.
struct Stage {
    name: &'static str,
    command: String,
    seconds: f64,
    summary: Value,
}

/// A stage runner: numbers the stages and keeps their records.
struct Runner {
    exe: PathBuf,
    total: usize,
    stages: Vec<Stage>,
    /// `--device` for the stages that run a model.
    device: String,
}

impl Runner {
    /// Run `rae-cache ARGS` (stderr shown: progress bars and logs), parse
    /// its stdout as the stage's JSON summary.
    fn run(&mut self, name: &'static str, args: &[String], device: bool) -> anyhow::Result<&Value> {
        let mut args = args.to_vec();
        if device {
            args.extend(["--device".to_string(), self.device.clone()]);
        }
        let command = format!(
            "rae-cache {}",
            args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
        );
        eprintln!(
            "\n[{}/{}] {name}\n  $ {command}",
            self.stages.len() + 1,
            self.total
        );
        let start = Instant::now();
        let out = Command::new(&self.exe)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        if !out.status.success() {
            bail!("stage `{name}` failed ({}): {command}", out.status);
        }
        let summary: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("stage `{name}` printed no JSON summary"))?;
        self.stages.push(Stage {
            name,
            command,
            seconds: start.elapsed().as_secs_f64(),
            summary,
        });
        Ok(&self.stages.last().expect("just pushed").summary)
    }
}

/// Shell quoting for display (single quotes where needed).
fn quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn prepare_out(a: &Args) -> anyhow::Result<()> {
    if a.out.exists() && std::fs::read_dir(&a.out)?.next().is_some() {
        if !a.force {
            bail!(
                "{} exists and is not empty (pass --force to replace it)",
                a.out.display()
            );
        }
        std::fs::remove_dir_all(&a.out).with_context(|| format!("removing {}", a.out.display()))?;
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    rae_cache::fsutil::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Labels for `sample`: first a `classes x classes` block, class-major (the
/// grid: one row per class), then the rest of each class.
fn sample_labels(classes: usize, per_class: usize) -> Vec<usize> {
    let head = classes.min(per_class);
    let mut v: Vec<usize> = (0..classes)
        .flat_map(|c| std::iter::repeat_n(c, head))
        .collect();
    v.extend((0..classes).flat_map(|c| std::iter::repeat_n(c, per_class - head)));
    v
}

/// `rae-cache ARGS...` as owned strings.
fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|x| x.to_string()).collect()
}

/// The demo's folders, all under one root.
struct Dirs(PathBuf);

impl Dirs {
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn s(&self, name: &str) -> String {
        s(&self.path(name))
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let plan = Plan::new(a.size);
    prepare_out(&a)?;
    let d = Dirs(std::fs::canonicalize(&a.out)?);
    let mut r = Runner {
        exe: std::env::current_exe()?,
        total: 7,
        stages: Vec::new(),
        device: a.device.clone(),
    };
    let set = plan.images;
    eprintln!(
        "[0/{}] images: {} classes x {} images of {} px in {}",
        r.total,
        set.classes,
        set.per_class,
        set.side,
        d.s("images")
    );
    let classes = set.write(&d.path("images"))?;
    set.example_sheet(6).save(d.path("examples.png"))?;

    let channels = build_cache(&mut r, &d)?;
    let decoder = train_decoder(&mut r, &d, &plan, channels)?;
    let train = train_dit(&mut r, &d, &plan, channels)?;
    sample_and_decode(&mut r, &d, &plan)?;
    let metrics = evaluate(&mut r, &d, set.classes)?;

    let recon = latest_preview(&d.path("decoder-run"))?;
    std::fs::write(
        d.path("losses.svg"),
        report::loss_svg(&[
            Curve::from_log(
                "decoder L1 (stage 1)",
                &d.path("decoder-run/log.jsonl"),
                "l1",
            )?,
            Curve::from_log(
                "DiT-DH flow loss (stage 2)",
                &d.path("run/log.jsonl"),
                "loss",
            )?,
        ]),
    )?;
    let mut metrics = metrics;
    metrics["reconstruction_psnr"] = decoder["last"]["psnr"].clone();
    let summary = json!({
        "size": a.size,
        "out": s(&d.0),
        "seconds": start.elapsed().as_secs_f64(),
        "encoder": "random-weight DINOv2-with-registers (48 wide, 2 layers, seed 0): real use takes facebook/dinov2-with-registers-base",
        "images": {"classes": classes, "per_class": set.per_class, "side": set.side},
        "decoder": {"steps": plan.decoder_steps, "l1": decoder["last"]["l1"], "psnr": decoder["last"]["psnr"]},
        "train": {"steps": train["steps"], "last": train["last"]},
        "metrics": metrics,
        "files": {"index": "index.html", "examples": "examples.png", "reconstructions": rel(&d.0, &recon),
                  "generated": "decoded/grid.png", "losses": "losses.svg"},
        "stages": r.stages.iter().map(|st| json!({"name": st.name, "command": st.command, "seconds": st.seconds})).collect::<Vec<_>>(),
    });
    write_json(&d.path("summary.json"), &summary)?;
    let page = page(&summary, &r, &classes);
    rae_cache::fsutil::write_atomic(&d.path("index.html"), report::index_html(&page).as_bytes())?;
    eprintln!(
        "\ndone in {:.0} s: open {}",
        start.elapsed().as_secs_f64(),
        d.s("index.html")
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// A random encoder, then the cache; returns the latent channels.
fn build_cache(r: &mut Runner, d: &Dirs) -> anyhow::Result<usize> {
    let enc = d.s("encoder");
    let e = r.run(
        "random encoder",
        &argv(&[
            "bench",
            "random-encoder",
            "--shape",
            "tiny",
            "--seed",
            "0",
            "--out",
            &enc,
        ]),
        false,
    )?;
    eprintln!(
        "  encoder: random-weight DINOv2-with-registers, {} parameters (a stand-in: real use takes facebook/dinov2-with-registers-base)",
        e["params"]
    );
    let (images, cache) = (d.s("images"), d.s("cache"));
    let b = r.run(
        "build the latent cache",
        &argv(&[
            "build",
            &images,
            "--encoder",
            &enc,
            "--out",
            &cache,
            "--json",
        ]),
        true,
    )?;
    eprintln!("  cache: {} images encoded", b["images_encoded"]);
    let channels = manifest_channels(&d.path("cache"));
    Ok(channels.context("the cache manifest names no channel count")? as usize)
}

fn train_decoder(r: &mut Runner, d: &Dirs, plan: &Plan, channels: usize) -> anyhow::Result<Value> {
    let mut cfg = plan.decoder.clone();
    cfg["latent_dim"] = json!(channels);
    write_json(&d.path("decoder.json"), &cfg)?;
    let steps = plan.decoder_steps.to_string();
    let (cache, out, dec) = (d.s("cache"), d.s("decoder-run"), d.s("decoder.json"));
    let v = r.run(
        "train the pixel decoder (stage 1)",
        &argv(&[
            "train-decoder",
            "--data",
            &cache,
            "--out",
            &out,
            "--decoder-config",
            &dec,
            "--batch-size",
            "16",
            "--steps",
            &steps,
            "--lr",
            "2e-3",
            "--warmup-epochs",
            "0",
            "--perceptual-weight",
            "0",
            "--disc-weight",
            "0",
            "--preview-every",
            &steps,
            "--seed",
            "0",
            "--json",
        ]),
        true,
    )?;
    eprintln!(
        "  decoder: L1 {:.4}, reconstruction PSNR {:.2} dB",
        v["last"]["l1"].as_f64().unwrap_or(f64::NAN),
        v["last"]["psnr"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(v.clone())
}

fn train_dit(r: &mut Runner, d: &Dirs, plan: &Plan, channels: usize) -> anyhow::Result<Value> {
    write_json(
        &d.path("model.json"),
        &(plan.model)(channels, plan.images.classes),
    )?;
    let steps = plan.train_steps.to_string();
    let (cache, out, model) = (d.s("cache"), d.s("run"), d.s("model.json"));
    let v = r.run(
        "train DiT-DH on the cached latents (stage 2)",
        &argv(&[
            "train",
            "--data",
            &cache,
            "--out",
            &out,
            "--model-config",
            &model,
            "--batch-size",
            "16",
            "--lr",
            "2e-3",
            "--steps",
            &steps,
            "--seed",
            "1",
            "--json",
        ]),
        true,
    )?;
    eprintln!(
        "  DiT-DH: {} steps, last loss {}",
        v["steps"],
        fmt(&v["last"]["loss"])
    );
    Ok(v.clone())
}

fn sample_and_decode(r: &mut Runner, d: &Dirs, plan: &Plan) -> anyhow::Result<()> {
    let classes = plan.images.classes;
    let labels = sample_labels(classes, plan.samples_per_class);
    let list = labels
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let num = labels.len().to_string();
    let (run, samples, stats) = (d.s("run"), d.s("samples"), d.s("cache/stats.safetensors"));
    r.run(
        "sample latents per class with guidance",
        &argv(&[
            "sample",
            "--model",
            &run,
            "--out",
            &samples,
            "--labels",
            &list,
            "--num",
            &num,
            "--steps",
            "26",
            "--cfg-scale",
            "4.0",
            "--stats",
            &stats,
            "--seed",
            "5",
            "--json",
        ]),
        true,
    )?;
    eprintln!(
        "  samples: {num} latents, {} per class",
        plan.samples_per_class
    );
    let grid = (classes * classes.min(plan.samples_per_class)).to_string();
    let (dec, cfg, out) = (
        d.s("decoder-run"),
        d.s("decoder-run/decoder.json"),
        d.s("decoded"),
    );
    r.run(
        "decode the samples to pixels",
        &argv(&[
            "decode",
            &samples,
            "--decoder",
            &dec,
            "--decoder-config",
            &cfg,
            "--out",
            &out,
            "--format",
            "png",
            "--grid",
            &grid,
            "--json",
        ]),
        true,
    )?;
    eprintln!("  decoded: {out}/grid.png, one row per class");
    Ok(())
}

/// Latent metrics by `eval`, and the nearest-centroid class accuracy.
fn evaluate(r: &mut Runner, d: &Dirs, classes: usize) -> anyhow::Result<Value> {
    let (samples, cache) = (d.s("samples"), d.s("cache"));
    let e = r.run(
        "latent-space metrics against the cache",
        &argv(&[
            "eval",
            &samples,
            "--ref",
            &cache,
            "--metrics",
            "latent",
            "--json",
        ]),
        false,
    )?;
    let latent = e["latent"].clone();
    eprintln!(
        "  latent FD {} (pooled), precision/recall {} / {}",
        fmt(&latent["fd_pooled"]),
        fmt(&latent["pr"]["precision"]),
        fmt(&latent["pr"]["recall"])
    );
    let real = LabelledRows::read(&shards(&d.path("cache"))?)?;
    let generated = LabelledRows::read(&shards(&d.path("samples"))?)?;
    let nc = NearestCentroid::fit(&real);
    let (acc, real_acc) = (nc.accuracy(&generated)?, nc.accuracy(&real)?);
    let chance = 1.0 / classes as f64;
    eprintln!(
        "\n  class accuracy of generated latents: {acc:.3} (chance {chance:.3}; the same classifier on real latents: {real_acc:.3})"
    );
    Ok(json!({
        "class_accuracy": acc, "chance": chance, "real_class_accuracy": real_acc, "latent": latent,
    }))
}

fn manifest_channels(cache: &Path) -> Option<u64> {
    let m: Value =
        serde_json::from_slice(&std::fs::read(cache.join("manifest.json")).ok()?).ok()?;
    m["encoder"]["channels"].as_u64()
}

fn shards(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let d = dir.join("shards");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .with_context(|| format!("reading {}", d.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    v.sort();
    Ok(v)
}

fn latest_preview(run: &Path) -> anyhow::Result<PathBuf> {
    let d = run.join("previews");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .with_context(|| format!("reading {}", d.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    v.sort();
    v.pop()
        .with_context(|| format!("no preview PNG in {}", d.display()))
}

fn rel(base: &Path, p: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.4}"),
        None => "n/a".into(),
    }
}

fn page(summary: &Value, r: &Runner, classes: &[String]) -> Page {
    let m = &summary["metrics"];
    let f = &summary["files"];
    let rows = classes.join(", ");
    Page {
        title: "rae-cache demo: the RAE pipeline from nothing to pictures".into(),
        notes: vec![
            format!("Encoder: {}.", summary["encoder"].as_str().unwrap_or("")),
            "Everything here was made by `rae-cache demo` from images it drew itself; no download."
                .into(),
        ],
        figures: vec![
            (
                "Input images".into(),
                format!("Examples of each class, one row per class: {rows}."),
                "examples.png".into(),
            ),
            (
                "Reconstructions (stage 1)".into(),
                "Pairs of original | decoder output from the cached latents.".into(),
                f["reconstructions"].as_str().unwrap_or("").into(),
            ),
            (
                "Generated (stage 2)".into(),
                format!("DiT-DH samples with guidance, decoded; one row per class: {rows}."),
                "decoded/grid.png".into(),
            ),
            (
                "Training curves".into(),
                "Loss against step (log scale).".into(),
                "losses.svg".into(),
            ),
        ],
        metrics: vec![
            (
                "class accuracy of generated latents (nearest centroid)".into(),
                fmt(&m["class_accuracy"]),
            ),
            ("chance".into(), fmt(&m["chance"])),
            (
                "same classifier on real latents".into(),
                fmt(&m["real_class_accuracy"]),
            ),
            (
                "reconstruction PSNR (dB)".into(),
                fmt(&m["reconstruction_psnr"]),
            ),
            ("latent FD, pooled".into(), fmt(&m["latent"]["fd_pooled"])),
            ("latent FD, tokens".into(), fmt(&m["latent"]["fd_tokens"])),
            (
                "latent precision / recall".into(),
                format!(
                    "{} / {}",
                    fmt(&m["latent"]["pr"]["precision"]),
                    fmt(&m["latent"]["pr"]["recall"])
                ),
            ),
            (
                "total seconds".into(),
                format!("{:.0}", summary["seconds"].as_f64().unwrap_or(0.0)),
            ),
        ],
        commands: r
            .stages
            .iter()
            .map(|st| format!("# {} ({:.0} s)\n{}", st.name, st.seconds, st.command))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_labels_put_a_class_major_grid_first() {
        assert_eq!(sample_labels(2, 3), vec![0, 0, 1, 1, 0, 1]);
        assert_eq!(sample_labels(3, 2), vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("--x=1,2"), "--x=1,2");
    }
}
