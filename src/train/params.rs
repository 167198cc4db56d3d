//! The optimised side of a model, shared by the DiT state
//! ([`super::TrainState`]) and the stage-1 decoder state
//! ([`crate::stage1::GeneratorState`]): every variable by name, the trained
//! ones, AdamW over them, the EMA of every variable, the gradient clip; the
//! update (AdamW, then the EMA), the state dict and the restore from a
//! checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Tensor, Var};

use super::optim::AdamWState;
use super::{AdamW, AdamWConfig, Ema, Gradients, ParamGroup, Result, TrainError};

/// Variables, optimizer, EMA and clip of one model.
#[derive(Debug)]
pub struct OptimizedParams {
    /// Every tensor of the model (trainable and frozen), by name, sorted.
    all_vars: Vec<(String, Var)>,
    trainable: Vec<(String, Var)>,
    opt: AdamW,
    ema: Option<Ema>,
    clip_grad: f64,
}

impl OptimizedParams {
    /// AdamW (`optimizer`) over the variables `is_trained` keeps, an EMA
    /// (decay `ema`) of all of them, clipping at `clip_grad` (0: off).
    pub fn new(
        all_vars: Vec<(String, Var)>,
        is_trained: impl Fn(&str) -> bool,
        optimizer: AdamWConfig,
        ema: Option<f64>,
        clip_grad: f64,
    ) -> Result<Self> {
        let trainable: Vec<(String, Var)> = all_vars
            .iter()
            .filter(|(k, _)| is_trained(k))
            .cloned()
            .collect();
        let opt = AdamW::new(vec![ParamGroup::new(trainable.clone())], optimizer)?;
        let ema = ema
            .map(|d| Ema::new(all_vars.iter().map(|(k, v)| (k, v)), d))
            .transpose()?;
        Ok(Self {
            all_vars,
            trainable,
            opt,
            ema,
            clip_grad,
        })
    }

    /// Weights, optimizer state and (when kept) the EMA from a checkpoint
    /// read from `path`; every weight must be there with its shape.
    pub fn restore(
        &mut self,
        model: &BTreeMap<String, Tensor>,
        ema: BTreeMap<String, Tensor>,
        optim: AdamWState,
        path: &Path,
    ) -> Result<()> {
        for (name, var) in &self.all_vars {
            let t = model.get(name).ok_or_else(|| {
                TrainError::State(format!("{}: no weights for {name}", path.display()))
            })?;
            if t.dims() != var.dims() {
                return Err(TrainError::State(format!(
                    "{}: {name} is {:?}, the model wants {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        self.opt.load_state(optim)?;
        if let Some(e) = &self.ema {
            self.ema = Some(Ema::from_tensors(ema, e.decay())?);
        }
        Ok(())
    }

    /// Clip `grads` to the configured global norm; returns the norm before.
    pub fn clip(&self, grads: &mut Gradients) -> Result<f64> {
        if self.clip_grad > 0.0 {
            grads.clip_global_norm(self.clip_grad)
        } else {
            grads.global_norm()
        }
    }

    /// AdamW with learning rate `lr`, then the EMA of the trained variables.
    pub fn update(&mut self, grads: Gradients, lr: f64) -> Result<()> {
        self.opt.step(&grads, lr)?;
        drop(grads); // lower peak memory before whatever the caller does next
        if let Some(ema) = &mut self.ema {
            ema.update(self.trainable.iter().map(|(k, v)| (k, v)))?;
        }
        Ok(())
    }

    /// Every variable (trainable and frozen), sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.all_vars
    }

    /// The trained variables, sorted by name.
    pub fn trainable(&self) -> &[(String, Var)] {
        &self.trainable
    }

    /// The optimizer (its state goes into checkpoints).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The EMA, when kept.
    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    /// Every weight by name, detached.
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        self.all_vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Tensors kept from one step to the next that carry an autograd graph
    /// (none may: each would keep every earlier step alive).
    pub fn tensors_with_graph(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(ema) = &self.ema {
            for (k, t) in ema.tensors() {
                if t.track_op() {
                    out.push(format!("ema.{k}"));
                }
            }
        }
        for (k, s) in &self.opt.state().params {
            if s.m.track_op() {
                out.push(format!("optim.m.{k}"));
            }
            if s.v.track_op() {
                out.push(format!("optim.v.{k}"));
            }
        }
        out
    }
}
