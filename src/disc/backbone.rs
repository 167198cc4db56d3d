//! The discriminator's frozen backbone, as the reference `FrozenDINONoDrop`
//! (`src/disc/dinodisc.py`): DINO(v1) ViT-S/8 with pre-LN blocks and
//! tanh-approximate GELU, fed an image in [-1, 1] resized to 224x224
//! (bilinear, `align_corners=False`, no antialias) and ImageNet-normalised
//! as `(x + 1) / 2`. It returns the outputs of blocks 2, 5, 8 and 11 with
//! the CLS token dropped, the last block's output again in front
//! (`[f11, f2, f5, f8, f11]`); the final `norm` is never applied.
//!
//! Its weights never train, but every op has a backward pass: the
//! generator's adversarial loss differentiates through it into the decoder.
//! Weights: timm `vit_small_patch8_224.dino` or the original
//! `dino_deitsmall8_pretrain.pth` (both use the same names; `module.` /
//! `backbone.` prefixes are dropped), `.safetensors` or `.pth`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::{DiscError, Result};
use crate::models::layers::{Linear, LinearInit, Norm};

/// The default source of the DINO ViT-S/8 weights (a Hugging Face repo).
pub const DEFAULT_DINO_WEIGHTS: &str = "timm/vit_small_patch8_224.dino";

/// Weight files looked for in a directory / HF snapshot, in this order.
const DINO_FILES: [&str; 4] = [
    "model.safetensors",
    "pytorch_model.bin",
    "dino_deitsmall8_pretrain.pth",
    "dino_vit_small_patch8_224.pth",
];

/// Find the DINO weights offline: a file; a directory holding one of
/// `model.safetensors`, `pytorch_model.bin`, `dino_deitsmall8_pretrain.pth`;
/// or a Hugging Face repo id (`org/name[@rev]`) in the local HF cache
/// (`cache_root`, else the environment's, see [`crate::weights`]).
pub fn resolve_dino_weights(spec: &str, cache_root: Option<&Path>) -> Result<std::path::PathBuf> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    let mut looked = Vec::new();
    let in_dir = |dir: &Path, looked: &mut Vec<String>| {
        let hit = DINO_FILES.iter().map(|f| dir.join(f)).find(|f| f.is_file());
        if hit.is_none() {
            looked.push(format!(
                "{} (none of {})",
                dir.display(),
                DINO_FILES.join(", ")
            ));
        }
        hit
    };
    if p.is_dir() {
        if let Some(f) = in_dir(p, &mut looked) {
            return Ok(f);
        }
    } else if let Some(root) = cache_root
        .map(Path::to_path_buf)
        .or_else(crate::weights::hf_cache_root)
    {
        let (repo, rev) = spec.split_once('@').unwrap_or((spec, "main"));
        if repo.contains('/') && !repo.starts_with(['/', '.']) {
            let dir = root.join(hf_hub::Repo::model(repo.to_string()).folder_name());
            let commit = std::fs::read_to_string(dir.join("refs").join(rev))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| rev.to_string());
            let snap = dir.join("snapshots").join(commit);
            if let Some(f) = in_dir(&snap, &mut looked) {
                return Ok(f);
            }
        } else {
            looked.push(format!(
                "{spec} (neither a file, a directory nor a repo id)"
            ));
        }
    }
    Err(DiscError::Weights {
        path: spec.into(),
        reason: format!(
            "DINO ViT-S/8 weights for the discriminator not found; looked in: {}. \
             Run `huggingface-cli download {DEFAULT_DINO_WEIGHTS}`, or download \
             dino_deitsmall8_pretrain.pth (facebookresearch/dino) and pass its path",
            if looked.is_empty() {
                spec.to_string()
            } else {
                looked.join("; ")
            }
        ),
    })
}

