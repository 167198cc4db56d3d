//! `rae-cache inspect`: summarise a cache directory or one shard file.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use rae_cache::pipeline::{BuildManifest, build_state};
use rae_cache::shards::{LatentDType, LatentStats, Manifest, ShardReader};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A cache directory (with manifest.json) or one `.parquet` shard; or a
    /// cache in a store (`s3://bucket/cache`, read through --cache-dir).
    pub path: PathBuf,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn schema(dtype: LatentDType, tokens: usize, channels: usize) -> serde_json::Value {
    let item = match dtype {
        LatentDType::F16 => "float16",
        LatentDType::Bf16 => "uint16 (bfloat16 bit patterns)",
        LatentDType::F32 => "float32",
        LatentDType::Int8 => "int8",
    };
    let mut cols = vec![
        json!({"name": "key", "type": "utf8"}),
        json!({"name": "label", "type": "int32"}),
        json!({"name": "flip", "type": "bool"}),
        json!({"name": "latent", "type": format!("fixed_size_list<{item}>[{}]", tokens * channels),
               "extension": "arrow.fixed_shape_tensor", "shape": [tokens, channels]}),
    ];
    if dtype == LatentDType::Int8 {
        cols.push(json!({"name": "scale", "type": format!("fixed_size_list<float32>[{tokens}] (per token)")}));
    }
    serde_json::Value::Array(cols)
}

fn range(v: impl Iterator<Item = f64>) -> serde_json::Value {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    json!([lo, hi])
}

fn inspect_cache(dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let m = Manifest::load(&dir.join(build_state::MANIFEST_FILE))?;
    // The builder's own record, when this cache was built (not sampled).
    let state = BuildManifest::load(dir).ok();
    let (tokens, channels) = (m.encoder.tokens, m.encoder.channels);
    let t = &m.totals;
    let raw = t.rows * (tokens * channels * 4) as u64;
    let stats_path = dir.join(build_state::STATS_FILE);
    let stats_v = if stats_path.exists() {
        let st = LatentStats::load(&stats_path)
            .with_context(|| format!("reading {}", stats_path.display()))?;
        json!({
            "file": build_state::STATS_FILE,
            "count": st.count,
            "shape": [st.channels, st.height, st.width],
            "mean_range": range(st.mean.iter().map(|&x| x as f64)),
            "std_range": range(st.var.iter().map(|&x| (x.max(0.0) as f64).sqrt())),
            "mean_of_means": st.mean.iter().map(|&x| x as f64).sum::<f64>() / st.mean.len().max(1) as f64,
        })
    } else {
        serde_json::Value::Null
    };
    Ok(json!({
        "kind": "cache",
        "path": dir,
        "complete": state.as_ref().map(|s| s.complete),
        "part": m.part,
        "schema": schema(m.dtype, tokens, channels),
        "dtype": m.dtype,
        "latent_shape": [tokens, channels],
        "hflip": m.hflip,
        "encoder": m.encoder,
        "preprocessing": m.preprocessing,
        "dataset_root": m.dataset_root,
        "classes": m.classes.len(),
        "class_names": m.classes,
        "images_encoded": t.images,
        "images_rejected": m.rejected.len(),
        "rows": t.rows,
        "shards": m.shards.len(),
        "stored_bytes": t.bytes,
        "raw_f32_bytes": raw,
        "compression_ratio": if t.bytes > 0 { raw as f64 / t.bytes as f64 } else { 0.0 },
        "bytes_per_image": if t.images > 0 { t.bytes as f64 / t.images as f64 } else { 0.0 },
        "stats": stats_v,
        "rejected": m.rejected,
        "skipped": state.as_ref().map(|s| s.skipped.clone()).unwrap_or_default(),
    }))
}

fn inspect_file(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let r = ShardReader::open(path)?;
    let bytes = std::fs::metadata(path)?.len();
    let mut labels = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let (mut tokens, mut channels, mut flipped) = (0, 0, 0u64);
    let (mut lo, mut hi, mut sum, mut n) = (f32::INFINITY, f32::NEG_INFINITY, 0f64, 0u64);
    for g in 0..r.num_row_groups() {
        let b = r.read_row_group(g)?;
        tokens = b.tokens;
        channels = b.channels;
        labels.extend(b.labels.iter().copied());
        keys.extend(b.keys.iter().cloned());
        flipped += b.flips.iter().filter(|f| **f).count() as u64;
        for &x in &b.latents {
            lo = lo.min(x);
            hi = hi.max(x);
            sum += x as f64;
        }
        n += b.latents.len() as u64;
    }
    let raw = r.num_rows() * (tokens * channels * 4) as u64;
    Ok(json!({
        "kind": "shard",
        "path": path,
        "rows": r.num_rows(),
        "row_groups": r.num_row_groups(),
        "images": keys.len(),
        "flipped_rows": flipped,
        "classes": labels.len(),
        "latent_shape": [tokens, channels],
        "stored_bytes": bytes,
        "raw_f32_bytes": raw,
        "compression_ratio": if bytes > 0 { raw as f64 / bytes as f64 } else { 0.0 },
        "bytes_per_image": if keys.is_empty() { 0.0 } else { bytes as f64 / keys.len() as f64 },
        "value_range": [lo, hi],
        "value_mean": if n > 0 { sum / n as f64 } else { 0.0 },
        "metadata": r.metadata(),
    }))
}

