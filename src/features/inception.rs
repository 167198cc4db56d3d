//! The FID Inception-v3: the TF graph `classify_image_graph_def.pb`
//! (inception-2015-12-05) that the ADM evaluator runs, with pytorch-fid's
//! module and weight names (`pt_inception-2015-12-05-6726825d.pth`).
//!
//! Input path as the TF graph: TF1 `ResizeBilinear` to 299 (no half-pixel
//! centres, no antialiasing), then `(x - 128) / 128`. pytorch-fid itself
//! resizes with half-pixel bilinear and `2x - 1`, which is not the ADM
//! protocol (about 0.005 FID at FID 4); its network and weights are.
//!
//! Blocks are pytorch-fid's FID variants: branch average pools exclude the
//! padding from the count (`FIDInceptionA/C/E_1`), the last block
//! (`FIDInceptionE_2`, TF `mixed_10`) max-pools. BatchNorm (eps 1e-3) is
//! folded into the convolutions at load (changes results by ~1e-7).
//!
//! Taps, as the ADM evaluator reads them:
//! * `pool`: `pool_3:0`, the 8x8 mean of the last block, `[N, 2048]`.
//! * `spatial`: `mixed_6/conv:0` (TF `mixed_6` = torchvision `Mixed_6d`;
//!   `mixed_6/conv` is the ReLU of its first 1x1 branch, `branch1x1`,
//!   `[N, 17, 17, 192]` NHWC in TF), first 7 channels, flattened in TF's
//!   row-major (h, w, c) order: `[N, 2023]`. The order must match the
//!   reference `mu_s`/`sigma_s` of the ADM npz files.
//! * `logits`: `pool @ softmax/weights` with **no bias**, the input of the
//!   evaluator's IS softmax (`softmax/logits/MatMul`), `[N, 1008]`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::conv_ops::{self, Geom, Pool, bias_act, pool3x3};
use super::{FeatureError, check_images, legacy_pth};

/// The network's input side.
pub const INPUT_SIZE: usize = 299;
/// Channels of the sFID tap kept by the ADM evaluator.
pub const SPATIAL_CHANNELS: usize = 7;
const BN_EPS: f64 = 1e-3;
/// Where the weights are published (never downloaded by rae-cache).
pub const WEIGHTS_URL: &str = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";

/// What one forward pass yields.
#[derive(Debug, Clone)]
pub struct InceptionOutputs {
    /// `pool_3`, `[N, 2048]`: FID, precision/recall.
    pub pool: Tensor,
    /// `mixed_6/conv[..., :7]` flattened (h, w, c), `[N, 2023]`: sFID.
    pub spatial: Tensor,
    /// `pool @ fc.weight^T` without bias, `[N, 1008]`: IS (pre-softmax).
    pub logits: Tensor,
}

/// TF1 `resize_bilinear` (align_corners=False, half_pixel_centers=False)
/// of `[N, C, H, W]` f32 to `[N, C, out_h, out_w]`, with TF's float32
/// arithmetic: `scale = in / out`, `src = dst * scale`, `lo = floor(src)`,
/// `hi = min(ceil(src), in - 1)`, `top = tl + (tr - tl) * xl`,
/// `bottom = bl + (br - bl) * xl`, `out = top + (bottom - top) * yl`.
/// Runs on the tensor's device.
pub fn tf1_resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor, FeatureError> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 {
        return Err(FeatureError::Input(format!("resize to {out_h}x{out_w}")));
    }
    let dev = x.device();
    let (ylo, yhi, yl) = tf1_taps(h, out_h);
    let (xlo, xhi, xl) = tf1_taps(w, out_w);
    let ix = |v: Vec<u32>| Tensor::from_vec(v, out_w, dev);
    let iy = |v: Vec<u32>| Tensor::from_vec(v, out_h, dev);
    let (xlo, xhi) = (ix(xlo)?, ix(xhi)?);
    let top_rows = x.index_select(&iy(ylo)?, 2)?;
    let bottom_rows = x.index_select(&iy(yhi)?, 2)?;
    let xl = Tensor::from_vec(xl, (1, 1, 1, out_w), dev)?;
    let yl = Tensor::from_vec(yl, (1, 1, out_h, 1), dev)?;
    let lerp_x = |rows: &Tensor| -> candle_core::Result<Tensor> {
        let l = rows.index_select(&xlo, 3)?;
        let r = rows.index_select(&xhi, 3)?;
        l.add(&(r - &l)?.broadcast_mul(&xl)?)
    };
    let top = lerp_x(&top_rows)?;
    let bottom = lerp_x(&bottom_rows)?;
    Ok(top.add(&(bottom - &top)?.broadcast_mul(&yl)?)?)
}

