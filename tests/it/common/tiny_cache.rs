//! A tiny latent cache written with the project's own shard writer, for the
//! loader and training tests (and `benches/train.rs`, which includes this
//! file): `images` images in `classes` classes, both flips (or one row per
//! image), spread over `shards` shards.
#![allow(dead_code)]

use std::path::Path;

use rae_cache::shards::manifest::{HFlip, MANIFEST_FILE, STATS_FILE};
use rae_cache::shards::{
    EncoderInfo, LatentDType, LatentRow, Manifest, ShardWriter, StatsAccumulator, WriterOptions,
};

#[derive(Debug, Clone)]
pub struct Spec {
    pub images: usize,
    pub classes: usize,
    pub tokens: usize,
    pub channels: usize,
    pub shards: usize,
    pub rows_per_row_group: usize,
    pub both_flips: bool,
    pub seed: u64,
    /// The stored latent dtype.
    pub dtype: LatentDType,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            images: 40,
            classes: 4,
            tokens: 16,
            channels: 8,
            shards: 2,
            rows_per_row_group: 6,
            both_flips: true,
            seed: 1,
            dtype: LatentDType::F32,
        }
    }
}

fn hash(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Deterministic latent: a class pattern (learnable) plus per-image noise;
/// the flipped row mirrors the token grid left-right.
pub fn latent(spec: &Spec, image: usize, flip: bool) -> Vec<f32> {
    let (t, c) = (spec.tokens, spec.channels);
    let side = (t as f64).sqrt() as usize;
    let class = image % spec.classes;
    let mut out = vec![0f32; t * c];
    for tok in 0..t {
        let (h, w) = (tok / side, tok % side);
        let src_w = if flip { side - 1 - w } else { w };
        for ch in 0..c {
            let pattern = (((class * 7 + ch * 3 + h * 5 + src_w) % 11) as f32 - 5.0) / 3.0;
            let u = hash(spec.seed ^ ((image * t * c + (h * side + src_w) * c + ch) as u64)) as f64
                / u64::MAX as f64;
            out[tok * c + ch] = 2.0 + pattern + 0.3 * (u as f32 - 0.5);
        }
    }
    out
}

pub fn key(image: usize, spec: &Spec) -> String {
    format!("class{}/img{image:04}.png", image % spec.classes)
}

/// Write the cache into `dir` (manifest.json, shards/part-*.parquet,
/// stats.safetensors).
pub fn write(dir: &Path, spec: &Spec) -> Manifest {
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    let encoder = EncoderInfo {
        kind: "dinov2-reg".into(),
        id: "test/tiny".into(),
        revision: None,
        config_hash: "00".repeat(32),
        tokens: spec.tokens,
        channels: spec.channels,
        crop_size: 256,
        input_size: 224,
        patch_size: 14,
    };
    let classes = (0..spec.classes).map(|c| format!("class{c}")).collect();
    let mode = if spec.both_flips {
        HFlip::Both
    } else {
        HFlip::None
    };
    let mut m = Manifest::new("/tiny", classes, encoder, spec.dtype, mode);
    let mut stats = StatsAccumulator::new(spec.tokens, spec.channels);
    let per_shard = spec.images.div_ceil(spec.shards);
    for s in 0..spec.shards {
        let imgs: Vec<usize> = (s * per_shard..((s + 1) * per_shard).min(spec.images)).collect();
        let flips: &[bool] = if spec.both_flips {
            &[false, true]
        } else {
            &[false]
        };
        let mut keys = Vec::new();
        let mut lats = Vec::new();
        let mut meta = Vec::new();
        for &i in &imgs {
            for &f in flips {
                keys.push(key(i, spec));
                lats.push(latent(spec, i, f));
                meta.push(((i % spec.classes) as i32, f));
            }
        }
        let rows: Vec<LatentRow> = (0..keys.len())
            .map(|r| LatentRow {
                key: &keys[r],
                label: meta[r].0,
                flip: meta[r].1,
                latent: &lats[r],
            })
            .collect();
        let mut opts = WriterOptions::new(spec.dtype, spec.tokens, spec.channels);
        opts.rows_per_row_group = spec.rows_per_row_group;
        let name = format!("part-{s:05}.parquet");
        let mut w = ShardWriter::create(&dir.join("shards").join(&name), opts).unwrap();
        w.write_rows(&rows).unwrap();
        let mut info = w.finish().unwrap();
        info.file = name;
        m.shards.push(info);
        for l in &lats {
            stats.push_rows(l, 1).unwrap();
        }
    }
    m.totals.images = spec.images as u64;
    m.update_totals();
    stats.save_stats(&dir.join(STATS_FILE)).unwrap();
    m.save(&dir.join(MANIFEST_FILE)).unwrap();
    m
}
