//! Model configurations with the reference constructor keys (the fixture
//! JSONs and `configs/stage2/*.yaml` `params`), presets, and file loading.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ModelError;

fn one() -> usize {
    1
}
fn four() -> f64 {
    4.0
}
fn yes() -> bool {
    true
}
fn no() -> bool {
    false
}
fn dropout() -> f64 {
    0.1
}
fn classes() -> usize {
    1000
}

/// The block options LightningDiT and DiT-DH share, under their reference
/// constructor keys and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlockOptions {
    /// RMS-normalise queries and keys.
    #[serde(default = "no")]
    pub use_qknorm: bool,
    /// SwiGLU MLPs instead of GELU.
    #[serde(default = "yes")]
    pub use_swiglu: bool,
    /// 2-D rotary position embedding in attention.
    #[serde(default = "yes")]
    pub use_rope: bool,
    /// RMSNorm instead of LayerNorm.
    #[serde(default = "yes")]
    pub use_rmsnorm: bool,
    /// adaLN modulation without the shift term.
    #[serde(default = "no")]
    pub wo_shift: bool,
}

impl Default for BlockOptions {
    /// The reference defaults: SwiGLU, rope, RMSNorm; no q/k norm, shift kept.
    fn default() -> Self {
        Self {
            use_qknorm: false,
            use_swiglu: true,
            use_rope: true,
            use_rmsnorm: true,
            wo_shift: false,
        }
    }
}

/// LightningDiT (`stage2.models.lightningDiT.LightningDiT`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LightningDitConfig {
    /// Latent height and width.
    pub input_size: usize,
    /// Patch side in latent cells.
    #[serde(default = "one")]
    pub patch_size: usize,
    /// Latent channels.
    pub in_channels: usize,
    /// Transformer width.
    pub hidden_size: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Class labels (the null class is this index).
    #[serde(default = "classes")]
    pub num_classes: usize,
    /// MLP width over the transformer width.
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    /// Label dropout during training (classifier-free guidance).
    #[serde(default = "dropout")]
    pub class_dropout_prob: f64,
    /// Also predict a variance (doubles the output channels).
    #[serde(default = "no")]
    pub learn_sigma: bool,
    /// Block options (flattened: the same constructor keys).
    #[serde(flatten)]
    pub block: BlockOptions,
}

/// `num_heads` may be one number for both stacks or a `[backbone, head]` pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrPair {
    /// The same for both stacks.
    One(usize),
    /// `[backbone, head]`.
    Pair([usize; 2]),
}

impl OneOrPair {
    /// As `[backbone, head]`.
    pub fn pair(&self) -> [usize; 2] {
        match *self {
            Self::One(v) => [v, v],
            Self::Pair(p) => p,
        }
    }
}

/// DiT-DH (`stage2.models.DDT.DiTwDDTHead`): `[backbone, head]` pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DitDhConfig {
    /// Latent height and width.
    pub input_size: usize,
    /// Patch side in latent cells.
    #[serde(default = "one")]
    pub patch_size: usize,
    /// Latent channels.
    pub in_channels: usize,
    /// `[backbone, head]` widths.
    pub hidden_size: [usize; 2],
    /// `[backbone, head]` block counts.
    pub depth: [usize; 2],
    /// Attention heads of each stack.
    pub num_heads: OneOrPair,
    /// Class labels (the null class is this index).
    #[serde(default = "classes")]
    pub num_classes: usize,
    /// MLP width over the transformer width.
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    /// Label dropout during training (classifier-free guidance).
    #[serde(default = "dropout")]
    pub class_dropout_prob: f64,
    /// Block options (flattened: the same constructor keys).
    #[serde(flatten)]
    pub block: BlockOptions,
    /// Add the fixed sin-cos position table to the tokens.
    #[serde(default = "yes")]
    pub use_pos_embed: bool,
}

/// The DiT-S/B/L/XL backbone (width, depth, heads) that `name` selects,
/// given the prefixes its family is spelled with (case and `_`/`-` free).
fn backbone_size(name: &str, prefixes: &[&str]) -> Option<(usize, usize, usize)> {
    let name = name.to_ascii_uppercase().replace('_', "-");
    let size = prefixes.iter().find_map(|p| name.strip_prefix(p))?;
    match size {
        "S" => Some((384, 12, 6)),
        "B" => Some((768, 12, 12)),
        "L" => Some((1024, 24, 16)),
        "XL" => Some((1152, 28, 16)),
        _ => None,
    }
}

impl DitDhConfig {
    /// DiT-DH with a DiT-S/B/L/XL backbone and the reference's 2048-wide,
    /// 2-deep, 16-head head on 16x16x768 latents, 1000 classes.
    pub fn preset(name: &str) -> Option<Self> {
        let (w, d, h) = backbone_size(name, &["DIT-DH-", "DITDH-"])?;
        Some(Self {
            input_size: 16,
            patch_size: 1,
            in_channels: 768,
            hidden_size: [w, 2048],
            depth: [d, 2],
            num_heads: OneOrPair::Pair([h, 16]),
            num_classes: 1000,
            mlp_ratio: 4.0,
            class_dropout_prob: 0.1,
            block: BlockOptions::default(),
            use_pos_embed: true,
        })
    }
}

