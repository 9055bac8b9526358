//! Optimizers with their state as named tensors, and the learning-rate schedule.
//!
//! tch's `nn::Optimizer` hides libtorch's optimizer state (momentum buffers, Adam moments),
//! which makes exact resume impossible, and libtorch has no LARS. Each update rule here is a
//! few tensor operations:
//! - SGD with momentum and L2 weight decay;
//! - LARS (You et al. 2017, "Large Batch Training of Convolutional Networks", Eq. 6), as used
//!   by SwAV: the update of each weight tensor is scaled by
//!   `trust * ||w|| / ||g + wd * w||`; biases and normalisation parameters (tensors of
//!   rank <= 1) get neither the scaling nor weight decay;
//! - AdamW (Loshchilov and Hutter 2019, Algorithm 2) with decoupled weight decay, and its
//!   AMSGrad variant (`amsgrad`, Reddi et al., ICLR 2018).
//!
//! Tensors of rank <= 1 (biases, norm scales) are excluded from weight decay for every
//! optimizer, as is standard in SSL recipes.
//!
//! A parameter that the last backward pass did not reach is skipped entirely (no weight
//! decay, no momentum, no moment update), as PyTorch's optimizers skip a `grad` of `None`
//! after `zero_grad(set_to_none=True)`, PyTorch's default: [`Optimizer::zero_grad`] drops
//! every gradient (torch-ext's `clear_grad`; tch can only zero them in place), so a defined
//! gradient is one this backward pass wrote. That is also faster: the backward pass writes
//! each gradient afresh instead of adding into a zeroed buffer (`medssl bench swav-step`,
//! ResNet-50: backward 955-968 ms against 1039-1075 ms; docs/benchmarks.md). Without the skip
//! a module frozen for a
//! while (SwAV's prototypes during `freeze_prototypes_steps`) was weight-decayed in a
//! process that had trained it before, and not in one resumed from a checkpoint.
//!
//! One difference from PyTorch on purpose: Adam's bias correction counts the optimizer's
//! steps, not each parameter's, so a parameter first reached at step t is corrected as at
//! step t (PyTorch: as at its first step); the count is one number in the checkpoint.

use crate::config::OptimizerConfig;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::Tensor;

/// The optimizers' names, as `optimizer.name` takes them.
pub const RULES: [&str; 3] = ["sgd", "lars", "adamw"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Sgd,
    Lars,
    AdamW,
}

pub struct Optimizer {
    rule: Rule,
    cfg: OptimizerConfig,
    params: Vec<(String, Tensor)>,
    /// Buffers by `<param>.<buffer>`.
    state: BTreeMap<String, Tensor>,
    /// Updates applied so far (Adam's bias correction).
    steps: i64,
    /// Learning-rate multipliers by parameter-name prefix (the first match applies), e.g.
    /// a smaller rate for a pre-trained encoder than for a new head when fine-tuning.
    lr_scales: Vec<(String, f64)>,
}