/// ImageNet mean / std (the reference's `x_scale`, `x_shift` constants).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Shape of the backbone (the reference's `recipes`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DinoConfig {
    /// Transformer blocks.
    pub depth: usize,
    /// Blocks (0-based) whose outputs feed a head; those `>= depth` dropped.
    pub key_depths: Vec<usize>,
    /// Patch size.
    pub patch_size: usize,
    /// Token width.
    pub embed_dim: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP hidden width / embed_dim.
    pub mlp_ratio: f64,
    /// LayerNorm eps.
    pub norm_eps: f64,
    /// The input is resized to `img_size` x `img_size`.
    pub img_size: usize,
}

impl Default for DinoConfig {
    /// The reference's `S_8` recipe (ViT-S/8 at 224).
    fn default() -> Self {
        Self {
            depth: 12,
            key_depths: vec![2, 5, 8, 11],
            patch_size: 8,
            embed_dim: 384,
            num_heads: 6,
            mlp_ratio: 4.0,
            norm_eps: 1e-6,
            img_size: 224,
        }
    }
}

impl DinoConfig {
    /// Key depths that exist (the reference drops those `>= depth`).
    pub fn used_key_depths(&self) -> Vec<usize> {
        self.key_depths
            .iter()
            .copied()
            .filter(|&d| d < self.depth)
            .collect()
    }

    /// Feature maps returned (one per head): the key depths plus the last.
    pub fn feature_count(&self) -> usize {
        self.used_key_depths().len() + 1
    }

    /// Tokens per feature map (`(img_size / patch)^2`).
    pub fn tokens(&self) -> usize {
        (self.img_size / self.patch_size).pow(2)
    }

    /// Blocks built: `max(depth, 1 + max key depth)` as the reference.
    fn blocks(&self) -> usize {
        let deepest = self.used_key_depths().into_iter().max().unwrap_or(0);
        self.depth.max(deepest + 1)
    }
}

/// One pre-LN block: `x + proj(attn(ln1 x))`, then `x + fc2(gelu_tanh(fc1(ln2 x)))`.
#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    qkv: Linear,
    proj: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn load(cfg: &DinoConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = cfg.embed_dim;
        let hidden = (c as f64 * cfg.mlp_ratio).round() as usize;
        let lin = |i, o, name: &str| Linear::new(i, o, true, LinearInit::Xavier, vb.pp(name));
        Ok(Self {
            norm1: Norm::layer(c, cfg.norm_eps, vb.pp("norm1"))?,
            qkv: lin(c, 3 * c, "attn.qkv")?,
            proj: lin(c, c, "attn.proj")?,
            norm2: Norm::layer(c, cfg.norm_eps, vb.pp("norm2"))?,
            fc1: lin(c, hidden, "mlp.fc1")?,
            fc2: lin(hidden, c, "mlp.fc2")?,
            heads: cfg.num_heads,
        })
    }

    /// `fused`: candle's fused LayerNorm (no backward: only when nothing
    /// upstream needs a gradient, the D step's detached images).
    fn forward(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm1.forward(x, fused)?)?;
        let a = attention(&qkv, self.heads)?;
        let x = (x + self.proj.forward(&a)?)?;
        // candle's `gelu` is the tanh approximation, as the reference MLP.
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x, fused)?)?.gelu()?)?;
        x + m
    }
}

