//! A 1-D convolution under `torch.nn.utils.spectral_norm` (the reference's
//! `SpectralConv1d`: `n_power_iterations = 1`, `dim = 0`, `eps = 1e-12`),
//! over token-major input `[B, L, C_in]` with circular padding.
//!
//! The trained parameter is `weight_orig` `[out, in, k]`; the buffers
//! `weight_u` `[out]` and `weight_v` `[in * k]` estimate its largest
//! singular vectors. In training mode each forward first runs one power
//! iteration on `W = weight_orig.reshape(out, in * k)` without gradient
//! (`v = normalize(W^T u)`, `u = normalize(W v)`, `normalize(x) =
//! x / max(|x|, eps)`) and stores u, v; in every mode the convolution uses
//! `weight_orig / sigma` with `sigma = u . (W v)`, differentiated through W
//! only (u, v constant), as PyTorch does.

use candle_core::{D, Device, Tensor, Var};

use super::Result;

/// One spectral-norm Conv1d with bias, `padding = k / 2`, circular.
#[derive(Debug, Clone)]
pub struct SpectralConv1d {
    weight_orig: Var,
    bias: Var,
    u: Tensor,
    v: Tensor,
    eps: f64,
    power_iterations: usize,
}

/// `x / max(|x|, eps)` for a vector.
fn normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.sqr()?.sum_all()?.sqrt()?.clamp(eps, f64::INFINITY)?;
    Ok(x.broadcast_div(&n)?)
}

impl SpectralConv1d {
    /// From its tensors: `weight_orig` `[out, in, k]`, `bias` `[out]`,
    /// `u` `[out]`, `v` `[in * k]`.
    pub fn from_parts(
        weight_orig: Tensor,
        bias: Tensor,
        u: Tensor,
        v: Tensor,
        eps: f64,
        power_iterations: usize,
    ) -> Result<Self> {
        let (out, cin, k) = weight_orig.dims3()?;
        if k % 2 == 0 {
            return Err(super::DiscError::Config(format!(
                "spectral conv kernel {k}: only odd kernels keep the length"
            )));
        }
        let check = |what: &str, t: &Tensor, want: usize| -> Result<()> {
            if t.dims() != [want] {
                return Err(super::DiscError::State(format!(
                    "spectral conv {what} is {:?}, want [{want}] for weight [{out}, {cin}, {k}]",
                    t.dims()
                )));
            }
            Ok(())
        };
        check("bias", &bias, out)?;
        check("weight_u", &u, out)?;
        check("weight_v", &v, cin * k)?;
        Ok(Self {
            weight_orig: Var::from_tensor(&weight_orig.contiguous()?)?,
            bias: Var::from_tensor(&bias.contiguous()?)?,
            u: u.detach().contiguous()?,
            v: v.detach().contiguous()?,
            eps,
            power_iterations,
        })
    }

