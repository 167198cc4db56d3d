//! The generator (decoder) half of a stage-1 step, as the reference
//! (`train_stage1.py`): decode the noisy latent, `L1 = mean|recon - x|` on
//! [0,1] pixels, `LPIPS(2x-1, 2recon-1)`, `R = L1 + w_p * LPIPS`, and once
//! the adversarial term is on, `total = R + w_d * lambda * G` with the
//! VQGAN adaptive weight
//! `lambda = clamp(|dR/dW| / (|dG/dW| + 1e-6), 0, max_d_weight)` on
//! `W = decoder_pred.weight`. Then AdamW and the EMA.
//!
//! The adversarial loss `G` is a seam ([`AdversarialLoss`]): whatever maps
//! the [-1,1] reconstruction to a scalar (the DINO discriminator with
//! DiffAugment and `-mean(logits)` in the full recipe).
//!
//! One backward per loss and one through the decoder: the losses are
//! differentiated w.r.t. the pixel logits (`decoder_pred`'s output), the
//! gradients of `W` follow from those as `g^T h`, and the decoder is
//! differentiated once with the combined logit gradient. The reference
//! runs two extra backward passes (`autograd.grad` for each norm); the
//! gradients are the same.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::lpips::Lpips;
use super::noise::{NoiseAug, NoiseDraws};
use super::{Result, Stage1Error};
use crate::models::embed::sincos_2d;
use crate::models::state_dict::{fill_varmap, sorted_vars};
use crate::models::{DecoderConfig, RaeDecoder};
use crate::train::checkpoint::Checkpoint;
use crate::train::init::SeededVarMap;
use crate::train::{AdamWConfig, Gradients, OptimizedParams};

/// The reference's position-table name (frozen unless asked otherwise).
pub const POS_EMBED: &str = "decoder_pos_embed";
/// The adaptive weight's epsilon (the reference's; taming uses 1e-4).
const ADAPTIVE_EPS: f64 = 1e-6;

/// Loss weights (reference `gan.loss`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenLossConfig {
    /// LPIPS weight (`perceptual_weight`, 1.0).
    pub perceptual_weight: f64,
    /// Adversarial weight (`disc_weight`, 0.75).
    pub disc_weight: f64,
    /// Clamp of the adaptive weight (`max_d_weight`, 1e4).
    pub max_d_weight: f64,
}

impl Default for GenLossConfig {
    fn default() -> Self {
        Self {
            perceptual_weight: 1.0,
            disc_weight: 0.75,
            max_d_weight: 1e4,
        }
    }
}

/// The generator's adversarial loss: a scalar from the reconstruction
/// `[B, 3, H, W]` in [-1, 1], differentiable w.r.t. it (e.g.
/// `-mean(D(DiffAug(x)))`). Any `FnMut(&Tensor) -> Result<Tensor>` is one.
pub trait AdversarialLoss {
    /// The loss `G` for this reconstruction.
    fn generator_loss(&mut self, recon_pm1: &Tensor) -> candle_core::Result<Tensor>;
}

impl<F: FnMut(&Tensor) -> candle_core::Result<Tensor>> AdversarialLoss for F {
    fn generator_loss(&mut self, recon_pm1: &Tensor) -> candle_core::Result<Tensor> {
        self(recon_pm1)
    }
}

/// One batch: target images `[B, 3, H, W]` in [0, 1], raw latents
/// `[B, T, C]`, and the noise draws (`None`: no noise, evaluation).
#[derive(Debug, Clone)]
pub struct GenBatch {
    /// Target pixels in [0, 1].
    pub images: Tensor,
    /// Raw (un-normalised) latent tokens.
    pub z: Tensor,
    /// The noise augmentation's draws.
    pub noise: Option<NoiseDraws>,
}

/// The scalars of one generator step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenLosses {
    /// Mean absolute error on [0, 1] pixels.
    pub l1: f64,
    /// LPIPS (batch mean).
    pub lpips: f64,
    /// Adversarial loss `G` (0 when off).
    pub gan: f64,
    /// The adaptive weight lambda (0 when off).
    pub adaptive_weight: f64,
    /// `L1 + w_p LPIPS + w_d lambda G`.
    pub total: f64,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

/// Gradient of `loss` w.r.t. the logits leaf; an error naming `what` when
/// the loss does not depend on it.
fn grad_wrt(loss: &Tensor, leaf: &Var, what: &str) -> Result<Tensor> {
    let store = loss.backward()?;
    store.get(leaf.as_tensor()).cloned().ok_or_else(|| {
        Stage1Error::Invalid(format!("the {what} does not depend on the reconstruction"))
    })
}

