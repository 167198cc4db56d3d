//! The discriminator's trainable heads (reference `DinoDisc.heads`,
//! `src/disc/dinodisc.py`): one per backbone feature map, each
//!
//! ```text
//! h1  = lrelu0.2(bn(snconv_k1(f)))
//! h2  = (lrelu0.2(bn(snconv_k(h1))) + h1) / sqrt(2)      k = 9, circular
//! out = snconv_k1_to_1(h2)                                -> [B, L]
//! ```
//!
//! and the logits are the heads' outputs concatenated, `[B, heads * L]`.
//! "bn" is the reference's `BatchNormLocal` with `virtual_bs = 1`: each
//! sample normalised per channel over its own tokens (biased variance, eps
//! 1e-6), then an affine weight / bias; no running statistics.
//!
//! State-dict names are the reference's (below a `heads.` prefix), so a
//! PyTorch `DinoDisc` loads what [`Heads::state_dict`] exports:
//! `heads.{i}.0.0.*` (first conv), `heads.{i}.0.1.*` (its norm),
//! `heads.{i}.1.fn.0.*`, `heads.{i}.1.fn.1.*` (residual conv and norm),
//! `heads.{i}.2.*` (output conv); convs hold `weight_orig`, `bias` and the
//! spectral-norm buffers `weight_u`, `weight_v`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;

use super::spectral::SpectralConv1d;
use super::{DiscError, Result};

/// Shape of the heads (the reference's `ks`, `norm_eps`, spectral norm).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadsConfig {
    /// Feature width (the backbone's embed_dim).
    pub channels: usize,
    /// Kernel of the residual conv (`ks`, 9 in the released config).
    pub kernel_size: usize,
    /// Number of heads (backbone feature maps: key depths + 1).
    pub count: usize,
    /// BatchNormLocal eps.
    pub norm_eps: f64,
    /// Spectral-norm eps.
    pub sn_eps: f64,
}

impl Default for HeadsConfig {
    /// The released configuration on ViT-S/8.
    fn default() -> Self {
        Self {
            channels: 384,
            kernel_size: 9,
            count: 5,
            norm_eps: 1e-6,
            sn_eps: 1e-12,
        }
    }
}

/// A standard normal draw (Box-Muller).
pub(crate) fn std_normal(rng: &mut impl rand::Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Per-sample, per-channel normalisation over the tokens of `[B, L, C]`.
#[derive(Debug, Clone)]
struct BatchNormLocal {
    weight: Var,
    bias: Var,
    eps: f64,
}

impl BatchNormLocal {
    /// In f64 (the reference: f32): the gradient of a layer in front of a
    /// norm is a small difference of large terms, and the statistics and
    /// the backward reductions over the tokens are where f32 loses it.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let x = x.to_dtype(DType::F64)?;
        let mean = x.mean_keepdim(1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let w = self.weight.as_tensor().to_dtype(DType::F64)?;
        let b = self.bias.as_tensor().to_dtype(DType::F64)?;
        Ok(y.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dt)?)
    }
}

/// LeakyReLU(0.2) from ops with a backward pass: `0.2 x + 0.8 relu(x)`
/// (slope 0.2 at 0, as PyTorch).
fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok(((x * 0.2)? + (x.relu()? * 0.8)?)?)
}

#[derive(Debug, Clone)]
struct Head {
    conv0: SpectralConv1d,
    bn0: BatchNormLocal,
    conv1: SpectralConv1d,
    bn1: BatchNormLocal,
    conv2: SpectralConv1d,
}

/// Sub-module names inside a head, reference order.
const CONVS: [&str; 3] = ["0.0", "1.fn.0", "2"];
const NORMS: [&str; 2] = ["0.1", "1.fn.1"];

impl Head {
    fn convs(&self) -> [&SpectralConv1d; 3] {
        [&self.conv0, &self.conv1, &self.conv2]
    }

    fn convs_mut(&mut self) -> [&mut SpectralConv1d; 3] {
        [&mut self.conv0, &mut self.conv1, &mut self.conv2]
    }

    fn norms(&self) -> [&BatchNormLocal; 2] {
        [&self.bn0, &self.bn1]
    }

    fn forward(&self, f: &Tensor) -> Result<Tensor> {
        let h1 = leaky_relu(&self.bn0.forward(&self.conv0.forward(f)?)?)?;
        let r = leaky_relu(&self.bn1.forward(&self.conv1.forward(&h1)?)?)?;
        let h2 = ((r + &h1)? * std::f64::consts::FRAC_1_SQRT_2)?;
        let out = self.conv2.forward(&h2)?; // [B, L, 1]
        let (b, l, _) = out.dims3()?;
        Ok(out.reshape((b, l))?)
    }
}

/// The trainable heads with their spectral-norm buffers.
#[derive(Debug, Clone)]
pub struct Heads {
    cfg: HeadsConfig,
    heads: Vec<Head>,
}

impl Heads {
    /// Fresh heads, initialised as PyTorch does (see
    /// [`SpectralConv1d::init`]; norms weight 1, bias 0), from `seed`.
    pub fn init(cfg: HeadsConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let c = cfg.channels;
        let norm = || -> Result<BatchNormLocal> {
            Ok(BatchNormLocal {
                weight: Var::ones(c, candle_core::DType::F32, device)?,
                bias: Var::zeros(c, candle_core::DType::F32, device)?,
                eps: cfg.norm_eps,
            })
        };
        let mut heads = Vec::with_capacity(cfg.count);
        for _ in 0..cfg.count {
            heads.push(Head {
                conv0: SpectralConv1d::init(c, c, 1, cfg.sn_eps, &mut rng, device)?,
                bn0: norm()?,
                conv1: SpectralConv1d::init(c, c, cfg.kernel_size, cfg.sn_eps, &mut rng, device)?,
                bn1: norm()?,
                conv2: SpectralConv1d::init(c, 1, 1, cfg.sn_eps, &mut rng, device)?,
            });
        }
        Ok(Self { cfg, heads })
    }

