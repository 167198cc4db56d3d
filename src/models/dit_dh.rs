//! DiT-DH (reference `DiTwDDTHead`): a LightningDiT backbone maps x_t to
//! tokens `s`, then a wide head re-embeds x_t at head width and is
//! modulated per token by proj(silu(s + t_emb)).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::VelocityModel;
use super::config::DitDhConfig;
use super::dit_block::{BlockSpec, DitBlock, FinalLayer};
use super::embed::{
    LabelEmbedder, PatchEmbed, Rope2d, TimestepEmbedder, frozen_or, sincos_2d, unpatchify,
};
use super::layers::{Linear, LinearInit};
use candle_core::Module;

/// DiT-DH: `depth[0]` backbone blocks at width `hidden_size[0]` conditioned on
/// silu(t_emb + y_emb), then `depth[1]` head blocks at `hidden_size[1]`
/// conditioned per token on the backbone output (reference `DiTwDDTHead`
/// state-dict names).
#[derive(Debug, Clone)]
pub struct DitDh {
    cfg: DitDhConfig,
    s_embedder: PatchEmbed,
    x_embedder: PatchEmbed,
    /// None when backbone and head have the same width (reference Identity).
    s_projector: Option<Linear>,
    t_embedder: TimestepEmbedder,
    y_embedder: LabelEmbedder,
    pos_embed: Option<Tensor>,
    enc_rope: Option<Rope2d>,
    dec_rope: Option<Rope2d>,
    enc_blocks: Vec<DitBlock>,
    dec_blocks: Vec<DitBlock>,
    final_layer: FinalLayer,
    /// Fused kernels (inference only); set through `DitModel::set_fused`.
    pub(super) fused: bool,
    /// Weights and activations (`vb.dtype()`); see `forward`.
    pub(super) dtype: DType,
}

impl DitDh {
    /// Build from `vb`; the frozen `pos_embed` and rope tables are computed when
    /// `vb` does not hold them.
    pub fn new(cfg: &DitDhConfig, vb: VarBuilder) -> Result<Self> {
        let [de, dd] = cfg.hidden_size;
        let [ne, nd] = cfg.depth;
        let [he, hd] = cfg.num_heads.pair();
        let p = cfg.patch_size;
        let grid = cfg.input_size / p;
        let spec = |hidden, heads| BlockSpec {
            hidden,
            heads,
            mlp_ratio: cfg.mlp_ratio,
            options: cfg.block,
        };
        let (se, sd) = (spec(de, he), spec(dd, hd));
        let pos_embed = if cfg.use_pos_embed {
            Some(frozen_or(
                &vb,
                "pos_embed",
                &[1, grid * grid, de],
                sincos_2d(de, grid, false, vb.device())?,
            )?)
        } else {
            None
        };
        let (enc_rope, dec_rope) = if cfg.block.use_rope {
            (
                Some(Rope2d::new(de / he, grid, vb.device(), vb.dtype())?),
                Some(Rope2d::new(dd / hd, grid, vb.device(), vb.dtype())?),
            )
        } else {
            (None, None)
        };
        let tok_ch = cfg.in_channels * p * p;
        Ok(Self {
            s_embedder: PatchEmbed::new(cfg.in_channels, de, p, vb.pp("s_embedder"))?,
            x_embedder: PatchEmbed::new(cfg.in_channels, dd, p, vb.pp("x_embedder"))?,
            s_projector: if de != dd {
                Some(Linear::new(
                    de,
                    dd,
                    true,
                    LinearInit::Xavier,
                    vb.pp("s_projector"),
                )?)
            } else {
                None
            },
            t_embedder: TimestepEmbedder::new(de, vb.pp("t_embedder"))?,
            y_embedder: LabelEmbedder::new(cfg.num_classes, de, vb.pp("y_embedder"))?,
            pos_embed,
            enc_rope,
            dec_rope,
            enc_blocks: (0..ne)
                .map(|i| DitBlock::new(&se, vb.pp(format!("blocks.{i}"))))
                .collect::<Result<_>>()?,
            dec_blocks: (ne..ne + nd)
                .map(|i| DitBlock::new(&sd, vb.pp(format!("blocks.{i}"))))
                .collect::<Result<_>>()?,
            final_layer: FinalLayer::new(dd, tok_ch, cfg.block.use_rmsnorm, vb.pp("final_layer"))?,
            cfg: cfg.clone(),
            fused: false,
            dtype: vb.dtype(),
        })
    }

    /// The config the model was built with.
    pub fn config(&self) -> &DitDhConfig {
        &self.cfg
    }

    /// The frozen buffers under their reference names (pos_embed, rope
    /// tables), to complete a saved state dict built from a fresh VarMap.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        if let Some(pe) = &self.pos_embed {
            v.push(("pos_embed".to_string(), pe.clone()));
        }
        for (name, r) in [
            ("enc_feat_rope", &self.enc_rope),
            ("dec_feat_rope", &self.dec_rope),
        ] {
            if let Some(r) = r {
                let (c, s) = r.tables();
                v.push((format!("{name}.freqs_cos"), c.clone()));
                v.push((format!("{name}.freqs_sin"), s.clone()));
            }
        }
        v
    }

    /// Backbone and head rotary tables (compare with `enc_feat_rope` /
    /// `dec_feat_rope` buffers).
    pub fn ropes(&self) -> (Option<&Rope2d>, Option<&Rope2d>) {
        (self.enc_rope.as_ref(), self.dec_rope.as_ref())
    }

    /// x: `[B,C,H,W]`, t: `[B]` (1 = noise), y: `[B]` labels -> velocity `[B,C,H,W]`.
    /// x and t may be f32 with a half-precision model: x is cast to the
    /// model dtype here, t feeds the f32 time embedding, and the velocity
    /// comes back in x's dtype (the sampler's f32 state).
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let out_dtype = x.dtype();
        let x = &x.to_dtype(self.dtype)?;
        let f = self.fused;
        let t_emb = self.t_embedder.forward(t)?;
        let c = candle_nn::ops::silu(&(&t_emb + self.y_embedder.forward(y)?)?)?.unsqueeze(1)?;
        let mut s = self.s_embedder.forward(x)?;
        if let Some(pe) = &self.pos_embed {
            s = s.broadcast_add(pe)?;
        }
        for b in &self.enc_blocks {
            s = b.forward(&s, &c, self.enc_rope.as_ref(), f)?;
        }
        let mut s = super::ops::silu_any(&s.broadcast_add(&t_emb.unsqueeze(1)?)?)?;
        if let Some(proj) = &self.s_projector {
            s = proj.forward(&s)?;
        }
        let mut h = self.x_embedder.forward(x)?;
        for b in &self.dec_blocks {
            h = b.forward(&h, &s, self.dec_rope.as_ref(), f)?;
        }
        let out = self.final_layer.forward(&h, &s, f)?;
        unpatchify(&out, self.cfg.patch_size, self.cfg.in_channels)?.to_dtype(out_dtype)
    }
}

impl VelocityModel for DitDh {
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        DitDh::forward(self, x, t, y)
    }
}