/// `|g^T h|` (Frobenius): the norm of `decoder_pred.weight`'s gradient for a
/// logit gradient `g` `[B, T, O]` and pred inputs `h` `[B, T, I]`.
fn pred_weight_grad_norm(g: &Tensor, h: &Tensor) -> Result<f64> {
    let o = g.dim(D::Minus1)?;
    let i = h.dim(D::Minus1)?;
    let g2 = g.reshape(((), o))?;
    let h2 = h.reshape(((), i))?;
    let gw = g2.t()?.matmul(&h2)?;
    scalar(&gw.sqr()?.sum_all()?.sqrt()?)
}

/// The generator losses and the gradients of `params` (by name) for one
/// batch. `lpips`: the perceptual term, `None` when its weight is 0 (no
/// VGG needed). `adversarial`: the GAN term, `None` before its start.
pub fn generator_grads(
    decoder: &RaeDecoder,
    lpips: Option<&Lpips>,
    batch: &GenBatch,
    noise: NoiseAug,
    cfg: &GenLossConfig,
    adversarial: Option<&mut dyn AdversarialLoss>,
    params: &[(String, Var)],
) -> Result<(GenLosses, Gradients)> {
    let z = match &batch.noise {
        Some(d) => noise.apply(&batch.z, d)?,
        None => batch.z.clone(),
    };
    let hidden = decoder.forward_hidden(&z)?;
    let logits = candle_core::Module::forward(decoder.pred(), &hidden)?;
    // The losses are differentiated w.r.t. a detached copy of the logits.
    let leaf = Var::from_tensor(&logits.detach().to_dtype(DType::F32)?)?;
    let recon = decoder.logits_to_pixels(leaf.as_tensor())?;
    if recon.dims() != batch.images.dims() {
        return Err(Stage1Error::Invalid(format!(
            "decoder output {:?} vs target images {:?}",
            recon.dims(),
            batch.images.dims()
        )));
    }
    let x = batch.images.to_dtype(DType::F32)?;
    let l1 = (&recon - &x)?.abs()?.mean_all()?;
    let recon_pm1 = recon.affine(2.0, -1.0)?;
    let (rec_total, lp) = match lpips {
        Some(net) => {
            let lp = net.forward(&x.affine(2.0, -1.0)?, &recon_pm1)?;
            (
                (&l1 + lp.affine(cfg.perceptual_weight, 0.0)?)?,
                scalar(&lp)?,
            )
        }
        None => (l1.clone(), 0.0),
    };
    let g_rec = grad_wrt(&rec_total, &leaf, "reconstruction loss")?;
    let mut losses = GenLosses {
        l1: scalar(&l1)?,
        lpips: lp,
        total: scalar(&rec_total)?,
        ..Default::default()
    };
    let g_logits = match adversarial {
        Some(adv) if cfg.disc_weight > 0.0 => {
            let gan = adv.generator_loss(&recon_pm1)?;
            let g_gan = grad_wrt(&gan, &leaf, "adversarial loss")?;
            let h = hidden.detach().to_dtype(DType::F32)?;
            let n_rec = pred_weight_grad_norm(&g_rec, &h)?;
            let n_gan = pred_weight_grad_norm(&g_gan, &h)?;
            // f32 as torch computes it
            let lambda = ((n_rec as f32) / (n_gan as f32 + ADAPTIVE_EPS as f32))
                .clamp(0.0, cfg.max_d_weight as f32) as f64;
            let gan_v = scalar(&gan)?;
            losses.gan = gan_v;
            losses.adaptive_weight = lambda;
            let w = (cfg.disc_weight as f32 * lambda as f32) as f64;
            losses.total = scalar(&(rec_total + gan.affine(w, 0.0)?)?)?;
            (g_rec + g_gan.affine(w, 0.0)?)?
        }
        _ => g_rec,
    };
    let surrogate = (logits.to_dtype(DType::F32)? * g_logits.detach())?.sum_all()?;
    let store = surrogate.backward()?;
    let grads = Gradients::from_store(&store, params)?;
    Ok((losses, grads))
}

/// What a [`GeneratorState`] is built from.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Seed of a fresh initialisation.
    pub seed: u64,
    /// AdamW (reference: lr 2e-4, betas 0.9/0.95, eps 1e-8, wd 0).
    pub optimizer: AdamWConfig,
    /// EMA decay (reference 0.9978); `None`: no EMA.
    pub ema: Option<f64>,
    /// Global gradient-norm clip; 0 = none (the reference's `clip_grad: 0.0`).
    pub clip_grad: f64,
    /// Train `decoder_pos_embed` as the reference does (its
    /// `requires_grad_(True)` un-freezes the sin-cos table); default frozen.
    pub train_pos_embed: bool,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            optimizer: AdamWConfig::default(),
            ema: Some(0.9978),
            clip_grad: 0.0,
            train_pos_embed: false,
        }
    }
}

/// The decoder's f32 weights, AdamW and the EMA.
pub struct GeneratorState {
    decoder: RaeDecoder,
    _varmap: VarMap,
    params: OptimizedParams,
}

