//! The linear probe: multinomial logistic regression on standardised frozen features.
//!
//! Features are standardised with the training subset's mean and standard deviation (a
//! feature constant on that subset is dropped: it carries nothing the probe could learn).
//! The weights start from N(0, 0.01^2), seeded, and are fitted full-batch with Adam for a
//! fixed number of epochs (one epoch is one step) on the mean cross-entropy plus an L2
//! penalty `weight_decay / 2 * ||W||^2` on the weights (not the bias). tch exposes no
//! L-BFGS, the usual solver for this convex problem; a fixed full-batch schedule is
//! deterministic and, with the penalty, close to the optimum on the few thousand samples
//! and few hundred features these probes see.

use crate::rng::{self, domain};
use anyhow::{ensure, Result};
use serde::Serialize;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};

/// Sub-domain of [`domain::PROBE`] for the weights' initialisation.
const INIT: u64 = 2;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogisticConfig {
    /// Full-batch Adam steps.
    pub epochs: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// L2 penalty on the weights.
    pub weight_decay: f64,
}

impl Default for LogisticConfig {
    fn default() -> Self {
        LogisticConfig {
            epochs: 500,
            lr: 0.01,
            weight_decay: 1e-4,
        }
    }
}

impl LogisticConfig {
    pub fn check(&self) -> Result<()> {
        ensure!(self.epochs >= 1, "--epochs {}: expected at least 1", self.epochs);
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "--lr {}: expected a positive learning rate",
            self.lr
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay {}: expected a finite value >= 0",
            self.weight_decay
        );
        Ok(())
    }
}

/// A fitted probe.
pub struct Logistic {
    mean: Tensor,
    /// 1 / std per feature, 0 for features constant on the training subset.
    inverse_std: Tensor,
    weight: Tensor,
    bias: Tensor,
}

impl Logistic {
    /// Fits `classes`-way logistic regression to `features` `[N, F]` and `labels` `[N]`
    /// (int64 class ids), on the features' device.
    pub fn fit(features: &Tensor, labels: &Tensor, classes: i64, cfg: &LogisticConfig, seed: u64) -> Result<Logistic> {
        cfg.check()?;
        let x = features.to_kind(Kind::Float);
        let mean = x.mean_dim(0, true, Kind::Float);
        let std = if x.size()[0] > 1 {
            x.std_dim(0, false, true)
        } else {
            x.ones_like()
        };
        let inverse_std = std.clamp_min(1e-6).reciprocal() * std.gt(1e-6).to_kind(Kind::Float);
        let x = (&x - &mean) * &inverse_std;
        let labels = labels.to_device(x.device()).to_kind(Kind::Int64);

        tch::manual_seed(rng::derive(seed, &[domain::PROBE, INIT]) as i64);
        let vs = nn::VarStore::new(x.device());
        let root = vs.root();
        let weight = root.var(
            "weight",
            &[x.size()[1], classes],
            nn::Init::Randn { mean: 0.0, stdev: 0.01 },
        );
        let bias = root.zeros("bias", &[classes]);
        let mut optimizer = nn::Adam::default().build(&vs, cfg.lr)?;
        for _ in 0..cfg.epochs {
            let logits = x.matmul(&weight) + &bias;
            let loss =
                logits.cross_entropy_for_logits(&labels) + weight.square().sum(Kind::Float) * (cfg.weight_decay / 2.0);
            optimizer.backward_step(&loss);
        }
        Ok(Logistic {
            mean,
            inverse_std,
            weight: weight.detach(),
            bias: bias.detach(),
        })
    }

    /// Class probabilities `[M, classes]` of `features` `[M, F]`.
    pub fn probabilities(&self, features: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let x = (features.to_kind(Kind::Float).to_device(self.mean.device()) - &self.mean) * &self.inverse_std;
            (x.matmul(&self.weight) + &self.bias).softmax(-1, Kind::Float)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Device;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn separates_linearly_separable_data(
            seed in 0u64..1000,
            dims in 2i64..8,
            n in 20i64..80,
            offset in -0.5f64..0.5,
        ) {
            tch::manual_seed(seed as i64);
            let direction = Tensor::randn([dims], (Kind::Float, Device::Cpu));
            let direction = &direction / direction.norm();
            let x = Tensor::randn([n, dims], (Kind::Float, Device::Cpu)) * 3.0;
            let margin = x.matmul(&direction) - offset;
            // Keep a margin between the classes, so that separable means separable by a
            // visible gap.
            let keep = margin.abs().gt(0.3).nonzero().squeeze_dim(1);
            let (x, margin) = (x.index_select(0, &keep), margin.index_select(0, &keep));
            let labels = margin.gt(0.0).to_kind(Kind::Int64);
            let classes = Vec::<i64>::try_from(&labels).unwrap();
            prop_assume!(classes.contains(&0) && classes.contains(&1));
            let cfg = LogisticConfig { epochs: 150, lr: 0.1, weight_decay: 0.0 };
            let probe = Logistic::fit(&x, &labels, 2, &cfg, seed).unwrap();
            let predicted = probe.probabilities(&x).argmax(-1, false);
            let accuracy = predicted.eq_tensor(&labels).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
            prop_assert_eq!(accuracy, 1.0);
        }
    }

    #[test]
    fn constant_features_are_dropped_and_probabilities_sum_to_one() {
        let x = Tensor::from_slice(&[0.0f32, 5.0, 1.0, 5.0, 2.0, 5.0, 3.0, 5.0]).view([4, 2]);
        let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let cfg = LogisticConfig {
            epochs: 100,
            ..Default::default()
        };
        let probe = Logistic::fit(&x, &labels, 3, &cfg, 0).unwrap();
        // A shifted constant feature on new data must not blow up through a zero std.
        let shifted = Tensor::from_slice(&[0.0f32, 500.0, 3.0, -7.0]).view([2, 2]);
        let p = probe.probabilities(&shifted);
        assert_eq!(p.size(), [2, 3]);
        assert!(bool::try_from(p.isfinite().all()).unwrap());
        let sums = p.sum_dim_intlist(1, false, Kind::Float);
        assert!(sums.allclose(&sums.ones_like(), 1e-5, 1e-5, false));
        assert_eq!(Vec::<i64>::try_from(p.argmax(-1, false)).unwrap(), [0, 1]);
        let err = Logistic::fit(
            &x,
            &labels,
            2,
            &LogisticConfig {
                epochs: 0,
                ..Default::default()
            },
            0,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("--epochs"), "{err}");
    }
}
