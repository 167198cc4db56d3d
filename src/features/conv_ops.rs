//! The Inception's convolution, pooling and bias+ReLU on activations laid
//! out **CNHW** (`[C, N, H, W]`: channel-major, the batch inside), with
//! CPU fast paths.
//!
//! Why CNHW: a 1x1 convolution is then one matrix product `W [O, C] @
//! x [C, N*H*W]` over the whole batch (any device), and a kxk one is
//! `W [O, C*kh*kw] @ cols [C*kh*kw, N*Ho*Wo]`, instead of one small
//! product per image (64 columns at the 8x8 stage). Branch concatenation is
//! along the outer axis (a plain append), and every (channel, image) plane
//! is still a contiguous `H*W` block for pooling. On the 2-core CPU box it
//! measured the same as per-image NCHW products (2.43 vs 2.45 images per
//! CPU-second at batch 50): the GEMM itself (~80% of the time) bounds it.
//!
//! On the CPU candle's conv2d (single-threaded im2col, an output
//! transpose), its pools and its broadcast add / ReLU run single-threaded;
//! here im2col, the 3x3 pools and bias+ReLU are rayon passes. Other devices
//! use candle's ops (same math; conv2d through an NCHW transpose).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The contiguous f32 slice of a CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input not contiguous")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// Conv geometry: kernel, stride, padding (per side, height then width).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub k: (usize, usize),
    pub stride: usize,
    pub pad: (usize, usize),
}

impl Geom {
    fn out(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad.0 - self.k.0) / self.stride + 1,
            (w + 2 * self.pad.1 - self.k.1) / self.stride + 1,
        )
    }
}

/// im2col of images `start..start + m` of a CNHW tensor: rows
/// `c*kh*kw + ky*kw + kx` (the order of `W [O, C, kh, kw]` flattened),
/// columns `j*Ho*Wo + p` for image `j` of the chunk.
struct Im2Col {
    g: Geom,
    start: usize,
    m: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "inception-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (c, n, h, w) = l.shape().dims4()?;
        let g = self.g;
        let (ho, wo) = g.out(h, w);
        let (kh, kw) = g.k;
        let plane = ho * wo;
        let (start, m) = (self.start, self.m);
        if start + m > n {
            candle_core::bail!("im2col images {start}..{} of {n}", start + m);
        }
        let mut out = vec![0f32; c * kh * kw * m * plane];
        out.par_chunks_mut(m * plane)
            .enumerate()
            .for_each(|(r, row)| {
                let (ci, tap) = (r / (kh * kw), r % (kh * kw));
                for (j, seg) in row.chunks_mut(plane).enumerate() {
                    let p = (ci * n + start + j) * h * w;
                    let src = &x[p..p + h * w];
                    fill_row(seg, src, (h, w), (ho, wo), (tap / kw, tap % kw), &g);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((c * kh * kw, m * plane))))
    }
}

/// One im2col row: the input shifted by kernel tap (ky, kx), zero outside.
fn fill_row(
    row: &mut [f32],
    src: &[f32],
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    (ky, kx): (usize, usize),
    g: &Geom,
) {
    let s = g.stride;
    for oy in 0..ho {
        let iy = (oy * s + ky) as isize - g.pad.0 as isize;
        if iy < 0 || iy >= h as isize {
            continue;
        }
        let src_row = &src[iy as usize * w..(iy as usize + 1) * w];
        let dst = &mut row[oy * wo..(oy + 1) * wo];
        if s == 1 {
            // Valid output columns: 0 <= ox + kx - pad < w.
            let lo = g.pad.1.saturating_sub(kx);
            let hi = (w + g.pad.1).saturating_sub(kx).min(wo);
            if lo < hi {
                let start = lo + kx - g.pad.1;
                dst[lo..hi].copy_from_slice(&src_row[start..start + (hi - lo)]);
            }
        } else {
            for (ox, d) in dst.iter_mut().enumerate() {
                let ix = (ox * s + kx) as isize - g.pad.1 as isize;
                if ix >= 0 && (ix as usize) < w {
                    *d = src_row[ix as usize];
                }
            }
        }
    }
}

