//! AdamW with parameter groups, global gradient-norm clipping and gradient
//! accumulation, numerically as `torch.optim.AdamW` (decoupled weight decay,
//! bias correction) and `torch.nn.utils.clip_grad_norm_`.
//!
//! All arithmetic is on tensors on the parameters' device; moments and
//! accumulated gradients are f32 whatever the parameter dtype.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{Result, TrainError, inplace};

/// Hyper-parameters shared by every group (a group may scale `lr` and
/// override `weight_decay`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Base learning rate; the trainer passes the scheduled value to each step
    /// (default and reference 2e-4).
    pub lr: f64,
    /// First-moment decay (default and reference 0.9).
    pub beta1: f64,
    /// Second-moment decay (default and reference 0.95).
    pub beta2: f64,
    /// Added to the bias-corrected sqrt(v) (default 1e-8, torch's).
    pub eps: f64,
    /// Decoupled weight decay, applied as `p *= 1 - lr * wd` (default and reference 0).
    pub weight_decay: f64,
}

/// The AdamW settings a run config names: the same keys (`betas`, `eps`,
/// `weight_decay`) in `train`'s and `train-decoder`'s configs, flattened
/// into both (the learning rate is scheduled, so it stays with the schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWSettings {
    /// AdamW (beta1, beta2) (default and reference [0.9, 0.95]).
    pub betas: [f64; 2],
    /// AdamW epsilon (default 1e-8, PyTorch's).
    pub eps: f64,
    /// AdamW decoupled weight decay (default and reference 0).
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        let d = AdamWConfig::default();
        Self {
            betas: [d.beta1, d.beta2],
            eps: d.eps,
            weight_decay: d.weight_decay,
        }
    }
}

impl AdamWSettings {
    /// The optimizer's hyper-parameters with base learning rate `lr`.
    pub fn with_lr(&self, lr: f64) -> AdamWConfig {
        AdamWConfig {
            lr,
            beta1: self.betas[0],
            beta2: self.betas[1],
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Named trainable variables sharing an lr multiplier and weight decay.
/// Frozen tensors are simply in no group.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// (reference name, variable) pairs.
    pub params: Vec<(String, Var)>,
    /// Multiplier on the scheduled lr (default 1).
    pub lr_mult: f64,
    /// `None`: the optimizer's `weight_decay`.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group of `params` with lr multiplier 1 and the optimizer's weight decay.
    pub fn new(params: Vec<(String, Var)>) -> Self {
        Self {
            params,
            lr_mult: 1.0,
            weight_decay: None,
        }
    }

    /// Set the lr multiplier.
    pub fn with_lr_mult(mut self, m: f64) -> Self {
        self.lr_mult = m;
        self
    }

    /// Override the optimizer's weight decay for this group.
    pub fn with_weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = Some(wd);
        self
    }

    /// The usual split: weight decay `wd` on matrices (rank >= 2), none on
    /// biases, norm gains and other vectors.
    pub fn split_decay(params: Vec<(String, Var)>, wd: f64) -> Vec<Self> {
        let (mats, vecs): (Vec<_>, Vec<_>) = params.into_iter().partition(|(_, v)| v.rank() >= 2);
        vec![
            Self::new(mats).with_weight_decay(wd),
            Self::new(vecs).with_weight_decay(0.0),
        ]
    }
}

/// Gradients by parameter name (f32).
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    grads: BTreeMap<String, Tensor>,
}

impl Gradients {
    /// No gradients.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pick the gradients of `params` out of a backward pass. A parameter
    /// the loss does not depend on has no entry (AdamW then skips it, as
    /// torch does for `grad is None`).
    pub fn from_store(store: &GradStore, params: &[(String, Var)]) -> Result<Self> {
        let mut grads = BTreeMap::new();
        for (name, var) in params {
            if let Some(g) = store.get(var.as_tensor()) {
                grads.insert(name.clone(), g.to_dtype(DType::F32)?);
            }
        }
        Ok(Self { grads })
    }

    /// Set the gradient of `name`, stored as f32.
    pub fn insert(&mut self, name: impl Into<String>, grad: Tensor) -> Result<()> {
        self.grads.insert(name.into(), grad.to_dtype(DType::F32)?);
        Ok(())
    }