impl Optimizer {
    /// An optimizer over `params` (name, tensor) as `cfg.name` says.
    pub fn new(cfg: &OptimizerConfig, mut params: Vec<(String, Tensor)>) -> Result<Self> {
        let rule = match cfg.name.as_str() {
            "sgd" => Rule::Sgd,
            "lars" => Rule::Lars,
            "adamw" => Rule::AdamW,
            other => {
                bail!("config key `optimizer.name`: unknown optimizer `{other}`; expected one of: sgd, lars, adamw")
            }
        };
        if cfg.lr <= 0.0 || !cfg.lr.is_finite() {
            bail!("config key `optimizer.lr` must be a positive number, got {}", cfg.lr);
        }
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Optimizer {
            rule,
            cfg: cfg.clone(),
            params,
            state: BTreeMap::new(),
            steps: 0,
            lr_scales: Vec::new(),
        })
    }

    /// Multiplies the learning rate of every parameter whose name starts with `prefix` by
    /// `scale` (the first prefix given that matches applies).
    pub fn scale_lr(&mut self, prefix: &str, scale: f64) {
        self.lr_scales.push((prefix.to_string(), scale));
    }

    fn lr_scale(&self, name: &str) -> f64 {
        self.lr_scales
            .iter()
            .find(|(prefix, _)| name.starts_with(prefix.as_str()))
            .map_or(1.0, |(_, scale)| *scale)
    }

    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Drops every parameter's gradient, as `zero_grad(set_to_none=True)`.
    pub fn zero_grad(&mut self) {
        for (_, p) in &self.params {
            // Resetting a tensor's gradient handle has no failure mode of its own.
            torch_ext::clear_grad(p).expect("clearing a gradient");
        }
    }

    /// The gradients the backward pass since the last `zero_grad` wrote (not a frozen
    /// module's stale zeros), for the loss scaler to unscale and check.
    pub fn fresh_gradients(&self) -> Vec<Tensor> {
        (0..self.params.len()).filter_map(|i| self.fresh_gradient(i)).collect()
    }

    /// The gradient of parameter `i` if the backward pass since the last `zero_grad`
    /// reached it.
    fn fresh_gradient(&self, i: usize) -> Option<Tensor> {
        let g = self.params[i].1.grad();
        g.defined().then_some(g)
    }

    /// Global L2 norm of the gradients, clipped to `max_norm` when `max_norm > 0`.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = (0..self.params.len()).filter_map(|i| self.fresh_gradient(i)).collect();
            if grads.is_empty() {
                return 0.0;
            }
            let norm = Tensor::stack(&grads.iter().map(|g| g.norm()).collect::<Vec<_>>(), 0)
                .norm()
                .double_value(&[]);
            if max_norm > 0.0 && norm > max_norm {
                let scale = max_norm / (norm + 1e-6);
                for g in &grads {
                    let _ = g.shallow_clone().f_mul_scalar_(scale);
                }
            }
            norm
        })
    }

    fn buffer(&mut self, name: &str, buffer: &str, like: &Tensor) -> Tensor {
        self.state
            .entry(format!("{name}.{buffer}"))
            .or_insert_with(|| like.zeros_like())
            .shallow_clone()
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let t = self.steps as f64;
        let cfg = self.cfg.clone();
        let params: Vec<(String, Tensor, Tensor, f64)> = (0..self.params.len())
            .filter_map(|i| {
                let (n, p) = &self.params[i];
                let g = self.fresh_gradient(i)?;
                Some((n.clone(), p.shallow_clone(), g, lr * self.lr_scale(n)))
            })
            .collect();
        tch::no_grad(|| {
            for (name, mut p, g, lr) in params {
                let decays = p.dim() > 1 && cfg.weight_decay > 0.0;
                match self.rule {
                    Rule::Sgd | Rule::Lars => {
                        let mut d = if decays {
                            &g + &p * cfg.weight_decay
                        } else {
                            g.shallow_clone()
                        };
                        if self.rule == Rule::Lars && p.dim() > 1 {
                            let (pn, dn) = (p.norm().double_value(&[]), d.norm().double_value(&[]));
                            if pn > 0.0 && dn > 0.0 {
                                d *= cfg.trust_coefficient * pn / dn;
                            }
                        }
                        let update = if cfg.momentum > 0.0 {
                            let mut buf = self.buffer(&name, "momentum", &p);
                            buf *= cfg.momentum;
                            buf += &d;
                            buf
                        } else {
                            d
                        };
                        let _ = p.f_sub_(&(update * lr));
                    }
                    Rule::AdamW => {
                        // PyTorch's single-tensor AdamW (its CPU default), op for op and in
                        // place: two temporaries per parameter instead of one per operation.
                        // tch's addcmul_/addcdiv_ take no `value`, so it is folded into an
                        // operand (a rounding difference at the last bit, no more).
                        if decays {
                            let _ = p.f_mul_scalar_(1.0 - lr * cfg.weight_decay);
                        }
                        let [b1, b2] = cfg.betas;
                        let mut m = self.buffer(&name, "exp_avg", &p);
                        let mut v = self.buffer(&name, "exp_avg_sq", &p);
                        let _ = m.f_lerp_(&g, 1.0 - b1);
                        v *= b2;
                        let _ = v.f_addcmul_(&(&g * (1.0 - b2)), &g);
                        let step_size = lr / (1.0 - b1.powf(t));
                        let mut denom = if cfg.amsgrad {
                            let max_v = self.buffer(&name, "max_exp_avg_sq", &p);
                            let _ = max_v.f_maximum_out(&max_v.shallow_clone(), &v);
                            max_v.sqrt()
                        } else {
                            v.sqrt()
                        };
                        denom *= -1.0 / (step_size * (1.0 - b2.powf(t)).sqrt());
                        denom += -cfg.eps / step_size;
                        let _ = p.f_addcdiv_(&m, &denom);
                    }
                }
            }
        });
    }

    /// The optimizer's state as named tensors, plus its step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, i64) {
        (
            self.state.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect(),
            self.steps,
        )
    }

    /// Restores what [`Optimizer::state`] returned.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>, steps: i64) -> Result<()> {
        let known: BTreeMap<&str, &Tensor> = self.params.iter().map(|(n, p)| (n.as_str(), p)).collect();
        for (key, tensor) in tensors {
            let param = key.rsplit_once('.').map(|(p, _)| p).unwrap_or_default();
            let Some(p) = known.get(param) else {
                bail!("optimizer state `{key}` belongs to no parameter of this run");
            };
            if p.size() != tensor.size() {
                bail!(
                    "optimizer state `{key}` has shape {:?}, its parameter {:?}",
                    tensor.size(),
                    p.size()
                );
            }
            // Laid out as its parameter (`zeros_like` keeps a channels-last layout), as the
            // buffers of an uninterrupted run are: the update is elementwise either way, but
            // mixed layouts cost a copy each step.
            let buffer = tch::no_grad(|| p.zeros_like().to_kind(tensor.kind()));
            tch::no_grad(|| buffer.shallow_clone().copy_(&tensor));
            self.state.insert(key, buffer);
        }
        self.steps = steps;
        Ok(())
    }
}