/// Convolution of CNHW `x` `[C, N, H, W]` with `w` `[O, C, kh, kw]` (no
/// bias), CNHW out. `w2`: the same weights as `[O, C*kh*kw]`.
pub(super) fn conv(x: &Tensor, w: &Tensor, w2: &Tensor, g: Geom) -> Result<Tensor> {
    let (c, n, h, wd) = x.dims4()?;
    let (ho, wo) = g.out(h, wd);
    let o = w2.dim(0)?;
    if g.k == (1, 1) && g.stride == 1 {
        // Any device: one product over the whole batch.
        return w2
            .matmul(&x.reshape((c, n * h * wd))?)?
            .reshape((o, n, h, wd));
    }
    if !matches!(x.device(), Device::Cpu) {
        let x = x.transpose(0, 1)?.contiguous()?;
        let y = if g.pad.0 == g.pad.1 {
            x.conv2d(w, g.pad.0, g.stride, 1, 1)?
        } else {
            // 1x7 / 7x1 kernels: asymmetric SAME padding, done explicitly.
            x.pad_with_zeros(2, g.pad.0, g.pad.0)?
                .pad_with_zeros(3, g.pad.1, g.pad.1)?
                .conv2d(w, 0, g.stride, 1, 1)?
        };
        return y.transpose(0, 1)?.contiguous();
    }
    // Images per im2col chunk: keep the column buffer near 64 MiB.
    let per_image = c * g.k.0 * g.k.1 * ho * wo * 4;
    let chunk = ((64 << 20) / per_image.max(1)).clamp(1, n);
    let x = x.contiguous()?;
    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let m = chunk.min(n - start);
        let cols = x.apply_op1_no_bwd(&Im2Col { g, start, m })?;
        outs.push(w2.matmul(&cols)?.reshape((o, m, ho * wo))?);
    }
    let y = if outs.len() == 1 {
        outs.pop().unwrap_or_else(|| unreachable!())
    } else {
        Tensor::cat(&outs, 1)?
    };
    y.reshape((o, n, ho, wo))
}

/// 3x3 pooling flavours of the FID Inception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pool {
    /// Max over the window; padding never wins (as -inf padding).
    Max,
    /// Mean over the window's pixels inside the image (TF SAME average
    /// pooling, `count_include_pad=False`).
    AvgExcludingPad,
}

struct Pool3 {
    kind: Pool,
    stride: usize,
    pad: usize,
}

impl Pool3 {
    fn out(&self, n: usize) -> usize {
        (n + 2 * self.pad - 3) / self.stride + 1
    }
}