fn print_human(v: &serde_json::Value) {
    let g = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "{} {}",
        g("kind").as_str().unwrap_or(""),
        g("path").as_str().unwrap_or("")
    );
    if g("kind") == "cache" {
        print_cache(v);
    } else {
        print_shard(v);
    }
}

/// The lines under the heading for a cache directory.
fn print_cache(v: &serde_json::Value) {
    let g = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    println!("  complete:       {}", g("complete"));
    println!(
        "  encoder:        {} ({})",
        v["encoder"]["id"].as_str().unwrap_or(""),
        v["encoder"]["kind"].as_str().unwrap_or("")
    );
    println!(
        "  dtype:          {}   latent [tokens, C] = {}",
        g("dtype").as_str().unwrap_or(""),
        g("latent_shape")
    );
    println!("  schema:");
    for c in g("schema").as_array().into_iter().flatten() {
        println!(
            "    {:<8} {}",
            c["name"].as_str().unwrap_or(""),
            c["type"].as_str().unwrap_or("")
        );
    }
    println!(
        "  images:         {} encoded, {} rejected, {} classes",
        g("images_encoded"),
        g("images_rejected"),
        g("classes")
    );
    println!("  rows:           {} in {} shards", g("rows"), g("shards"));
    println!(
        "  size:           {:.1} MB stored, {:.1} MB as raw f32, ratio {:.2}x, {:.0} bytes/image",
        g("stored_bytes").as_f64().unwrap_or(0.0) / 1e6,
        g("raw_f32_bytes").as_f64().unwrap_or(0.0) / 1e6,
        g("compression_ratio").as_f64().unwrap_or(0.0),
        g("bytes_per_image").as_f64().unwrap_or(0.0)
    );
    let st = g("stats");
    if !st.is_null() {
        println!(
            "  stats:          count {}, mean in {}, std in {}",
            st["count"], st["mean_range"], st["std_range"]
        );
    }
    let rej = g("rejected");
    let rej = rej.as_array().cloned().unwrap_or_default();
    if !rej.is_empty() {
        println!("  rejected inputs:");
        for r in rej {
            println!(
                "    {}: {}",
                r["key"].as_str().unwrap_or(""),
                r["reason"].as_str().unwrap_or("")
            );
        }
    }
}

/// The lines under the heading for one shard file.
fn print_shard(v: &serde_json::Value) {
    let g = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "  rows:           {} in {} row groups ({} images, {} flipped rows, {} classes)",
        g("rows"),
        g("row_groups"),
        g("images"),
        g("flipped_rows"),
        g("classes")
    );
    println!("  latent:         {}", g("latent_shape"));
    println!(
        "  size:           {:.1} MB stored, ratio {:.2}x vs raw f32, {:.0} bytes/image",
        g("stored_bytes").as_f64().unwrap_or(0.0) / 1e6,
        g("compression_ratio").as_f64().unwrap_or(0.0),
        g("bytes_per_image").as_f64().unwrap_or(0.0)
    );
    println!(
        "  values:         range {}, mean {}",
        g("value_range"),
        g("value_mean")
    );
    if let Some(md) = g("metadata").as_object() {
        println!("  metadata:");
        for (k, val) in md {
            let s = val.as_str().unwrap_or("");
            let s = if s.len() > 100 {
                format!("{}...", &s[..s.floor_char_boundary(100)])
            } else {
                s.to_string()
            };
            println!("    {k}: {s}");
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = rae_cache::store::local_cache_dir(&args.path)?;
    let v = if path.is_dir() {
        inspect_cache(&path)?
    } else if path.is_file() {
        inspect_file(&path)?
    } else {
        anyhow::bail!(
            "{}: no such cache directory or shard file",
            args.path.display()
        );
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_human(&v);
    }
    Ok(ExitCode::SUCCESS)
}
