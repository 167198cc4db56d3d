//! Position, time and label embeddings: the fixed 2D sin-cos table, the 2D
//! rotary embedding (reference `VisionRotaryEmbeddingFast`), the
//! Gaussian-Fourier time embedding and the label table with a null class.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::{Linear, LinearInit};

/// The MAE/DiT 2D sin-cos table `[grid*grid, dim]` (f64 math, like numpy):
/// the first half of the channels encodes the column (w), the second half
/// the row (h); each half is [sin(pos*omega), cos(pos*omega)],
/// omega_i = 10000^(-i/(dim/4)).
pub fn sincos_2d_table(dim: usize, grid: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(grid * grid * dim);
    for h in 0..grid {
        for w in 0..grid {
            // reference meshgrid puts w first: emb_h (first half) uses w
            for pos in [w as f64, h as f64] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    out
}

/// `[1, grid*grid (+1 if cls), dim]` sin-cos table, zeros for the CLS row.
pub fn sincos_2d(dim: usize, grid: usize, cls: bool, device: &Device) -> Result<Tensor> {
    let mut v = if cls { vec![0f32; dim] } else { Vec::new() };
    v.extend(sincos_2d_table(dim, grid));
    let n = v.len() / dim;
    Tensor::from_vec(v, (1, n, dim), device)
}

/// Frozen tensor: the stored value when the VarBuilder has it (a released
/// checkpoint), else computed; detached so no gradient reaches it.
pub fn frozen_or(vb: &VarBuilder, name: &str, shape: &[usize], computed: Tensor) -> Result<Tensor> {
    if vb.contains_tensor(name) {
        Ok(vb.get(shape, name)?.detach())
    } else {
        Ok(computed.to_dtype(vb.dtype())?.detach())
    }
}

/// 2D rotary embedding in the reference's `VisionRotaryEmbeddingFast`
/// layout for head dim `dh` on a `grid x grid` token grid (theta 10000):
/// per token the `dh` channels are [rows half | columns half], each half
/// holding `dh/4` frequencies, each repeated twice (interleaved pairs).
/// Applied as x*cos + rotate_pairs(x)*sin where rotate_pairs maps
/// (x0, x1) -> (-x1, x0).
#[derive(Debug, Clone)]
pub struct Rope2d {
    /// `[N, dh]`
    cos: Tensor,
    sin: Tensor,
    /// `[N, dh/2]` (one entry per pair) for the fused kernel.
    cos_half: Tensor,
    sin_half: Tensor,
    /// Host copies of `cos`/`sin` for the fused CPU attention (f32 CPU models).
    host: Option<super::ops::RopeTables>,
}

impl Rope2d {
    /// Tables for head dim `head_dim` on a `grid x grid` grid, in `dtype` on `device`
    /// (f32 host copies kept too when the model is f32 on CPU).
    pub fn new(head_dim: usize, grid: usize, device: &Device, dtype: DType) -> Result<Self> {
        let dim = head_dim / 2; // the reference's `dim` = half head dim
        let freqs: Vec<f64> = (0..dim / 2)
            .map(|i| {
                // torch computes this in f32: 1 / 10000^(2i/dim)
                let e = (2 * i) as f32 / dim as f32;
                (1.0f32 / 10000f32.powf(e)) as f64
            })
            .collect();
        let n = grid * grid;
        let mut angles = Vec::with_capacity(n * head_dim);
        // reference positions: arange(n) / n * n, in f32
        let pos_of = |k: usize| (k as f32 / grid as f32) * grid as f32;
        for h in 0..grid {
            for w in 0..grid {
                for pos in [pos_of(h), pos_of(w)] {
                    for f in &freqs {
                        // torch multiplies in f32
                        let a = (pos * *f as f32) as f64;
                        angles.push(a);
                        angles.push(a);
                    }
                }
            }
        }
        let cos: Vec<f32> = angles.iter().map(|a| (*a as f32).cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| (*a as f32).sin()).collect();
        let host = (device.is_cpu() && dtype == DType::F32).then(|| super::ops::RopeTables {
            cos: std::sync::Arc::new(cos.clone()),
            sin: std::sync::Arc::new(sin.clone()),
        });
        let cos = Tensor::from_vec(cos, (n, head_dim), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, head_dim), device)?.to_dtype(dtype)?;
        let pick_even = |t: &Tensor| -> Result<Tensor> {
            t.reshape((n, head_dim / 2, 2))?
                .narrow(2, 0, 1)?
                .squeeze(2)?
                .contiguous()
        };
        Ok(Self {
            cos_half: pick_even(&cos)?,
            sin_half: pick_even(&sin)?,
            cos,
            sin,
            host,
        })
    }

    /// The f32 host tables for [`super::ops::attention_qkv`] (f32 CPU models only).
    pub fn host_tables(&self) -> Option<&super::ops::RopeTables> {
        self.host.as_ref()
    }

    /// `[N, dh]` cos and sin tables (compare with the stored buffers).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// x: `[B, H, N, dh]`.
    pub fn apply(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            return candle_nn::rotary_emb::rope_i(&x.contiguous()?, &self.cos_half, &self.sin_half);
        }
        let (b, h, n, d) = x.dims4()?;
        let pairs = x.reshape((b, h, n, d / 2, 2))?;
        let x0 = pairs.narrow(4, 0, 1)?;
        let x1 = pairs.narrow(4, 1, 1)?;
        let rot = Tensor::cat(&[&x1.neg()?, &x0], 4)?.reshape((b, h, n, d))?;
        x.broadcast_mul(&self.cos)?
            .broadcast_add(&rot.broadcast_mul(&self.sin)?)
    }
}

