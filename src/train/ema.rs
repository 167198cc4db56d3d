//! Exponential moving average of the weights, in f32, updated after every
//! optimizer step: `ema = decay * ema + (1 - decay) * param` (the
//! reference `update_ema`, default decay 0.9995).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::{Result, TrainError, inplace};

/// The f32 shadow weights (reference `ema` model) by parameter name.
#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// Start from a copy of `params`. Frozen tensors may be included: they
    /// never change, and copying them keeps the EMA a complete state dict.
    pub fn new<'a>(
        params: impl IntoIterator<Item = (&'a String, &'a Var)>,
        decay: f64,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&decay) {
            return Err(TrainError::Config(format!(
                "EMA decay {decay} outside [0, 1]"
            )));
        }
        let mut shadow = BTreeMap::new();
        for (name, var) in params {
            // Detached: a shadow must not hold the variable's autograd graph.
            let t = var.as_tensor().detach().to_dtype(DType::F32)?.copy()?;
            shadow.insert(name.clone(), t);
        }
        Ok(Self { decay, shadow })
    }

    /// The decay per update (reference `ema_decay`).
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Move the named tensors towards the current weights. Only the given
    /// parameters are updated (pass the trainable ones: frozen tensors stay
    /// bit-identical instead of picking up rounding noise).
    pub fn update<'a>(
        &mut self,
        params: impl IntoIterator<Item = (&'a String, &'a Var)>,
    ) -> Result<()> {
        let d = self.decay;
        for (name, var) in params {
            // `detach` first: an op on the `Var` itself is tracked, and the new
            // shadow would keep the graph back to every earlier shadow (the
            // training leak of issue 10: memory grew by a model copy a step).
            let p = var.as_tensor().detach().to_dtype(DType::F32)?;
            let s = self
                .shadow
                .get_mut(name)
                .ok_or_else(|| TrainError::State(format!("EMA has no tensor {name}")))?;
            if inplace::applies(&[s, &p]) {
                inplace::ema(s, &p, d)?;
            } else {
                *s = (s.affine(d, 0.0)? + p.affine(1.0 - d, 0.0)?)?;
            }
        }
        Ok(())
    }

    /// The shadow weights by reference parameter name. f32 CPU shadows are
    /// updated in place by [`Self::update`]: `copy()` one to keep it as it
    /// is now.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }

    /// Rebuild from saved tensors (a checkpoint).
    pub fn from_tensors(shadow: BTreeMap<String, Tensor>, decay: f64) -> Result<Self> {
        let shadow = shadow
            .into_iter()
            // Own copies: the shadows are updated in place.
            .map(|(k, t)| Ok((k, t.detach().to_dtype(DType::F32)?.copy()?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self { decay, shadow })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ema_moves_towards_weights() {
        let p = Var::from_tensor(&Tensor::new(&[0.0f32, 10.0], &Device::Cpu).unwrap()).unwrap();
        let name = "w".to_string();
        let mut ema = Ema::new([(&name, &p)], 0.9).unwrap();
        p.set(&Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap())
            .unwrap();
        ema.update([(&name, &p)]).unwrap();
        let v = ema.tensors()["w"].to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 0.1).abs() < 1e-6 && (v[1] - 9.0).abs() < 1e-5,
            "{v:?}"
        );
        let missing = "x".to_string();
        assert!(ema.update([(&missing, &p)]).is_err());
    }
}
