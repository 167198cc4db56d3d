//! `build-state.json`: the builder's own record of a build (or of one part
//! of a multi-machine build): what was encoded, how, which planned shards are
//! complete (with their rejected inputs), and whether the build finished.
//! `--resume` continues from it. After every shard it is rewritten
//! atomically, followed by the public `manifest.json` (the shards module's
//! [`crate::shards::Manifest`], schemas/manifest.schema.json) derived from it.
//!
//! Everything that depends on the clock or on the machine (timings, threads,
//! device) lives in `build_log`, which only `build-state.json` carries, so
//! `manifest.json` is byte-identical between builds with the same inputs and
//! arguments.

use std::path::Path;

use crate::encoders::EncoderSpec;
use crate::images::Skipped;
use crate::shards::LatentDType;

use super::plan::PartSpec;

pub use crate::shards::manifest::{MANIFEST_FILE, STATS_FILE};
pub const BUILD_STATE_FILE: &str = "build-state.json";
pub const SHARDS_DIR: &str = "shards";
pub const PARTS_DIR: &str = "parts";
pub const STATE_DIR: &str = "state";
pub const LOCK_FILE: &str = ".lock";

/// Which crops of an image are stored: `Both`, the crop and its left-right
/// flip (two rows per image); `None`, the crop only. (`--hflip both|none`.)
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum HFlip {
    Both,
    None,
}

impl HFlip {
    pub fn flips(self) -> &'static [bool] {
        match self {
            HFlip::Both => &[false, true],
            HFlip::None => &[false],
        }
    }
}

/// The arguments that decide the bytes of the output. `--resume` refuses
/// when any of them differs from the manifest's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BuildSettings {
    pub encoder_id: String,
    pub encoder_kind: String,
    pub encoder_config_sha256: String,
    pub dtype: LatentDType,
    pub hflip: HFlip,
    pub crop_size: usize,
    pub rows_per_shard: usize,
    pub rows_per_group: usize,
    pub zstd_level: i32,
    pub max_pixels: u64,
    pub limit: Option<usize>,
    pub num_parts: Option<usize>,
    pub part: Option<usize>,
    /// sha256 over the sorted (key, label) list after `--limit`.
    pub image_list_sha256: String,
    pub num_images: usize,
}

impl BuildSettings {
    /// Names every field that differs, with both values.
    pub fn differences(&self, other: &BuildSettings) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let mut out = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).cloned().unwrap_or(serde_json::Value::Null);
                if *va != vb {
                    out.push(format!("{k}: cache has {va}, this run has {vb}"));
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Dataset {
    pub root: String,
    pub classes: Vec<String>,
    /// Images listed (after `--limit`), all parts together.
    pub images: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocessing {
    pub crop: String,
    pub crop_size: usize,
    pub encoder_input_size: usize,
    pub hflip: HFlip,
    pub notes: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub rows_per_shard: usize,
    pub images_per_shard: usize,
    pub rows_per_group: usize,
    pub zstd_level: i32,
    /// Global shard range of this manifest, `[first, end)`.
    pub first_shard: usize,
    pub end_shard: usize,
    /// Shards of the whole build (all parts).
    pub total_shards: usize,
}

/// One planned shard, once complete. `file` is `None` when every image of
/// the shard was rejected (no file is written then).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardEntry {
    pub index: usize,
    pub file: Option<String>,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: Option<String>,
    /// Images of this shard that were encoded.
    pub images: u64,
    pub rejected: Vec<Skipped>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub images_encoded: u64,
    pub images_rejected: u64,
    pub rows: u64,
    pub bytes: u64,
    /// rows * tokens * C * 4: the latents as raw f32.
    pub raw_f32_bytes: u64,
}

/// Clock- and machine-dependent facts, excluded from reproducibility checks.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BuildLog {
    pub tool_version: String,
    pub started_unix: u64,
    pub updated_unix: u64,
    pub seconds: f64,
    pub runs: u32,
    pub threads: usize,
    pub batch_size: usize,
    pub device: String,
    /// The encoder's compute dtype (`f32`, `bf16`, `f16`) of the last run.
    #[serde(default)]
    pub precision: String,
    /// Whether TF32 f32 matrix products were allowed in the last run.
    #[serde(default)]
    pub tf32: bool,
}

impl BuildLog {
    /// Stamp the time of a save: now, and the seconds of every run so far.
    pub fn stamp(&mut self, clock: RunClock) {
        self.updated_unix = unix_now();
        self.seconds = clock.seconds_before + clock.start.elapsed().as_secs_f64();
    }
}