    /// PyTorch's defaults: weight and bias uniform in `+-1/sqrt(in * k)`
    /// (kaiming-uniform with a = sqrt(5)); u, v normalised normal draws.
    pub fn init(
        cin: usize,
        cout: usize,
        k: usize,
        eps: f64,
        rng: &mut impl rand::Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / ((cin * k) as f32).sqrt();
        let mut uniform = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                .collect()
        };
        let w = Tensor::from_vec(uniform(cout * cin * k), (cout, cin, k), device)?;
        let b = Tensor::from_vec(uniform(cout), cout, device)?;
        let mut normal = |n: usize| -> Result<Tensor> {
            let v: Vec<f32> = (0..n).map(|_| super::heads::std_normal(rng)).collect();
            normalize(&Tensor::from_vec(v, n, device)?, eps)
        };
        let u = normal(cout)?;
        let v = normal(cin * k)?;
        Self::from_parts(w, b, u, v, eps, 1)
    }

    /// The trainable parameters, `(suffix, var)`: `weight_orig`, `bias`.
    pub fn params(&self) -> [(&'static str, &Var); 2] {
        [("weight_orig", &self.weight_orig), ("bias", &self.bias)]
    }

    /// The buffers, `(suffix, tensor)`: `weight_u`, `weight_v`.
    pub fn buffers(&self) -> [(&'static str, &Tensor); 2] {
        [("weight_u", &self.u), ("weight_v", &self.v)]
    }

    /// Replace the buffers (shapes must match).
    pub fn set_buffers(&mut self, u: &Tensor, v: &Tensor) -> Result<()> {
        if u.dims() != self.u.dims() || v.dims() != self.v.dims() {
            return Err(super::DiscError::State(format!(
                "spectral-norm buffers u {:?} / v {:?}, want {:?} / {:?}",
                u.dims(),
                v.dims(),
                self.u.dims(),
                self.v.dims()
            )));
        }
        let fit = |t: &Tensor, like: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(like.dtype())?
                .to_device(like.device())?
                .detach()
                .contiguous()?)
        };
        self.u = fit(u, &self.u)?;
        self.v = fit(v, &self.v)?;
        Ok(())
    }

    fn matrix(&self) -> Result<Tensor> {
        let (out, cin, k) = self.weight_orig.dims3()?;
        Ok(self.weight_orig.as_tensor().reshape((out, cin * k))?)
    }

    /// The training-mode update of u and v (no gradient).
    pub fn power_iteration(&mut self) -> Result<()> {
        let w = self.matrix()?.detach();
        for _ in 0..self.power_iterations {
            let v = normalize(&w.t()?.matmul(&self.u.unsqueeze(1)?)?.squeeze(1)?, self.eps)?;
            let u = normalize(&w.matmul(&v.unsqueeze(1)?)?.squeeze(1)?, self.eps)?;
            self.v = v.detach();
            self.u = u.detach();
        }
        Ok(())
    }

    /// `weight_orig / sigma` `[out, in, k]`, differentiable w.r.t. weight_orig.
    /// Computed in f64 and rounded once: the backward pass through sigma is
    /// a reduction over the whole weight that nearly cancels the direct term
    /// when a norm follows the conv.
    pub fn weight(&self) -> Result<Tensor> {
        let f64 = candle_core::DType::F64;
        let dt = self.weight_orig.dtype();
        let w = self.weight_orig.as_tensor().to_dtype(f64)?;
        let (out, cin, k) = w.dims3()?;
        let wv = w
            .reshape((out, cin * k))?
            .matmul(&self.v.to_dtype(f64)?.unsqueeze(1)?)?; // [out, 1]
        let sigma = self
            .u
            .to_dtype(f64)?
            .unsqueeze(0)?
            .matmul(&wv)?
            .reshape(())?;
        Ok(w.broadcast_div(&sigma)?.to_dtype(dt)?)
    }

    /// Convolution of `[B, L, in]` to `[B, L, out]`: circular padding
    /// `k / 2` on the token axis, then one matrix product over the `k`
    /// shifted copies (im2col).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight()?;
        let (out, cin, k) = w.dims3()?;
        let (_, l, _) = x.dims3()?;
        let cols = if k == 1 {
            x.clone()
        } else {
            let p = k / 2;
            if p > l {
                return Err(super::DiscError::Config(format!(
                    "circular padding {p} wider than {l} tokens"
                )));
            }
            let xp = Tensor::cat(&[&x.narrow(1, l - p, p)?, x, &x.narrow(1, 0, p)?], 1)?;
            let shifted = (0..k)
                .map(|j| xp.narrow(1, j, l))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&shifted, D::Minus1)?
        };
        // [out, in, k] -> [out, k, in] to match the (shift, channel) columns.
        let w2 = w
            .permute((0, 2, 1))?
            .contiguous()?
            .reshape((out, k * cin))?;
        linear(&cols, &w2, self.bias.as_tensor())
    }
}

/// `x W^T + b` over the last dim of `[B, L, in]` (the fused CPU kernel,
/// with its backward, where it applies).
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    use crate::models::ops;
    if ops::applies(&[x, w, b]) {
        return Ok(ops::linear(x, w, Some(b))?);
    }
    let (bs, l, cin) = x.dims3()?;
    let y = x
        .contiguous()?
        .reshape((bs * l, cin))?
        .matmul(&w.t()?)?
        .broadcast_add(b)?;
    Ok(y.reshape((bs, l, w.dim(0)?))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_iteration_finds_the_top_singular_value() {
        // W = diag(3, 1) as [2, 2, 1]: sigma -> 3, W / sigma has norm 1
        let dev = Device::Cpu;
        let w = Tensor::new(&[[[3f32], [0.0]], [[0.0], [1.0]]], &dev).unwrap();
        let b = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        let u = Tensor::new(&[0.6f32, 0.8], &dev).unwrap();
        let v = Tensor::new(&[0.8f32, 0.6], &dev).unwrap();
        let mut c = SpectralConv1d::from_parts(w, b, u, v, 1e-12, 1).unwrap();
        for _ in 0..30 {
            c.power_iteration().unwrap();
        }
        let wn = c
            .weight()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (wn[0] - 1.0).abs() < 1e-5 && (wn[3] - 1.0 / 3.0).abs() < 1e-5,
            "{wn:?}"
        );
    }

    #[test]
    fn circular_conv_wraps_the_sequence() {
        // k = 3 identity-on-left-neighbour kernel: y[l] = x[l - 1 mod L]
        let dev = Device::Cpu;
        let w = Tensor::new(&[[[1f32, 0.0, 0.0]]], &dev).unwrap();
        let b = Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap();
        let u = Tensor::new(&[1f32], &dev).unwrap();
        let v = Tensor::new(&[1f32, 0.0, 0.0], &dev).unwrap();
        let c = SpectralConv1d::from_parts(w, b, u, v, 1e-12, 1).unwrap();
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)
            .unwrap()
            .reshape((1, 4, 1))
            .unwrap();
        let y = c
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, vec![4.0, 1.0, 2.0, 3.0]);
    }
}
