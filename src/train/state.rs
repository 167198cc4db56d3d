//! One training state: the model, its f32 master weights, AdamW and the EMA,
//! and the flow-matching step on them. The trainer (with its loader, ranks
//! and checkpoints) and the benchmarks both drive this type, so a benchmark
//! measures the product's own step.
//!
//! Nothing kept here between steps holds an autograd graph: the EMA
//! shadows, AdamW moments and master weights are built from detached
//! tensors (`tests` check it after real steps).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use super::checkpoint::Checkpoint;
use super::init::{CastVars, SeededVarMap};
use super::params::OptimizedParams;
use super::{AdamW, AdamWConfig, Ema, Gradients, Result};
use crate::diffusion::schedule::{interpolate, velocity_target};
use crate::models::state_dict::sorted_vars;
use crate::models::{DitConfig, DitModel, VelocityModel, is_frozen};

/// What a [`TrainState`] is built from.
#[derive(Debug, Clone)]
pub struct TrainStateConfig {
    /// Seed of the weight initialisation.
    pub seed: u64,
    /// AdamW hyper-parameters (the lr is scheduled per step by the caller).
    pub optimizer: AdamWConfig,
    /// EMA decay; `None`: no EMA (non-zero ranks, benchmarks without one).
    pub ema: Option<f64>,
    /// Global gradient-norm clip; 0 = none (the norm is still measured).
    pub clip_grad: f64,
    /// Forward/backward dtype (f32, or bf16 autocast over f32 masters).
    pub compute: DType,
}

/// One micro-batch of flow matching: clean latents `x`, noise `eps`, times
/// `t` and (already dropped) labels `y`.
#[derive(Debug, Clone)]
pub struct FlowBatch {
    /// Normalised clean latents `[B, C, H, W]`, f32.
    pub x: Tensor,
    /// Gaussian noise shaped as `x`.
    pub eps: Tensor,
    /// Times `[B]` in [0, 1] (1 = pure noise).
    pub t: Tensor,
    /// Class labels `[B]`, dropped ones replaced by the null class `num_classes`.
    pub y: Tensor,
}

/// Loss and gradient norm of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepMetrics {
    /// Flow-matching MSE of the step's micro-batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Model, master weights, optimizer and EMA.
pub struct TrainState {
    /// The model as the forward pass sees it: the f32 variables themselves,
    /// or (autocast) their casts to `compute`, rebuilt after each update.
    model: DitModel,
    model_cfg: DitConfig,
    compute: DType,
    device: Device,
    _varmap: VarMap,
    /// Every tensor of the model, AdamW over the non-frozen ones, the EMA.
    params: OptimizedParams,
}

impl TrainState {
    /// Seeded random f32 master weights for `model_cfg` on `device`.
    pub fn new(model_cfg: &DitConfig, cfg: &TrainStateConfig, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = SeededVarMap::var_builder(&varmap, cfg.seed, DType::F32, device);
        let model = DitModel::new(model_cfg, vb)?;
        let params = OptimizedParams::new(
            sorted_vars(&varmap),
            |k| !is_frozen(k),
            cfg.optimizer.clone(),
            cfg.ema,
            cfg.clip_grad,
        )?;
        let mut state = Self {
            model,
            model_cfg: model_cfg.clone(),
            compute: cfg.compute,
            device: device.clone(),
            _varmap: varmap,
            params,
        };
        state.recast()?;
        Ok(state)
    }

    /// Weights, optimizer state and (when this state keeps one) the EMA
    /// from a checkpoint read from `path`.
    pub fn restore(&mut self, ck: Checkpoint, path: &std::path::Path) -> Result<()> {
        self.params.restore(&ck.model, ck.ema, ck.optim, path)?;
        self.recast()
    }

    /// Replace every weight by `f(weight)` (e.g. a broadcast from rank 0).
    pub fn set_weights(&mut self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<()> {
        for (_, var) in self.params.vars() {
            var.set(&f(var.as_tensor())?)?;
        }
        self.recast()
    }

    /// Autocast: rebuild the model from fresh casts of the master weights.
    fn recast(&mut self) -> Result<()> {
        if self.compute != DType::F32 {
            let vb = CastVars::var_builder(self.params.vars(), self.compute, &self.device);
            self.model = DitModel::new(&self.model_cfg, vb)?;
        }
        Ok(())
    }

    /// Flow-matching loss of one micro-batch and its gradients (f32). The
    /// loss is the mean squared error against the velocity `eps - x` at
    /// `x_t = (1 - t) x + t eps`.
    pub fn loss_and_grads(&self, b: &FlowBatch) -> Result<(f64, Gradients)> {
        let x_t = interpolate(&b.x, &b.eps, &b.t)?;
        let target = velocity_target(&b.x, &b.eps)?;
        let v = self.model.forward(&x_t, &b.t, &b.y)?;
        let loss = (v - target)?.sqr()?.mean_all()?;
        let store = loss.backward()?;
        let grads = Gradients::from_store(&store, self.params.trainable())?;
        let loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        Ok((loss, grads))
    }

    /// Clip `grads` to the configured global norm; returns the norm before.
    pub fn clip(&self, grads: &mut Gradients) -> Result<f64> {
        self.params.clip(grads)
    }

    /// AdamW with learning rate `lr`, then the EMA (the gradients are
    /// dropped before the fresh casts: lower peak memory).
    pub fn update(&mut self, grads: Gradients, lr: f64) -> Result<()> {
        self.params.update(grads, lr)?;
        self.recast()
    }

    /// One optimizer step on a single micro-batch (what the trainer does
    /// with one process and no accumulation).
    pub fn step(&mut self, batch: &FlowBatch, lr: f64) -> Result<StepMetrics> {
        let (loss, mut grads) = self.loss_and_grads(batch)?;
        let grad_norm = self.clip(&mut grads)?;
        self.update(grads, lr)?;
        Ok(StepMetrics { loss, grad_norm })
    }

    /// The model's config.
    pub fn model_config(&self) -> &DitConfig {
        &self.model_cfg
    }

    /// Forward/backward dtype.
    pub fn compute(&self) -> DType {
        self.compute
    }

    /// Device of the weights and the step.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every variable (trainable and frozen), sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        self.params.vars()
    }