/// One axis of the TF1 legacy bilinear: (lower, upper, lerp) per output.
fn tf1_taps(in_size: usize, out_size: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let scale = in_size as f32 / out_size as f32;
    let last = (in_size - 1) as f32;
    let mut lo = Vec::with_capacity(out_size);
    let mut hi = Vec::with_capacity(out_size);
    let mut lerp = Vec::with_capacity(out_size);
    for i in 0..out_size {
        let src = i as f32 * scale;
        let f = src.floor();
        lo.push(f as u32);
        hi.push(src.ceil().min(last) as u32);
        lerp.push(src - f);
    }
    (lo, hi, lerp)
}

/// Conv (no bias) + BatchNorm folded into weight and bias; ReLU applied by
/// `forward`.
struct Unit {
    /// `[O, C, kh, kw]` (candle's conv2d off the CPU).
    w: Tensor,
    /// `[O, C*kh*kw]`: the 1x1 matmul and the CPU im2col path.
    w2: Tensor,
    /// `[O]`.
    b: Tensor,
    geom: Geom,
}

impl Unit {
    /// The convolution alone (no bias, no ReLU), CNHW in and out.
    fn conv(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv_ops::conv(x, &self.w, &self.w2, self.geom)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        bias_act(&self.conv(x)?, &self.b, true)
    }

    /// The branch `pool -> unit` of the A/C/E_1 blocks, as `unit.conv ->
    /// pool -> bias -> ReLU`: pooling and a 1x1 conv are both linear and
    /// the pool weights sum to 1, so the order is free, and pooling the
    /// narrower conv output is cheaper.
    fn after_avg_pool(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = pool3x3(&self.conv(x)?, Pool::AvgExcludingPad, 1, 1)?;
        bias_act(&p, &self.b, true)
    }
}

/// The 3x3 stride-2 VALID max pool of the stem and the reductions.
fn max_pool_s2(x: &Tensor) -> candle_core::Result<Tensor> {
    pool3x3(x, Pool::Max, 2, 0)
}

/// `Mixed_5b/5c/5d` (TF `mixed`, `mixed_1`, `mixed_2`).
struct BlockA {
    b1: Unit,
    b5: [Unit; 2],
    dbl: [Unit; 3],
    pool: Unit,
}

impl BlockA {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b1 = self.b1.forward(x)?;
        let b5 = self.b5[1].forward(&self.b5[0].forward(x)?)?;
        let d = self.dbl[0].forward(x)?;
        let d = self.dbl[2].forward(&self.dbl[1].forward(&d)?)?;
        let p = self.pool.after_avg_pool(x)?;
        Tensor::cat(&[&b1, &b5, &d, &p], 0)
    }
}

/// `Mixed_6a` (TF `mixed_3`): stride-2 reduction.
struct BlockB {
    b3: Unit,
    dbl: [Unit; 3],
}

impl BlockB {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b3 = self.b3.forward(x)?;
        let d = self.dbl[0].forward(x)?;
        let d = self.dbl[2].forward(&self.dbl[1].forward(&d)?)?;
        let p = max_pool_s2(x)?;
        Tensor::cat(&[&b3, &d, &p], 0)
    }
}

/// `Mixed_6b..6e` (TF `mixed_4..mixed_7`).
struct BlockC {
    b1: Unit,
    b7: [Unit; 3],
    dbl: [Unit; 5],
    pool: Unit,
}