    /// The gradient of `name`, if the loss depends on it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.grads.get(name)
    }

    /// Number of parameters with a gradient.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// True when no parameter has a gradient.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// (name, gradient) pairs in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.grads.iter()
    }

    /// Global L2 norm over all gradients: the norm of the per-tensor norms,
    /// as `clip_grad_norm_`. One device-to-host transfer.
    pub fn global_norm(&self) -> Result<f64> {
        let Some(first) = self.grads.values().next() else {
            return Ok(0.0);
        };
        let sq: Vec<Tensor> = self
            .grads
            .values()
            .map(|g| g.sqr()?.sum_all())
            .collect::<candle_core::Result<_>>()?;
        let total = Tensor::stack(&sq, 0)?
            .to_device(first.device())?
            .sum_all()?
            .sqrt()?;
        Ok(total.to_scalar::<f32>()? as f64)
    }

    /// Scale every gradient by `max_norm / (norm + 1e-6)` when that is below
    /// 1; returns the norm before clipping (what torch returns).
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        // f32 like torch's coefficient tensor.
        let coef = (max_norm as f32) / (norm as f32 + 1e-6);
        if coef < 1.0 {
            for g in self.grads.values_mut() {
                *g = g.affine(coef as f64, 0.0)?;
            }
        }
        Ok(norm)
    }

    /// Multiply every gradient by `s` (e.g. 1 / micro-steps).
    pub fn scale(&mut self, s: f64) -> Result<()> {
        for g in self.grads.values_mut() {
            *g = g.affine(s, 0.0)?;
        }
        Ok(())
    }

    /// True when every gradient is finite (no NaN / inf).
    pub fn all_finite(&self) -> Result<bool> {
        let norm = self.global_norm()?;
        Ok(norm.is_finite())
    }
}

/// Sums the gradients of several micro-batches into f32 buffers; `finish`
/// averages them, which equals the reference's `(loss / accum).backward()`.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: BTreeMap<String, Tensor>,
    micro_steps: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Micro-batches added since the last [`Self::finish`].
    pub fn micro_steps(&self) -> usize {
        self.micro_steps
    }

    /// Add one micro-batch's gradients to the sums (in f32).
    pub fn add(&mut self, grads: &Gradients) -> Result<()> {
        for (name, g) in grads.iter() {
            let sum = match self.sums.remove(name) {
                Some(s) => (s + g)?,
                // gradient tensors are immutable: sharing the first one is safe
                None => g.to_dtype(DType::F32)?,
            };
            self.sums.insert(name.clone(), sum);
        }
        self.micro_steps += 1;
        Ok(())
    }

    /// The mean gradient over the accumulated micro-steps; resets.
    pub fn finish(&mut self) -> Result<Gradients> {
        let n = std::mem::take(&mut self.micro_steps);
        let sums = std::mem::take(&mut self.sums);
        let mut out = Gradients { grads: sums };
        if n > 1 {
            out.scale(1.0 / n as f64)?;
        }
        Ok(out)
    }
}

/// Per-parameter AdamW state: first and second moments (f32) and the number
/// of updates this parameter has received (torch keeps it per parameter).
#[derive(Debug, Clone)]
pub struct ParamState {
    /// First moment (torch `exp_avg`), f32, shaped as the parameter.
    pub m: Tensor,
    /// Second moment (torch `exp_avg_sq`), f32, shaped as the parameter.
    pub v: Tensor,
    /// Updates this parameter received (bias-correction exponent).
    pub step: u64,
}

/// Everything needed to resume the optimizer exactly.
#[derive(Debug, Clone, Default)]
pub struct AdamWState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Per-parameter state by name; parameters never updated have none.
    pub params: BTreeMap<String, ParamState>,
}

/// AdamW over parameter groups (torch `AdamW` semantics, moments in f32).
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<ParamGroup>,
    state: AdamWState,
    /// Update f32 CPU parameters and moments in place ([`inplace`]).
    in_place: bool,
}

