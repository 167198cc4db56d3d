//! The GAN losses of stage-1 training (reference `src/disc/gan_loss.py` and
//! `calculate_adaptive_weight` in `src/train_stage1.py`).

use candle_core::Tensor;

use super::{DiscError, Result};
use crate::train::Gradients;

/// Hinge discriminator loss (`disc_loss: hinge`):
/// `0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`, means over every
/// logit.
pub fn hinge_d_loss(logits_real: &Tensor, logits_fake: &Tensor) -> Result<Tensor> {
    let real = (1.0 - logits_real)?.relu()?.mean_all()?;
    let fake = (logits_fake + 1.0)?.relu()?.mean_all()?;
    Ok(((real + fake)? * 0.5)?)
}

/// The generator's adversarial loss (`gen_loss: vanilla`, which is the
/// hinge / linear generator loss of VQGAN, not the non-saturating one):
/// `-mean(logits_fake)`.
pub fn g_loss(logits_fake: &Tensor) -> Result<Tensor> {
    Ok(logits_fake.mean_all()?.neg()?)
}

/// The D step's fake: `round((clamp(2 recon - 1, -1, 1) + 1) * 127.5) /
/// 127.5 - 1` (8-bit quantised, rounding half to even as `torch.round`),
/// detached, from a reconstruction in [0, 1] scale.
pub fn quantize_fake(recon01: &Tensor) -> Result<Tensor> {
    let dims = recon01.dims().to_vec();
    let v = recon01
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let q: Vec<f32> = v
        .iter()
        .map(|&x| {
            let y = (x * 2.0 - 1.0).clamp(-1.0, 1.0);
            ((y + 1.0) * 127.5).round_ties_even() / 127.5 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(q, dims, recon01.device())?.to_dtype(recon01.dtype())?)
}

/// The VQGAN adaptive weight of the adversarial term and its scale:
/// `total = recon + disc_weight * lambda * g_loss` with
/// `lambda = clamp(|grad_rec| / (|grad_gan| + eps), 0, max_d_weight)`,
/// detached, both gradients taken w.r.t. the decoder's last layer weight
/// (`decoder_pred.weight`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdversarialWeight {
    /// `gan.loss.disc_weight` (0.75).
    pub disc_weight: f64,
    /// `gan.loss.max_d_weight` (1e4).
    pub max_d_weight: f64,
    /// The denominator's epsilon (1e-6 in the reference; taming uses 1e-4).
    pub eps: f64,
}

impl Default for AdversarialWeight {
    fn default() -> Self {
        Self {
            disc_weight: 0.75,
            max_d_weight: 1e4,
            eps: 1e-6,
        }
    }
}

/// Frobenius norm, summed in f64 (a sequential f32 sum over the ~10^6
/// entries of `decoder_pred.weight` would lose digits; torch sums
/// pairwise) and rounded to f32 as `torch.norm` of an f32 gradient.
fn norm(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(candle_core::DType::F64)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()? as f32)
}

impl AdversarialWeight {
    /// `lambda` from the gradients of the reconstruction loss (L1 +
    /// perceptual) and of the generator loss w.r.t. `decoder_pred.weight`.
    pub fn lambda(&self, grad_rec: &Tensor, grad_gan: &Tensor) -> Result<f32> {
        if grad_rec.dims() != grad_gan.dims() {
            return Err(DiscError::Config(format!(
                "adaptive weight: gradients {:?} and {:?} differ in shape",
                grad_rec.dims(),
                grad_gan.dims()
            )));
        }
        let l = norm(grad_rec)? / (norm(grad_gan)? + self.eps as f32);
        Ok(l.clamp(0.0, self.max_d_weight as f32))
    }

    /// The factor on the generator loss: `disc_weight * lambda`.
    pub fn factor(&self, grad_rec: &Tensor, grad_gan: &Tensor) -> Result<f32> {
        Ok(self.disc_weight as f32 * self.lambda(grad_rec, grad_gan)?)
    }
}

/// The gradients of `recon + factor * g_loss` from the gradients of each
/// (the total is linear in them, so two backward passes, one per loss, give
/// what the reference's `total_loss.backward()` gives, and the two
/// `decoder_pred.weight` entries are what the adaptive weight needs).
/// A parameter missing from one side takes the other's gradient alone.
pub fn combine_gradients(rec: &Gradients, gan: &Gradients, factor: f32) -> Result<Gradients> {
    let mut out = Gradients::new();
    for (name, g) in rec.iter() {
        let t = match gan.get(name) {
            Some(a) => (g + (a * factor as f64)?)?,
            None => g.clone(),
        };
        out.insert(name.clone(), t)?;
    }
    for (name, a) in gan.iter() {
        if rec.get(name).is_none() {
            out.insert(name.clone(), (a * factor as f64)?)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gradients_combine_linearly() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let mut rec = Gradients::new();
        rec.insert("a", t(&[1.0, 2.0])).unwrap();
        rec.insert("b", t(&[3.0])).unwrap();
        let mut gan = Gradients::new();
        gan.insert("a", t(&[10.0, 20.0])).unwrap();
        gan.insert("c", t(&[4.0])).unwrap();
        let c = combine_gradients(&rec, &gan, 0.5).unwrap();
        assert_eq!(
            c.get("a").unwrap().to_vec1::<f32>().unwrap(),
            vec![6.0, 12.0]
        );
        assert_eq!(c.get("b").unwrap().to_vec1::<f32>().unwrap(), vec![3.0]);
        assert_eq!(c.get("c").unwrap().to_vec1::<f32>().unwrap(), vec![2.0]);
    }

    #[test]
    fn quantisation_rounds_half_to_even_and_clamps() {
        // 2x - 1 = 0 -> 127.5 -> 128 (even); 1.2 -> clamp 1 -> 255
        let x = Tensor::new(&[0.5f32, 1.2, -0.3, 0.0], &Device::Cpu).unwrap();
        let q = quantize_fake(&x).unwrap().to_vec1::<f32>().unwrap();
        let want = [128.0f32 / 127.5 - 1.0, 1.0, -1.0, -1.0];
        for (a, b) in q.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{q:?}");
        }
    }
}
