//! Dynamic loss scaling for fp16 mixed precision (Micikevicius et al., "Mixed Precision
//! Training", ICLR 2018, section 3.2), as `torch.amp.GradScaler` does it.
//!
//! fp16's smallest normal number is 6e-5, and many gradients of a deep network are smaller:
//! they would flush to zero in the fp16 parts of the backward pass. Multiplying the loss by
//! a large scale S before the backward pass lifts them into range; the fp32 master gradients
//! are divided by S again before anything reads them (clipping, the optimizer). When S is
//! too large a gradient overflows to inf: the step is skipped and S halved. After
//! `growth_interval` steps without overflow S doubles, so it tracks the largest scale that
//! does not overflow. The defaults are GradScaler's (S = 2^16, x2 every 2000 clean steps,
//! x0.5 on overflow), and so is the order within a step: scale, backward, (all-reduce),
//! unscale, check, clip, step or skip, update. Under data parallelism the check runs after
//! the gradients are averaged, so every rank sees the same overflow and skips together.
//!
//! Only gradients are scaled: an fp16 forward pass that overflows gives a non-finite loss,
//! which no scale fixes, and the run stops with the divergence error as in fp32.
//!
//! The scale and the count of clean steps are part of the checkpoint (`TrainingState`), so a
//! resumed run scales, skips and grows exactly as the uninterrupted one would.

use crate::optim::Optimizer;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// `run.loss_scaling`: `auto` (dynamic under `precision = "fp16"`, off otherwise), `dynamic`
/// (also under fp32 or bf16, where it is harmless and only useful to test the mechanism), or
/// `off`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossScaling {
    #[default]
    Auto,
    Dynamic,
    Off,
}

impl LossScaling {
    /// Whether a run in `precision` scales its loss.
    pub fn enabled(self, precision: crate::precision::Precision) -> bool {
        match self {
            LossScaling::Auto => precision == crate::precision::Precision::Fp16,
            LossScaling::Dynamic => true,
            LossScaling::Off => false,
        }
    }
}

/// GradScaler's `init_scale`.
pub const INITIAL_SCALE: f64 = 65536.0;
/// GradScaler's `growth_factor`.
pub const GROWTH_FACTOR: f64 = 2.0;
/// GradScaler's `backoff_factor`.
pub const BACKOFF_FACTOR: f64 = 0.5;
/// GradScaler's `growth_interval`.
pub const GROWTH_INTERVAL: u64 = 2000;

/// What one step's check found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScaledStep {
    /// Finite gradients, unscaled: take the optimizer step.
    Apply,
    /// Some gradient was inf or NaN at `scale`: skip the optimizer step.
    Skip { scale: f64 },
}

/// Dynamic loss scaling, one per run (it carries over from stage to stage, as one GradScaler
/// over a whole training does). What it holds is what the checkpoint saves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale S.
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub growth_tracker: u64,
    /// Steps skipped for overflowing gradients over the whole run.
    pub skipped_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: INITIAL_SCALE,
            growth_tracker: 0,
            skipped_steps: 0,
        }
    }
}

impl LossScaler {
    /// The loss to call backward on: `loss * S`.
    pub fn scaled(&self, loss: &Tensor) -> Tensor {
        loss * self.scale
    }

    /// Divides the gradients by S in place and says whether any is inf or NaN. `gradients`
    /// are the ones this step's backward pass wrote (not a frozen module's stale zeros); the
    /// check costs one device-to-host read for all of them.
    pub fn unscale(&self, gradients: &[Tensor]) -> ScaledStep {
        if gradients.is_empty() {
            return ScaledStep::Apply;
        }
        let inverse = 1.0 / self.scale;
        let non_finite = tch::no_grad(|| {
            let flags: Vec<Tensor> = gradients
                .iter()
                .map(|g| {
                    let _ = g.shallow_clone().f_mul_scalar_(inverse);
                    g.isfinite().logical_not().any()
                })
                .collect();
            Tensor::stack(&flags, 0).any().to_kind(Kind::Int64).int64_value(&[]) != 0
        });
        if non_finite {
            ScaledStep::Skip { scale: self.scale }
        } else {
            ScaledStep::Apply
        }
    }