impl BlockC {
    /// The block output and its `branch1x1` (the sFID tap of `Mixed_6d`).
    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let b1 = self.b1.forward(x)?;
        let mut b7 = self.b7[0].forward(x)?;
        for u in &self.b7[1..] {
            b7 = u.forward(&b7)?;
        }
        let mut d = self.dbl[0].forward(x)?;
        for u in &self.dbl[1..] {
            d = u.forward(&d)?;
        }
        let p = self.pool.after_avg_pool(x)?;
        Ok((Tensor::cat(&[&b1, &b7, &d, &p], 0)?, b1))
    }
}

/// `Mixed_7a` (TF `mixed_8`): stride-2 reduction.
struct BlockD {
    b3: [Unit; 2],
    b7: [Unit; 4],
}

impl BlockD {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b3 = self.b3[1].forward(&self.b3[0].forward(x)?)?;
        let mut b7 = self.b7[0].forward(x)?;
        for u in &self.b7[1..] {
            b7 = u.forward(&b7)?;
        }
        let p = max_pool_s2(x)?;
        Tensor::cat(&[&b3, &b7, &p], 0)
    }
}

/// `Mixed_7b` (average pool) and `Mixed_7c` (max pool) (TF `mixed_9`, `mixed_10`).
struct BlockE {
    b1: Unit,
    b3: Unit,
    b3ab: [Unit; 2],
    dbl: [Unit; 2],
    dblab: [Unit; 2],
    pool: Unit,
    max_pool: bool,
}

impl BlockE {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b1 = self.b1.forward(x)?;
        let b3 = self.b3.forward(x)?;
        let b3a = self.b3ab[0].forward(&b3)?;
        let b3b = self.b3ab[1].forward(&b3)?;
        let d = self.dbl[1].forward(&self.dbl[0].forward(x)?)?;
        let da = self.dblab[0].forward(&d)?;
        let db = self.dblab[1].forward(&d)?;
        let p = if self.max_pool {
            // FIDInceptionE_2 / TF mixed_10: 3x3 stride-1 SAME max pool.
            self.pool.forward(&pool3x3(x, Pool::Max, 1, 1)?)?
        } else {
            self.pool.after_avg_pool(x)?
        };
        Tensor::cat(&[&b1, &b3a, &b3b, &da, &db, &p], 0)
    }
}

/// The FID Inception-v3 (see the module docs).
pub struct InceptionV3 {
    stem: [Unit; 5],
    mixed_5: [BlockA; 3],
    mixed_6a: BlockB,
    mixed_6: [BlockC; 4],
    mixed_7a: BlockD,
    mixed_7: [BlockE; 2],
    /// `fc.weight^T`, `[2048, 1008]`.
    fc_t: Tensor,
    fc_bias: Tensor,
    device: Device,
}

/// Reads units out of a state dict, checking shapes, folding BN.
struct Weights<'a> {
    map: &'a HashMap<String, Tensor>,
    path: &'a Path,
    device: &'a Device,
}

