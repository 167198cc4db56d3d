//! The RAE ViT decoder (reference `stage1.decoders.GeneralDecoder`, HF
//! ViTMAE decoder key names): linear embed of the latent tokens, a learned
//! CLS token prepended, fixed 2D sin-cos positions, pre-LN ViT layers with
//! GELU, final LayerNorm, linear to p*p*3 per token, unpatchify, then
//! de-normalisation with the encoder's image mean/std (no clamp, as the
//! reference `RAE.decode`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::embed::{frozen_or, sincos_2d, unpatchify};
use super::layers::{Linear, LinearInit, Norm, attention, merge_heads, split_heads};
use super::ops;
use crate::encoders::Activation;

/// Per-channel RGB mean the encoder normalises images with (ImageNet; DINOv2, MAE).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel RGB std the encoder normalises images with (ImageNet; DINOv2, MAE).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn ln_eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}
fn imagenet_mean() -> [f32; 3] {
    IMAGENET_MEAN
}
fn imagenet_std() -> [f32; 3] {
    IMAGENET_STD
}

/// Keys as the fixture `decoder.json` (`latent_dim` is the reference's
/// `hidden_size`, the encoder width).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Width of the input latent tokens (the encoder's hidden size; 768 for DINOv2-B).
    pub latent_dim: usize,
    /// Width of the decoder ViT (768/1024/1152 for ViT-B/L/XL).
    pub decoder_hidden_size: usize,
    /// Number of ViT layers (12/24/28 for ViT-B/L/XL).
    pub decoder_num_hidden_layers: usize,
    /// Attention heads per layer (12/16/16 for ViT-B/L/XL).
    pub decoder_num_attention_heads: usize,
    /// MLP hidden width (3072/4096/4096 for ViT-B/L/XL).
    pub decoder_intermediate_size: usize,
    /// Pixel patch side each latent token decodes to (16 gives 256 px from 256 tokens).
    pub patch_size: usize,
    /// Latent tokens per image, a square number (256 for a 16x16 grid).
    pub num_patches: usize,
    /// LayerNorm epsilon (default 1e-12, as HF ViTMAE).
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
    /// MLP activation, HF name (default `gelu`).
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// RGB mean the output pixels are de-normalised with (default ImageNet).
    #[serde(default = "imagenet_mean")]
    pub image_mean: [f32; 3],
    /// RGB std the output pixels are de-normalised with (default ImageNet).
    #[serde(default = "imagenet_std")]
    pub image_std: [f32; 3],
}

impl DecoderConfig {
    /// Reference `configs/decoder/ViT{B,L,XL}` for `latent_dim` 768 and 256
    /// latent tokens; `patch_size` 16 gives 256 px, 32 gives 512 px.
    /// ImageNet mean/std (DINOv2, MAE); set `image_mean/std` to 0.5 for SigLIP2.
    pub fn preset(name: &str, patch_size: usize) -> Option<Self> {
        let (w, d, h, m) = match name.to_ascii_uppercase().replace(['-', '_'], "").as_str() {
            "VITB" => (768, 12, 12, 3072),
            "VITL" => (1024, 24, 16, 4096),
            "VITXL" => (1152, 28, 16, 4096),
            _ => return None,
        };
        Some(Self {
            latent_dim: 768,
            decoder_hidden_size: w,
            decoder_num_hidden_layers: d,
            decoder_num_attention_heads: h,
            decoder_intermediate_size: m,
            patch_size,
            num_patches: 256,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            image_mean: IMAGENET_MEAN,
            image_std: IMAGENET_STD,
        })
    }

    /// Output image side in pixels (`grid * patch_size`).
    pub fn image_size(&self) -> usize {
        self.grid() * self.patch_size
    }

    /// Side of the square latent token grid (`sqrt(num_patches)`).
    pub fn grid(&self) -> usize {
        (self.num_patches as f64).sqrt().round() as usize
    }
}

#[derive(Debug, Clone)]
struct VitLayer {
    ln_before: Norm,
    ln_after: Norm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    fc1: Linear,
    fc2: Linear,
    /// q, k and v as one projection (rows q | k | v, the layout
    /// [`ops::attention_qkv`] reads), stacked once when the weights are
    /// plain tensors; on variables (training) it is stacked per forward so
    /// that gradients reach each part.
    qkv: Option<Linear>,
    heads: usize,
    act: Activation,
}

