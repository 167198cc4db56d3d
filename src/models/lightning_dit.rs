//! LightningDiT: patch embed + fixed sin-cos positions, adaLN blocks with 2D
//! rope conditioned on c = t_emb + y_emb, final adaLN layer, unpatchify.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::VelocityModel;
use super::config::LightningDitConfig;
use super::dit_block::{BlockSpec, DitBlock, FinalLayer};
use super::embed::{
    LabelEmbedder, PatchEmbed, Rope2d, TimestepEmbedder, frozen_or, sincos_2d, unpatchify,
};

/// LightningDiT: a DiT with optional RMSNorm, SwiGLU, QK-norm and 2-D RoPE.
#[derive(Debug, Clone)]
pub struct LightningDit {
    cfg: LightningDitConfig,
    x_embedder: PatchEmbed,
    t_embedder: TimestepEmbedder,
    y_embedder: LabelEmbedder,
    pos_embed: Tensor,
    rope: Option<Rope2d>,
    blocks: Vec<DitBlock>,
    final_layer: FinalLayer,
    /// Fused kernels (inference only); set through `DitModel::set_fused`.
    pub(super) fused: bool,
    /// Weights and activations (`vb.dtype()`); see `forward`.
    pub(super) dtype: DType,
}

impl LightningDit {
    /// Build it from `vb` (a checkpoint's tensors or a fresh VarMap).
    pub fn new(cfg: &LightningDitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let grid = cfg.input_size / cfg.patch_size;
        let out_ch = if cfg.learn_sigma {
            2 * cfg.in_channels
        } else {
            cfg.in_channels
        };
        let spec = BlockSpec {
            hidden: d,
            heads: cfg.num_heads,
            mlp_ratio: cfg.mlp_ratio,
            options: cfg.block,
        };
        let pos = sincos_2d(d, grid, false, vb.device())?;
        let rope = if cfg.block.use_rope {
            Some(Rope2d::new(
                d / cfg.num_heads,
                grid,
                vb.device(),
                vb.dtype(),
            )?)
        } else {
            None
        };
        Ok(Self {
            x_embedder: PatchEmbed::new(cfg.in_channels, d, cfg.patch_size, vb.pp("x_embedder"))?,
            t_embedder: TimestepEmbedder::new(d, vb.pp("t_embedder"))?,
            y_embedder: LabelEmbedder::new(cfg.num_classes, d, vb.pp("y_embedder"))?,
            pos_embed: frozen_or(&vb, "pos_embed", &[1, grid * grid, d], pos)?,
            rope,
            blocks: (0..cfg.depth)
                .map(|i| DitBlock::new(&spec, vb.pp(format!("blocks.{i}"))))
                .collect::<Result<_>>()?,
            final_layer: FinalLayer::new(
                d,
                cfg.patch_size * cfg.patch_size * out_ch,
                cfg.block.use_rmsnorm,
                vb.pp("final_layer"),
            )?,
            cfg: cfg.clone(),
            fused: false,
            dtype: vb.dtype(),
        })
    }

    /// Its constructor keys.
    pub fn config(&self) -> &LightningDitConfig {
        &self.cfg
    }

    /// The frozen buffers under their reference names (pos_embed, rope
    /// tables), to complete a saved state dict built from a fresh VarMap.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("pos_embed".to_string(), self.pos_embed.clone())];
        if let Some(r) = &self.rope {
            let (c, s) = r.tables();
            v.push(("feat_rope.freqs_cos".to_string(), c.clone()));
            v.push(("feat_rope.freqs_sin".to_string(), s.clone()));
        }
        v
    }

    /// The rotary tables (to compare with a checkpoint's `feat_rope` buffers).
    pub fn rope(&self) -> Option<&Rope2d> {
        self.rope.as_ref()
    }

    /// x: `[B,C,H,W]`, t: `[B]` (1 = noise), y: `[B]` integer labels. As
    /// `DitDh::forward`: computed in the model dtype, returned in x's dtype.
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let out_dtype = x.dtype();
        let x = &x.to_dtype(self.dtype)?;
        let f = self.fused;
        let mut h = self.x_embedder.forward(x)?.broadcast_add(&self.pos_embed)?;
        let c = (self.t_embedder.forward(t)? + self.y_embedder.forward(y)?)?.unsqueeze(1)?;
        for b in &self.blocks {
            h = b.forward(&h, &c, self.rope.as_ref(), f)?;
        }
        let out = self.final_layer.forward(&h, &c, f)?;
        let out_ch = if self.cfg.learn_sigma {
            2 * self.cfg.in_channels
        } else {
            self.cfg.in_channels
        };
        let img = unpatchify(&out, self.cfg.patch_size, out_ch)?;
        let img = if self.cfg.learn_sigma {
            img.narrow(1, 0, self.cfg.in_channels)?
        } else {
            img
        };
        img.to_dtype(out_dtype)
    }
}

impl VelocityModel for LightningDit {
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        LightningDit::forward(self, x, t, y)
    }
}