impl Weights<'_> {
    fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, FeatureError> {
        let t = self.map.get(name).ok_or_else(|| FeatureError::Weights {
            path: self.path.to_path_buf(),
            reason: format!(
                "tensor {name} missing: not the FID Inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth layout)"
            ),
        })?;
        if t.dims() != shape {
            return Err(FeatureError::Weights {
                path: self.path.to_path_buf(),
                reason: format!("{name} has shape {:?}, want {shape:?}", t.dims()),
            });
        }
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// `{name}.conv` + `{name}.bn`: `cin -> cout`, kernel `k`, stride, padding.
    fn unit(
        &self,
        name: &str,
        (cin, cout): (usize, usize),
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Unit, FeatureError> {
        let mut w = self.host(&format!("{name}.conv.weight"), &[cout, cin, k.0, k.1])?;
        let bn = |p: &str| self.host(&format!("{name}.bn.{p}"), &[cout]);
        let (gamma, beta, mean, var) = (
            bn("weight")?,
            bn("bias")?,
            bn("running_mean")?,
            bn("running_var")?,
        );
        let per_out = cin * k.0 * k.1;
        let mut b = vec![0f32; cout];
        for o in 0..cout {
            let s = gamma[o] as f64 / (var[o] as f64 + BN_EPS).sqrt();
            for v in &mut w[o * per_out..(o + 1) * per_out] {
                *v = (*v as f64 * s) as f32;
            }
            b[o] = (beta[o] as f64 - mean[o] as f64 * s) as f32;
        }
        let w = Tensor::from_vec(w, (cout, cin, k.0, k.1), self.device)?;
        Ok(Unit {
            w2: w.reshape((cout, cin * k.0 * k.1))?,
            w,
            b: Tensor::from_vec(b, cout, self.device)?,
            geom: Geom { k, stride, pad },
        })
    }

    /// A stride-1 SAME unit (padding half the kernel).
    fn same(
        &self,
        name: &str,
        io: (usize, usize),
        k: (usize, usize),
    ) -> Result<Unit, FeatureError> {
        self.unit(name, io, k, 1, (k.0 / 2, k.1 / 2))
    }

    fn block_a(&self, name: &str, cin: usize, pool: usize) -> Result<BlockA, FeatureError> {
        let n = |s: &str| format!("{name}.{s}");
        Ok(BlockA {
            b1: self.same(&n("branch1x1"), (cin, 64), (1, 1))?,
            b5: [
                self.same(&n("branch5x5_1"), (cin, 48), (1, 1))?,
                self.same(&n("branch5x5_2"), (48, 64), (5, 5))?,
            ],
            dbl: [
                self.same(&n("branch3x3dbl_1"), (cin, 64), (1, 1))?,
                self.same(&n("branch3x3dbl_2"), (64, 96), (3, 3))?,
                self.same(&n("branch3x3dbl_3"), (96, 96), (3, 3))?,
            ],
            pool: self.same(&n("branch_pool"), (cin, pool), (1, 1))?,
        })
    }

    fn block_c(&self, name: &str, c7: usize) -> Result<BlockC, FeatureError> {
        let n = |s: &str| format!("{name}.{s}");
        let (row, col) = ((1, 7), (7, 1));
        Ok(BlockC {
            b1: self.same(&n("branch1x1"), (768, 192), (1, 1))?,
            b7: [
                self.same(&n("branch7x7_1"), (768, c7), (1, 1))?,
                self.same(&n("branch7x7_2"), (c7, c7), row)?,
                self.same(&n("branch7x7_3"), (c7, 192), col)?,
            ],
            dbl: [
                self.same(&n("branch7x7dbl_1"), (768, c7), (1, 1))?,
                self.same(&n("branch7x7dbl_2"), (c7, c7), col)?,
                self.same(&n("branch7x7dbl_3"), (c7, c7), row)?,
                self.same(&n("branch7x7dbl_4"), (c7, c7), col)?,
                self.same(&n("branch7x7dbl_5"), (c7, 192), row)?,
            ],
            pool: self.same(&n("branch_pool"), (768, 192), (1, 1))?,
        })
    }

    fn block_e(&self, name: &str, cin: usize, max_pool: bool) -> Result<BlockE, FeatureError> {
        let n = |s: &str| format!("{name}.{s}");
        let ab = |a: &str, b: &str, c: usize| -> Result<[Unit; 2], FeatureError> {
            Ok([
                self.same(&n(a), (c, 384), (1, 3))?,
                self.same(&n(b), (c, 384), (3, 1))?,
            ])
        };
        Ok(BlockE {
            b1: self.same(&n("branch1x1"), (cin, 320), (1, 1))?,
            b3: self.same(&n("branch3x3_1"), (cin, 384), (1, 1))?,
            b3ab: ab("branch3x3_2a", "branch3x3_2b", 384)?,
            dbl: [
                self.same(&n("branch3x3dbl_1"), (cin, 448), (1, 1))?,
                self.same(&n("branch3x3dbl_2"), (448, 384), (3, 3))?,
            ],
            dblab: ab("branch3x3dbl_3a", "branch3x3dbl_3b", 384)?,
            pool: self.same(&n("branch_pool"), (cin, 192), (1, 1))?,
            max_pool,
        })
    }
}

/// Read a weights file into host tensors: safetensors, a PyTorch zip
/// checkpoint, or a legacy (pre-1.6) PyTorch file, told apart by content
/// (not by extension). A `module.` prefix (DataParallel) is dropped.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>, FeatureError> {
    let werr = |reason: String| FeatureError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(werr(format!(
            "file not found. The FID Inception weights are pytorch-fid's pt_inception-2015-12-05-6726825d.pth \
             (published at {WEIGHTS_URL}; torch-fidelity's weights-inception-2015-12-05-6726825d.pth has the \
             same layout) or a .safetensors with the same tensor names; rae-cache does not download them"
        )));
    }
    let mut head = [0u8; 9];
    let n = std::io::Read::read(
        &mut std::fs::File::open(path).map_err(|e| werr(e.to_string()))?,
        &mut head,
    )
    .map_err(|e| werr(e.to_string()))?;
    let tensors: Vec<(String, Tensor)> = if legacy_pth::is_legacy(path) {
        legacy_pth::read_legacy(path, &Device::Cpu)?
    } else if n >= 4 && head[..4] == *b"PK\x03\x04" {
        legacy_pth::read_zip(path, &Device::Cpu)?
    } else if n == 9 && head[8] == b'{' {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| werr(format!("safetensors: {e}")))?
            .into_iter()
            .collect()
    } else {
        return Err(werr(
            "not a safetensors file, a PyTorch zip checkpoint or a legacy PyTorch file".into(),
        ));
    };
    Ok(tensors
        .into_iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("module.").map(str::to_string).unwrap_or(k),
                v,
            )
        })
        .collect())
}

