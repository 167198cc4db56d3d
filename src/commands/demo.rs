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
                    per_class: 100,
                    side: 64,
                },
                decoder: decoder(96, 3),
                decoder_steps: 1500,
                model,
                train_steps: 3000,
                samples_per_class: 32,
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
}

impl Runner {
    /// Run `rae-cache ARGS` (stderr shown: progress bars and logs), parse
    /// its stdout as the stage's JSON summary.
    fn run(&mut self, name: &'static str, args: &[String]) -> anyhow::Result<&Value> {
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
            .args(args)
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

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let plan = Plan::new(a.size);
    prepare_out(&a)?;
    let out = std::fs::canonicalize(&a.out)?;
    let p = |name: &str| out.join(name);
    let mut r = Runner {
        exe: std::env::current_exe()?,
        total: 7,
        stages: Vec::new(),
    };
    let dev = ["--device".to_string(), a.device.clone()];

    // 1. images
    let set = plan.images;
    eprintln!(
        "[0/{}] images: {} classes x {} images of {} px in {}",
        r.total,
        set.classes,
        set.per_class,
        set.side,
        s(&p("images"))
    );
    let classes = set.write(&p("images"))?;
    set.example_sheet(6).save(p("examples.png"))?;

    // 2. encoder + build
    r.run(
        "random encoder",
        &[
            "bench".into(),
            "random-encoder".into(),
            "--shape".into(),
            "tiny".into(),
            "--seed".into(),
            "0".into(),
            "--out".into(),
            s(&p("encoder")),
        ],
    )?;
    let mut build = vec![
        "build".into(),
        s(&p("images")),
        "--encoder".into(),
        s(&p("encoder")),
        "--out".into(),
        s(&p("cache")),
        "--json".into(),
    ];
    build.extend(dev.clone());
    let b = r.run("build the latent cache", &build)?.clone();
    let channels = b["encoder"]["channels"]
        .as_u64()
        .or_else(|| manifest_channels(&p("cache")))
        .unwrap_or(48) as usize;
    eprintln!(
        "  cache: {} rows",
        b["rows"]
            .as_u64()
            .or(b["totals"]["rows"].as_u64())
            .unwrap_or(0)
    );

    // 3. decoder
    let mut dec_cfg = plan.decoder.clone();
    dec_cfg["latent_dim"] = json!(channels);
    write_json(&p("decoder.json"), &dec_cfg)?;
    let steps = plan.decoder_steps.to_string();
    let mut td: Vec<String> = vec![
        "train-decoder".into(),
        "--data".into(),
        s(&p("cache")),
        "--out".into(),
        s(&p("decoder-run")),
        "--decoder-config".into(),
        s(&p("decoder.json")),
        "--batch-size".into(),
        "16".into(),
        "--steps".into(),
        steps.clone(),
        "--lr".into(),
        "2e-3".into(),
        "--warmup-epochs".into(),
        "0".into(),
        "--perceptual-weight".into(),
        "0".into(),
        "--preview-every".into(),
        steps.clone(),
        "--seed".into(),
        "0".into(),
        "--json".into(),
    ];
    td.extend(dev.clone());
    let d = r.run("train the pixel decoder (stage 1)", &td)?.clone();
    let psnr = d["last"]["psnr"].as_f64();
    eprintln!(
        "  decoder: L1 {:.4}, reconstruction PSNR {:.2} dB",
        d["last"]["l1"].as_f64().unwrap_or(f64::NAN),
        psnr.unwrap_or(f64::NAN)
    );

    // 4. DiT-DH
    write_json(&p("model.json"), &(plan.model)(channels, set.classes))?;
    let mut tr: Vec<String> = vec![
        "train".into(),
        "--data".into(),
        s(&p("cache")),
        "--out".into(),
        s(&p("run")),
        "--model-config".into(),
        s(&p("model.json")),
        "--batch-size".into(),
        "16".into(),
        "--lr".into(),
        "2e-3".into(),
        "--steps".into(),
        plan.train_steps.to_string(),
        "--seed".into(),
        "1".into(),
        "--json".into(),
    ];
    tr.extend(dev.clone());
    let t = r
        .run("train DiT-DH on the cached latents (stage 2)", &tr)?
        .clone();
    eprintln!("  DiT-DH: {} steps", t["steps"]);

    // 5. sample + decode
    let labels = sample_labels(set.classes, plan.samples_per_class);
    let label_list = labels
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut sa: Vec<String> = vec![
        "sample".into(),
        "--model".into(),
        s(&p("run")),
        "--out".into(),
        s(&p("samples")),
        "--labels".into(),
        label_list,
        "--num".into(),
        labels.len().to_string(),
        "--steps".into(),
        "26".into(),
        "--cfg-scale".into(),
        "4.0".into(),
        "--stats".into(),
        s(&p("cache/stats.safetensors")),
        "--seed".into(),
        "5".into(),
        "--json".into(),
    ];
    sa.extend(dev.clone());
    r.run("sample latents per class with guidance", &sa)?;
    let grid = (set.classes * set.classes.min(plan.samples_per_class)).to_string();
    let mut de: Vec<String> = vec![
        "decode".into(),
        s(&p("samples")),
        "--decoder".into(),
        s(&p("decoder-run")),
        "--out".into(),
        s(&p("decoded")),
        "--format".into(),
        "png".into(),
        "--grid".into(),
        grid,
        "--json".into(),
    ];
    de.extend(dev.clone());
    r.run("decode the samples to pixels", &de)?;

    // 6. evaluation
    let e = r
        .run(
            "latent-space metrics against the cache",
            &[
                "eval".into(),
                s(&p("samples")),
                "--ref".into(),
                s(&p("cache")),
                "--metrics".into(),
                "latent".into(),
                "--json".into(),
            ],
        )?
        .clone();
    let real = LabelledRows::read(&shards(&p("cache"))?)?;
    let generated = LabelledRows::read(&shards(&p("samples"))?)?;
    let nc = NearestCentroid::fit(&real);
    let acc = nc.accuracy(&generated)?;
    let real_acc = nc.accuracy(&real)?;
    eprintln!(
        "\n  class accuracy of generated latents: {acc:.3} (chance {:.3}; the same classifier on real latents: {real_acc:.3})",
        1.0 / set.classes as f64
    );

    // the page
    let recon = latest_preview(&p("decoder-run"))?;
    std::fs::write(
        p("losses.svg"),
        report::loss_svg(&[
            Curve::from_log("decoder L1 (stage 1)", &p("decoder-run/log.jsonl"), "l1")?,
            Curve::from_log("DiT-DH flow loss (stage 2)", &p("run/log.jsonl"), "loss")?,
        ]),
    )?;
    let summary = json!({
        "size": a.size,
        "out": s(&out),
        "seconds": start.elapsed().as_secs_f64(),
        "encoder": "random-weight DINOv2-with-registers (48 wide, 2 layers, seed 0): real use takes facebook/dinov2-with-registers-base",
        "images": {"classes": classes, "per_class": set.per_class, "side": set.side},
        "decoder": {"steps": plan.decoder_steps, "l1": d["last"]["l1"], "psnr": psnr},
        "train": {"steps": t["steps"], "last": t["last"]},
        "metrics": {
            "class_accuracy": acc, "chance": 1.0 / set.classes as f64, "real_class_accuracy": real_acc,
            "latent": e["latent"], "reconstruction_psnr": psnr,
        },
        "files": {"index": "index.html", "examples": "examples.png", "reconstructions": rel(&out, &recon),
                  "generated": "decoded/grid.png", "losses": "losses.svg"},
        "stages": r.stages.iter().map(|st| json!({"name": st.name, "command": st.command, "seconds": st.seconds})).collect::<Vec<_>>(),
    });
    write_json(&p("summary.json"), &summary)?;
    let page = page(&summary, &r, &classes);
    rae_cache::fsutil::write_atomic(&p("index.html"), report::index_html(&page).as_bytes())?;
    eprintln!(
        "\ndone in {:.0} s: open {}",
        start.elapsed().as_secs_f64(),
        s(&p("index.html"))
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(ExitCode::SUCCESS)
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
