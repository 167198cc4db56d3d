//! The pre-LayerNorm ViT block shared by DINOv2, SigLIP's vision tower and
//! ViT-MAE (inference only: uses candle's fused LayerNorm / softmax).
//! Each family names its parameters differently; `BlockNames` maps them.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::activation::Activation;
use crate::models::ops;

/// `y = x W^T + b` on the last dimension. Leading dimensions are folded into
/// one so a batch is a single large matrix product.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, as stored by PyTorch.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }

    /// `act(x W^T + b)`, bias and activation fused on CPU.
    pub fn forward_act(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let in_dim = x.dim(D::Minus1)?;
        let dims = x.dims();
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match (&self.bias, act) {
            (Some(b), _) => super::fused::bias_act(&y, b, act)?,
            (None, Some(a)) => a.apply(&y)?,
            (None, None) => y,
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out_dims)
    }
}

/// Parameter names of one block, relative to the block's prefix.
#[derive(Debug, Clone, Copy)]
pub struct BlockNames {
    pub norm1: &'static str,
    pub norm2: &'static str,
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub out: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    /// DINOv2's SwiGLU FFN (`use_swiglu_ffn`).
    pub swiglu_in: &'static str,
    pub swiglu_out: &'static str,
    /// DINOv2's layer scale (`lambda1` below these).
    pub scale1: Option<&'static str>,
    pub scale2: Option<&'static str>,
}

/// Shapes and options of one block.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub hidden: usize,
    pub heads: usize,
    /// Width of the hidden MLP layer (for SwiGLU: of each half).
    pub mlp_hidden: usize,
    pub eps: f64,
    pub act: Activation,
    pub qkv_bias: bool,
    pub swiglu: bool,
}

/// Multi-head self-attention with q/k/v fused into one projection at load
/// time (one matmul instead of three).
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn load(vb: &VarBuilder, cfg: &BlockConfig, names: &BlockNames) -> Result<Self> {
        let c = cfg.hidden;
        let q = Linear::load(vb.pp(names.query), c, c, cfg.qkv_bias)?;
        let k = Linear::load(vb.pp(names.key), c, c, cfg.qkv_bias)?;
        let v = Linear::load(vb.pp(names.value), c, c, cfg.qkv_bias)?;
        let weight = Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?;
        let bias = match (q.bias, k.bias, v.bias) {
            (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[&bq, &bk, &bv], 0)?),
            _ => None,
        };
        let out = Linear::load(vb.pp(names.out), c, c, true)?;
        let head_dim = c / cfg.heads;
        Ok(Self {
            qkv: Linear::new(weight, bias),
            out,
            heads: cfg.heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let d = c / self.heads;
        // [b, n, 3c] -> [3, b, heads, n, d]
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.heads, d))?
            .permute((2, 0, 3, 1, 4))?;
        // Scaling q (n*d values) is cheaper than scaling the n*n scores and
        // makes q contiguous at the same time.
        let q = (qkv.get(0)? * self.scale)?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = q.matmul(&k.t()?)?;
        // As transformers' eager attention: softmax in f32 whatever the dtype.
        let probs = if scores.dtype() == DType::F32 {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(scores.dtype())?
        };
        let o = probs.matmul(&v)?; // [b, heads, n, d]
        let o = o.transpose(1, 2)?.reshape((b, n, c))?;
        self.out.forward(&o)
    }
}

#[derive(Debug, Clone)]
enum Mlp {
    Plain {
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    },
    SwiGlu {
        w_in: Linear,
        w_out: Linear,
        hidden: usize,
    },
}

impl Mlp {
    fn load(vb: &VarBuilder, cfg: &BlockConfig, names: &BlockNames) -> Result<Self> {
        let c = cfg.hidden;
        let h = cfg.mlp_hidden;
        if cfg.swiglu {
            Ok(Self::SwiGlu {
                w_in: Linear::load(vb.pp(names.swiglu_in), c, 2 * h, true)?,
                w_out: Linear::load(vb.pp(names.swiglu_out), h, c, true)?,
                hidden: h,
            })
        } else {
            Ok(Self::Plain {
                fc1: Linear::load(vb.pp(names.fc1), c, h, true)?,
                fc2: Linear::load(vb.pp(names.fc2), h, c, true)?,
                act: cfg.act,
            })
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain { fc1, fc2, act } => fc2.forward(&fc1.forward_act(x, Some(*act))?),
            Self::SwiGlu {
                w_in,
                w_out,
                hidden,
            } => {
                let h = w_in.forward(x)?;
                let x1 = h.narrow(D::Minus1, 0, *hidden)?;
                let x2 = h.narrow(D::Minus1, *hidden, *hidden)?;
                w_out.forward(&(candle_nn::ops::silu(&x1)? * x2)?)
            }
        }
    }
}

/// Pre-LN transformer block: x + s1*attn(ln1(x)), then + s2*mlp(ln2(x)).
/// The layer scales s1, s2 (DINOv2) are folded into the attention output
/// projection and the MLP's last layer at load.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