impl InceptionV3 {
    /// Load the FID Inception from pytorch-fid's `.pth` (zip or legacy
    /// format) or a `.safetensors` with the same tensor names.
    pub fn load(path: &Path, device: &Device) -> Result<Self, FeatureError> {
        let map = read_weights(path)?;
        let net = Self::from_tensors(&map, path, device)?;
        tracing::info!(file = %path.display(), "FID Inception loaded");
        Ok(net)
    }

    /// Build from a state dict with pytorch-fid's names (`path` names the
    /// source in errors).
    pub fn from_tensors(
        map: &HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
    ) -> Result<Self, FeatureError> {
        let w = Weights { map, path, device };
        let stem = [
            w.unit("Conv2d_1a_3x3", (3, 32), (3, 3), 2, (0, 0))?,
            w.unit("Conv2d_2a_3x3", (32, 32), (3, 3), 1, (0, 0))?,
            w.unit("Conv2d_2b_3x3", (32, 64), (3, 3), 1, (1, 1))?,
            w.unit("Conv2d_3b_1x1", (64, 80), (1, 1), 1, (0, 0))?,
            w.unit("Conv2d_4a_3x3", (80, 192), (3, 3), 1, (0, 0))?,
        ];
        let mixed_5 = [
            w.block_a("Mixed_5b", 192, 32)?,
            w.block_a("Mixed_5c", 256, 64)?,
            w.block_a("Mixed_5d", 288, 64)?,
        ];
        let mixed_6a = BlockB {
            b3: w.unit("Mixed_6a.branch3x3", (288, 384), (3, 3), 2, (0, 0))?,
            dbl: [
                w.same("Mixed_6a.branch3x3dbl_1", (288, 64), (1, 1))?,
                w.same("Mixed_6a.branch3x3dbl_2", (64, 96), (3, 3))?,
                w.unit("Mixed_6a.branch3x3dbl_3", (96, 96), (3, 3), 2, (0, 0))?,
            ],
        };
        let mixed_6 = [
            w.block_c("Mixed_6b", 128)?,
            w.block_c("Mixed_6c", 160)?,
            w.block_c("Mixed_6d", 160)?,
            w.block_c("Mixed_6e", 192)?,
        ];
        let mixed_7a = BlockD {
            b3: [
                w.same("Mixed_7a.branch3x3_1", (768, 192), (1, 1))?,
                w.unit("Mixed_7a.branch3x3_2", (192, 320), (3, 3), 2, (0, 0))?,
            ],
            b7: [
                w.same("Mixed_7a.branch7x7x3_1", (768, 192), (1, 1))?,
                w.same("Mixed_7a.branch7x7x3_2", (192, 192), (1, 7))?,
                w.same("Mixed_7a.branch7x7x3_3", (192, 192), (7, 1))?,
                w.unit("Mixed_7a.branch7x7x3_4", (192, 192), (3, 3), 2, (0, 0))?,
            ],
        };
        let mixed_7 = [
            w.block_e("Mixed_7b", 1280, false)?,
            w.block_e("Mixed_7c", 2048, true)?,
        ];
        let fc = w.host("fc.weight", &[1008, 2048])?;
        let fc_t = Tensor::from_vec(fc, (1008, 2048), device)?
            .t()?
            .contiguous()?;
        let fc_bias = Tensor::from_vec(w.host("fc.bias", &[1008])?, 1008, device)?;
        Ok(Self {
            stem,
            mixed_5,
            mixed_6a,
            mixed_6,
            mixed_7a,
            mixed_7,
            fc_t,
            fc_bias,
            device: device.clone(),
        })
    }

