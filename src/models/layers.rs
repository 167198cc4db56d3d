//! Differentiable building blocks shared by LightningDiT, DiT-DH and the RAE
//! decoder. Every block has a default path built only from ops with a
//! backward pass; `fused = true` switches to candle's fused kernels (faster,
//! inference only: they silently drop gradients).

use candle_core::{D, DType, Module, Result, Tensor};

use crate::precision::is_half;
use candle_nn::{Init, VarBuilder};

/// How a linear layer is initialised when the VarBuilder has no stored value
/// (training from scratch); loading ignores it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinearInit {
    /// xavier-uniform weight, zero bias (the reference `_basic_init`).
    Xavier,
    /// normal(0, std) weight, zero bias.
    Normal(f64),
    /// all zeros (the reference zero-inits adaLN and output layers).
    Zero,
}

/// y = x W^T + b, with reference-style initialisation hints.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// `weight` `[out_dim, in_dim]` and optional `bias` `[out_dim]` from `vb`, created
    /// with `init` when absent.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init: LinearInit,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w_init = match init {
            LinearInit::Xavier => {
                let bound = (6.0 / (in_dim + out_dim) as f64).sqrt();
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                }
            }
            LinearInit::Normal(stdev) => Init::Randn { mean: 0.0, stdev },
            LinearInit::Zero => Init::Const(0.0),
        };
        let w = vb.get_with_hints((out_dim, in_dim), "weight", w_init)?;
        let b = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            inner: candle_nn::Linear::new(w, b),
        })
    }

    /// A linear layer stored as a 1x1.. conv weight `[out, in, p, p]` (timm
    /// PatchEmbed), flattened to `[out, in*p*p]`.
    pub fn from_conv(in_ch: usize, out_dim: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        let fan_in = in_ch * patch * patch;
        let bound = (6.0 / (fan_in + out_dim) as f64).sqrt();
        let w = vb.get_with_hints(
            (out_dim, in_ch, patch, patch),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let w = w.reshape((out_dim, fan_in))?;
        let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            inner: candle_nn::Linear::new(w, Some(b)),
        })
    }

    /// The weight `[out_dim, in_dim]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[out_dim]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// The layers side by side: one layer whose output is theirs
    /// concatenated on the last dim (one GEMM instead of several). On
    /// variables the concatenation is part of the graph (gradients reach
    /// each part).
    pub fn stack(parts: &[&Linear]) -> Result<Self> {
        let ws: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
        let bs: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias()).collect();
        Ok(Self {
            inner: candle_nn::Linear::new(
                Tensor::cat(&ws, 0)?,
                bs.map(|b| Tensor::cat(&b, 0)).transpose()?,
            ),
        })
    }

    /// Output rows `start..start + len` of this layer as a layer of its own
    /// (views of the weight and bias: gradients flow back into them).
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        let w = self.inner.weight().narrow(0, start, len)?;
        let b = match self.inner.bias() {
            Some(b) => Some(b.narrow(0, start, len)?),
            None => None,
        };
        Ok(Self {
            inner: candle_nn::Linear::new(w, b),
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One 2D GEMM over all leading dims: faster than candle's batched
        // broadcast matmul, and avoids its wrong results on some transposed
        // (non-contiguous) inputs in candle 0.11 (e.g. [B,C,T]->[B,T,C]).
        if super::ops::applies(&[x, self.inner.weight()]) {
            return super::ops::linear(x, self.inner.weight(), self.inner.bias());
        }
        let dims = x.dims().to_vec();
        let Some((&in_dim, lead)) = dims.split_last() else {
            candle_core::bail!("linear: scalar input");
        };
        let rows: usize = lead.iter().product();
        let x2 = x.contiguous()?.reshape((rows, in_dim))?;
        let w = self.inner.weight();
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = self.inner.bias() {
            y = y.broadcast_add(b)?;
        }
        let mut out = lead.to_vec();
        out.push(w.dim(0)?);
        y.reshape(out)
    }
}