/// softmax(q k^T / sqrt(dh)) v from the fused `[B, N, 3C]` projection laid
/// out (3, heads, dh) per token; merged heads `[B, N, C]`.
fn attention(qkv: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    use crate::models::ops;
    if ops::applies(&[qkv]) {
        return ops::attention_qkv(qkv, heads, None);
    }
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let qkv = qkv
        .reshape((b, n, 3, heads, c / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
    let o = crate::models::layers::attention(&q, &k, &v, false)?;
    crate::models::layers::merge_heads(&o)
}

/// The frozen DINO backbone.
#[derive(Debug, Clone)]
pub struct DinoBackbone {
    cfg: DinoConfig,
    patch_embed: Linear,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    x_scale: Tensor,
    x_shift: Tensor,
}

/// Drop wrapper prefixes (DDP `module.`, DINO training checkpoints'
/// `backbone.`) and zero every qkv key bias as the reference does at load
/// (a per-query constant shift of the scores: softmax ignores it).
fn clean(tensors: HashMap<String, Tensor>, c: usize) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len());
    for (k, t) in tensors {
        let mut name = k.as_str();
        while let Some(r) = name
            .strip_prefix("module.")
            .or_else(|| name.strip_prefix("backbone."))
        {
            name = r;
        }
        let t = t.to_dtype(DType::F32)?;
        let t = if name.ends_with(".attn.qkv.bias") && t.dims1()? == 3 * c {
            Tensor::cat(
                &[
                    t.narrow(0, 0, c)?,
                    t.zeros_like()?.narrow(0, 0, c)?,
                    t.narrow(0, 2 * c, c)?,
                ],
                0,
            )?
        } else {
            t
        };
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

impl DinoBackbone {
    /// Load from a weights file (`.safetensors` or `.pth`/`.pt`/`.bin`).
    pub fn from_file(cfg: DinoConfig, path: &Path, device: &Device) -> Result<Self> {
        let tensors =
            crate::models::load_state_dict(path, &Default::default(), device).map_err(|e| {
                DiscError::Weights {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
        Self::from_tensors(cfg, tensors, device).map_err(|e| match e {
            DiscError::Weights { reason, .. } => DiscError::Weights {
                path: path.to_path_buf(),
                reason,
            },
            e => e,
        })
    }

    /// Build from a state dict with DINO / timm names.
    pub fn from_tensors(
        cfg: DinoConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let c = cfg.embed_dim;
        let tensors = clean(tensors, c)?;
        let missing = |e: candle_core::Error| DiscError::Weights {
            path: "<DINO state dict>".into(),
            reason: format!("not a DINO ViT with {cfg:?}: {e}"),
        };
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let patch_embed =
            Linear::from_conv(3, c, cfg.patch_size, vb.pp("patch_embed.proj")).map_err(missing)?;
        let cls_token = vb.get((1, 1, c), "cls_token").map_err(missing)?;
        let pos_embed = vb
            .get((1, cfg.tokens() + 1, c), "pos_embed")
            .map_err(missing)?;
        let blocks = (0..cfg.blocks())
            .map(|i| Block::load(&cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(missing)?;
        let scale: Vec<f32> = STD.iter().map(|s| 0.5 / s).collect();
        let shift: Vec<f32> = MEAN.iter().zip(STD).map(|(m, s)| (0.5 - m) / s).collect();
        Ok(Self {
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            x_scale: Tensor::from_vec(scale, (1, 3, 1, 1), device)?,
            x_shift: Tensor::from_vec(shift, (1, 3, 1, 1), device)?,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DinoConfig {
        &self.cfg
    }

    /// Features `[B, L, C]` (CLS dropped, token-major) of images
    /// `[B, 3, H, W]` in [-1, 1]: `[last block, key depths...]`.
    /// Runs in f32 whatever the input dtype (gradients flow back through
    /// the cast).
    pub fn forward(&self, x_pm1: &Tensor) -> Result<Vec<Tensor>> {
        let x_pm1 = &x_pm1.to_dtype(DType::F32)?;
        let (b, ch, _, _) = x_pm1.dims4()?;
        if ch != 3 {
            return Err(DiscError::Config(format!(
                "discriminator input has {ch} channels, want 3"
            )));
        }
        let s = self.cfg.img_size;
        let x = resize_bilinear(x_pm1, s, s)?;
        let x = x
            .broadcast_mul(&self.x_scale.to_dtype(x.dtype())?)?
            .broadcast_add(&self.x_shift.to_dtype(x.dtype())?)?;
        let p = self.cfg.patch_size;
        let g = s / p;
        let cols = x
            .reshape((b, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, g * g, 3 * p * p))?;
        let tokens = self.patch_embed.forward(&cols)?;
        let c = self.cfg.embed_dim;
        let cls = self.cls_token.broadcast_as((b, 1, c))?;
        let mut x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.pos_embed)?;
        let keys = self.cfg.used_key_depths();
        let mut feats = Vec::with_capacity(keys.len() + 1);
        // The weights are constants: only a tracked input (the generator's
        // reconstruction) needs the differentiable path.
        let fused = !x_pm1.track_op();
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, fused)?;
            if keys.contains(&i) {
                feats.push(x.narrow(1, 1, g * g)?);
            }
        }
        feats.insert(0, x.narrow(1, 1, g * g)?);
        Ok(feats)
    }
}

/// `[out, in]` weights of PyTorch's 1-D linear interpolation
/// (`align_corners=False`, no antialias): source `(i + 0.5) * in/out - 0.5`
/// clamped at 0, in f32 as its CPU kernel.
pub fn bilinear_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    let scale = in_size as f32 / out_size as f32;
    let mut m = vec![0f32; out_size * in_size];
    for o in 0..out_size {
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(in_size - 1);
        let i1 = (i0 + 1).min(in_size - 1);
        let l1 = src - i0 as f32;
        m[o * in_size + i0] += 1.0 - l1;
        m[o * in_size + i1] += l1;
    }
    m
}

/// Bilinear resize of `[B, C, H, W]` to `[B, C, oh, ow]` as two 2-D matrix
/// products (differentiable on any device); identity when the size matches.
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let rw = Tensor::from_vec(bilinear_matrix(w, ow), (ow, w), dev)?.to_dtype(x.dtype())?;
    let rh = Tensor::from_vec(bilinear_matrix(h, oh), (oh, h), dev)?.to_dtype(x.dtype())?;
    // rows: [B*C*H, W] @ [W, ow]
    let y = x.contiguous()?.reshape((b * c * h, w))?.matmul(&rw.t()?)?;
    // columns: [B*C*ow, H] @ [H, oh]
    let y = y
        .reshape((b * c, h, ow))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * c * ow, h))?
        .matmul(&rh.t()?)?;
    Ok(y.reshape((b * c, ow, oh))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, oh, ow))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_rows_sum_to_one_and_identity_at_same_size() {
        for (i, o) in [(256, 224), (64, 224), (7, 3)] {
            let m = bilinear_matrix(i, o);
            for r in 0..o {
                let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-6);
            }
        }
        let m = bilinear_matrix(5, 5);
        for r in 0..5 {
            assert_eq!(m[r * 5 + r], 1.0);
        }
    }

    #[test]
    fn names_are_cleaned_and_key_bias_zeroed() {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        let bias = Tensor::new(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0], &dev).unwrap();
        m.insert("module.backbone.blocks.0.attn.qkv.bias".to_string(), bias);
        m.insert(
            "backbone.cls_token".to_string(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
        );
        let out = clean(m, 2).unwrap();
        let b = out["blocks.0.attn.qkv.bias"].to_vec1::<f32>().unwrap();
        assert_eq!(b, vec![1.0, 2.0, 0.0, 0.0, 5.0, 6.0]);
        assert!(out.contains_key("cls_token"));
    }

    #[test]
    fn weights_resolve_from_file_dir_and_hf_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let snap = root.join("models--timm--vit_small_patch8_224.dino/snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(root.join("models--timm--vit_small_patch8_224.dino/refs")).unwrap();
        std::fs::write(
            root.join("models--timm--vit_small_patch8_224.dino/refs/main"),
            "abc\n",
        )
        .unwrap();
        let err = resolve_dino_weights(DEFAULT_DINO_WEIGHTS, Some(root)).unwrap_err();
        assert!(
            err.to_string().contains("huggingface-cli download"),
            "{err}"
        );
        std::fs::write(snap.join("model.safetensors"), b"x").unwrap();
        let f = resolve_dino_weights(DEFAULT_DINO_WEIGHTS, Some(root)).unwrap();
        assert_eq!(f, snap.join("model.safetensors"));
        assert_eq!(
            resolve_dino_weights(snap.to_str().unwrap(), None).unwrap(),
            f
        );
        assert_eq!(resolve_dino_weights(f.to_str().unwrap(), None).unwrap(), f);
    }
}
