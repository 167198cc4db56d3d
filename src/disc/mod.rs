//! The stage-1 GAN discriminator of RAE (reference `src/disc/`): a frozen
//! DINO ViT-S/8 backbone whose block features feed five trainable
//! spectral-norm 1-D conv heads, DiffAugment on its inputs, the hinge /
//! generator losses, the VQGAN adaptive weight and the discriminator's
//! optimizer step.
//!
//! * [`backbone`]: `FrozenDINONoDrop` (frozen weights, differentiable w.r.t.
//!   its input so the generator's adversarial loss reaches the decoder).
//! * [`spectral`]: `torch.nn.utils.spectral_norm` on a 1-D conv.
//! * [`heads`]: the five heads (per-sample "BatchNormLocal", circular conv).
//! * [`diffaug`]: translation then colour (then cutout), draws injectable.
//! * [`loss`]: hinge D loss, `-mean(D(G))`, the adaptive weight, the D-step
//!   8-bit quantisation of the fake.
//! * [`step`]: the discriminator update (gradients, then AdamW on the heads).
//!
//! Activations are token-major (`[B, L, C]`): the reference transposes
//! to `[B, C, L]` for its Conv1d; the numbers are the same.

pub mod backbone;
pub mod diffaug;
pub mod heads;
pub mod loss;
pub mod spectral;
pub mod step;

use std::path::PathBuf;

use candle_core::Tensor;

pub use backbone::{DinoBackbone, DinoConfig};
pub use diffaug::{DiffAug, DiffAugParams};
pub use heads::{Heads, HeadsConfig};
pub use loss::{AdversarialWeight, combine_gradients, g_loss, hinge_d_loss, quantize_fake};
pub use step::{DiscLrClock, DiscState, DiscStats, DiscTrainer};

/// Errors of the discriminator.
#[derive(Debug, thiserror::Error)]
pub enum DiscError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A weights file is missing, unreadable or lacks a tensor.
    #[error("{path}: {reason}")]
    Weights {
        /// The file (or the state dict's origin).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A state dict (heads, buffers, optimizer) does not fit.
    #[error("discriminator state: {0}")]
    State(String),
    /// An invalid configuration or input.
    #[error("discriminator: {0}")]
    Config(String),
    /// The optimizer failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
}

/// Result of the discriminator code.
pub type Result<T> = std::result::Result<T, DiscError>;

/// Whether a forward updates the spectral-norm estimates (the reference's
/// `discriminator.train()` in the D step) or only reads them (`.eval()`,
/// the generator step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One power iteration per spectral-norm conv, u/v updated in place.
    Train,
    /// u/v read, not updated.
    Eval,
}

/// The whole discriminator: frozen backbone plus trainable heads.
#[derive(Debug)]
pub struct Discriminator {
    /// The frozen DINO backbone.
    pub backbone: DinoBackbone,
    /// The trainable heads (parameters and spectral-norm buffers).
    pub heads: Heads,
}

impl Discriminator {
    /// Pair a backbone with heads of its width.
    pub fn new(backbone: DinoBackbone, heads: Heads) -> Result<Self> {
        let (want, got) = (backbone.config().embed_dim, heads.config().channels);
        let n = backbone.config().feature_count();
        if want != got || n != heads.len() {
            return Err(DiscError::Config(format!(
                "heads ({} of width {got}) do not fit the backbone ({n} features of width {want})",
                heads.len()
            )));
        }
        Ok(Self { backbone, heads })
    }

    /// The released discriminator: DINO ViT-S/8 from `dino_weights` (see
    /// [`backbone::resolve_dino_weights`]) and fresh heads drawn from `seed`
    /// (`ks` 9, five heads, spectral norm).
    pub fn released(
        dino_weights: &std::path::Path,
        seed: u64,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let backbone = DinoBackbone::from_file(DinoConfig::default(), dino_weights, device)?;
        let heads = Heads::init(
            HeadsConfig {
                channels: backbone.config().embed_dim,
                count: backbone.config().feature_count(),
                ..HeadsConfig::default()
            },
            seed,
            device,
        )?;
        Self::new(backbone, heads)
    }

    /// Logits `[B, heads * L]` of images `[B, 3, H, W]` in [-1, 1]
    /// (already augmented). `Mode::Train` advances the spectral-norm
    /// estimates first (needs `&mut`); see [`Self::logits_eval`].
    pub fn logits(&mut self, x_pm1: &Tensor, mode: Mode) -> Result<Tensor> {
        let feats = self.backbone.forward(x_pm1)?;
        if mode == Mode::Train {
            self.heads.power_iteration()?;
        }
        self.heads.forward(&feats)
    }

    /// Logits with the spectral-norm estimates as they are (the generator
    /// step): differentiable w.r.t. `x_pm1` and the head parameters.
    pub fn logits_eval(&self, x_pm1: &Tensor) -> Result<Tensor> {
        let feats = self.backbone.forward(x_pm1)?;
        self.heads.forward(&feats)
    }

    /// The generator's adversarial loss `-mean(D(aug(recon)))` for a
    /// reconstruction in [-1, 1] (`2 * recon01 - 1`, unclamped), with the
    /// augmentation draws `params`. Differentiable w.r.t. `recon_pm1`; the
    /// head parameters also receive gradients, which the caller discards
    /// (as the reference's D-step `zero_grad` does).
    pub fn generator_loss(
        &self,
        recon_pm1: &Tensor,
        aug: &DiffAug,
        params: &DiffAugParams,
    ) -> Result<Tensor> {
        let x = aug.apply(recon_pm1, params)?;
        g_loss(&self.logits_eval(&x)?)
    }
}