/// `s * (x W^T + b)` as one layer: rows of W and b scaled by `s` (in f32).
fn fold_scale(l: Linear, s: &Tensor) -> Result<Linear> {
    let dt = l.weight.dtype();
    let s = s.to_dtype(DType::F32)?;
    let w = l
        .weight
        .to_dtype(DType::F32)?
        .broadcast_mul(&s.unsqueeze(1)?)?
        .to_dtype(dt)?;
    let b = match l.bias {
        Some(b) => Some((b.to_dtype(DType::F32)? * &s)?.to_dtype(dt)?),
        None => None,
    };
    Ok(Linear::new(w, b))
}

fn layer_norm(vb: VarBuilder, c: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(c, "weight")?,
        vb.get(c, "bias")?,
        eps,
    ))
}

impl Block {
    pub fn load(vb: VarBuilder, cfg: &BlockConfig, names: &BlockNames) -> Result<Self> {
        let c = cfg.hidden;
        let scale = |name: Option<&str>| -> Result<Option<Tensor>> {
            name.map(|n| vb.pp(n).get(c, "lambda1")).transpose()
        };
        let mut attn = Attention::load(&vb, cfg, names)?;
        if let Some(s) = scale(names.scale1)? {
            attn.out = fold_scale(attn.out, &s)?;
        }
        let mut mlp = Mlp::load(&vb, cfg, names)?;
        if let Some(s) = scale(names.scale2)? {
            mlp = match mlp {
                Mlp::Plain { fc1, fc2, act } => Mlp::Plain {
                    fc1,
                    fc2: fold_scale(fc2, &s)?,
                    act,
                },
                Mlp::SwiGlu {
                    w_in,
                    w_out,
                    hidden,
                } => Mlp::SwiGlu {
                    w_in,
                    w_out: fold_scale(w_out, &s)?,
                    hidden,
                },
            };
        }
        Ok(Self {
            norm1: layer_norm(vb.pp(names.norm1), c, cfg.eps)?,
            attn,
            norm2: layer_norm(vb.pp(names.norm2), c, cfg.eps)?,
            mlp,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x)? {
            return Ok(y);
        }
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + m
    }

    /// f32 CPU: the block as four kernels (qkv projection, attention,
    /// projection + residual, MLP + residual); None where they do not
    /// apply (other devices and dtypes, SwiGLU, no biases).
    fn forward_cpu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (Mlp::Plain { fc1, fc2, act }, Some(ob)) = (&self.mlp, &self.attn.out.bias) else {
            return Ok(None);
        };
        let (Some(b1), Some(b2)) = (&fc1.bias, &fc2.bias) else {
            return Ok(None);
        };
        let qkv = &self.attn.qkv;
        if !ops::infer::applies(&[x, &qkv.weight, &fc1.weight]) {
            return Ok(None);
        }
        let h = self.norm1.forward(x)?;
        let a = ops::attention_qkv(
            &ops::linear(&h, &qkv.weight, qkv.bias.as_ref())?,
            self.attn.heads,
            None,
        )?;
        let x = ops::infer::linear_residual(x, &a, &self.attn.out.weight, ob)?;
        let h = self.norm2.forward(&x)?;
        let mlp = ops::infer::MlpWeights {
            fc1: (&fc1.weight, b1),
            act: *act,
            fc2: (&fc2.weight, b2),
        };
        ops::infer::mlp_residual(&x, &h, mlp).map(Some)
    }
}

/// Conv2d with kernel = stride = patch, written as patchify + one matmul so
/// it needs nothing beyond reshape/permute/matmul on any backend.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Linear,
    patch: usize,
    channels: usize,
}

impl PatchEmbed {
    pub fn load(vb: VarBuilder, channels: usize, hidden: usize, patch: usize) -> Result<Self> {
        let w = vb.get((hidden, channels, patch, patch), "weight")?;
        let b = vb.get(hidden, "bias")?;
        let w = w.reshape((hidden, channels * patch * patch))?;
        Ok(Self {
            proj: Linear::new(w, Some(b)),
            patch,
            channels,
        })
    }

    /// `[B, ch, H, W]` -> `[B, (H/p)*(W/p), hidden]`, tokens row-major.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, ch, h, w) = x.dims4()?;
        let p = self.patch;
        if ch != self.channels || h % p != 0 || w % p != 0 {
            candle_core::bail!(
                "patch embed: input {:?} for {} channels, patch {p}",
                x.dims(),
                self.channels
            );
        }
        let (gh, gw) = (h / p, w / p);
        let cols = x
            .reshape((b, ch, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, ch * p * p))?;
        self.proj.forward(&cols)
    }
}

/// LayerNorm over the last dim without affine parameters (the RAE latent:
/// final norm with weight 1, bias 0), computed in f32.
#[derive(Debug, Clone)]
pub struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
    eps: f64,
}

impl PlainLayerNorm {
    pub fn new(c: usize, eps: f64, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(c, DType::F32, device)?,
            zeros: Tensor::zeros(c, DType::F32, device)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        candle_nn::ops::layer_norm(&x, &self.ones, &self.zeros, self.eps as f32)
    }
}