/// Gaussian-Fourier time embedding: fixed frequencies `W` (frozen), then
/// [sin(2πtW), cos(2πtW)] -> Linear -> SiLU -> Linear.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    w: Tensor,
    fc1: Linear,
    fc2: Linear,
}

impl TimestepEmbedder {
    /// Number of Fourier features, 128 sin + 128 cos (reference `frequency_embedding_size`).
    pub const EMBEDDING_SIZE: usize = 256;

    /// Frozen `W` (`N(0, 1)` when not loaded) and the MLP `mlp.0`/`mlp.2`
    /// (`N(0, 0.02)` init), mapping to width `hidden`.
    pub fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        let e = Self::EMBEDDING_SIZE;
        // The frequencies stay f32 whatever the model dtype: 2*pi*t*W reaches
        // tens of radians, where a bf16 argument is off by ~0.1 rad.
        let w = vb
            .clone()
            .set_dtype(DType::F32)
            .get_with_hints(
                e,
                "W",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?
            .detach();
        let fc1 = Linear::new(
            2 * e,
            hidden,
            true,
            LinearInit::Normal(0.02),
            vb.pp("mlp.0"),
        )?;
        let fc2 = Linear::new(
            hidden,
            hidden,
            true,
            LinearInit::Normal(0.02),
            vb.pp("mlp.2"),
        )?;
        Ok(Self { w, fc1, fc2 })
    }

    /// t: `[B]` (any float dtype) -> `[B, hidden]` in the model dtype. The
    /// sin/cos features are computed in f32 and rounded once.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let emb = self.features(t)?.to_dtype(self.fc1.weight().dtype())?;
        self.fc2
            .forward(&candle_nn::ops::silu(&self.fc1.forward(&emb)?)?)
    }
}

impl TimestepEmbedder {
    /// The f32 Fourier features [sin(2πtW), cos(2πtW)] `[B, 2*256]`.
    pub fn features(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        let w = self.w.to_dtype(DType::F32)?;
        let arg =
            (t.unsqueeze(1)?.broadcast_mul(&w.unsqueeze(0)?)? * (2.0 * std::f64::consts::PI))?;
        Tensor::cat(&[arg.sin()?, arg.cos()?], D::Minus1)
    }
}

/// Class label table with `num_classes + 1` rows; row `num_classes` is the
/// null (unconditional) class. Label dropout is the caller's business
/// (replace labels by `num_classes`).
#[derive(Debug, Clone)]
pub struct LabelEmbedder {
    table: Tensor,
}

impl LabelEmbedder {
    /// `embedding_table.weight` `[num_classes + 1, hidden]` (`N(0, 0.02)` init).
    pub fn new(num_classes: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let table = vb.get_with_hints(
            (num_classes + 1, hidden),
            "embedding_table.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        Ok(Self { table })
    }

    /// Integer labels `[B]` (any dtype, cast to u32) -> `[B, hidden]`.
    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        self.table
            .index_select(&y.to_dtype(DType::U32)?.flatten_all()?, 0)
    }
}

/// `[B, C, H, W]` -> `[B, (H/p)*(W/p), C*p*p]`, channel order (c, ph, pw) as
/// a conv weight flattens.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    if p == 1 {
        return x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous();
    }
    x.reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, gh * gw, c * p * p))
}

/// `[B, T, p*p*c]` (per token (p, q, c)) -> `[B, c, g*p, g*p]`, g = sqrt(T).
pub fn unpatchify(x: &Tensor, p: usize, c: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let g = (t as f64).sqrt().round() as usize;
    if g * g != t {
        candle_core::bail!("unpatchify: {t} tokens is not a square grid");
    }
    if p == 1 {
        return x.transpose(1, 2)?.reshape((b, c, g, g));
    }
    x.reshape((b, g, g, p, p, c))?
        .permute((0, 5, 1, 3, 2, 4))?
        .reshape((b, c, g * p, g * p))
}