    /// The trained variables (everything but the frozen buffers), sorted by name.
    pub fn trainable(&self) -> &[(String, Var)] {
        self.params.trainable()
    }

    /// Number of trainable scalars.
    pub fn trainable_params(&self) -> usize {
        self.params
            .trainable()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// The optimizer (its state goes into checkpoints).
    pub fn optimizer(&self) -> &AdamW {
        self.params.optimizer()
    }

    /// The EMA, when this state keeps one.
    pub fn ema(&self) -> Option<&Ema> {
        self.params.ema()
    }

    /// Tensors this state keeps from one step to the next that carry an
    /// autograd graph (none may: each would keep every earlier step alive).
    pub fn tensors_with_graph(&self) -> Vec<String> {
        self.params.tensors_with_graph()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::DitDhConfig;
    use crate::models::config::OneOrPair;

    fn tiny() -> DitConfig {
        DitConfig::DitDh(DitDhConfig {
            input_size: 4,
            in_channels: 8,
            hidden_size: [16, 24],
            depth: [1, 1],
            num_heads: OneOrPair::Pair([2, 2]),
            num_classes: 3,
            ..DitDhConfig::preset("ditdh-s").unwrap()
        })
    }

    fn state(compute: DType, ema: f64) -> TrainState {
        let cfg = TrainStateConfig {
            seed: 3,
            optimizer: AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
            ema: Some(ema),
            clip_grad: 1.0,
            compute,
        };
        TrainState::new(&tiny(), &cfg, &Device::Cpu).unwrap()
    }

    fn batch(seed: u64) -> FlowBatch {
        let dev = Device::Cpu;
        let mut r = crate::diffusion::schedule::NoiseRng::new(seed);
        FlowBatch {
            x: r.randn(&[2, 8, 4, 4], &dev).unwrap(),
            eps: r.randn(&[2, 8, 4, 4], &dev).unwrap(),
            t: Tensor::new(&[0.3f32, 0.8], &dev).unwrap(),
            y: Tensor::new(&[1u32, 3], &dev).unwrap(),
        }
    }

    /// The training leak (issue 10): an EMA shadow built from the `Var`
    /// kept the autograd graph of every earlier step. After real steps no
    /// tensor kept across steps may carry a graph, in f32 and in autocast.
    #[test]
    fn long_lived_tensors_hold_no_graph() {
        for compute in [DType::F32, DType::BF16] {
            let mut s = state(compute, 0.9);
            for k in 0..3 {
                s.step(&batch(k), 1e-2).unwrap();
            }
            assert_eq!(s.optimizer().state().params.len(), s.trainable().len());
            let bad = s.tensors_with_graph();
            assert!(
                bad.is_empty(),
                "{compute:?}: {} tensors keep a graph: {bad:?}",
                bad.len()
            );
        }
    }

    /// The EMA after real steps equals the recurrence `e = d e + (1 - d) p`
    /// computed by hand (f64) from the weights after each optimizer step,
    /// starting from the initial weights (the reference `update_ema`).
    #[test]
    fn ema_follows_the_weights_after_each_update() {
        let d = 0.75;
        let mut s = state(DType::F32, d);
        let read = |s: &TrainState| -> Vec<Vec<f64>> {
            s.trainable()
                .iter()
                .map(|(_, v)| {
                    let t = v
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    t.into_iter().map(f64::from).collect()
                })
                .collect()
        };
        let mut hand = read(&s);
        for k in 0..4 {
            s.step(&batch(10 + k), 1e-2).unwrap();
            for (e, p) in hand.iter_mut().zip(read(&s)) {
                for (e, p) in e.iter_mut().zip(p) {
                    *e = d * *e + (1.0 - d) * p;
                }
            }
        }
        let ema = s.ema().unwrap().tensors();
        let mut worst = 0f64;
        for ((name, _), h) in s.trainable().iter().zip(&hand) {
            let got = ema[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (g, h) in got.iter().zip(h) {
                worst = worst.max((*g as f64 - h).abs());
            }
        }
        assert!(worst < 1e-6, "EMA off the hand recurrence by {worst}");
        // and the EMA moved: it is not the initial weights any more
        assert!(s.trainable().iter().any(|(n, v)| {
            let a = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = ema[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            a != b
        }));
    }
}
