//! Seeded parameter initialisation: a VarBuilder backend over a `VarMap`
//! that draws each missing tensor from a ChaCha8 stream derived from
//! (seed, tensor name), honouring candle's `Init` hints. candle's own
//! `VarMap` draws from an unseeded CPU RNG, so two runs with one seed would
//! start from different weights.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A VarBuilder backend over existing variables that hands out each one cast
/// to the builder's dtype: a model built from it computes in that dtype
/// (bf16 autocast) while gradients flow back, through the cast, to the f32
/// master variables. The casts are taken when the model is built, so the
/// trainer rebuilds the model after every optimizer step.
pub struct CastVars {
    vars: std::collections::HashMap<String, Var>,
}

impl CastVars {
    /// A VarBuilder over `vars` that casts each variable to `dtype` on `device`.
    pub fn var_builder(
        vars: &[(String, Var)],
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let vars = vars.iter().cloned().collect();
        VarBuilder::from_backend(Box::new(Self { vars }), dtype, device.clone())
    }
}

impl SimpleBackend for CastVars {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{name}: the variable is {:?}, the model asks for {s:?}",
                t.shape()
            )
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let v = self
            .vars
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?;
        v.as_tensor().to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }
}

/// A VarBuilder backend over a `VarMap` that creates each missing variable from a
/// ChaCha8 stream seeded by (seed, name), so one seed gives one initial model.
pub struct SeededVarMap {
    map: VarMap,
    seed: u64,
}

impl SeededVarMap {
    /// Wrap `map`, drawing missing variables from `seed`.
    pub fn new(map: VarMap, seed: u64) -> Self {
        Self { map, seed }
    }

    /// A VarBuilder that creates missing variables in `map` deterministically.
    pub fn var_builder(
        map: &VarMap,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(Self::new(map.clone(), seed)),
            dtype,
            device.clone(),
        )
    }

    fn rng_for(&self, name: &str) -> ChaCha8Rng {
        // FNV-1a of the name, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ h.rotate_left(17));
        rng.set_stream(h);
        rng
    }
}

pub(crate) fn unit(rng: &mut ChaCha8Rng) -> f64 {
    // 53 random bits in [0, 1)
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

pub(crate) fn normals(rng: &mut ChaCha8Rng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box-Muller, both outputs used
        let u1 = 1.0 - unit(rng); // (0, 1]
        let u2 = unit(rng);
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        out.push((mean + std * r * th.cos()) as f32);
        out.push((mean + std * r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

pub(crate) fn uniforms(rng: &mut ChaCha8Rng, n: usize, lo: f64, up: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (lo + (up - lo) * unit(rng)) as f32)
        .collect()
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = self.map.data();
        let mut data = data
            .lock()
            .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "{name}: existing variable {:?} vs requested {:?}",
                    v.shape(),
                    s
                );
            }
            return v.as_tensor().to_dtype(dtype);
        }
        let n = s.elem_count();
        let mut rng = self.rng_for(name);
        let vals = match h {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => normals(&mut rng, n, mean, stdev),
            Init::Uniform { lo, up } => uniforms(&mut rng, n, lo, up),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => normals(&mut rng, n, 0.0, std),
                    NormalOrUniform::Uniform => {
                        let b = 3f64.sqrt() * std;
                        uniforms(&mut rng, n, -b, b)
                    }
                }
            }
        };
        let t = Tensor::from_vec(vals, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.map.data();
        let data = data
            .lock()
            .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("no variable {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> (VarMap, Vec<f32>) {
        let map = VarMap::new();
        let vb = SeededVarMap::var_builder(&map, seed, DType::F32, &Device::Cpu);
        let w = vb
            .pp("lin")
            .get_with_hints(
                (64, 32),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
            .unwrap();
        let _ = vb.get_with_hints(8, "bias", Init::Const(0.5)).unwrap();
        (map, w.flatten_all().unwrap().to_vec1().unwrap())
    }

    #[test]
    fn same_seed_same_weights_and_registered_as_vars() {
        let (m1, a) = build(3);
        let (_, b) = build(3);
        let (_, c) = build(4);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.003 && (var.sqrt() - 0.02).abs() < 0.002,
            "mean {mean} std {}",
            var.sqrt()
        );
        let names: Vec<String> = m1.data().lock().unwrap().keys().cloned().collect();
        assert!(names.contains(&"lin.weight".to_string()) && names.contains(&"bias".to_string()));
        let bias = m1.data().lock().unwrap()["bias"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(bias, vec![0.5; 8]);
    }
}