    /// Load from a state dict with the reference names (`heads.` prefix);
    /// every tensor must be present (other keys are ignored).
    pub fn from_state_dict(
        cfg: HeadsConfig,
        sd: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let get = |name: String| -> Result<Tensor> {
            let t = sd
                .get(&name)
                .ok_or_else(|| DiscError::State(format!("missing {name}")))?;
            Ok(t.to_dtype(candle_core::DType::F32)?.to_device(device)?)
        };
        let mut heads = Vec::with_capacity(cfg.count);
        for i in 0..cfg.count {
            let conv = |m: &str| -> Result<SpectralConv1d> {
                let p = format!("heads.{i}.{m}");
                SpectralConv1d::from_parts(
                    get(format!("{p}.weight_orig"))?,
                    get(format!("{p}.bias"))?,
                    get(format!("{p}.weight_u"))?,
                    get(format!("{p}.weight_v"))?,
                    cfg.sn_eps,
                    1,
                )
            };
            let norm = |m: &str| -> Result<BatchNormLocal> {
                let p = format!("heads.{i}.{m}");
                Ok(BatchNormLocal {
                    weight: Var::from_tensor(&get(format!("{p}.weight"))?)?,
                    bias: Var::from_tensor(&get(format!("{p}.bias"))?)?,
                    eps: cfg.norm_eps,
                })
            };
            heads.push(Head {
                conv0: conv(CONVS[0])?,
                bn0: norm(NORMS[0])?,
                conv1: conv(CONVS[1])?,
                bn1: norm(NORMS[1])?,
                conv2: conv(CONVS[2])?,
            });
        }
        let me = Self { cfg, heads };
        me.check_shapes()?;
        Ok(me)
    }

    fn check_shapes(&self) -> Result<()> {
        let c = self.cfg.channels;
        let k = self.cfg.kernel_size;
        for (name, v) in self.named_params() {
            let d = v.dims().to_vec();
            let want: Vec<usize> = if name.ends_with("2.weight_orig") {
                vec![1, c, 1]
            } else if name.ends_with("fn.0.weight_orig") {
                vec![c, c, k]
            } else if name.ends_with("weight_orig") {
                vec![c, c, 1]
            } else if name.ends_with(".2.bias") {
                vec![1]
            } else {
                vec![c]
            };
            if d != want {
                return Err(DiscError::State(format!("{name} is {d:?}, want {want:?}")));
            }
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &HeadsConfig {
        &self.cfg
    }

    /// Number of heads.
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// Whether there are no heads.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Trainable parameters with their reference names (for the optimizer).
    pub fn named_params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, h) in self.heads.iter().enumerate() {
            for (m, conv) in CONVS.iter().zip(h.convs()) {
                for (s, v) in conv.params() {
                    out.push((format!("heads.{i}.{m}.{s}"), v.clone()));
                }
            }
            for (m, bn) in NORMS.iter().zip(h.norms()) {
                out.push((format!("heads.{i}.{m}.weight"), bn.weight.clone()));
                out.push((format!("heads.{i}.{m}.bias"), bn.bias.clone()));
            }
        }
        out
    }

    /// The spectral-norm buffers (`...weight_u`, `...weight_v`): state a
    /// checkpoint must keep (they change at every training forward).
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, h) in self.heads.iter().enumerate() {
            for (m, conv) in CONVS.iter().zip(h.convs()) {
                for (s, t) in conv.buffers() {
                    out.push((format!("heads.{i}.{m}.{s}"), t.clone()));
                }
            }
        }
        out
    }

    /// Parameters and buffers, reference names: the heads' checkpoint.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .named_params()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        out.extend(self.buffers());
        out
    }

    /// Restore the parameters and buffers saved by [`Self::state_dict`]
    /// (every one must be present, with its shape).
    pub fn load_state_dict(&mut self, sd: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.named_params() {
            let t = sd
                .get(&name)
                .ok_or_else(|| DiscError::State(format!("missing {name}")))?;
            if t.dims() != var.dims() {
                return Err(DiscError::State(format!(
                    "{name} is {:?}, want {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        self.load_buffers(sd)
    }

    /// Restore only the spectral-norm buffers.
    pub fn load_buffers(&mut self, sd: &HashMap<String, Tensor>) -> Result<()> {
        for (i, h) in self.heads.iter_mut().enumerate() {
            for (m, conv) in CONVS.iter().zip(h.convs_mut()) {
                let get = |s: &str| {
                    let name = format!("heads.{i}.{m}.{s}");
                    sd.get(&name)
                        .ok_or_else(|| DiscError::State(format!("missing {name}")))
                };
                conv.set_buffers(get("weight_u")?, get("weight_v")?)?;
            }
        }
        Ok(())
    }

    /// One power iteration on every spectral-norm conv (training forward).
    pub fn power_iteration(&mut self) -> Result<()> {
        for h in &mut self.heads {
            for conv in h.convs_mut() {
                conv.power_iteration()?;
            }
        }
        Ok(())
    }

    /// Logits `[B, count * L]` from the backbone's feature maps `[B, L, C]`.
    pub fn forward(&self, feats: &[Tensor]) -> Result<Tensor> {
        if feats.len() != self.heads.len() {
            return Err(DiscError::Config(format!(
                "{} feature maps for {} heads",
                feats.len(),
                self.heads.len()
            )));
        }
        let outs = self
            .heads
            .iter()
            .zip(feats)
            .map(|(h, f)| h.forward(f))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs, 1)?)
    }
}