impl AdamW {
    /// An optimizer over `groups`, which must not share a parameter name.
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        for g in &groups {
            for (name, _) in &g.params {
                if !seen.insert(name.as_str()) {
                    return Err(TrainError::Config(format!(
                        "parameter {name} is in two groups"
                    )));
                }
            }
        }
        Ok(Self {
            cfg,
            groups,
            state: AdamWState::default(),
            in_place: true,
        })
    }

    /// The shared hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Every trainable (name, var), group order.
    pub fn params(&self) -> impl Iterator<Item = &(String, Var)> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// The state to checkpoint. The moments are updated in place by later
    /// steps: `copy()` a tensor to keep it as it is now.
    pub fn state(&self) -> &AdamWState {
        &self.state
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.state.step
    }

    /// Restore a saved state; every entry must name a parameter of this
    /// optimizer with its shape.
    pub fn load_state(&mut self, state: AdamWState) -> Result<()> {
        let shapes: BTreeMap<&str, &Var> = self.params().map(|(n, v)| (n.as_str(), v)).collect();
        for (name, s) in &state.params {
            let var = shapes
                .get(name.as_str())
                .ok_or_else(|| TrainError::State(format!("state for unknown parameter {name}")))?;
            if s.m.dims() != var.dims() || s.v.dims() != var.dims() {
                return Err(TrainError::State(format!(
                    "{name}: moments {:?}/{:?} vs parameter {:?}",
                    s.m.dims(),
                    s.v.dims(),
                    var.dims()
                )));
            }
        }
        let mut params = BTreeMap::new();
        for (name, s) in state.params {
            let dev = shapes[name.as_str()].device();
            // Own copies: the moments are updated in place.
            let m = s.m.to_dtype(DType::F32)?.to_device(dev)?.copy()?;
            let v = s.v.to_dtype(DType::F32)?.to_device(dev)?.copy()?;
            params.insert(name, ParamState { m, v, step: s.step });
        }
        self.state = AdamWState {
            step: state.step,
            params,
        };
        Ok(())
    }

    /// One AdamW update with learning rate `lr` (times each group's
    /// multiplier). Parameters without a gradient are left untouched.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        let (b1, b2, eps) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps);
        for group in &self.groups {
            let lr = lr * group.lr_mult;
            let wd = group.weight_decay.unwrap_or(self.cfg.weight_decay);
            for (name, var) in &group.params {
                let Some(g) = grads.get(name) else { continue };
                if g.dims() != var.dims() {
                    return Err(TrainError::State(format!(
                        "{name}: gradient {:?} vs parameter {:?}",
                        g.dims(),
                        var.dims()
                    )));
                }
                let g = g.to_device(var.device())?;
                let st = match self.state.params.remove(name) {
                    Some(s) => s,
                    None => ParamState {
                        m: g.zeros_like()?,
                        v: g.zeros_like()?,
                        step: 0,
                    },
                };
                let step = st.step + 1;
                let bc1 = 1.0 - b1.powi(step as i32);
                let bc2_sqrt = (1.0 - b2.powi(step as i32)).sqrt();
                let k = Update {
                    b1,
                    b2,
                    eps,
                    decay: (wd != 0.0).then(|| 1.0 - lr * wd),
                    step_size: lr / bc1,
                    inv_bc2: 1.0 / bc2_sqrt,
                };
                let (m, v) =
                    if self.in_place && inplace::applies(&[var.as_tensor(), &g, &st.m, &st.v]) {
                        inplace::adamw(var.as_tensor(), &g, &st.m, &st.v, k.consts())?;
                        (st.m, st.v)
                    } else {
                        k.apply(var, &g, &st.m, &st.v)?
                    };
                self.state
                    .params
                    .insert(name.clone(), ParamState { m, v, step });
            }
        }
        self.state.step += 1;
        Ok(())
    }
}

/// The scalars of one parameter's AdamW update.
#[derive(Debug, Clone, Copy)]
struct Update {
    b1: f64,
    b2: f64,
    eps: f64,
    /// 1 - lr * wd, when weight decay is on.
    decay: Option<f64>,
    /// lr / (1 - beta1^t).
    step_size: f64,
    /// 1 / sqrt(1 - beta2^t).
    inv_bc2: f64,
}

impl Update {
    /// As f32, the way `affine` applies them.
    fn consts(&self) -> inplace::AdamWConsts {
        inplace::AdamWConsts {
            c1: (1.0 - self.b1) as f32,
            b2: self.b2 as f32,
            c2: (1.0 - self.b2) as f32,
            inv_bc2: self.inv_bc2 as f32,
            eps: self.eps as f32,
            decay: self.decay.map(|d| d as f32),
            step_size: self.step_size as f32,
        }
    }

