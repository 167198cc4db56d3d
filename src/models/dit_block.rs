//! The LightningDiT block (used by LightningDiT and both stacks of DiT-DH)
//! and the final adaLN layer. Conditioning `c` is `[B, 1, D]` (one vector
//! per sample) or `[B, N, D]` (per token, the DiT-DH head).

use candle_core::{D, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::BlockOptions;
use super::embed::Rope2d;
use super::layers::{FeedForward, Linear, LinearInit, Norm, attention, merge_heads, modulate};
use super::ops;

/// Hyper-parameters of one block.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    /// Token width D.
    pub hidden: usize,
    /// Attention heads (head dim D / heads).
    pub heads: usize,
    /// MLP hidden width as a multiple of D (SwiGLU takes 2/3 of it).
    pub mlp_ratio: f64,
    /// q/k norm, SwiGLU, RMSNorm (eps 1e-6, else LayerNorm without affine,
    /// also for q/k norm), adaLN without shift (4 modulation chunks instead
    /// of 6); `use_rope` is the model's (it owns the tables).
    pub options: BlockOptions,
}

/// Self-attention with a fused qkv projection (`qkv`, `proj`), optional
/// q/k norm, optional 2D rope.
#[derive(Debug, Clone)]
pub struct NormAttention {
    qkv: Linear,
    proj: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    heads: usize,
}

impl NormAttention {
    /// `qkv` `D -> 3D` and `proj` `D -> D` (xavier init), plus `q_norm`/`k_norm` over the
    /// head dim when `use_qknorm` (RMSNorm eps 1e-6, else LayerNorm eps 1e-5).
    pub fn new(spec: &BlockSpec, vb: VarBuilder) -> Result<Self> {
        let d = spec.hidden;
        let dh = d / spec.heads;
        let (q_norm, k_norm) = if spec.options.use_qknorm {
            let mk = |name: &str| -> Result<Norm> {
                if spec.options.use_rmsnorm {
                    Norm::rms(dh, 1e-6, vb.pp(name))
                } else {
                    Norm::layer(dh, 1e-5, vb.pp(name))
                }
            };
            (Some(mk("q_norm")?), Some(mk("k_norm")?))
        } else {
            (None, None)
        };
        Ok(Self {
            qkv: Linear::new(d, 3 * d, true, LinearInit::Xavier, vb.pp("qkv"))?,
            proj: Linear::new(d, d, true, LinearInit::Xavier, vb.pp("proj"))?,
            q_norm,
            k_norm,
            heads: spec.heads,
        })
    }

    /// Whether [`Self::forward_fused_cpu`] can run this layer on `x`.
    fn fused_cpu(&self, x: &Tensor, rope: Option<&Rope2d>) -> bool {
        ops::applies(&[x])
            && x.rank() == 3
            && self.q_norm.is_none()
            && self.k_norm.is_none()
            && rope.is_none_or(|r| r.host_tables().is_some())
    }

    /// qkv projection -> fused rope + attention -> proj (f32 CPU).
    fn forward_fused_cpu(&self, x: &Tensor, rope: Option<&Rope2d>) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let tables = rope.and_then(|r| r.host_tables());
        self.proj
            .forward(&ops::attention_qkv(&qkv, self.heads, tables)?)
    }

    /// x: `[B, N, D]` -> `[B, N, D]`; `rope` rotates q and k. `fused`: inference only.
    pub fn forward(&self, x: &Tensor, rope: Option<&Rope2d>, fused: bool) -> Result<Tensor> {
        if self.fused_cpu(x, rope) {
            return self.forward_fused_cpu(x, rope);
        }
        let (b, n, c) = x.dims3()?;
        let dh = c / self.heads;
        // [B,N,3,H,Dh] -> [3,B,H,N,Dh]
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.heads, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let mut q = qkv.get(0)?;
        let mut k = qkv.get(1)?;
        let v = qkv.get(2)?;
        if let Some(nq) = &self.q_norm {
            q = nq.forward(&q, fused)?;
        }
        if let Some(nk) = &self.k_norm {
            k = nk.forward(&k, fused)?;
        }
        if let Some(r) = rope {
            q = r.apply(&q, fused)?;
            k = r.apply(&k, fused)?;
        }
        let o = attention(&q, &k, &v, fused)?;
        self.proj.forward(&merge_heads(&o)?)
    }
}

/// Split the last dim into `n` equal chunks.
fn chunks(x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let d = x.dim(D::Minus1)? / n;
    (0..n).map(|i| x.narrow(D::Minus1, i * d, d)).collect()
}

/// adaLN-modulated pre-norm transformer block (`norm1`, `attn`, `norm2`,
/// `mlp`, `adaLN_modulation.1`).
#[derive(Debug, Clone)]
pub struct DitBlock {
    norm1: Norm,
    norm2: Norm,
    attn: NormAttention,
    mlp: FeedForward,
    ada: Linear,
    wo_shift: bool,
}

impl DitBlock {
    /// Build the block under `vb`; the adaLN projection is zero-initialised, so a
    /// fresh block is the identity.
    pub fn new(spec: &BlockSpec, vb: VarBuilder) -> Result<Self> {
        let d = spec.hidden;
        let n_mod = if spec.options.wo_shift { 4 } else { 6 };
        Ok(Self {
            norm1: Norm::dit(d, spec.options.use_rmsnorm, vb.pp("norm1"))?,
            norm2: Norm::dit(d, spec.options.use_rmsnorm, vb.pp("norm2"))?,
            attn: NormAttention::new(spec, vb.pp("attn"))?,
            mlp: FeedForward::new(d, spec.mlp_ratio, spec.options.use_swiglu, vb.pp("mlp"))?,
            ada: Linear::new(
                d,
                n_mod * d,
                true,
                LinearInit::Zero,
                vb.pp("adaLN_modulation.1"),
            )?,
            wo_shift: spec.options.wo_shift,
        })
    }

