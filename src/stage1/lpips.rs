//! LPIPS as the reference uses it (`src/disc/lpips.py`, the taming/VQGAN
//! "stripped" LPIPS): a fixed scaling layer, VGG16 features at relu1_2 ..
//! relu5_3, per-position unit normalisation over channels
//! (`x / (sqrt(sum x^2) + 1e-10)`), squared difference, the v0.1 linear
//! heads (1x1 convolutions without bias), spatial mean, summed over the five
//! layers. Inputs in [-1, 1]; differentiable w.r.t. both (frozen weights).
//!
//! Weights: VGG16 ImageNet features from torchvision (`vgg16-397923af.pth`)
//! or timm (`timm/vgg16.tv_in1k`), and the `lpips` package's
//! `weights/v0.1/vgg.pth` (`lin{k}.model.1.weight`), as `.pth` or
//! `.safetensors`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};

use super::vgg::Vgg16Features;
use super::{Result, Stage1Error};
use crate::models::{WeightsKey, load_state_dict};

/// LPIPS scaling layer: `(x - SHIFT) / SCALE` per channel.
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];
/// The unit normalisation's epsilon (added to the norm, not under the root).
const NORM_EPS: f64 = 1e-10;

/// Where the two LPIPS weight files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LpipsSource {
    /// VGG16 ImageNet weights: a file, a directory or a Hugging Face repo
    /// id in the local cache (default `timm/vgg16.tv_in1k`).
    pub vgg: String,
    /// The v0.1 linear heads: a file or a directory holding `vgg.pth`
    /// (`None`: look next to the VGG weights).
    pub lin: Option<String>,
}

impl Default for LpipsSource {
    fn default() -> Self {
        Self {
            vgg: "timm/vgg16.tv_in1k".into(),
            lin: None,
        }
    }
}

/// File names a VGG16 weights directory / snapshot may hold.
const VGG_FILES: [&str; 4] = [
    "model.safetensors",
    "pytorch_model.bin",
    "vgg16-397923af.pth",
    "vgg16.safetensors",
];
/// File names of the LPIPS v0.1 linear heads.
const LIN_FILES: [&str; 4] = [
    "vgg.pth",
    "weights/v0.1/vgg.pth",
    "lpips_vgg.safetensors",
    "vgg.safetensors",
];

const VGG_HINT: &str = "LPIPS needs VGG16 ImageNet weights: `huggingface-cli download timm/vgg16.tv_in1k`, \
    or torchvision's https://download.pytorch.org/models/vgg16-397923af.pth (pass the file with --lpips-vgg)";
const LIN_HINT: &str = "LPIPS needs its v0.1 linear weights `vgg.pth`: `pip install lpips` ships it as \
    lpips/weights/v0.1/vgg.pth (or get lpips/weights/v0.1/vgg.pth from github.com/richzhang/PerceptualSimilarity); \
    pass the file with --lpips-lin";

impl LpipsSource {
    /// The two files, resolved offline.
    pub fn resolve(&self) -> Result<(PathBuf, PathBuf)> {
        let vgg = crate::weights::resolve_file(&self.vgg, &VGG_FILES, VGG_HINT)?;
        let lin = match &self.lin {
            Some(l) => crate::weights::resolve_file(l, &LIN_FILES, LIN_HINT)?,
            None => {
                let dir = vgg.parent().unwrap_or(Path::new("."));
                crate::weights::resolve_file(&dir.to_string_lossy(), &LIN_FILES, LIN_HINT)?
            }
        };
        Ok((vgg, lin))
    }
}

/// The LPIPS distance with frozen VGG16 and linear weights.
#[derive(Debug, Clone)]
pub struct Lpips {
    vgg: Vgg16Features,
    /// `[1, C, 1, 1]` per layer.
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
}

