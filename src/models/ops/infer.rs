//! Inference-only f32 CPU kernels for the pre-LayerNorm ViT block of the
//! encoders and the RAE decoder (issue 15). A ViT forward at batch 16 is
//! GEMM plus a long tail of memory passes: bias, GELU, layer scale and
//! residual each read and write an activation of 13-50 MB, and the MLP's
//! hidden activation is large enough that glibc maps and unmaps it on every
//! call (page faults). These kernels do a whole sub-layer per row block
//! instead, with the MLP's hidden activation in a reused per-thread scratch:
//!
//! * [`mlp_residual`]: `x + fc2(act(fc1(h)))`;
//! * [`linear_residual`]: `x + h W^T + b` (the attention output projection).
//!
//! They have no backward pass and refuse tracked inputs (an error, never a
//! silently dropped gradient): see [`applies`].

use candle_core::{Result, Storage, Tensor, bail};
use gemm::Parallelism;

use super::{
    Dst, Operand, SendPtr, blocks, cpu_tensor, exp_f32, has_avx2, output_vec, par_for,
    pool_threads, slice_of, with_scratch,
};
use crate::encoders::Activation;

/// Rows of one MLP task at most. Each GEMM call packs the whole weight
/// matrix, so blocks must be long: at 128 rows, packing took a quarter of a
/// ViT-B forward (1 thread, batch 16: 8.0 s against 6.9 s at 1,024 rows).
/// The hidden block (`rows x mlp width`) lives in a per-thread scratch that
/// is reused, never returned to the kernel.
const MLP_BLOCK_ROWS: usize = 1024;

/// True when these kernels may run on all of `ts`: the fused CPU kernels
/// apply (f32, CPU, enabled) and no input records an autograd graph.
pub fn applies(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| !t.track_op()) && super::applies(ts)
}

/// erf(x), Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), the
/// approximation PyTorch's vectorised CPU erf uses; branch-free so that
/// loops over it vectorise.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp_f32(-a * a)).copysign(x)
}

/// The activation of one value, vectorisable (no libm calls).
#[inline(always)]
fn act_f32(act: Activation, v: f32) -> f32 {
    match act {
        Activation::GeluErf => 0.5 * v * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
            let u = SQRT_TWO_OVER_PI * v * (1.0 + 0.044_715 * v * v);
            // tanh(u) = 1 - 2 / (exp(2u) + 1)
            0.5 * v * (2.0 - 2.0 / (exp_f32(2.0 * u) + 1.0))
        }
    }
}

multiversion! {
    fn activate(act: Activation, v: &mut [f32]) {
        match act {
            Activation::GeluErf => v.iter_mut().for_each(|x| *x = act_f32(Activation::GeluErf, *x)),
            Activation::GeluTanh => v.iter_mut().for_each(|x| *x = act_f32(Activation::GeluTanh, *x)),
        }
    }
}

multiversion! {
    /// dst rows = x rows + b (the residual and bias a GEMM then accumulates onto).
    fn residual_plus_bias(dst: &mut [f32], x: &[f32], b: &[f32]) {
        let c = b.len();
        for (d, xr) in dst.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for ((d, xv), bv) in d.iter_mut().zip(xr).zip(b) {
                *d = xv + bv;
            }
        }
    }
}

/// The weights of a two-layer MLP: `fc2(act(fc1(h)))`, PyTorch layouts
/// (`w1` `[hidden, C]`, `w2` `[C, hidden]`).
#[derive(Debug, Clone, Copy)]
pub struct MlpWeights<'a> {
    /// fc1 weight `[hidden, C]` and bias `[hidden]`.
    pub fc1: (&'a Tensor, &'a Tensor),
    /// The activation between the layers.
    pub act: Activation,
    /// fc2 weight `[C, hidden]` and bias `[C]`.
    pub fc2: (&'a Tensor, &'a Tensor),
}

/// Run `f` on the contiguous f32 CPU data of every tensor of `ts`.
fn with_all<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let owned = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        match &**s {
            Storage::Cpu(c) => slices.push(slice_of(c, l)?),
            _ => bail!("vit kernel: not a CPU tensor"),
        }
    }
    f(&slices)
}

fn check(ts: &[&Tensor], what: &str) -> Result<()> {
    if !applies(ts) {
        bail!("{what}: needs untracked f32 CPU tensors (inference only, no backward)");
    }
    Ok(())
}