impl GeneratorState {
    /// A decoder from `weights` (reference names), or freshly initialised
    /// as PyTorch's defaults (Linear: U(+-1/sqrt(fan_in)) weight and bias;
    /// LayerNorm 1/0; CLS token 0; sin-cos positions) from `cfg.seed`.
    pub fn new(
        dec_cfg: &DecoderConfig,
        cfg: &GeneratorConfig,
        weights: Option<&HashMap<String, Tensor>>,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        if let Some(w) = weights {
            fill_varmap(&varmap, w, DType::F32)?;
        }
        let has_pos = varmap
            .data()
            .lock()
            .map(|d| d.contains_key(POS_EMBED))
            .unwrap_or(false);
        if cfg.train_pos_embed && !has_pos {
            let pos = sincos_2d(dec_cfg.decoder_hidden_size, dec_cfg.grid(), true, device)?;
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Stage1Error::Invalid("varmap lock poisoned".into()))?;
            data.insert(
                POS_EMBED.to_string(),
                Var::from_tensor(&pos.to_dtype(DType::F32)?)?,
            );
        }
        let vb: VarBuilder = SeededVarMap::var_builder(&varmap, cfg.seed, DType::F32, device);
        let mut decoder = RaeDecoder::new(dec_cfg, vb)?;
        let all_vars = sorted_vars(&varmap);
        if weights.is_none() {
            torch_default_linear_init(&all_vars, cfg.seed)?;
        }
        if cfg.train_pos_embed {
            let pos = all_vars
                .iter()
                .find(|(k, _)| k == POS_EMBED)
                .map(|(_, v)| v.as_tensor().clone())
                .ok_or_else(|| Stage1Error::Invalid("no decoder_pos_embed variable".into()))?;
            decoder.set_pos_embed(pos)?;
        }
        let params = OptimizedParams::new(
            all_vars,
            |k| cfg.train_pos_embed || k != POS_EMBED,
            cfg.optimizer.clone(),
            cfg.ema,
            cfg.clip_grad,
        )?;
        Ok(Self {
            decoder,
            _varmap: varmap,
            params,
        })
    }

    /// The decoder (its weights are the trained variables).
    pub fn decoder(&self) -> &RaeDecoder {
        &self.decoder
    }

    /// Variables, optimizer and EMA (checkpoints read them here).
    pub fn params(&self) -> &OptimizedParams {
        &self.params
    }

    /// Weights, EMA and optimizer state from a checkpoint read from `path`
    /// (every weight must be there with its shape).
    pub fn restore(&mut self, ck: Checkpoint, path: &Path) -> Result<()> {
        Ok(self.params.restore(&ck.model, ck.ema, ck.optim, path)?)
    }

    /// Losses and gradients of one batch (see [`generator_grads`]).
    pub fn grads(
        &self,
        lpips: Option<&Lpips>,
        batch: &GenBatch,
        noise: NoiseAug,
        cfg: &GenLossConfig,
        adversarial: Option<&mut dyn AdversarialLoss>,
    ) -> Result<(GenLosses, Gradients)> {
        generator_grads(
            &self.decoder,
            lpips,
            batch,
            noise,
            cfg,
            adversarial,
            self.params.trainable(),
        )
    }

    /// Clip (if configured), AdamW with `lr`, then the EMA. Returns the
    /// gradient norm before clipping.
    pub fn update(&mut self, mut grads: Gradients, lr: f64) -> Result<f64> {
        let norm = self.params.clip(&mut grads)?;
        self.params.update(grads, lr)?;
        Ok(norm)
    }
}

/// PyTorch's default `nn.Linear` initialisation (kaiming-uniform with
/// a = sqrt(5): weight and bias U(+-1/sqrt(fan_in))) for every 2-D weight
/// and its bias, drawn from a stream seeded by `seed` in name order. The
/// reference trains the decoder from this initialisation.
fn torch_default_linear_init(vars: &[(String, Var)], seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_1a7e);
    let by_name: HashMap<&str, &Var> = vars.iter().map(|(k, v)| (k.as_str(), v)).collect();
    for (name, var) in vars {
        let Some(stem) = name.strip_suffix(".weight") else {
            continue;
        };
        if var.rank() != 2 {
            continue;
        }
        let (out, fan_in) = var.dims2()?;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let w = crate::train::init::uniforms(&mut rng, out * fan_in, -bound, bound);
        var.set(&Tensor::from_vec(w, (out, fan_in), var.device())?)?;
        if let Some(b) = by_name.get(format!("{stem}.bias").as_str()) {
            let bv = crate::train::init::uniforms(&mut rng, out, -bound, bound);
            b.set(&Tensor::from_vec(bv, out, b.device())?)?;
        }
    }
    Ok(())
}