    /// The device the network runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `fc.bias` (`[1008]`): not part of `logits` (ADM's IS uses none);
    /// add it for torch-fidelity's biased `logits`.
    pub fn fc_bias(&self) -> &Tensor {
        &self.fc_bias
    }

    /// `images`: `[N, 3, H, W]` f32 RGB in [0, 255] (uint8 values), any
    /// size. TF1-bilinear resize to 299 (skipped at 299, where it is the
    /// identity), `(x - 128) / 128`, the network.
    pub fn forward(&self, images: &Tensor) -> Result<InceptionOutputs, FeatureError> {
        let (_, h, w) = check_images(images)?;
        let x = images.to_device(&self.device)?.to_dtype(DType::F32)?;
        let x = if (h, w) == (INPUT_SIZE, INPUT_SIZE) {
            x
        } else {
            tf1_resize_bilinear(&x, INPUT_SIZE, INPUT_SIZE)?
        };
        // (x - 128) / 128 exactly: the scale is a power of two.
        self.forward_normalized(&x.affine(1.0 / 128.0, -1.0)?)
    }

    /// The network on inputs already resized to 299 and normalised to
    /// [-1, 1] (`[N, 3, 299, 299]`).
    pub fn forward_normalized(&self, x: &Tensor) -> Result<InceptionOutputs, FeatureError> {
        let n = x.dim(0)?;
        // Activations run CNHW (see conv_ops): channel-concatenation is an
        // append and every conv one matrix product over the batch.
        let mut h = x.transpose(0, 1)?.contiguous()?;
        for (i, u) in self.stem.iter().enumerate() {
            h = u.forward(&h)?;
            if i == 2 || i == 4 {
                h = max_pool_s2(&h)?;
            }
        }
        for b in &self.mixed_5 {
            h = b.forward(&h)?;
        }
        h = self.mixed_6a.forward(&h)?;
        let mut tap = None;
        for (i, b) in self.mixed_6.iter().enumerate() {
            let (out, b1) = b.forward(&h)?;
            if i == 2 {
                tap = Some(b1);
            }
            h = out;
        }
        h = self.mixed_7a.forward(&h)?;
        for b in &self.mixed_7 {
            h = b.forward(&h)?;
        }
        // [2048, N, 8, 8] -> pool_3 [N, 2048].
        let pool = h.mean((2, 3))?.t()?.contiguous()?;
        let logits = pool.matmul(&self.fc_t)?;
        let tap = tap.ok_or_else(|| FeatureError::Input("Mixed_6d did not run".into()))?;
        // [192, N, 17, 17] -> TF's NHWC, first 7 channels, (h, w, c) order.
        let spatial = tap
            .narrow(0, 0, SPATIAL_CHANNELS)?
            .permute((1, 2, 3, 0))?
            .contiguous()?
            .reshape((n, ()))?;
        Ok(InceptionOutputs {
            pool,
            spatial,
            logits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_follow_tf_legacy_scaling() {
        // 4 -> 3: scale 4/3, src = 0, 1.333, 2.667.
        let (lo, hi, l) = tf1_taps(4, 3);
        assert_eq!(lo, vec![0, 1, 2]);
        assert_eq!(hi, vec![0, 2, 3]);
        assert!((l[1] - 1.0 / 3.0).abs() < 1e-6 && (l[2] - 2.0 / 3.0).abs() < 1e-6);
        // Upsampling clamps the upper tap at the last input.
        let (_, hi, _) = tf1_taps(2, 5);
        assert_eq!(*hi.last().unwrap(), 1);
    }
}