/// A patch embedding (timm `PatchEmbed`, key `proj`) as a linear map.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Linear,
    patch: usize,
}

impl PatchEmbed {
    /// A `patch x patch` stride-`patch` conv from `in_ch` to `hidden` channels, stored
    /// under `proj.{weight,bias}` in conv layout.
    pub fn new(in_ch: usize, hidden: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj: Linear::from_conv(in_ch, hidden, patch, vb.pp("proj"))?,
            patch,
        })
    }

    /// `[B, C, H, W]` -> tokens `[B, (H/p)*(W/p), hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&patchify(x, self.patch)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;

    #[test]
    fn sincos_matches_reference_formula() {
        // row 1 (h=0, w=1) of the reference get_2d_sincos_pos_embed(48, 4)
        let t = sincos_2d_table(48, 4);
        let row1 = &t[48..54];
        let want = [
            0.84147098, 0.44767083, 0.21378067, 0.09983342, 0.04639922, 0.02154268,
        ];
        for (a, b) in row1.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // second half of row 1 encodes h = 0: sin 0 = 0, cos 0 = 1
        assert!(t[72..84].iter().all(|v| v.abs() < 1e-7));
        assert!(t[84..96].iter().all(|v| (v - 1.0).abs() < 1e-7));
    }

    #[test]
    fn rope_fused_equals_differentiable_and_rotates_pairs() {
        let dev = Device::Cpu;
        let r = Rope2d::new(8, 3, &dev, DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 2, 9, 8), &dev).unwrap();
        let a = r.apply(&x, false).unwrap();
        let b = r.apply(&x, true).unwrap();
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-6, "{d}");
        // token 0 sits at (0,0): rotation by angle 0 is the identity
        let y0 = r.apply(&x, false).unwrap().narrow(2, 0, 1).unwrap();
        assert!(max_abs_diff(&y0, &x.narrow(2, 0, 1).unwrap()) < 1e-7);
    }

    #[test]
    fn time_features_stay_f32_in_a_bf16_model() {
        // Large frequencies: 2*pi*t*W reaches ~60 rad, where a bf16
        // argument would be off by up to 0.125 rad.
        let dev = Device::Cpu;
        let e = TimestepEmbedder::EMBEDDING_SIZE;
        let h = 8;
        let w: Vec<f32> = (0..e).map(|i| 10.0 * (i as f32 * 0.37).sin()).collect();
        let mut ts = std::collections::HashMap::new();
        ts.insert("W".to_string(), Tensor::from_vec(w, e, &dev).unwrap());
        for (name, shape) in [("mlp.0", (h, 2 * e)), ("mlp.2", (h, h))] {
            ts.insert(
                format!("{name}.weight"),
                Tensor::randn(0f32, 0.02, shape, &dev).unwrap(),
            );
            ts.insert(
                format!("{name}.bias"),
                Tensor::zeros(h, DType::F32, &dev).unwrap(),
            );
        }
        let t = Tensor::new(&[0.9137f32, 0.377, 0.0021], &dev).unwrap();
        let mk =
            |dt| TimestepEmbedder::new(h, VarBuilder::from_tensors(ts.clone(), dt, &dev)).unwrap();
        let (f32_emb, bf16_emb) = (mk(DType::F32), mk(DType::BF16));
        let a = f32_emb.features(&t).unwrap();
        let b = bf16_emb.features(&t).unwrap();
        assert_eq!(b.dtype(), DType::F32);
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        assert_eq!(bf16_emb.forward(&t).unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn patchify_unpatchify_roundtrip() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 8.0 * 8.0, &dev)
            .unwrap()
            .reshape((2, 3, 8, 8))
            .unwrap();
        for p in [1, 2, 4] {
            let t = patchify(&x, p).unwrap();
            assert_eq!(t.dims(), &[2, 64 / (p * p), 3 * p * p]);
            // unpatchify expects (p, q, c) per token; patchify gives (c, p, q)
            let (b, n, _) = t.dims3().unwrap();
            let t = t
                .reshape((b, n, 3, p, p))
                .unwrap()
                .permute((0, 1, 3, 4, 2))
                .unwrap()
                .reshape((b, n, 3 * p * p))
                .unwrap();
            let y = unpatchify(&t, p, 3).unwrap();
            let d = max_abs_diff(&y, &x);
            assert_eq!(d, 0.0, "p={p}");
        }
    }
}