/// One run's clock: the seconds the earlier runs of the build took, and when
/// this one started writing.
#[derive(Debug, Clone, Copy)]
pub struct RunClock {
    pub seconds_before: f64,
    pub start: std::time::Instant,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BuildManifest {
    pub format: String,
    pub schema_version: String,
    pub complete: bool,
    pub dataset: Dataset,
    pub encoder: EncoderSpec,
    pub preprocessing: Preprocessing,
    pub dtype: LatentDType,
    /// [tokens, C]
    pub latent_shape: [usize; 2],
    pub layout: Layout,
    pub part: Option<PartSpec>,
    pub settings: BuildSettings,
    pub shards: Vec<ShardEntry>,
    pub totals: Totals,
    pub rejected: Vec<Skipped>,
    /// Files under the dataset root that are not images.
    pub skipped: Vec<Skipped>,
    /// `stats.safetensors` once complete (not for parts).
    pub stats: Option<String>,
    pub build_log: BuildLog,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a rae-cache build state: {reason}")]
    Format {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Shard(#[from] crate::shards::ShardError),
}

impl BuildManifest {
    /// Read `build-state.json` from a build root.
    pub fn load(root: &Path) -> Result<Self, ManifestError> {
        let path = &root.join(BUILD_STATE_FILE);
        let s = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: path.into(),
            source,
        })?;
        serde_json::from_str(&s).map_err(|e| ManifestError::Format {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// Write `build-state.json` into `root`, then `manifest.json` next to it
    /// (both atomically; the state first, since `--resume` trusts it).
    pub fn save(&self, root: &Path) -> Result<(), ManifestError> {
        let path = root.join(BUILD_STATE_FILE);
        let mut s = serde_json::to_string_pretty(self).map_err(|e| ManifestError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        s.push('\n');
        crate::fsutil::write_atomic(&path, s.as_bytes())
            .map_err(|source| ManifestError::Io { path, source })?;
        self.to_public()
            .save(&root.join(MANIFEST_FILE))
            .map_err(ManifestError::Shard)
    }

    /// The public manifest (schemas/manifest.schema.json). Shard files are
    /// named relative to the cache directory: `shards/part-NNNNN.parquet`.
    pub fn to_public(&self) -> crate::shards::Manifest {
        use crate::shards::manifest::{
            EncoderInfo, HflipMode, PartInfo, RejectedInput, Totals as PubTotals,
        };
        let mut m = crate::shards::Manifest::new(
            self.dataset.root.clone(),
            self.dataset.classes.clone(),
            EncoderInfo::from(&self.encoder),
            self.dtype,
            match self.settings.hflip {
                HFlip::Both => HflipMode::Both,
                HFlip::None => HflipMode::None,
            },
        );
        m.preprocessing = serde_json::to_value(&self.preprocessing).unwrap_or_default();
        m.shards = self
            .shards
            .iter()
            .filter_map(|s| {
                Some(crate::shards::ShardInfo {
                    file: s.file.clone()?,
                    rows: s.rows,
                    bytes: s.bytes,
                    sha256: s.sha256.clone()?,
                })
            })
            .collect();
        m.totals = PubTotals {
            images: self.totals.images_encoded,
            rows: self.totals.rows,
            bytes: self.totals.bytes,
        };
        m.rejected = self
            .rejected
            .iter()
            .map(|r| RejectedInput {
                key: r.key.clone(),
                reason: r.reason.clone(),
            })
            .collect();
        m.build_args = serde_json::json!({
            "settings": self.settings,
            "layout": self.layout,
            "complete": self.complete,
            "skipped": self.skipped,
        });
        m.part = match self.part {
            Some(p) => PartInfo {
                num_parts: p.count,
                part: p.index,
            },
            None => PartInfo::default(),
        };
        m
    }

    /// Recompute totals and the flat rejected list from the shard entries.
    pub fn refresh_totals(&mut self) {
        let per_row = (self.latent_shape[0] * self.latent_shape[1] * 4) as u64;
        let mut t = Totals::default();
        let mut rejected = Vec::new();
        for s in &self.shards {
            t.images_encoded += s.images;
            t.images_rejected += s.rejected.len() as u64;
            t.rows += s.rows;
            t.bytes += s.bytes;
            rejected.extend(s.rejected.iter().cloned());
        }
        t.raw_f32_bytes = t.rows * per_row;
        self.totals = t;
        self.rejected = rejected;
    }

    /// The next shard to write (global index).
    pub fn next_shard(&self) -> usize {
        self.layout.first_shard + self.shards.len()
    }
}

/// Seconds since the epoch (build_log only).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BuildSettings {
        BuildSettings {
            encoder_id: "e".into(),
            encoder_kind: "dinov2-reg".into(),
            encoder_config_sha256: "h".into(),
            dtype: LatentDType::F16,
            hflip: HFlip::Both,
            crop_size: 256,
            rows_per_shard: 8,
            rows_per_group: 4,
            zstd_level: 3,
            max_pixels: 10,
            limit: None,
            num_parts: None,
            part: None,
            image_list_sha256: "x".into(),
            num_images: 6,
        }
    }

    #[test]
    fn differences_name_the_field() {
        let a = settings();
        assert!(a.differences(&a).is_empty());
        let mut b = a.clone();
        b.dtype = LatentDType::Bf16;
        b.rows_per_shard = 4;
        let d = a.differences(&b);
        assert_eq!(d.len(), 2);
        assert!(
            d.iter()
                .any(|s| s.starts_with("dtype: cache has \"f16\", this run has \"bf16\"")),
            "{d:?}"
        );
        assert!(d.iter().any(|s| s.starts_with("rows_per_shard")));
    }
}