    /// The update on tensors (any device and dtype): sets `var`, returns the
    /// new moments.
    fn apply(&self, var: &Var, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        // m.lerp_(g, 1 - b1) as torch: m + (1 - b1) (g - m)
        let m = (m + (g - m)?.affine(1.0 - self.b1, 0.0)?)?;
        let v = (v.affine(self.b2, 0.0)? + g.sqr()?.affine(1.0 - self.b2, 0.0)?)?;
        let denom = v.sqrt()?.affine(self.inv_bc2, self.eps)?;
        let dtype = var.dtype();
        let mut p = var.as_tensor().detach().to_dtype(DType::F32)?;
        if let Some(d) = self.decay {
            p = p.affine(d, 0.0)?;
        }
        let p = (p - (&m / &denom)?.affine(self.step_size, 0.0)?)?;
        var.set(&p.to_dtype(dtype)?)?;
        Ok((m, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place f32 CPU update gives the tensor code's results bit for
    /// bit (parameters and moments), with weight decay and without.
    #[test]
    fn in_place_update_is_bit_identical() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut vals =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
        // more than one parallel chunk, and a short last one
        let n = 3 * (1 << 16) + 77;
        let init = vals(n);
        let grads: Vec<Vec<f32>> = (0..3).map(|_| vals(n)).collect();
        let run = |in_place: bool| {
            let p = var(&init);
            let groups =
                vec![ParamGroup::new(vec![("p".into(), p.clone())]).with_weight_decay(0.05)];
            let mut opt = AdamW::new(groups, AdamWConfig::default()).unwrap();
            opt.in_place = in_place;
            for gv in &grads {
                let mut g = Gradients::new();
                g.insert("p", Tensor::new(gv.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                opt.step(&g, 1e-2).unwrap();
            }
            let s = &opt.state().params["p"];
            let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
            (v(p.as_tensor()), v(&s.m), v(&s.v))
        };
        let (a, b) = (run(true), run(false));
        assert!(a.0 != init, "the parameter moved");
        assert!(a == b, "in-place and tensor updates differ");
    }

    fn var(vals: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(vals, &Device::Cpu).unwrap()).unwrap()
    }

    /// Two AdamW steps on a scalar compared with the closed form.
    #[test]
    fn adamw_matches_hand_computation() {
        let p = var(&[1.0]);
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt =
            AdamW::new(vec![ParamGroup::new(vec![("p".into(), p.clone())])], cfg).unwrap();
        let mut expect = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for (k, gv) in [0.5f64, -0.25].iter().enumerate() {
            let mut g = Gradients::new();
            g.insert("p", Tensor::new(&[*gv as f32], &Device::Cpu).unwrap())
                .unwrap();
            opt.step(&g, 0.1).unwrap();
            let t = (k + 1) as i32;
            expect *= 1.0 - 0.1 * 0.1;
            m = 0.9 * m + 0.1 * gv;
            v = 0.95 * v + 0.05 * gv * gv;
            let denom = (v.sqrt() / (1.0 - 0.95f64.powi(t)).sqrt()) + 1e-8;
            expect -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - expect).abs() < 1e-6, "{got} vs {expect}");
        assert_eq!(opt.step_count(), 2);
        assert_eq!(opt.state().params["p"].step, 2);
    }

    #[test]
    fn clip_scales_to_max_norm() {
        let mut g = Gradients::new();
        g.insert("a", Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap())
            .unwrap();
        g.insert("b", Tensor::new(&[4.0f32], &Device::Cpu).unwrap())
            .unwrap();
        let n = g.clip_global_norm(1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-5);
        // below the max: untouched
        let before = g.get("a").unwrap().to_vec1::<f32>().unwrap();
        g.clip_global_norm(10.0).unwrap();
        assert_eq!(g.get("a").unwrap().to_vec1::<f32>().unwrap(), before);
    }

    #[test]
    fn accumulator_averages() {
        let mut acc = GradAccumulator::new();
        for x in [1.0f32, 3.0] {
            let mut g = Gradients::new();
            g.insert("a", Tensor::new(&[x, 2.0 * x], &Device::Cpu).unwrap())
                .unwrap();
            acc.add(&g).unwrap();
        }
        let g = acc.finish().unwrap();
        assert_eq!(
            g.get("a").unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0, 4.0]
        );
        assert_eq!(acc.micro_steps(), 0);
    }

    #[test]
    fn groups_apply_lr_mult_and_decay() {
        let a = var(&[1.0]);
        let b = var(&[1.0]);
        let groups = vec![
            ParamGroup::new(vec![("a".into(), a.clone())]),
            ParamGroup::new(vec![("b".into(), b.clone())])
                .with_lr_mult(0.0)
                .with_weight_decay(0.0),
        ];
        let mut opt = AdamW::new(groups, AdamWConfig::default()).unwrap();
        let mut g = Gradients::new();
        g.insert("a", Tensor::new(&[1.0f32], &Device::Cpu).unwrap())
            .unwrap();
        g.insert("b", Tensor::new(&[1.0f32], &Device::Cpu).unwrap())
            .unwrap();
        opt.step(&g, 0.01).unwrap();
        assert!(a.as_tensor().to_vec1::<f32>().unwrap()[0] < 1.0);
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap()[0], 1.0);
        let dup = AdamW::new(
            vec![
                ParamGroup::new(vec![("a".into(), a.clone())]),
                ParamGroup::new(vec![("a".into(), a)]),
            ],
            AdamWConfig::default(),
        );
        assert!(dup.is_err());
    }
}