impl VitLayer {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.decoder_hidden_size;
        let m = cfg.decoder_intermediate_size;
        let a = vb.pp("attention");
        let lin = |i, o, vb| Linear::new(i, o, true, LinearInit::Xavier, vb);
        let Some(act) = Activation::from_hf(&cfg.hidden_act) else {
            candle_core::bail!("decoder: unsupported hidden_act {:?}", cfg.hidden_act)
        };
        let (query, key, value) = (
            lin(d, d, a.pp("attention.query"))?,
            lin(d, d, a.pp("attention.key"))?,
            lin(d, d, a.pp("attention.value"))?,
        );
        let qkv = if query.weight().is_variable() {
            None
        } else {
            Some(Linear::stack(&[&query, &key, &value])?)
        };
        Ok(Self {
            ln_before: Norm::layer(d, cfg.layer_norm_eps, vb.pp("layernorm_before"))?,
            ln_after: Norm::layer(d, cfg.layer_norm_eps, vb.pp("layernorm_after"))?,
            query,
            key,
            value,
            qkv,
            out: lin(d, d, a.pp("output.dense"))?,
            fc1: lin(d, m, vb.pp("intermediate.dense"))?,
            fc2: lin(m, d, vb.pp("output.dense"))?,
            heads: cfg.decoder_num_attention_heads,
            act,
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if ops::applies(&[x, self.out.weight()]) {
            return self.forward_cpu(x, fused);
        }
        let h = self.ln_before.forward(x, fused)?;
        let q = split_heads(&self.query.forward(&h)?, self.heads)?;
        let k = split_heads(&self.key.forward(&h)?, self.heads)?;
        let v = split_heads(&self.value.forward(&h)?, self.heads)?;
        let a = self
            .out
            .forward(&merge_heads(&attention(&q, &k, &v, fused)?)?)?;
        let x = (x + a)?;
        let h = self.fc1.forward(&self.ln_after.forward(&x, fused)?)?;
        x + self.fc2.forward(&self.act.apply(&h)?)?
    }

    /// f32 CPU: the fused kernels of [`ops`], which have backward passes;
    /// without a graph to record, whole sub-layers run as single
    /// inference kernels ([`ops::infer`]).
    fn forward_cpu(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        let h = self.ln_before.forward(x, fused)?;
        let qkv = match &self.qkv {
            Some(qkv) => qkv.forward(&h)?,
            None => Linear::stack(&[&self.query, &self.key, &self.value])?.forward(&h)?,
        };
        let a = ops::attention_qkv(&qkv, self.heads, None)?;
        let (Some(out_b), Some(b1), Some(b2)) = (self.out.bias(), self.fc1.bias(), self.fc2.bias())
        else {
            candle_core::bail!("decoder layer without biases");
        };
        let plain = [x, self.out.weight(), self.fc1.weight(), self.fc2.weight()];
        if !ops::infer::applies(&plain) {
            let x = (x + self.out.forward(&a)?)?;
            let h = self.fc1.forward(&self.ln_after.forward(&x, fused)?)?;
            return x + self.fc2.forward(&self.act.apply(&h)?)?;
        }
        let x = ops::infer::linear_residual(x, &a, self.out.weight(), out_b)?;
        let h = self.ln_after.forward(&x, fused)?;
        let mlp = ops::infer::MlpWeights {
            fc1: (self.fc1.weight(), b1),
            act: self.act,
            fc2: (self.fc2.weight(), b2),
        };
        ops::infer::mlp_residual(&x, &h, mlp)
    }
}

/// The RAE pixel decoder.
#[derive(Debug, Clone)]
pub struct RaeDecoder {
    cfg: DecoderConfig,
    embed: Linear,
    cls: Tensor,
    pos: Tensor,
    layers: Vec<VitLayer>,
    norm: Norm,
    pred: Linear,
    /// f32 `[1, 3, 1, 1]`.
    mean: Tensor,
    std: Tensor,
    fused: bool,
    /// Weights and activations (`vb.dtype()`).
    dtype: DType,
}

impl RaeDecoder {
    /// Build the decoder from `vb` (reference key names); a missing `decoder_pos_embed`
    /// is the fixed 2D sin-cos table with a zero CLS row.
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.decoder_hidden_size;
        let n = cfg.num_patches;
        let grid = cfg.grid();
        if grid * grid != n {
            candle_core::bail!("decoder: num_patches {n} is not a square");
        }
        let dev = vb.device().clone();
        let pos = frozen_or(
            &vb,
            "decoder_pos_embed",
            &[1, n + 1, d],
            sincos_2d(d, grid, true, &dev)?,
        )?;
        Ok(Self {
            embed: Linear::new(
                cfg.latent_dim,
                d,
                true,
                LinearInit::Xavier,
                vb.pp("decoder_embed"),
            )?,
            cls: vb.get_with_hints((1, 1, d), "trainable_cls_token", Init::Const(0.0))?,
            pos,
            layers: (0..cfg.decoder_num_hidden_layers)
                .map(|i| VitLayer::new(cfg, vb.pp(format!("decoder_layers.{i}"))))
                .collect::<Result<_>>()?,
            norm: Norm::layer(d, cfg.layer_norm_eps, vb.pp("decoder_norm"))?,
            pred: Linear::new(
                d,
                cfg.patch_size * cfg.patch_size * 3,
                true,
                LinearInit::Xavier,
                vb.pp("decoder_pred"),
            )?,
            // Pixels are de-normalised in f32 whatever the compute dtype.
            mean: Tensor::from_slice(&cfg.image_mean, (1, 3, 1, 1), &dev)?,
            std: Tensor::from_slice(&cfg.image_std, (1, 3, 1, 1), &dev)?,
            dtype: vb.dtype(),
            cfg: cfg.clone(),
            fused: false,
        })
    }