impl LightningDitConfig {
    /// LightningDiT-S/B/L/XL on 16x16x768 latents (patch 1, 1000 classes).
    pub fn preset(name: &str) -> Option<Self> {
        let (w, d, h) = backbone_size(name, &["LIGHTNINGDIT-", "DIT-"])?;
        Some(Self {
            input_size: 16,
            patch_size: 1,
            in_channels: 768,
            hidden_size: w,
            depth: d,
            num_heads: h,
            num_classes: 1000,
            mlp_ratio: 4.0,
            class_dropout_prob: 0.1,
            learn_sigma: false,
            block: BlockOptions::default(),
        })
    }
}

/// Either model; which one is decided by `hidden_size` being a pair (DiT-DH)
/// or a number (LightningDiT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DitConfig {
    /// DiT with a denoising head.
    DitDh(DitDhConfig),
    /// LightningDiT.
    Lightning(LightningDitConfig),
}

impl DitConfig {
    /// The config a JSON object describes (`origin` names it in errors).
    pub fn from_value(v: serde_json::Value, origin: &str) -> Result<Self, ModelError> {
        let bad = |e: serde_json::Error| ModelError::Config {
            path: origin.to_string(),
            reason: e.to_string(),
        };
        match v.get("hidden_size") {
            Some(serde_json::Value::Array(_)) => {
                Ok(Self::DitDh(serde_json::from_value(v).map_err(bad)?))
            }
            Some(_) => Ok(Self::Lightning(serde_json::from_value(v).map_err(bad)?)),
            None => Err(ModelError::Config {
                path: origin.to_string(),
                reason: "missing key `hidden_size`".into(),
            }),
        }
    }

    /// A preset name (DiT-DH-S/B/L/XL, LightningDiT-S/B/L/XL) or a JSON /
    /// TOML file with the constructor keys (a YAML-style `params` table
    /// nested one level is accepted too).
    pub fn load(name_or_path: &str) -> Result<Self, ModelError> {
        if let Some(c) = DitDhConfig::preset(name_or_path) {
            return Ok(Self::DitDh(c));
        }
        if let Some(c) = LightningDitConfig::preset(name_or_path) {
            return Ok(Self::Lightning(c));
        }
        let v = read_config_value(Path::new(name_or_path))?;
        let v = match v.get("params") {
            Some(p) if p.is_object() => p.clone(),
            _ => v,
        };
        Self::from_value(v, name_or_path)
    }

    /// Class labels of the model.
    pub fn num_classes(&self) -> usize {
        match self {
            Self::DitDh(c) => c.num_classes,
            Self::Lightning(c) => c.num_classes,
        }
    }

    /// Latent channels the model samples.
    pub fn in_channels(&self) -> usize {
        match self {
            Self::DitDh(c) => c.in_channels,
            Self::Lightning(c) => c.in_channels,
        }
    }

    /// Latent height and width.
    pub fn input_size(&self) -> usize {
        match self {
            Self::DitDh(c) => c.input_size,
            Self::Lightning(c) => c.input_size,
        }
    }
}

/// Read a JSON or TOML file (by extension; `.toml` is TOML, anything else
/// JSON) into a JSON value.
pub fn read_config_value(path: &Path) -> Result<serde_json::Value, ModelError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Config {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
    {
        let t: toml::Value = toml::from_str(&text).map_err(|e| ModelError::Config {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        serde_json::to_value(t).map_err(|e| ModelError::Config {
            path: p,
            reason: e.to_string(),
        })
    } else {
        serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: p,
            reason: e.to_string(),
        })
    }
}

/// Parse a typed config from a JSON/TOML file.
pub fn load_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let v = read_config_value(path)?;
    serde_json::from_value(v).map_err(|e| ModelError::Config {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_toml() {
        let DitConfig::DitDh(xl) = DitConfig::load("DiT-DH-XL").unwrap() else {
            panic!()
        };
        assert_eq!(
            (xl.hidden_size, xl.depth, xl.num_heads.pair()),
            ([1152, 2048], [28, 2], [16, 16])
        );
        let DitConfig::DitDh(s) = DitConfig::load("DiTDH-S").unwrap() else {
            panic!()
        };
        assert_eq!(
            (s.hidden_size, s.depth, s.num_heads.pair()),
            ([384, 2048], [12, 2], [6, 16])
        );
        assert!(matches!(
            DitConfig::load("LightningDiT-XL").unwrap(),
            DitConfig::Lightning(_)
        ));

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(
            &p,
            "input_size = 4\nin_channels = 24\nhidden_size = [48, 64]\ndepth = [2, 1]\nnum_heads = 4\nnum_classes = 10\n",
        )
        .unwrap();
        let DitConfig::DitDh(c) = DitConfig::load(p.to_str().unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!(c.num_heads.pair(), [4, 4]);
        assert!(c.block.use_rope && c.block.use_swiglu && c.use_pos_embed && !c.block.wo_shift);

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"input_size\": 4}").unwrap();
        let e = DitConfig::load(bad.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.json") && e.contains("hidden_size"), "{e}");
    }
}