    /// Moves the scale after a step: backs off after a skip, grows after `GROWTH_INTERVAL`
    /// clean steps in a row (torch's `_amp_update_scale_`).
    pub fn update(&mut self, step: ScaledStep) {
        match step {
            ScaledStep::Skip { .. } => {
                self.scale *= BACKOFF_FACTOR;
                self.growth_tracker = 0;
                self.skipped_steps += 1;
            }
            ScaledStep::Apply => {
                self.growth_tracker += 1;
                if self.growth_tracker == GROWTH_INTERVAL {
                    self.scale *= GROWTH_FACTOR;
                    self.growth_tracker = 0;
                }
            }
        }
    }
}

/// The tensor to call backward on: the loss scaled by `scaler`'s S, or the loss itself.
pub fn loss_for_backward(scaler: Option<&LossScaler>, loss: &Tensor) -> Tensor {
    match scaler {
        Some(scaler) => scaler.scaled(loss),
        None => loss.shallow_clone(),
    }
}

/// The rest of an optimizer step once the backward pass (and, under data parallelism, the
/// gradients' all-reduce) is done: without a scaler, clip and step; with one, unscale and
/// check this step's gradients first, and skip the step when one overflowed, with a warning
/// that starts with `at()` (where in the run), then move the scale. The gradient norm before
/// clipping, or `None` for a skipped step.
pub fn finish_step(
    scaler: Option<&mut LossScaler>,
    optimizer: &mut Optimizer,
    clip_grad_norm: f64,
    lr: f64,
    global_step: usize,
    at: impl FnOnce() -> String,
) -> Option<f64> {
    let Some(scaler) = scaler else {
        let norm = optimizer.clip_grad_norm(clip_grad_norm);
        optimizer.step(lr);
        return Some(norm);
    };
    let gradients = optimizer.fresh_gradients();
    inject_overflow_if_asked(global_step, &gradients);
    let step = scaler.unscale(&gradients);
    scaler.update(step);
    match step {
        ScaledStep::Skip { scale } => {
            tracing::warn!(
                "{}: gradients overflowed at loss scale {scale}; optimizer step skipped, scale now {}",
                at(),
                scaler.scale
            );
            None
        }
        ScaledStep::Apply => {
            let norm = optimizer.clip_grad_norm(clip_grad_norm);
            optimizer.step(lr);
            Some(norm)
        }
    }
}