/// Linear warm-up from 0 to `lr` over `warmup_epochs`, then cosine decay to `final_lr` at the
/// stage's last step.
pub fn learning_rate(cfg: &OptimizerConfig, step: usize, total_steps: usize, steps_per_epoch: usize) -> f64 {
    let warmup = (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize;
    if step < warmup {
        return cfg.lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total_steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn quadratic_descends(name: &str, lr: f64) {
        let cfg = OptimizerConfig {
            name: name.into(),
            lr,
            weight_decay: 0.0,
            ..Default::default()
        };
        let w = Tensor::full([4, 3], 2.0, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())]).unwrap();
        let loss = |w: &Tensor| (w * w).sum(Kind::Float);
        let first = loss(&w).double_value(&[]);
        for _ in 0..20 {
            opt.zero_grad();
            loss(&w).backward();
            opt.step(cfg.lr);
        }
        let last = loss(&w).double_value(&[]);
        assert!(last < first * 0.9, "{name}: {first} -> {last}");
    }

    #[test]
    fn a_parameter_backward_did_not_reach_does_not_move() {
        for name in ["sgd", "lars", "adamw"] {
            let cfg = OptimizerConfig {
                name: name.into(),
                lr: 0.1,
                weight_decay: 0.1,
                ..Default::default()
            };
            let a = Tensor::full([2, 2], 1.0, (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let b = Tensor::full([2, 2], 2.0, (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let mut opt = Optimizer::new(
                &cfg,
                vec![("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())],
            )
            .unwrap();
            opt.zero_grad();
            (&a * &b).sum(Kind::Float).backward();
            opt.clip_grad_norm(1.0);
            opt.step(cfg.lr);
            // Step 2 reaches only `a`: `b`'s gradient is defined but stale (zeroed).
            let before = b.copy();
            opt.zero_grad();
            (&a * &a).sum(Kind::Float).backward();
            opt.clip_grad_norm(1.0);
            opt.step(cfg.lr);
            assert!(b.equal(&before), "{name}: an unreached parameter moved");
            // An exactly zero gradient that backward did compute still counts (PyTorch).
            opt.zero_grad();
            (&a * 0.0 + &b * 0.0).sum(Kind::Float).backward();
            let before = b.copy();
            opt.step(cfg.lr);
            assert!(!b.equal(&before), "{name}: weight decay skipped on a reached parameter");
        }
    }

    #[test]
    fn a_learning_rate_scale_applies_to_its_prefix_only() {
        let cfg = OptimizerConfig {
            name: "sgd".into(),
            momentum: 0.0,
            weight_decay: 0.0,
            ..Default::default()
        };
        let ones = || Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let (backbone, head, frozen) = (ones(), ones(), ones());
        let mut opt = Optimizer::new(
            &cfg,
            vec![
                ("encoder.w".into(), backbone.shallow_clone()),
                ("head.w".into(), head.shallow_clone()),
                ("aggregator.w".into(), frozen.shallow_clone()),
            ],
        )
        .unwrap();
        opt.scale_lr("encoder.", 0.1);
        opt.scale_lr("aggregator.", 0.0);
        (backbone.sum(Kind::Float) + head.sum(Kind::Float) + frozen.sum(Kind::Float)).backward();
        opt.step(1.0);
        // d(sum)/dw = 1: each tensor moves by its own rate.
        assert!((backbone.double_value(&[0]) - 0.9).abs() < 1e-6);
        assert!((head.double_value(&[0]) - 0.0).abs() < 1e-6);
        assert_eq!(frozen.double_value(&[0]), 1.0);
    }

    #[test]
    fn every_rule_descends_a_quadratic() {
        quadratic_descends("sgd", 0.05);
        quadratic_descends("adamw", 0.05);
        // LARS scales steps by trust * ||w|| / ||g||: a large nominal rate is its regime.
        quadratic_descends("lars", 20.0);
    }

    #[test]
    fn lars_steps_have_the_trust_ratio_norm_and_skip_biases() {
        // First step (zero momentum): ||dw|| = lr * trust * ||w|| for a weight matrix,
        // and plain SGD for a bias.
        let cfg = OptimizerConfig {
            name: "lars".into(),
            lr: 0.5,
            weight_decay: 0.0,
            trust_coefficient: 0.01,
            ..Default::default()
        };
        let w = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0])
            .view([2, 2])
            .set_requires_grad(true);
        let b = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = Optimizer::new(
            &cfg,
            vec![("w".into(), w.shallow_clone()), ("b".into(), b.shallow_clone())],
        )
        .unwrap();
        let before = w.detach().copy();
        ((&w * &w).sum(Kind::Float) * 7.0 + (&b * &b).sum(Kind::Float)).backward();
        opt.step(cfg.lr);
        let moved = (w.detach() - before).norm().double_value(&[]);
        assert!((moved - 0.5 * 0.01 * 5.0).abs() < 1e-6, "{moved}");
        assert!((b.double_value(&[0]) - 0.0).abs() < 1e-6, "bias: 1 - 0.5 * 2 = 0");
    }

    #[test]
    fn adamw_matches_pytorchs_update_over_three_steps() {
        // f64 weights [2, 1] and loss sum(w^2 * c(step)): the gradient 2 c w, the update of
        // torch.optim.AdamW written out in f64 (weight decay on the matrix only), with and
        // without AMSGrad; c shrinks at step 3 so that AMSGrad's maximum differs from v.
        for amsgrad in [false, true] {
            let cfg = OptimizerConfig {
                name: "adamw".into(),
                lr: 0.01,
                weight_decay: 0.05,
                amsgrad,
                ..Default::default()
            };
            let coefficients = [[1.0, 3.0], [1.0, 3.0], [0.01, 0.02]];
            let w = Tensor::from_slice(&[0.5f64, -2.0])
                .reshape([2, 1])
                .set_requires_grad(true);
            let mut opt = Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())]).unwrap();
            let ([b1, b2], eps, lr, wd) = (cfg.betas, cfg.eps, cfg.lr, cfg.weight_decay);
            let mut expected = [0.5f64, -2.0];
            let (mut m, mut v, mut v_max) = ([0.0f64; 2], [0.0f64; 2], [0.0f64; 2]);
            for (step, c) in (1..).zip(coefficients) {
                let coef = Tensor::from_slice(&c).reshape([2, 1]);
                opt.zero_grad();
                (&w * &w * &coef).sum(Kind::Double).backward();
                opt.step(lr);
                for i in 0..2 {
                    let g = 2.0 * c[i] * expected[i];
                    expected[i] *= 1.0 - lr * wd;
                    m[i] = b1 * m[i] + (1.0 - b1) * g;
                    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                    v_max[i] = v_max[i].max(v[i]);
                    let second = if amsgrad { v_max[i] } else { v[i] };
                    let denom = (second / (1.0 - b2.powi(step))).sqrt() + eps;
                    expected[i] -= lr / (1.0 - b1.powi(step)) * m[i] / denom;
                }
                let got = Vec::<f64>::try_from(&w.detach().flatten(0, -1)).unwrap();
                for i in 0..2 {
                    assert!(
                        (got[i] - expected[i]).abs() < 1e-12,
                        "amsgrad {amsgrad}, step {step}: {got:?} vs {expected:?}"
                    );
                }
            }
            let buffers = opt.state().0.len();
            assert_eq!(buffers, if amsgrad { 3 } else { 2 }, "the maximum is checkpointed");
        }
    }

    #[test]
    fn sgd_matches_the_closed_form() {
        // One SGD step with momentum 0.9 from zero buffers is w - lr * g.
        let cfg = OptimizerConfig {
            name: "sgd".into(),
            lr: 0.1,
            weight_decay: 0.0,
            ..Default::default()
        };
        let w = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())]).unwrap();
        (&w * &w).sum(Kind::Float).backward();
        opt.step(0.1);
        let got = Vec::<f32>::try_from(&w.detach()).unwrap();
        assert!((got[0] - 0.8).abs() < 1e-6 && (got[1] + 1.6).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_final_rate() {
        let cfg = OptimizerConfig {
            lr: 1.0,
            final_lr: 0.1,
            warmup_epochs: 1.0,
            ..Default::default()
        };
        assert!((learning_rate(&cfg, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&cfg, 9, 100, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 100, 100, 10) - 0.1).abs() < 1e-12);
        let mid = learning_rate(&cfg, 55, 100, 10);
        assert!((mid - 0.55).abs() < 1e-9, "{mid}");
    }

    #[test]
    fn unknown_optimizer_is_a_clear_error() {
        let cfg = OptimizerConfig {
            name: "adam9".into(),
            ..Default::default()
        };
        let err = Optimizer::new(&cfg, vec![]).err().unwrap().to_string();
        assert!(
            err.contains("optimizer.name") && err.contains("adam9") && err.contains("lars"),
            "{err}"
        );
    }
}