/// The normalisations used by the models.
#[derive(Debug, Clone)]
pub enum Norm {
    /// RMSNorm with a learned scale (reference `RMSNorm`, no bias).
    Rms {
        /// Per-channel scale `[dim]`.
        weight: Tensor,
        /// Added to the mean square before the root.
        eps: f64,
    },
    /// LayerNorm; `affine` is None for `elementwise_affine=False`.
    Layer {
        /// Per-channel `(weight, bias)`, each `[dim]`.
        affine: Option<(Tensor, Tensor)>,
        /// Added to the variance before the root.
        eps: f64,
    },
}

impl Norm {
    /// RMSNorm over `dim` channels; scale `weight` initialised to ones.
    pub fn rms(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self::Rms {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            eps,
        })
    }

    /// LayerNorm over `dim` channels with affine `weight` (ones) and `bias` (zeros).
    pub fn layer(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let b = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self::Layer {
            affine: Some((w, b)),
            eps,
        })
    }

    /// LayerNorm without learned parameters (reference `elementwise_affine=False`).
    pub fn layer_no_affine(eps: f64) -> Self {
        Self::Layer { affine: None, eps }
    }

    /// RMSNorm (learned scale) or LayerNorm without affine, as the DiT
    /// blocks choose with `use_rmsnorm`.
    pub fn dit(dim: usize, use_rms: bool, vb: VarBuilder) -> Result<Self> {
        if use_rms {
            Self::rms(dim, 1e-6, vb)
        } else {
            Ok(Self::layer_no_affine(1e-6))
        }
    }

    /// What [`super::ops::norm_modulate`] needs: the kind, a `[dim]` weight
    /// (ones for LayerNorm without affine) and eps; None for a LayerNorm with
    /// affine (not fused).
    pub fn fused_parts(
        &self,
        dim: usize,
        x: &Tensor,
    ) -> Result<Option<(super::ops::NormKind, Tensor, f64)>> {
        Ok(match self {
            Self::Rms { weight, eps } => Some((super::ops::NormKind::Rms, weight.clone(), *eps)),
            Self::Layer { affine: None, eps } => Some((
                super::ops::NormKind::Layer,
                Tensor::ones(dim, x.dtype(), x.device())?,
                *eps,
            )),
            Self::Layer {
                affine: Some(_), ..
            } => None,
        })
    }

    /// Normalise over the last dim; half inputs are normalised in f32 unless a fused
    /// kernel already keeps f32 statistics. `fused`: inference only (no backward).
    pub fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        let dt = x.dtype();
        // Half inputs: candle's fused LayerNorm keeps its statistics in f32
        // (CPU and CUDA), and so does its CUDA RMSNorm; its CPU RMSNorm
        // divides in the half type and the differentiable path would reduce
        // in it, so those run in f32 and round once at the end.
        let native = fused && (matches!(self, Self::Layer { .. }) || x.device().is_cuda());
        if is_half(dt) && !native {
            let up = |t: &Tensor| t.to_dtype(DType::F32);
            let f32_norm = match self {
                Self::Rms { weight, eps } => Self::Rms {
                    weight: up(weight)?,
                    eps: *eps,
                },
                Self::Layer { affine, eps } => Self::Layer {
                    affine: match affine {
                        Some((w, b)) => Some((up(w)?, up(b)?)),
                        None => None,
                    },
                    eps: *eps,
                },
            };
            return f32_norm.forward_native(&up(x)?, fused)?.to_dtype(dt);
        }
        self.forward_native(x, fused)
    }

    /// The norm in `x`'s own dtype.
    fn forward_native(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        match self {
            Self::Rms { weight, eps } => {
                if fused {
                    candle_nn::ops::rms_norm(&x.contiguous()?, weight, *eps as f32)
                } else {
                    rms_norm_diff(x, weight, *eps)
                }
            }
            Self::Layer { affine, eps } => {
                if fused {
                    let dim = x.dim(D::Minus1)?;
                    let (w, b) = match affine {
                        Some((w, b)) => (w.clone(), b.clone()),
                        None => (
                            Tensor::ones(dim, x.dtype(), x.device())?,
                            Tensor::zeros(dim, x.dtype(), x.device())?,
                        ),
                    };
                    candle_nn::ops::layer_norm(&x.contiguous()?, &w, &b, *eps as f32)
                } else {
                    let y = layer_norm_diff(x, *eps)?;
                    match affine {
                        Some((w, b)) => y.broadcast_mul(w)?.broadcast_add(b),
                        None => Ok(y),
                    }
                }
            }
        }
    }
}