    /// x: `[B,N,D]`, c: `[B,1,D]` or `[B,N,D]` (SiLU is applied here, as the
    /// reference's `adaLN_modulation = Sequential(SiLU, Linear)`).
    pub fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        rope: Option<&Rope2d>,
        fused: bool,
    ) -> Result<Tensor> {
        if self.attn.fused_cpu(x, rope) && ops::applies(&[c]) && c.rank() == 3 {
            let d = x.dim(D::Minus1)?;
            if let (Some(n1), Some(n2)) =
                (self.norm1.fused_parts(d, x)?, self.norm2.fused_parts(d, x)?)
            {
                return self.forward_fused_cpu(x, c, rope, n1, n2);
            }
        }
        let m = self.ada.forward(&candle_nn::ops::silu(c)?)?;
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = if self.wo_shift {
            let m = chunks(&m, 4)?;
            (
                None,
                m[0].clone(),
                m[1].clone(),
                None,
                m[2].clone(),
                m[3].clone(),
            )
        } else {
            let m = chunks(&m, 6)?;
            (
                Some(m[0].clone()),
                m[1].clone(),
                m[2].clone(),
                Some(m[3].clone()),
                m[4].clone(),
                m[5].clone(),
            )
        };
        let h = modulate(
            &self.norm1.forward(x, fused)?,
            shift_msa.as_ref(),
            &scale_msa,
        )?;
        let x = (x + self
            .attn
            .forward(&h, rope, fused)?
            .broadcast_mul(&gate_msa)?)?;
        let h = modulate(
            &self.norm2.forward(&x, fused)?,
            shift_mlp.as_ref(),
            &scale_mlp,
        )?;
        x + self.mlp.forward(&h)?.broadcast_mul(&gate_mlp)?
    }
}

type FusedNorm = (ops::NormKind, Tensor, f64);

impl DitBlock {
    /// The block from the fused f32 CPU kernels: adaLN as one projection per
    /// use ([shift|scale] pairs and gates, so no modulation gradient is padded
    /// to the full 6D width), norm + modulation, fused attention, gated
    /// residuals, fused SwiGLU.
    fn forward_fused_cpu(
        &self,
        x: &Tensor,
        c: &Tensor,
        rope: Option<&Rope2d>,
        (k1, w1, e1): FusedNorm,
        (k2, w2, e2): FusedNorm,
    ) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let sc = ops::silu(c)?;
        let shift = !self.wo_shift;
        // chunk layout: [shift, scale, gate] x 2, or [scale, gate] x 2
        let per = if shift { 3 } else { 2 };
        let ss = if shift { 2 * d } else { d };
        let mod1 = self.ada.rows(0, ss)?.forward(&sc)?;
        let gate1 = self.ada.rows(ss, d)?.forward(&sc)?;
        let mod2 = self.ada.rows(per * d, ss)?.forward(&sc)?;
        let gate2 = self.ada.rows(per * d + ss, d)?.forward(&sc)?;
        let h = ops::norm_modulate(x, &w1, &mod1, k1, e1, shift)?;
        let a = self.attn.forward_fused_cpu(&h, rope)?;
        let x = ops::gated_residual(x, &a, &gate1)?;
        let h = ops::norm_modulate(&x, &w2, &mod2, k2, e2, shift)?;
        let f = self.mlp.forward(&h)?;
        ops::gated_residual(&x, &f, &gate2)
    }
}

/// Final adaLN layer (`norm_final`, `adaLN_modulation.1`, `linear`): shift
/// and scale, no gate.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    norm: Norm,
    ada: Linear,
    linear: Linear,
}

impl FinalLayer {
    /// `hidden -> out` per token (out = p*p*C); adaLN and `linear` zero-initialised.
    pub fn new(hidden: usize, out: usize, use_rmsnorm: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: Norm::dit(hidden, use_rmsnorm, vb.pp("norm_final"))?,
            ada: Linear::new(
                hidden,
                2 * hidden,
                true,
                LinearInit::Zero,
                vb.pp("adaLN_modulation.1"),
            )?,
            linear: Linear::new(hidden, out, true, LinearInit::Zero, vb.pp("linear"))?,
        })
    }

    /// x: `[B, N, hidden]`, c: `[B, 1, hidden]` or `[B, N, hidden]` -> `[B, N, out]`
    /// (SiLU on `c` applied here). `fused`: inference only.
    pub fn forward(&self, x: &Tensor, c: &Tensor, fused: bool) -> Result<Tensor> {
        if ops::applies(&[x, c]) && x.rank() == 3 && c.rank() == 3 {
            let d = x.dim(D::Minus1)?;
            if let Some((k, w, eps)) = self.norm.fused_parts(d, x)? {
                let m = self.ada.forward(&ops::silu(c)?)?;
                let h = ops::norm_modulate(x, &w, &m, k, eps, true)?;
                return self.linear.forward(&h);
            }
        }
        let m = chunks(&self.ada.forward(&candle_nn::ops::silu(c)?)?, 2)?;
        let h = modulate(&self.norm.forward(x, fused)?, Some(&m[0]), &m[1])?;
        self.linear.forward(&h)
    }
}