    /// The config the decoder was built with.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The frozen position table under its reference name.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        vec![("decoder_pos_embed".to_string(), self.pos.clone())]
    }

    /// Use fused kernels (inference only: no gradients through them).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// The compute dtype (weights and activations).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Replace the position table (`[1, T+1, D]`), e.g. by a trainable
    /// variable: the reference trains it (its `requires_grad_(True)` on the
    /// whole decoder), which stage-1 training reproduces on request.
    pub fn set_pos_embed(&mut self, pos: Tensor) -> Result<()> {
        if pos.dims() != self.pos.dims() {
            candle_core::bail!(
                "decoder_pos_embed: {:?}, the decoder wants {:?}",
                pos.dims(),
                self.pos.dims()
            );
        }
        self.pos = pos;
        Ok(())
    }

    /// The output projection (`decoder_pred`), whose weight the stage-1
    /// adaptive GAN weight is measured on.
    pub fn pred(&self) -> &Linear {
        &self.pred
    }

    /// Raw latent tokens `[B, T, C]` (no latent statistics applied, any
    /// float dtype) -> pixel logits `[B, T, p*p*3]` in the compute dtype,
    /// before unpatchify / de-normalisation.
    pub fn forward_logits(&self, z: &Tensor) -> Result<Tensor> {
        self.pred.forward(&self.forward_hidden(z)?)
    }

    /// The hidden states `[B, T, D]` after the final LayerNorm, CLS dropped:
    /// the input of `decoder_pred`.
    pub fn forward_hidden(&self, z: &Tensor) -> Result<Tensor> {
        let (b, t, _) = z.dims3()?;
        if t != self.cfg.num_patches {
            candle_core::bail!("decoder expects {} tokens, got {t}", self.cfg.num_patches);
        }
        let x = self.embed.forward(&z.to_dtype(self.dtype)?)?;
        let cls = self
            .cls
            .broadcast_as((b, 1, self.cfg.decoder_hidden_size))?;
        let mut h = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos)?;
        for l in &self.layers {
            h = l.forward(&h, self.fused)?;
        }
        self.norm.forward(&h, self.fused)?.narrow(1, 1, t)
    }

    /// Pixel logits `[B, T, p*p*3]` -> de-normalised f32 pixels
    /// `[B, 3, H, W]` (unpatchify, then `* std + mean`).
    pub fn logits_to_pixels(&self, logits: &Tensor) -> Result<Tensor> {
        let img = unpatchify(&logits.to_dtype(DType::F32)?, self.cfg.patch_size, 3)?;
        img.broadcast_mul(&self.std)?.broadcast_add(&self.mean)
    }

    /// Raw latent tokens `[B, T, C]` -> de-normalised f32 pixels
    /// `[B, 3, H, W]` (about `[0, 1]`; not clamped).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.logits_to_pixels(&self.forward_logits(z)?)
    }
}