/// `x + fc2(act(fc1(h)))` over the last dim, for `x` and `h` of the same
/// shape `[.., C]`. Inference only (see [`applies`]).
pub fn mlp_residual(x: &Tensor, h: &Tensor, mlp: MlpWeights<'_>) -> Result<Tensor> {
    let MlpWeights {
        fc1: (w1, b1),
        act,
        fc2: (w2, b2),
    } = mlp;
    check(&[x, h, w1, b1, w2, b2], "mlp_residual")?;
    let (hid, c) = w1.dims2()?;
    if w2.dims2()? != (c, hid) || b1.dims1()? != hid || b2.dims1()? != c {
        bail!(
            "mlp_residual: fc1 {:?}/{:?} and fc2 {:?}/{:?} do not chain",
            w1.dims(),
            b1.dims(),
            w2.dims(),
            b2.dims()
        );
    }
    if x.dims() != h.dims() || x.dims().last() != Some(&c) {
        bail!(
            "mlp_residual: x {:?}, h {:?} for width {c}",
            x.dims(),
            h.dims()
        );
    }
    let rows = x.elem_count() / c.max(1);
    let out = with_all(&[x, h, w1, b1, w2, b2], |s| {
        let [x, h, w1, b1, w2, b2] = s else {
            unreachable!()
        };
        let mut out = output_vec(rows * c);
        let op = SendPtr(out.as_mut_ptr());
        // A multiple of the thread count: 5 blocks on 2 threads left one
        // idle for a fifth of the MLP.
        let threads = pool_threads();
        let parts = threads * rows.div_ceil(threads * MLP_BLOCK_ROWS).max(2);
        let (per, nb) = blocks(rows, parts, 16);
        par_for(nb, |i| {
            let r0 = i * per;
            let m = per.min(rows - r0);
            with_scratch(m * hid, |hb| unsafe {
                for row in hb.chunks_exact_mut(hid) {
                    row.copy_from_slice(b1);
                }
                super::sgemm(
                    (m, hid, c),
                    Dst::new(hb.as_mut_ptr(), hid, true),
                    Operand::new(h[r0 * c..].as_ptr(), c, 1),
                    Operand::new(w1.as_ptr(), 1, c),
                    1.0,
                    Parallelism::None,
                );
                activate(act, hb);
                let o = op.slice(r0 * c, m * c);
                residual_plus_bias(o, &x[r0 * c..(r0 + m) * c], b2);
                super::sgemm(
                    (m, c, hid),
                    Dst::new(o.as_mut_ptr(), c, true),
                    Operand::new(hb.as_ptr(), hid, 1),
                    Operand::new(w2.as_ptr(), 1, hid),
                    1.0,
                    Parallelism::None,
                );
            });
        });
        Ok(out)
    })?;
    cpu_tensor(out, x.shape().clone())
}

/// `x + h W^T + b` over the last dim (`h` `[.., in]`, `w` `[out, in]`, `x`
/// `[.., out]`). Inference only (see [`applies`]).
pub fn linear_residual(x: &Tensor, h: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    check(&[x, h, w, b], "linear_residual")?;
    let (dout, din) = w.dims2()?;
    let rows = h.elem_count() / din.max(1);
    if h.dims().last() != Some(&din)
        || x.dims().last() != Some(&dout)
        || x.elem_count() != rows * dout
        || b.dims1()? != dout
    {
        bail!(
            "linear_residual: x {:?}, h {:?}, w {:?}, b {:?}",
            x.dims(),
            h.dims(),
            w.dims(),
            b.dims()
        );
    }
    let out = with_all(&[x, h, w, b], |s| {
        let [x, h, w, b] = s else { unreachable!() };
        let mut out = output_vec(rows * dout);
        let op = SendPtr(out.as_mut_ptr());
        let (per, nb) = blocks(rows, 2 * pool_threads(), 16);
        par_for(nb, |i| unsafe {
            let r0 = i * per;
            let m = per.min(rows - r0);
            let o = op.slice(r0 * dout, m * dout);
            residual_plus_bias(o, &x[r0 * dout..(r0 + m) * dout], b);
            super::sgemm(
                (m, dout, din),
                Dst::new(o.as_mut_ptr(), dout, true),
                Operand::new(h[r0 * din..].as_ptr(), din, 1),
                Operand::new(w.as_ptr(), 1, din),
                1.0,
                Parallelism::None,
            );
        });
        Ok(out)
    })?;
    cpu_tensor(out, x.shape().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn activations_match_candle() {
        let x = (randn(&[4096], 1) * 6.0).unwrap();
        for act in [Activation::GeluErf, Activation::GeluTanh] {
            let mut v = x.to_vec1::<f32>().unwrap();
            activate(act, &mut v);
            let ours = Tensor::new(v, &Device::Cpu).unwrap();
            let theirs = act.apply(&x).unwrap();
            assert!(max_diff(&ours, &theirs) < 2e-6, "{act:?}");
        }
    }

    #[test]
    fn mlp_and_linear_residual_match_the_composition() {
        // 37 rows: blocks of different lengths, the last one short.
        let (rows, c, hid) = (37, 24, 40);
        let x = randn(&[1, rows, c], 2);
        let h = randn(&[1, rows, c], 3);
        let (w1, b1) = (randn(&[hid, c], 4), randn(&[hid], 5));
        let (w2, b2) = (randn(&[c, hid], 6), randn(&[c], 7));
        for act in [Activation::GeluErf, Activation::GeluTanh] {
            let mlp = MlpWeights {
                fc1: (&w1, &b1),
                act,
                fc2: (&w2, &b2),
            };
            let ours = mlp_residual(&x, &h, mlp).unwrap();
            let hidden = h
                .broadcast_matmul(&w1.t().unwrap())
                .unwrap()
                .broadcast_add(&b1)
                .unwrap();
            let y = act
                .apply(&hidden)
                .unwrap()
                .broadcast_matmul(&w2.t().unwrap())
                .unwrap()
                .broadcast_add(&b2)
                .unwrap();
            assert!(max_diff(&ours, &(&x + y).unwrap()) < 1e-4, "{act:?}");
        }
        let ours = linear_residual(&x, &h, &w2.narrow(1, 0, c).unwrap(), &b2).unwrap();
        let y = h
            .broadcast_matmul(&w2.narrow(1, 0, c).unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(&b2)
            .unwrap();
        assert!(max_diff(&ours, &(&x + y).unwrap()) < 1e-5);
    }

    #[test]
    fn tracked_inputs_are_refused() {
        let x = Var::from_tensor(&randn(&[2, 8], 8)).unwrap();
        let w = randn(&[8, 8], 9);
        let b = randn(&[8], 10);
        let err = linear_residual(x.as_tensor(), x.as_tensor(), &w, &b).unwrap_err();
        assert!(err.to_string().contains("inference only"), "{err}");
    }
}
