//! manifest.json: what a cache directory holds and how it was made
//! (schemas/manifest.schema.json is its JSON Schema).

use std::path::Path;

use super::{LatentDType, SCHEMA_VERSION, ShardError, ShardInfo};

/// The public manifest of a cache directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The dataset statistics (mean, var `[C,H,W]`, count).
pub const STATS_FILE: &str = "stats.safetensors";
/// Sub-directory of a cache or sample directory holding the shard files.
pub const SHARDS_DIR: &str = "shards";
/// Accumulator state next to the stats, for exact resume (see stats.rs).
pub const STATS_STATE_FILE: &str = "stats-state.safetensors";
/// `format` field value: identifies the file type.
pub const MANIFEST_FORMAT: &str = "rae-cache-manifest";

/// `part-NNNNN.parquet`.
pub fn shard_file_name(index: usize) -> String {
    format!("part-{index:05}.parquet")
}

/// What the flip rows are, for `hflip_note`.
pub const HFLIP_NOTE: &str = "Both the center crop and its left-right mirror are encoded and stored \
(flip = false / true rows). The reference trains with random horizontal flips of the image, and the \
encoder's latent of a flipped image is not the flipped latent (ViT features are not mirror-equivariant), \
so the flipped latent must be computed from the flipped crop, not derived from the stored one.";

/// The encoder that produced the latents (mirrors encoders::EncoderSpec).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncoderInfo {
    /// `dinov2-reg`, `dinov2`, `siglip2`, `mae`.
    pub kind: String,
    /// HF repo id or local directory.
    pub id: String,
    /// The HF cache snapshot (commit), if the encoder came from there.
    pub revision: Option<String>,
    /// sha256 of the encoder's config.json.
    pub config_hash: String,
    /// Tokens per image (patch tokens; special tokens are dropped).
    pub tokens: usize,
    /// Channels per token.
    pub channels: usize,
    /// Crop size fed to the encoder pipeline and the encoder's own input size.
    pub crop_size: usize,
    /// Side the encoder resizes the crop to.
    pub input_size: usize,
    /// Encoder patch size in pixels.
    pub patch_size: usize,
}

impl From<&crate::encoders::EncoderSpec> for EncoderInfo {
    fn from(s: &crate::encoders::EncoderSpec) -> Self {
        EncoderInfo {
            kind: s.kind.clone(),
            id: s.id.clone(),
            revision: s.revision.clone(),
            config_hash: s.config_hash.clone(),
            tokens: s.tokens,
            channels: s.channels,
            crop_size: s.crop_size,
            input_size: s.input_size,
            patch_size: s.patch_size,
        }
    }
}

/// Which crops of an image are stored: `Both`, the crop and its left-right
/// flip (two rows per image); `None`, the crop only. (`--hflip both|none`.)
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum HFlip {
    /// The crop and its flip.
    Both,
    /// The crop only.
    None,
}

impl HFlip {
    /// The rows of one image in order: `false` the crop, `true` its flip.
    pub fn flips(self) -> &'static [bool] {
        match self {
            HFlip::Both => &[false, true],
            HFlip::None => &[false],
        }
    }
}

/// Sums over the shards.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// Images encoded.
    pub images: u64,
    /// Rows stored.
    pub rows: u64,
    /// Bytes of the shard files.
    pub bytes: u64,
}

/// An input file left out of the cache, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RejectedInput {
    /// Path relative to the dataset root.
    pub key: String,
    /// Why it was left out.
    pub reason: String,
}

/// Which slice of the dataset this cache holds (`--num-parts/--part`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartInfo {
    /// How many parts the dataset was split into.
    pub num_parts: usize,
    /// Which part this is, 0-based.
    pub part: usize,
}

impl Default for PartInfo {
    fn default() -> Self {
        PartInfo {
            num_parts: 1,
            part: 0,
        }
    }
}

/// manifest.json, as schemas/manifest.schema.json describes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// The shard schema version ([`SCHEMA_VERSION`]).
    pub schema_version: String,
    /// Version of rae-cache that wrote it.
    pub tool_version: String,
    /// The image folder (canonical path); empty for samples.
    pub dataset_root: String,
    /// Sorted class folder names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
    /// The encoder (for samples: the sampling model).
    pub encoder: EncoderInfo,
    /// Free-form description of the crop/resize/normalisation steps.
    pub preprocessing: serde_json::Value,
    /// Storage type of the latents.
    pub dtype: LatentDType,
    /// Which crops are stored.
    pub hflip: HFlip,
    /// What the flip rows are, in words.
    pub hflip_note: String,
    /// The shard files, in order.
    pub shards: Vec<ShardInfo>,
    /// Sums over `shards`.
    pub totals: Totals,
    /// Input files left out, with reasons.
    pub rejected: Vec<RejectedInput>,
    /// The build's arguments, as a JSON object.
    pub build_args: serde_json::Value,
    /// Which part of the dataset this holds.
    pub part: PartInfo,
}

impl Manifest {
    /// A manifest with no shards yet; fills format, versions and the note.
    pub fn new(
        dataset_root: impl Into<String>,
        classes: Vec<String>,
        encoder: EncoderInfo,
        dtype: LatentDType,
        hflip: HFlip,
    ) -> Self {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            schema_version: SCHEMA_VERSION.into(),
            tool_version: super::schema::TOOL_VERSION.into(),
            dataset_root: dataset_root.into(),
            classes,
            encoder,
            preprocessing: serde_json::Value::Object(Default::default()),
            dtype,
            hflip,
            hflip_note: HFLIP_NOTE.into(),
            shards: Vec::new(),
            totals: Totals::default(),
            rejected: Vec::new(),
            build_args: serde_json::Value::Object(Default::default()),
            part: PartInfo::default(),
        }
    }

    /// Recompute `totals.rows` and `totals.bytes` from the shard list
    /// (`totals.images` is the caller's: it depends on the flip mode).
    pub fn update_totals(&mut self) {
        self.totals.rows = self.shards.iter().map(|s| s.rows).sum();
        self.totals.bytes = self.shards.iter().map(|s| s.bytes).sum();
    }

    /// Pretty JSON, written atomically.
    pub fn save(&self, path: &Path) -> Result<(), ShardError> {
        let mut json = serde_json::to_string_pretty(self)
            .map_err(|e| ShardError::format(path, format!("serialising manifest: {e}")))?;
        json.push('\n');
        crate::fsutil::write_atomic(path, json.as_bytes()).map_err(|e| ShardError::io(path, e))
    }

    /// Read and parse a manifest.json.
    pub fn load(path: &Path) -> Result<Self, ShardError> {
        let text = std::fs::read_to_string(path).map_err(|e| ShardError::io(path, e))?;
        // Check the identity first so a wrong file gets a clear message.
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ShardError::format(path, format!("manifest is not valid JSON: {e}")))?;
        match raw.get("format").and_then(|v| v.as_str()) {
            Some(MANIFEST_FORMAT) => {}
            other => {
                return Err(ShardError::format(
                    path,
                    format!(
                        "not a rae-cache manifest (format = {other:?}, expected {MANIFEST_FORMAT:?})"
                    ),
                ));
            }
        }
        match raw.get("schema_version").and_then(|v| v.as_str()) {
            Some(SCHEMA_VERSION) => {}
            other => {
                return Err(ShardError::format(
                    path,
                    format!(
                        "manifest schema_version {other:?}, this build reads {SCHEMA_VERSION:?}"
                    ),
                ));
            }
        }
        serde_json::from_value(raw)
            .map_err(|e| ShardError::format(path, format!("invalid manifest: {e}")))
    }
}
