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

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

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
    convs: Vec<(FrozenConv, Tensor)>,
}

/// A 3x3 convolution (stride 1, padding 1) with frozen weights whose
/// backward gives only the input's gradient, as a convolution with the
/// flipped, transposed kernel. candle's own conv2d backward goes through its
/// (slow, direct) CPU `conv_transpose2d` and also computes the kernel's
/// gradient, which a frozen network throws away. On the CPU both directions
/// run as im2col + one GEMM per image (about 4x candle's tiled conv2d here).
#[derive(Debug, Clone)]
struct FrozenConv {
    w: Tensor,
    /// `[out, in * 9]`, for the GEMM.
    w_mat: Tensor,
    /// `w_back[i, o, a, b] = w[o, i, 2 - a, 2 - b]`, as `[in, out * 9]`.
    w_back_mat: Tensor,
}

impl FrozenConv {
    fn new(w: Tensor) -> candle_core::Result<Self> {
        let (o, i, _, _) = w.dims4()?;
        let rev = Tensor::new(&[2u32, 1, 0], w.device())?;
        let w_back = w
            .index_select(&rev, 2)?
            .index_select(&rev, 3)?
            .transpose(0, 1)?
            .contiguous()?;
        Ok(Self {
            w_mat: w.reshape((o, i * 9))?.contiguous()?,
            w_back_mat: w_back.reshape((i, o * 9))?,
            w,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op1(self.clone())
        } else {
            x.conv2d(&self.w, 1, 1, 1, 1)
        }
    }
}

/// `x` `[B, C, H, W]` (contiguous f32) convolved with a 3x3 kernel given as
/// `w_mat` `[O, C * 9]`, padding 1: im2col of each image (rows `c*9 + kh*3 +
/// kw`) into one buffer reused across the batch, and a GEMM written straight
/// into the output, both split over candle's CPU workers (the GEMM by blocks
/// of output columns, so each task packs only its slice of the big im2col
/// matrix), instead of a fresh buffer and two output copies per image.
fn conv3x3_im2col(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    w_mat: &Tensor,
) -> candle_core::Result<Vec<f32>> {
    use crate::models::ops::{matmul_into, par_for};
    let (b, c, h, w) = dims;
    let o = w_mat.dim(0)?;
    let hw = h * w;
    let wm = w_mat.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; b * o * hw];
    let mut cols = vec![0f32; c * 9 * hw];
    // Column blocks of the GEMM: a multiple of 16, about 4 per thread.
    let threads = candle_core::utils::get_num_threads().max(1);
    let per = hw.div_ceil(4 * threads).div_ceil(16).max(1) * 16;
    let nblk = hw.div_ceil(per);
    for (img, dst) in x.chunks(c * hw).take(b).zip(out.chunks_mut(o * hw)) {
        let cp = SharedMut(cols.as_mut_ptr());
        par_for(c * 9, |r| {
            // SAFETY: task r writes row r of `cols` only.
            let row = unsafe { std::slice::from_raw_parts_mut(cp.at(r * hw), hw) };
            im2col_row(
                &img[(r / 9) * hw..(r / 9 + 1) * hw],
                (h, w),
                ((r % 9) / 3, r % 3),
                row,
            );
        });
        let dp = SharedMut(dst.as_mut_ptr());
        let cols = &cols;
        par_for(nblk, |j| {
            let j0 = j * per;
            let n = per.min(hw - j0);
            // SAFETY: task j writes columns j0..j0 + n of every output row.
            let d = unsafe { std::slice::from_raw_parts_mut(dp.at(j0), (o - 1) * hw + n) };
            matmul_into(d, hw, &wm, (&cols[j0..], hw), (o, n, c * 9));
        });
    }
    Ok(out)
}

/// A pointer parallel tasks share, each writing a disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element `i` places on (a method, so closures capture the whole
    /// `Sync` wrapper rather than the raw pointer field).
    fn at(self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}

/// One im2col row: `plane` `[h, w]` shifted by kernel tap (kh, kw), zero
/// outside (every element written: the buffer is reused).
fn im2col_row(plane: &[f32], (h, w): (usize, usize), (kh, kw): (usize, usize), row: &mut [f32]) {
    for y in 0..h {
        let dst = &mut row[y * w..(y + 1) * w];
        let sy = y as isize + kh as isize - 1;
        if sy < 0 || sy >= h as isize {
            dst.fill(0.0);
            continue;
        }
        let src = &plane[sy as usize * w..(sy as usize + 1) * w];
        match kw {
            0 => {
                dst[0] = 0.0;
                dst[1..].copy_from_slice(&src[..w - 1]);
            }
            1 => dst.copy_from_slice(src),
            _ => {
                dst[..w - 1].copy_from_slice(&src[1..]);
                dst[w - 1] = 0.0;
            }
        }
    }
}

/// [`conv3x3_im2col`] on a tensor (no autograd: the op's own backward).
fn conv3x3_tensor(x: &Tensor, w_mat: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let o = w_mat.dim(0)?;
    let v = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let y = conv3x3_im2col(&v, (b, c, h, w), w_mat)?;
    Tensor::from_vec(y, (b, o, h, w), x.device())
}

impl CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "frozen-conv3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen-conv3x3: non-contiguous input")
        };
        let (n, c, h, w) = l.shape().dims4()?;
        if c * 9 != self.w_mat.dim(1)? || h == 0 || w == 0 {
            candle_core::bail!(
                "frozen-conv3x3: input {:?} vs kernel {:?}",
                l.dims(),
                self.w.dims()
            )
        }
        let y = conv3x3_im2col(&s.as_slice::<f32>()?[a..b], (n, c, h, w), &self.w_mat)?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((n, self.w_mat.dim(0)?, h, w)),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(conv3x3_tensor(grad, &self.w_back_mat)?))
    }
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
            convs.push((
                FrozenConv::new(w.to_dtype(DType::F32)?.detach())?,
                b4.detach(),
            ));
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
            out[k] = self.convs[c - 1].0.w.dim(0).unwrap_or(0);
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
                h = w.forward(&h)?.broadcast_add(b)?.relu()?;
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
    fn frozen_conv_matches_candle_conv_and_its_gradient() {
        let dev = Device::Cpu;
        let val = |n: usize, k: u64| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u64 * 2654435761 + k) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        let w = Tensor::from_vec(val(4 * 3 * 9, 1), (4, 3, 3, 3), &dev).unwrap();
        let x = candle_core::Var::from_vec(val(2 * 3 * 5 * 7, 2), (2, 3, 5, 7), &dev).unwrap();
        let r = Tensor::from_vec(val(2 * 4 * 5 * 7, 3), (2, 4, 5, 7), &dev).unwrap();
        let conv = FrozenConv::new(w.clone()).unwrap();
        let ours = conv.forward(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().conv2d(&w, 1, 1, 1, 1).unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert!(diff(&ours, &theirs) < 1e-5);
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (g1, g2) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(diff(g1, g2) < 1e-4, "{}", diff(g1, g2));
    }

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
