//! CPU fast path for `x + bias` (optionally followed by GELU) over the
//! last dimension: one pass, spread over rayon threads. candle's own
//! broadcast add and GELU run single-threaded on CPU, and the erf-GELU
//! over the MLP hidden layer is the largest non-matmul cost of a ViT
//! forward. Other devices use the plain tensor ops (same math).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, D, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::activation::Activation;

struct BiasAct(Option<Activation>);

#[inline(always)]
fn act_f32(act: Option<Activation>, v: f32) -> f32 {
    match act {
        None => v,
        // Same formulas as candle's f32 `gelu_erf` / `gelu`.
        Some(Activation::GeluErf) => {
            (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v
        }
        Some(Activation::GeluTanh) => {
            const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
            0.5 * v * (1.0 + (SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)).tanh())
        }
    }
}

fn run<T: WithDType>(x: &[T], b: &[T], act: Option<Activation>) -> Vec<T> {
    let n = b.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(o, xr)| {
            for ((o, xv), bv) in o.iter_mut().zip(xr).zip(b) {
                let v = xv.to_f64() as f32 + bv.to_f64() as f32;
                *o = T::from_f64(act_f32(act, v) as f64);
            }
        });
    out
}

fn run_f32(x: &[f32], b: &[f32], act: Option<Activation>) -> Vec<f32> {
    let n = b.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(o, xr)| {
            for ((o, xv), bv) in o.iter_mut().zip(xr).zip(b) {
                *o = act_f32(act, xv + bv);
            }
        });
    out
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bias-act: inputs must be contiguous");
        };
        let n = b1 - b0;
        if n == 0 || l1.dims().last() != Some(&n) {
            candle_core::bail!(
                "bias-act: bias {:?} does not match input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let act = self.0;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(b)) => {
                CpuStorage::F32(run_f32(&x[a0..a1], &b[b0..b1], act))
            }
            (CpuStorage::F16(x), CpuStorage::F16(b)) => {
                CpuStorage::F16(run(&x[a0..a1], &b[b0..b1], act))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(run(&x[a0..a1], &b[b0..b1], act))
            }
            (CpuStorage::F64(x), CpuStorage::F64(b)) => {
                CpuStorage::F64(run(&x[a0..a1], &b[b0..b1], act))
            }
            _ => candle_core::bail!(
                "bias-act: unsupported dtypes {:?} / {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `act(x + bias)` with `bias` over the last dimension of `x`.
pub fn bias_act(x: &Tensor, bias: &Tensor, act: Option<Activation>) -> Result<Tensor> {
    if x.device().is_cpu()
        && x.is_contiguous()
        && bias.is_contiguous()
        && bias.dims1()? == x.dim(D::Minus1)?
    {
        return x.apply_op2_no_bwd(bias, &BiasAct(act));
    }
    let y = x.broadcast_add(bias)?;
    match act {
        None => Ok(y),
        Some(a) => a.apply(&y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{DType, Device};

    #[test]
    fn matches_plain_ops() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        let x = ((x - 12.0).unwrap() * 0.37).unwrap();
        let b = Tensor::new(&[0.1f32, -0.2, 0.3, -0.4, 0.5, -0.6], &dev).unwrap();
        for act in [None, Some(Activation::GeluErf), Some(Activation::GeluTanh)] {
            let want = x.broadcast_add(&b).unwrap();
            let want = match act {
                None => want,
                Some(a) => a.apply(&want).unwrap(),
            };
            let got = bias_act(&x, &b, act).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-6, "{act:?}: {d}");
            // Half precision goes through the same path.
            let got = bias_act(
                &x.to_dtype(DType::BF16).unwrap(),
                &b.to_dtype(DType::BF16).unwrap(),
                act,
            )
            .unwrap();
            assert!(max_abs_diff(&got, &want) < 0.05);
        }
    }
}