/// x * rsqrt(mean(x^2) + eps) * w, from differentiable ops.
pub fn rms_norm_diff(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// (x - mean) / sqrt(var + eps) over the last dim (biased variance), no affine.
pub fn layer_norm_diff(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

/// x * (1 + scale) + shift; `shift`/`scale` broadcast over tokens (`[B, 1, D]`)
/// or are per token (`[B, N, D]`, the DiT-DH head). `shift` None: no shift.
pub fn modulate(x: &Tensor, shift: Option<&Tensor>, scale: &Tensor) -> Result<Tensor> {
    let y = x.broadcast_mul(&(scale + 1.0)?)?;
    match shift {
        Some(s) => y.broadcast_add(s),
        None => Ok(y),
    }
}

/// The feed-forward of a DiT block: SwiGLU (`w12`, `w3`) or the timm MLP
/// (`fc1`, tanh-GELU, `fc2`).
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// `w3(silu(a) * b)` where `w12(x)` = `[a | b]`.
    SwiGlu {
        /// Fused gate and value projection, `dim -> 2h`.
        w12: Linear,
        /// Output projection, `h -> dim`.
        w3: Linear,
    },
    /// `fc2(gelu_tanh(fc1(x)))`.
    Gelu {
        /// `dim -> hidden`.
        fc1: Linear,
        /// `hidden -> dim`.
        fc2: Linear,
    },
}

impl FeedForward {
    /// `mlp_ratio` as the reference: hidden = int(dim*ratio), SwiGLU uses
    /// int(2/3 * hidden).
    pub fn new(dim: usize, mlp_ratio: f64, swiglu: bool, vb: VarBuilder) -> Result<Self> {
        let hidden = (dim as f64 * mlp_ratio) as usize;
        if swiglu {
            let h = (2.0 / 3.0 * hidden as f64) as usize;
            Ok(Self::SwiGlu {
                w12: Linear::new(dim, 2 * h, true, LinearInit::Xavier, vb.pp("w12"))?,
                w3: Linear::new(h, dim, true, LinearInit::Xavier, vb.pp("w3"))?,
            })
        } else {
            Ok(Self::Gelu {
                fc1: Linear::new(dim, hidden, true, LinearInit::Xavier, vb.pp("fc1"))?,
                fc2: Linear::new(hidden, dim, true, LinearInit::Xavier, vb.pp("fc2"))?,
            })
        }
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::SwiGlu { w12, w3 } if super::ops::applies(&[x]) => {
                w3.forward(&super::ops::swiglu(&w12.forward(x)?)?)
            }
            Self::SwiGlu { w12, w3 } => {
                let x12 = w12.forward(x)?;
                let h = x12.dim(D::Minus1)? / 2;
                let x1 = x12.narrow(D::Minus1, 0, h)?;
                let x2 = x12.narrow(D::Minus1, h, h)?;
                w3.forward(&(candle_nn::ops::silu(&x1)? * x2)?)
            }
            Self::Gelu { fc1, fc2 } => fc2.forward(&fc1.forward(x)?.gelu()?),
        }
    }
}

/// softmax(q k^T / sqrt(d)) v over `[B, H, N, Dh]` tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, fused: bool) -> Result<Tensor> {
    let dh = q.dim(D::Minus1)?;
    let q = (q * (1.0 / (dh as f64).sqrt()))?;
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    // Softmax in f32 whatever the compute dtype (as PyTorch's SDPA math
    // path): candle's CPU half softmax sums the exponentials in the half type.
    let dt = scores.dtype();
    let scores = if is_half(dt) {
        scores.to_dtype(DType::F32)?
    } else {
        scores
    };
    let probs = if fused {
        candle_nn::ops::softmax_last_dim(&scores)?
    } else {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    };
    probs.to_dtype(dt)?.matmul(&v.contiguous()?)
}

/// `[B, N, H*Dh]` -> `[B, H, N, Dh]`
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))?.transpose(1, 2)
}

/// `[B, H, N, Dh]` -> `[B, N, H*Dh]`
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, h * d))
}
