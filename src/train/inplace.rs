//! In-place f32 CPU updates of the optimizer state and the EMA (issue 15).
//! The tensor formulation of AdamW makes thirteen element-wise passes per
//! parameter, each allocating a parameter-sized tensor: on DiT-DH-S (196 M
//! parameters) that is gigabytes of fresh pages a step, most of the step's
//! kernel time. These kernels update the moments, the parameter and the EMA
//! shadow where they lie, with the same f32 operations in the same order as
//! the tensor code (bit-identical results, tested in `optim`).
//!
//! In-place means that a tensor cloned from an optimizer moment or an EMA
//! shadow sees later updates: take a `copy()` to keep a snapshot.

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, bail};

use crate::models::ops;

/// True when `ts` can be updated in place here: f32 CPU tensors with
/// contiguous data, and the fused CPU kernels enabled (`RAE_FUSED_CPU`).
pub(crate) fn applies(ts: &[&Tensor]) -> bool {
    ops::enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// Elements per parallel task: large enough to amortise a task, small
/// enough to spread a parameter over the threads.
const CHUNK: usize = 1 << 16;

fn data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => bail!("in-place update: non-contiguous tensor"),
    }
}

fn data_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("in-place update: non-contiguous tensor");
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => bail!("in-place update: not f32"),
    }
}

/// `f(dst chunk, offset)` over `CHUNK`-sized chunks of `dst`, in parallel.
fn chunked(dst: &mut [f32], f: impl Fn(&mut [f32], usize) + Sync) {
    ops::par_chunks(dst, CHUNK, |i, d| f(d, i * CHUNK));
}

/// The constants of one AdamW update, in f32 as the tensor code's `affine`
/// applies them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWConsts {
    /// 1 - beta1.
    pub c1: f32,
    /// beta2 and 1 - beta2.
    pub b2: f32,
    pub c2: f32,
    /// 1 / sqrt(1 - beta2^t) and eps.
    pub inv_bc2: f32,
    pub eps: f32,
    /// 1 - lr * wd, when weight decay is on.
    pub decay: Option<f32>,
    /// lr / (1 - beta1^t).
    pub step_size: f32,
}

struct MomentM(f32);

impl InplaceOp2 for MomentM {
    fn name(&self) -> &'static str {
        "adamw-m"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (m, g, c1) = (data_mut(m, ml)?, data(g, gl)?, self.0);
        chunked(m, |m, o| {
            for (m, g) in m.iter_mut().zip(&g[o..]) {
                *m += (g - *m) * c1 + 0.0;
            }
        });
        Ok(())
    }
}

struct MomentV(f32, f32);

impl InplaceOp2 for MomentV {
    fn name(&self) -> &'static str {
        "adamw-v"
    }

    fn cpu_fwd(&self, v: &mut CpuStorage, vl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let (v, g, (b2, c2)) = (data_mut(v, vl)?, data(g, gl)?, (self.0, self.1));
        chunked(v, |v, o| {
            for (v, g) in v.iter_mut().zip(&g[o..]) {
                *v = (*v * b2 + 0.0) + (g * g * c2 + 0.0);
            }
        });
        Ok(())
    }
}

struct ParamStep(AdamWConsts);

impl InplaceOp3 for ParamStep {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (p, m, v, k) = (data_mut(p, pl)?, data(m, ml)?, data(v, vl)?, self.0);
        chunked(p, |p, o| {
            for ((p, m), v) in p.iter_mut().zip(&m[o..]).zip(&v[o..]) {
                let denom = v.sqrt() * k.inv_bc2 + k.eps;
                let decayed = match k.decay {
                    Some(d) => *p * d + 0.0,
                    None => *p,
                };
                *p = decayed - ((m / denom) * k.step_size + 0.0);
            }
        });
        Ok(())
    }
}

/// One AdamW update of `p` with gradient `g`, moments `m`, `v` in place.
pub(crate) fn adamw(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: AdamWConsts) -> Result<()> {
    m.inplace_op2(g, &MomentM(k.c1))?;
    v.inplace_op2(g, &MomentV(k.b2, k.c2))?;
    p.inplace_op3(m, v, &ParamStep(k))
}

struct EmaStep(f32, f32);

impl InplaceOp2 for EmaStep {
    fn name(&self) -> &'static str {
        "ema"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, sl: &Layout, p: &CpuStorage, pl: &Layout) -> Result<()> {
        let (s, p, (d, c)) = (data_mut(s, sl)?, data(p, pl)?, (self.0, self.1));
        chunked(s, |s, o| {
            for (s, p) in s.iter_mut().zip(&p[o..]) {
                *s = (*s * d + 0.0) + (p * c + 0.0);
            }
        });
        Ok(())
    }
}

/// `shadow = decay * shadow + (1 - decay) * p` in place.
pub(crate) fn ema(shadow: &Tensor, p: &Tensor, decay: f64) -> Result<()> {
    shadow.inplace_op2(p, &EmaStep(decay as f32, (1.0 - decay) as f32))
}