/// Test hook: `INJECT_MEDSSL_OVERFLOW=step:N` makes a gradient of global step N infinite
/// before the check, the way an fp16 overflow would, so that the skip, the backoff and
/// their resume can be tested on a machine without CUDA.
pub fn inject_overflow_if_asked(global_step: usize, gradients: &[Tensor]) {
    let asked = std::env::var("INJECT_MEDSSL_OVERFLOW").is_ok_and(|at| at == format!("step:{global_step}"));
    if let (true, Some(first)) = (asked, gradients.first()) {
        tracing::warn!("INJECT_MEDSSL_OVERFLOW: an infinite gradient at step {global_step}");
        tch::no_grad(|| {
            let _ = first.shallow_clone().f_fill_(f64::INFINITY);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precision::Precision;
    use proptest::prelude::*;
    use tch::Device;

    fn gradient(values: &[f64]) -> Tensor {
        Tensor::from_slice(values).to_kind(Kind::Float).to_device(Device::Cpu)
    }

    #[test]
    fn auto_scales_fp16_only() {
        assert!(LossScaling::Auto.enabled(Precision::Fp16));
        assert!(!LossScaling::Auto.enabled(Precision::Bf16));
        assert!(!LossScaling::Auto.enabled(Precision::Fp32));
        assert!(LossScaling::Dynamic.enabled(Precision::Fp32));
        assert!(!LossScaling::Off.enabled(Precision::Fp16));
    }

    #[test]
    fn finite_gradients_are_divided_by_the_scale_and_applied() {
        let scaler = LossScaler::default();
        let g = gradient(&[65536.0, -131072.0]);
        assert_eq!(scaler.unscale(std::slice::from_ref(&g)), ScaledStep::Apply);
        assert_eq!(Vec::<f64>::try_from(&g.to_kind(Kind::Double)).unwrap(), vec![1.0, -2.0]);
        let loss = Tensor::from(0.5f32);
        assert_eq!(scaler.scaled(&loss).double_value(&[]), 32768.0);
    }

    #[test]
    fn an_infinite_or_nan_gradient_skips_and_backs_off() {
        for bad in [f64::INFINITY, f64::NAN] {
            let mut scaler = LossScaler::default();
            let grads = [gradient(&[1.0]), gradient(&[2.0, bad])];
            let step = scaler.unscale(&grads);
            assert_eq!(step, ScaledStep::Skip { scale: INITIAL_SCALE });
            scaler.update(step);
            assert_eq!(
                scaler,
                LossScaler {
                    scale: INITIAL_SCALE * BACKOFF_FACTOR,
                    growth_tracker: 0,
                    skipped_steps: 1
                }
            );
        }
    }

    #[test]
    fn the_injected_overflow_is_seen_as_one() {
        std::env::set_var("INJECT_MEDSSL_OVERFLOW", "step:7");
        let grads = [gradient(&[1.0, 2.0])];
        inject_overflow_if_asked(6, &grads);
        assert_eq!(LossScaler::default().unscale(&grads), ScaledStep::Apply);
        inject_overflow_if_asked(7, &grads);
        assert!(matches!(LossScaler::default().unscale(&grads), ScaledStep::Skip { .. }));
        std::env::remove_var("INJECT_MEDSSL_OVERFLOW");
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let scaler = LossScaler {
            scale: 1024.0,
            growth_tracker: 17,
            skipped_steps: 3,
        };
        let text = serde_json::to_string(&scaler).unwrap();
        assert_eq!(serde_json::from_str::<LossScaler>(&text).unwrap(), scaler);
    }

    proptest! {
        /// Against a direct model of GradScaler's rule: after any sequence of clean and
        /// overflowing steps the scale is 2^16 x 0.5^(overflows) x 2^(completed growth
        /// intervals since the last overflow, counted across), the tracker the clean steps
        /// since the scale last moved, and resuming from the state mid-sequence changes
        /// nothing.
        #[test]
        fn scale_follows_gradscalers_rule_and_resumes_exactly(
            steps in proptest::collection::vec(prop_oneof![9 => Just(false), 1 => Just(true)], 0..6000),
            cut in 0usize..6000,
        ) {
            let mut scaler = LossScaler::default();
            let (mut scale, mut tracker, mut skipped) = (INITIAL_SCALE, 0u64, 0u64);
            let cut = cut.min(steps.len());
            let mut resumed: Option<LossScaler> = None;
            for (i, &overflow) in steps.iter().enumerate() {
                if i == cut {
                    let json = serde_json::to_string(&scaler).unwrap();
                    resumed = Some(serde_json::from_str(&json).unwrap());
                }
                let step = if overflow { ScaledStep::Skip { scale } } else { ScaledStep::Apply };
                scaler.update(step);
                if let Some(r) = resumed.as_mut() {
                    r.update(step);
                }
                if overflow {
                    scale *= 0.5;
                    tracker = 0;
                    skipped += 1;
                } else {
                    tracker += 1;
                    if tracker == 2000 {
                        scale *= 2.0;
                        tracker = 0;
                    }
                }
            }
            let want = LossScaler { scale, growth_tracker: tracker, skipped_steps: skipped };
            prop_assert_eq!(&scaler, &want);
            if let Some(r) = resumed {
                prop_assert_eq!(&r, &want);
            }
        }
    }
}
