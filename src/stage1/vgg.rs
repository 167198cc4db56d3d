//! The VGG16 feature extractor LPIPS uses: torchvision's `vgg16().features`
//! (13 3x3 convolutions with padding 1 in blocks of 2-2-3-3-3, ReLU after
//! each, a 2x2 max-pool between blocks), tapped after the last ReLU of each
//! block (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
//!
//! Built only from ops with a backward pass, since LPIPS is differentiated
//! w.r.t. its input. The widths are read from the weights (the ImageNet
//! weights have 64/128/256/512/512 channels); only the topology is fixed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{Result, Stage1Error};

/// torchvision `features` indices of the 13 convolutions.
pub const CONV_INDICES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
/// Convolutions per block (a max-pool precedes every block but the first).
const BLOCKS: [usize; 5] = [2, 2, 3, 3, 3];
/// First `features` index of each LPIPS slice (`[0:4]`, `[4:9]`, ...).
const SLICE_STARTS: [usize; 5] = [0, 4, 9, 16, 23];

/// VGG16 convolution weights `[out, in, 3, 3]` and biases `[out]`.
#[derive(Debug, Clone)]
pub struct Vgg16Features {
    convs: Vec<(Tensor, Tensor)>,
}

/// `features.N.{weight,bias}` under the names the checkpoints use:
/// torchvision and timm (`features.N`), an LPIPS module's own state dict
/// (`net.sliceK.J`, numbered per slice as the RAE/taming code or with the
/// original indices as the `lpips` package). Other keys (classifier, lin
/// layers) are ignored.
fn feature_index(name: &str) -> Option<(usize, bool)> {
    let (stem, is_weight) = if let Some(s) = name.strip_suffix(".weight") {
        (s, true)
    } else {
        (name.strip_suffix(".bias")?, false)
    };
    let parts: Vec<&str> = stem.split('.').collect();
    let idx = match parts.as_slice() {
        [.., "features", i] => i.parse().ok()?,
        [.., "net", slice, j] => {
            let k: usize = slice.strip_prefix("slice")?.parse().ok()?;
            let start = *SLICE_STARTS.get(k.checked_sub(1)?)?;
            let j: usize = j.parse().ok()?;
            if j >= start { j } else { start + j }
        }
        _ => return None,
    };
    Some((idx, is_weight))
}

impl Vgg16Features {
    /// From a state dict (see the accepted names above); checks the 13
    /// convolutions chain (3 input channels, 3x3 kernels).
    pub fn from_state_dict(sd: &HashMap<String, Tensor>, path: &Path) -> Result<Self> {
        let bad = |reason: String| Stage1Error::BadWeights {
            path: path.to_path_buf(),
            reason,
        };
        let mut by_index: HashMap<(usize, bool), &Tensor> = HashMap::new();
        for (k, t) in sd {
            if let Some(key) = feature_index(k) {
                by_index.insert(key, t);
            }
        }
        let mut convs = Vec::with_capacity(CONV_INDICES.len());
        let mut in_ch = 3;
        for i in CONV_INDICES {
            let (Some(w), Some(b)) = (by_index.get(&(i, true)), by_index.get(&(i, false))) else {
                return Err(bad(format!(
                    "no VGG16 conv features.{i}.weight/bias (expected torchvision/timm `features.N` or LPIPS `net.sliceK.J` names)"
                )));
            };
            let dims = w.dims();
            if dims.len() != 4
                || dims[1] != in_ch
                || dims[2] != 3
                || dims[3] != 3
                || b.dims() != [dims[0]]
            {
                return Err(bad(format!(
                    "features.{i}: weight {dims:?} / bias {:?}, want [out, {in_ch}, 3, 3] / [out]",
                    b.dims()
                )));
            }
            in_ch = dims[0];
            let b4 = b.to_dtype(DType::F32)?.reshape((1, dims[0], 1, 1))?;
            convs.push((w.to_dtype(DType::F32)?.detach(), b4.detach()));
        }
        Ok(Self { convs })
    }

    /// Load from a `.safetensors` or `.pth` file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let sd = crate::models::load_state_dict(path, &crate::models::WeightsKey::Root, device)?;
        Self::from_state_dict(&sd, path)
    }

    /// Channels of the five taps.
    pub fn widths(&self) -> [usize; 5] {
        let mut out = [0; 5];
        let mut c = 0;
        for (k, n) in BLOCKS.iter().enumerate() {
            c += n;
            out[k] = self.convs[c - 1].0.dim(0).unwrap_or(0);
        }
        out
    }

    /// `x` `[B, 3, H, W]` (already through LPIPS's scaling layer) -> the
    /// five ReLU taps.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut taps = Vec::with_capacity(5);
        let mut h = x.clone();
        let mut c = 0;
        for (k, n) in BLOCKS.iter().enumerate() {
            if k > 0 {
                h = max_pool2(&h)?;
            }
            for (w, b) in &self.convs[c..c + n] {
                h = h.conv2d(w, 1, 1, 1, 1)?.broadcast_add(b)?.relu()?;
            }
            c += n;
            taps.push(h.clone());
        }
        Ok(taps)
    }
}

/// 2x2 max-pool, stride 2, floor mode (odd trailing rows/columns dropped),
/// as torch's `MaxPool2d(2, 2)`. Built from a reshape and `max`: candle's
/// own `max_pool2d` backward scales the gradient by the window's share of
/// maxima (a quarter for a single maximum) and maps odd sizes wrongly.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    if h2 == 0 || w2 == 0 {
        return Err(Stage1Error::Invalid(format!(
            "VGG16 max-pool on a {h}x{w} map: the image is too small"
        )));
    }
    let x = if h % 2 == 1 || w % 2 == 1 {
        x.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?
    } else {
        x.clone()
    };
    Ok(x.contiguous()?
        .reshape((b, c, h2, 2, w2, 2))?
        .max(5)?
        .max(3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_feature_indices() {
        assert_eq!(feature_index("features.28.weight"), Some((28, true)));
        assert_eq!(feature_index("module.features.0.bias"), Some((0, false)));
        // RAE/taming LPIPS: slices renumbered from 0
        assert_eq!(feature_index("net.slice2.1.weight"), Some((5, true)));
        // lpips package: original indices kept
        assert_eq!(feature_index("net.slice2.5.weight"), Some((5, true)));
        assert_eq!(feature_index("net.slice5.5.bias"), Some((28, false)));
        assert_eq!(feature_index("classifier.0.weight"), None);
        assert_eq!(feature_index("lin0.model.1.weight"), None);
    }

    #[test]
    fn max_pool_floor_and_gradient() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..25).map(|i| ((i * 7) % 11) as f32).collect();
        let x = candle_core::Var::from_vec(v.clone(), (1, 1, 5, 5), &dev).unwrap();
        let y = max_pool2(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), [1, 1, 2, 2]);
        let want: Vec<f32> = [(0, 0), (0, 2), (2, 0), (2, 2)]
            .iter()
            .map(|&(r, c)| {
                [(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)]
                    .iter()
                    .map(|&(i, j)| v[i * 5 + j])
                    .fold(f32::MIN, f32::max)
            })
            .collect();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // each window's (unique) maximum receives the full gradient
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(gx.iter().sum::<f32>(), 4.0);
        assert!(gx.iter().all(|&g| g == 0.0 || g == 1.0));
        assert_eq!(gx[4], 0.0, "the dropped column gets no gradient");
    }
}