impl Lpips {
    /// From loaded VGG features and a state dict holding
    /// `lin{k}.model.1.weight` `[1, C_k, 1, 1]` (`lin{k}.model.0.weight`,
    /// a checkpoint saved without dropout, is accepted too).
    pub fn new(vgg: Vgg16Features, lin: &HashMap<String, Tensor>, lin_path: &Path) -> Result<Self> {
        let widths = vgg.widths();
        let mut lins = Vec::with_capacity(5);
        for (k, c) in widths.iter().enumerate() {
            let names = [
                format!("lin{k}.model.1.weight"),
                format!("lin{k}.model.0.weight"),
            ];
            let Some(w) = names.iter().find_map(|n| lin.get(n)) else {
                return Err(Stage1Error::BadWeights {
                    path: lin_path.to_path_buf(),
                    reason: format!("no {} (LPIPS v0.1 linear weights)", names[0]),
                });
            };
            if w.dims() != [1, *c, 1, 1] {
                return Err(Stage1Error::BadWeights {
                    path: lin_path.to_path_buf(),
                    reason: format!(
                        "{}: {:?}, the VGG16 tap has {c} channels",
                        names[0],
                        w.dims()
                    ),
                });
            }
            lins.push(w.to_dtype(DType::F32)?.detach());
        }
        let dev = lins[0].device().clone();
        Ok(Self {
            vgg,
            lins,
            shift: Tensor::from_slice(&SHIFT, (1, 3, 1, 1), &dev)?,
            scale: Tensor::from_slice(&SCALE, (1, 3, 1, 1), &dev)?,
        })
    }

    /// Load both weight files (`.pth` or `.safetensors`).
    pub fn load(vgg_path: &Path, lin_path: &Path, device: &Device) -> Result<Self> {
        let vgg = Vgg16Features::load(vgg_path, device)?;
        let lin = load_state_dict(lin_path, &WeightsKey::Root, device)?;
        Self::new(vgg, &lin, lin_path)
    }

    /// Resolve ([`LpipsSource::resolve`]) and load.
    pub fn from_source(src: &LpipsSource, device: &Device) -> Result<Self> {
        let (vgg, lin) = src.resolve()?;
        tracing::info!(vgg = %vgg.display(), lin = %lin.display(), "LPIPS weights");
        Self::load(&vgg, &lin, device)
    }

    /// The VGG16 tap widths.
    pub fn widths(&self) -> [usize; 5] {
        self.vgg.widths()
    }

    /// VGG16 taps of an image in [-1, 1] (after the scaling layer).
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?;
        self.vgg.forward(&x)
    }

    /// Per-sample distance `[B]` between `x` and `y` (`[B, 3, H, W]`, [-1, 1]).
    pub fn forward_per_sample(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        if x.dims() != y.dims() {
            return Err(Stage1Error::Invalid(format!(
                "LPIPS inputs differ in shape: {:?} vs {:?}",
                x.dims(),
                y.dims()
            )));
        }
        let fx = self.features(x)?;
        let fy = self.features(y)?;
        let mut total: Option<Tensor> = None;
        for ((a, b), w) in fx.iter().zip(&fy).zip(&self.lins) {
            let d = (unit_normalize(a)? - unit_normalize(b)?)?.sqr()?;
            // 1x1 conv without bias, then the spatial mean: [B, 1]
            let v = d
                .broadcast_mul(w)?
                .sum_keepdim(1)?
                .flatten_from(2)?
                .mean(D::Minus1)?;
            total = Some(match total {
                Some(t) => (t + v)?,
                None => v,
            });
        }
        let total = total.ok_or_else(|| Stage1Error::Invalid("LPIPS without layers".into()))?;
        Ok(total.squeeze(1)?)
    }

    /// The batch mean (the reference's `reduction="mean"`), a scalar.
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.forward_per_sample(x, y)?.mean_all()?)
    }
}

/// `x / (sqrt(sum_c x^2) + 1e-10)` over the channel dim of `[B, C, H, W]`.
fn unit_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)?.sqrt()? + NORM_EPS)?;
    Ok(x.broadcast_div(&norm)?)
}
