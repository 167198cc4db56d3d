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

pub use crate::shards::manifest::{HFlip, MANIFEST_FILE, SHARDS_DIR, STATS_FILE};
/// The builder's record of a build, next to `manifest.json`.
pub const BUILD_STATE_FILE: &str = "build-state.json";
/// Sub-directory holding each part's record (`parts/I/`).
pub const PARTS_DIR: &str = "parts";
/// Sub-directory holding the per-shard statistics accumulators.
pub const STATE_DIR: &str = "state";
/// The directory lock file.
pub const LOCK_FILE: &str = ".lock";

/// The arguments that decide the bytes of the output. `--resume` refuses
/// when any of them differs from the manifest's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BuildSettings {
    /// Directory or repo id of the encoder.
    pub encoder_id: String,
    /// Encoder family (`dinov2-reg`, `siglip2`, `mae`).
    pub encoder_kind: String,
    /// sha256 of the encoder's config.json.
    pub encoder_config_sha256: String,
    /// Storage type of the latents.
    pub dtype: LatentDType,
    /// Which crops are stored.
    pub hflip: HFlip,
    /// Side of the center crop, in pixels.
    pub crop_size: usize,
    /// Rows per shard.
    pub rows_per_shard: usize,
    /// Rows per Parquet row group.
    pub rows_per_group: usize,
    /// zstd compression level.
    pub zstd_level: i32,
    /// The decompression-bomb limit (it decides which images are rejected).
    pub max_pixels: u64,
    /// `--limit`: only the first N images.
    pub limit: Option<usize>,
    /// `--num-parts`.
    pub num_parts: Option<usize>,
    /// `--part`.
    pub part: Option<usize>,
    /// sha256 over the sorted (key, label) list after `--limit`.
    pub image_list_sha256: String,
    /// Images listed after `--limit`.
    pub num_images: usize,
    /// A tar or Parquet source: its format, files and options (absent for
    /// an image folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::sources::SourceSettings>,
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

/// The image folder a cache was built from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Dataset {
    /// Its canonical path.
    pub root: String,
    /// Sorted class folder names (label = index).
    pub classes: Vec<String>,
    /// Images listed (after `--limit`), all parts together.
    pub images: usize,
}

/// How an image becomes the encoder's input.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocessing {
    /// The crop, in words.
    pub crop: String,
    /// Side of the center crop, in pixels.
    pub crop_size: usize,
    /// Side the encoder resizes the crop to.
    pub encoder_input_size: usize,
    /// Which crops are stored.
    pub hflip: HFlip,
    /// What the flip rows are, in words.
    pub notes: String,
}

/// How rows are split into shards and row groups.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// Rows per shard.
    pub rows_per_shard: usize,
    /// Images per shard.
    pub images_per_shard: usize,
    /// Rows per Parquet row group.
    pub rows_per_group: usize,
    /// zstd compression level.
    pub zstd_level: i32,
    /// Global shard range of this manifest, `[first, end)`.
    pub first_shard: usize,
    /// End of that range (exclusive).
    pub end_shard: usize,
    /// Shards of the whole build (all parts).
    pub total_shards: usize,
}

/// One planned shard, once complete. `file` is `None` when every image of
/// the shard was rejected (no file is written then).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardEntry {
    /// Global shard index.
    pub index: usize,
    /// Shard file, relative to the cache directory.
    pub file: Option<String>,
    /// Rows written.
    pub rows: u64,
    /// Size of the file.
    pub bytes: u64,
    /// sha256 of the file.
    pub sha256: Option<String>,
    /// Images of this shard that were encoded.
    pub images: u64,
    /// Images of this shard that could not be encoded.
    pub rejected: Vec<Skipped>,
}

/// Sums over the complete shards.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// Images encoded.
    pub images_encoded: u64,
    /// Images rejected.
    pub images_rejected: u64,
    /// Rows stored.
    pub rows: u64,
    /// Bytes of the shard files.
    pub bytes: u64,
    /// rows * tokens * C * 4: the latents as raw f32.
    pub raw_f32_bytes: u64,
}

/// Clock- and machine-dependent facts, excluded from reproducibility checks.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BuildLog {
    /// Version of rae-cache of the last run.
    pub tool_version: String,
    /// When the first run started.
    pub started_unix: u64,
    /// When the state was last saved.
    pub updated_unix: u64,
    /// Seconds spent writing, all runs together.
    pub seconds: f64,
    /// Runs so far (1 + resumes).
    pub runs: u32,
    /// Decode threads of the last run.
    pub threads: usize,
    /// Encoder batch size of the last run.
    pub batch_size: usize,
    /// Device of the last run.
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
    /// Seconds of the earlier runs.
    pub seconds_before: f64,
    /// When this run started writing.
    pub start: std::time::Instant,
}

/// The contents of `build-state.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BuildManifest {
    /// Always `rae-cache`.
    pub format: String,
    /// [`crate::shards::SCHEMA_VERSION`] when written.
    pub schema_version: String,
    /// Every planned shard is written (and, for a whole build, the statistics).
    pub complete: bool,
    /// The image folder.
    pub dataset: Dataset,
    /// The encoder.
    pub encoder: EncoderSpec,
    /// Image to encoder input.
    pub preprocessing: Preprocessing,
    /// Storage type of the latents.
    pub dtype: LatentDType,
    /// [tokens, C]
    pub latent_shape: [usize; 2],
    /// Shards and row groups.
    pub layout: Layout,
    /// The part this record is for.
    pub part: Option<PartSpec>,
    /// What `--resume` must find unchanged.
    pub settings: BuildSettings,
    /// The complete shards, in order.
    pub shards: Vec<ShardEntry>,
    /// Sums over `shards`.
    pub totals: Totals,
    /// Every shard's rejected inputs, in order.
    pub rejected: Vec<Skipped>,
    /// Files under the dataset root that are not images.
    pub skipped: Vec<Skipped>,
    /// `stats.safetensors` once complete (not for parts).
    pub stats: Option<String>,
    /// The source ended early (a truncated archive): where and why. The
    /// build holds the whole shards before the cut and is not complete;
    /// `--resume` continues once the source is whole (its listing must
    /// start with this one's images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<Skipped>,
    /// Timings and machine facts.
    pub build_log: BuildLog,
}

/// Why `build-state.json` cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid JSON for a build state.
    #[error("{path}: not a rae-cache build state: {reason}")]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// Writing the derived `manifest.json` failed.
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
        use crate::shards::manifest::{EncoderInfo, PartInfo, RejectedInput, Totals as PubTotals};
        let mut m = crate::shards::Manifest::new(
            self.dataset.root.clone(),
            self.dataset.classes.clone(),
            EncoderInfo::from(&self.encoder),
            self.dtype,
            self.settings.hflip,
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
            source: None,
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