impl CustomOp1 for Pool3 {
    fn name(&self) -> &'static str {
        "inception-pool3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = (self.out(h), self.out(w));
        let mut out = vec![0f32; n * c * ho * wo];
        let (stride, pad, kind) = (self.stride, self.pad, self.kind);
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(i, dst)| {
                let src = &x[i * h * w..(i + 1) * h * w];
                // Plain index loops: this crate builds at opt-level 1 in dev.
                for oy in 0..ho {
                    let y0 = (oy * stride) as isize - pad as isize;
                    let (ya, yb) = (y0.max(0) as usize, ((y0 + 3) as usize).min(h));
                    for ox in 0..wo {
                        let x0 = (ox * stride) as isize - pad as isize;
                        let (xa, xb) = (x0.max(0) as usize, ((x0 + 3) as usize).min(w));
                        let mut acc = if kind == Pool::Max {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        };
                        for y in ya..yb {
                            let row = &src[y * w + xa..y * w + xb];
                            for &v in row {
                                acc = if kind == Pool::Max {
                                    acc.max(v)
                                } else {
                                    acc + v
                                };
                            }
                        }
                        dst[oy * wo + ox] = if kind == Pool::Max {
                            acc
                        } else {
                            acc / ((yb - ya) * (xb - xa)) as f32
                        };
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// 3x3 pool with `stride` and `pad` pixels of padding on each side, per
/// `H x W` plane (layout-agnostic: CNHW and NCHW alike).
pub(super) fn pool3x3(x: &Tensor, kind: Pool, stride: usize, pad: usize) -> Result<Tensor> {
    if matches!(x.device(), Device::Cpu) {
        return x
            .contiguous()?
            .apply_op1_no_bwd(&Pool3 { kind, stride, pad });
    }
    pool3x3_generic(x, kind, stride, pad)
}

/// `pool3x3` with candle's tensor ops (any device).
fn pool3x3_generic(x: &Tensor, kind: Pool, stride: usize, pad: usize) -> Result<Tensor> {
    match (kind, pad) {
        (Pool::Max, 0) => x.max_pool2d_with_stride(3, stride),
        // Edge replication equals -inf padding for a max.
        (Pool::Max, p) => x
            .pad_with_same(2, p, p)?
            .pad_with_same(3, p, p)?
            .max_pool2d_with_stride(3, stride),
        (Pool::AvgExcludingPad, p) => {
            let (_, _, h, w) = x.dims4()?;
            let pool = Pool3 { kind, stride, pad };
            let (ho, wo) = (pool.out(h), pool.out(w));
            let count = |o: usize, n: usize| {
                let a = (o * stride) as isize - p as isize;
                ((a + 3).min(n as isize) - a.max(0)) as f32
            };
            // avg_pool2d divides by 9; rescale to each window's count.
            let f: Vec<f32> = (0..ho)
                .flat_map(|y| (0..wo).map(move |x| 9.0 / (count(y, h) * count(x, w))))
                .collect();
            let f = Tensor::from_vec(f, (1, 1, ho, wo), x.device())?;
            x.pad_with_zeros(2, p, p)?
                .pad_with_zeros(3, p, p)?
                .avg_pool2d_with_stride(3, stride)?
                .broadcast_mul(&f)
        }
    }
}

struct BiasAct {
    relu: bool,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "inception-bias-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let (c, n, h, w) = l1.shape().dims4()?;
        if b.len() != c {
            candle_core::bail!("bias of {} for {c} channels", b.len());
        }
        let plane = h * w;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let bc = b[i / n];
                if self.relu {
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(d, s)| *d = (s + bc).max(0.0));
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s + bc);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x + b` per channel (`x` CNHW `[C, N, H, W]`, `b` `[C]`), then ReLU if asked.
pub(super) fn bias_act(x: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    if matches!(x.device(), Device::Cpu) {
        return x.contiguous()?.apply_op2_no_bwd(b, &BiasAct { relu });
    }
    bias_act_generic(x, b, relu)
}

/// `bias_act` with candle's tensor ops (any device).
fn bias_act_generic(x: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    let y = x.broadcast_add(&b.reshape(((), 1, 1, 1))?)?;
    if relu { y.relu() } else { Ok(y) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU fast paths against candle's plain ops (the other-device path).
    fn close(a: &Tensor, b: &Tensor) -> f32 {
        crate::test_util::max_abs_diff(a, b)
    }

    #[test]
    fn im2col_conv_matches_candle_conv2d() -> Result<()> {
        // NCHW reference input, CNHW for ours.
        let x = Tensor::randn(0f32, 1.0, (3, 4, 11, 9), &Device::Cpu)?;
        let x_cnhw = x.transpose(0, 1)?.contiguous()?;
        for (k, stride, pad) in [
            ((3, 3), 1, (1, 1)),
            ((3, 3), 2, (0, 0)),
            ((1, 7), 1, (0, 3)),
            ((7, 1), 1, (3, 0)),
            ((5, 5), 1, (2, 2)),
            ((1, 1), 1, (0, 0)),
        ] {
            let w = Tensor::randn(0f32, 1.0, (6, 4, k.0, k.1), &Device::Cpu)?;
            let w2 = w.reshape((6, ()))?;
            let g = Geom { k, stride, pad };
            let got = conv(&x_cnhw, &w, &w2, g)?.transpose(0, 1)?;
            let xp = x
                .pad_with_zeros(2, pad.0, pad.0)?
                .pad_with_zeros(3, pad.1, pad.1)?;
            let want = xp.conv2d(&w, 0, stride, 1, 1)?;
            assert_eq!(got.dims(), want.dims());
            assert!(close(&got, &want) < 1e-4, "{k:?} {stride} {pad:?}");
            // A chunk of one image at a time gives the same columns.
            let one = Tensor::cat(
                &(0..3)
                    .map(|i| x_cnhw.apply_op1_no_bwd(&Im2Col { g, start: i, m: 1 }))
                    .collect::<Result<Vec<_>>>()?
                    .iter()
                    .map(|c| c.unsqueeze(1))
                    .collect::<Result<Vec<_>>>()?,
                1,
            )?;
            let all = x_cnhw.apply_op1_no_bwd(&Im2Col { g, start: 0, m: 3 })?;
            assert!(close(&one.reshape(all.dims())?, &all) == 0.0);
        }
        Ok(())
    }

    #[test]
    fn pools_match_reference_semantics() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 7, 6), &Device::Cpu)?;
        // The CPU kernel against the tensor-op path other devices take.
        for (kind, stride, pad) in [
            (Pool::Max, 2, 0),
            (Pool::Max, 1, 1),
            (Pool::AvgExcludingPad, 1, 1),
        ] {
            let fast = pool3x3(&x, kind, stride, pad)?;
            let generic = pool3x3_generic(&x, kind, stride, pad)?;
            assert_eq!(fast.dims(), generic.dims());
            assert!(close(&fast, &generic) < 1e-6, "{kind:?} {stride} {pad}");
        }
        // All ones: excluding the padding every average is exactly 1.
        let ones = Tensor::ones((1, 2, 4, 5), candle_core::DType::F32, &Device::Cpu)?;
        let avg = pool3x3(&ones, Pool::AvgExcludingPad, 1, 1)?;
        assert!(close(&avg, &ones) < 1e-6);
        // Corner of a ramp: mean of the 2x2 valid window.
        let r = Tensor::arange(0f32, 20.0, &Device::Cpu)?.reshape((1, 1, 4, 5))?;
        let a = pool3x3(&r, Pool::AvgExcludingPad, 1, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a[0], (0.0 + 1.0 + 5.0 + 6.0) / 4.0);
        let a = pool3x3_generic(&r, Pool::AvgExcludingPad, 1, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!((a[0] - 3.0).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn bias_relu_matches_broadcast_ops() -> Result<()> {
        // CNHW: 3 channels, 2 images.
        let x = Tensor::randn(0f32, 1.0, (3, 2, 4, 5), &Device::Cpu)?;
        let b = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu)?;
        let want = x.broadcast_add(&b.reshape((3, 1, 1, 1))?)?;
        assert!(close(&bias_act(&x, &b, false)?, &want) == 0.0);
        assert!(close(&bias_act(&x, &b, true)?, &want.relu()?) == 0.0);
        assert!(close(&bias_act_generic(&x, &b, true)?, &want.relu()?) == 0.0);
        Ok(())
    }
}
