//! Gated attention pooling over the slice axis: Ilse, Tomczak and Welling, "Attention-based
//! Deep Multiple Instance Learning", ICML 2018, Eq. 9. Each slice is an instance of the
//! volume's bag; its weight is
//! a_k = softmax_k(w^T (tanh(V h_k) ⊙ sigm(U h_k))) and the volume embedding is
//! sum_k a_k h_k. The tanh branch alone (Eq. 8) is nearly linear around zero, which limits
//! what the weights can express; the sigmoid gate is what the paper adds to fix that.
//!
//! Slice embeddings are first projected to `output_dim` and layer-normalised, so the pooled
//! width does not depend on the encoder. With `normalize`, slice and volume embeddings are
//! L2-normalised, in the spirit of Nguyen et al.'s Eq. 10 (as in `mean-pool`), so the two
//! aggregators feed an objective embeddings of the same scale.

use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AttentionPoolConfig {
    /// Width of the projected slice embeddings and of the volume embedding.
    pub output_dim: i64,
    /// Width of the hidden layer of the attention network (rows of V and U in Eq. 9).
    pub attention_dim: i64,
    /// L2-normalise the projected slice embeddings and the volume embedding.
    pub normalize: bool,
}

impl Default for AttentionPoolConfig {
    fn default() -> Self {
        AttentionPoolConfig {
            output_dim: 256,
            attention_dim: 128,
            normalize: true,
        }
    }
}

pub struct AttentionPoolAggregator {
    cfg: AttentionPoolConfig,
    input_dim: i64,
    project: nn::Linear,
    norm: nn::LayerNorm,
    attention_v: nn::Linear,
    attention_u: nn::Linear,
    attention_w: nn::Linear,
}

impl AttentionPoolAggregator {
    pub fn new(p: nn::Path, cfg: AttentionPoolConfig, input_dim: i64) -> Result<Self> {
        ensure!(
            cfg.output_dim > 0,
            "aggregator.output_dim must be positive, got {}",
            cfg.output_dim
        );
        ensure!(
            cfg.attention_dim > 0,
            "aggregator.attention_dim must be positive, got {}",
            cfg.attention_dim
        );
        ensure!(
            input_dim > 0,
            "attention-pool: the encoder's embedding width must be positive, got {input_dim}"
        );
        let project = layers::linear(&p / "project", input_dim, cfg.output_dim);
        let norm = layers::layer_norm(&p / "norm", vec![cfg.output_dim]);
        let attention_v = layers::linear(&p / "attention_v", cfg.output_dim, cfg.attention_dim);
        let attention_u = layers::linear(&p / "attention_u", cfg.output_dim, cfg.attention_dim);
        // A bias on w shifts every logit of a bag equally, which the softmax cancels: it could
        // never learn anything, and Eq. 9 has none.
        let attention_w = layers::linear_without_bias(&p / "attention_w", cfg.attention_dim, 1);
        Ok(AttentionPoolAggregator {
            cfg,
            input_dim,
            project,
            norm,
            attention_v,
            attention_u,
            attention_w,
        })
    }

    /// The projected slice embeddings `[B, n, output_dim]` (what `forward` returns as
    /// `slices`) and the attention weights `[B, n]` of Eq. 9, exactly zero on padding.
    pub fn attend(&self, slices: &Tensor, valid: Option<&Tensor>) -> (Tensor, Tensor) {
        let hidden = slices.apply(&self.project).apply(&self.norm);
        // Attention reads the layer-normalised embeddings rather than the L2-normalised ones:
        // their unit-variance entries are the scale V and U are initialised for, where entries
        // of size 1/sqrt(output_dim) would start every bag at near-uniform weights.
        let gated = hidden.apply(&self.attention_v).tanh() * hidden.apply(&self.attention_u).sigmoid();
        let logits = gated.apply(&self.attention_w).squeeze_dim(-1);
        let logits = match valid {
            Some(valid) => {
                // A bag with no valid slice would softmax over nothing but -inf (NaN); pooling
                // all of its slices keeps the batch finite, and such a row carries no signal.
                let empty = valid.any_dim(1, true).logical_not();
                let valid = valid.logical_or(&empty);
                logits.masked_fill(&valid.logical_not(), f64::NEG_INFINITY)
            }
            None => logits,
        };
        let weights = logits.softmax(1, logits.kind());
        let slices = if self.cfg.normalize {
            l2_normalize(&hidden)
        } else {
            hidden
        };
        (slices, weights)
    }
}

impl Aggregator for AttentionPoolAggregator {
    fn input_dim(&self) -> i64 {
        self.input_dim
    }

    fn output_dim(&self) -> i64 {
        self.cfg.output_dim
    }

    fn forward(&self, slices: &Tensor, valid: Option<&Tensor>, _train: bool) -> AggregatorOutput {
        let (slices, weights) = self.attend(slices, valid);
        let volume = weights.unsqueeze(1).matmul(&slices).squeeze_dim(1);
        let volume = if self.cfg.normalize {
            l2_normalize(&volume)
        } else {
            volume
        };
        AggregatorOutput { slices, volume }
    }
}

fn build(section: &Section, p: nn::Path, shape: &AggregatorShape) -> Result<Box<dyn Aggregator>> {
    Ok(Box::new(AttentionPoolAggregator::new(
        p,
        section.parse()?,
        shape.input_dim,
    )?))
}

register!(AGGREGATORS, ATTENTION_POOL: AggregatorEntry = AggregatorEntry {
    name: "attention-pool",
    about: "Gated attention pooling of projected slice embeddings (Ilse et al., ICML 2018, Eq. 9)",
    default_config: default_toml::<AttentionPoolConfig>,
    smoke_configs: &["output_dim = 8\nattention_dim = 4", "output_dim = 8\nattention_dim = 4\nnormalize = false"],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn aggregator(vs: &nn::VarStore, input_dim: i64, normalize: bool) -> AttentionPoolAggregator {
        let cfg = AttentionPoolConfig {
            output_dim: 8,
            attention_dim: 4,
            normalize,
        };
        AttentionPoolAggregator::new(vs.root() / "aggregator", cfg, input_dim).unwrap()
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn output_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        for normalize in [true, false] {
            let agg = aggregator(&vs, 6, normalize);
            let out = agg.forward(&randn(&[3, 5, 6]), None, true);
            assert_eq!(out.slices.size(), vec![3, 5, 8]);
            assert_eq!(out.volume.size(), vec![3, 8]);
            assert_eq!((agg.input_dim(), agg.output_dim()), (6, 8));
        }
    }

    #[test]
    fn padding_gets_zero_weight_and_does_not_change_the_volume_embedding() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let agg = aggregator(&vs, 6, false);
        let x = randn(&[2, 4, 6]);
        let valid = Tensor::from_slice(&[true, true, false, false, true, false, true, false]).view([2, 4]);
        let (_, weights) = agg.attend(&x, Some(&valid));
        let padded = weights.masked_select(&valid.logical_not());
        assert_eq!(Vec::<f32>::try_from(&padded).unwrap(), vec![0.0; 4]);

        let before = agg.forward(&x, Some(&valid), true).volume;
        let noise = randn(&[2, 4, 6]) * 100.0;
        let y = x.where_self(&valid.unsqueeze(-1), &noise);
        let after = agg.forward(&y, Some(&valid), true).volume;
        assert_eq!(max_abs_diff(&before, &after), 0.0);
    }

    #[test]
    fn a_bag_without_valid_slices_pools_all_of_them() {
        let vs = nn::VarStore::new(Device::Cpu);
        let agg = aggregator(&vs, 6, true);
        let x = randn(&[2, 3, 6]);
        let none = Tensor::zeros([2, 3], (Kind::Bool, Device::Cpu));
        let masked = agg.forward(&x, Some(&none), true).volume;
        let unmasked = agg.forward(&x, None, true).volume;
        assert!(bool::try_from(masked.isfinite().all()).unwrap());
        assert!(max_abs_diff(&masked, &unmasked) < 1e-6);
    }

    #[test]
    fn permuting_the_slices_does_not_change_the_volume_embedding() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        for normalize in [true, false] {
            let agg = aggregator(&vs, 6, normalize);
            let x = randn(&[2, 5, 6]);
            let valid =
                Tensor::from_slice(&[true, true, true, false, true, true, false, true, true, true]).view([2, 5]);
            let order = Tensor::from_slice(&[4i64, 2, 0, 3, 1]);
            let out = agg.forward(&x, Some(&valid), true);
            let permuted = agg.forward(&x.index_select(1, &order), Some(&valid.index_select(1, &order)), true);
            assert!(max_abs_diff(&out.volume, &permuted.volume) < 1e-5);
            assert!(max_abs_diff(&out.slices.index_select(1, &order), &permuted.slices) < 1e-6);
        }
    }

    #[test]
    fn gradients_reach_every_parameter() {
        tch::manual_seed(2);
        for normalize in [true, false] {
            let vs = nn::VarStore::new(Device::Cpu);
            let agg = aggregator(&vs, 6, normalize);
            let out = agg.forward(&randn(&[3, 4, 6]), None, true);
            // Not volume.sum(): at initialisation layer norm's output sums to zero over the
            // features, so a plain sum is flat in the projection and attention weights (their
            // gradients are rounding noise, about 1e-8).
            (out.volume * randn(&[3, 8])).sum(Kind::Float).backward();
            let mut names = Vec::new();
            for (name, p) in vs.variables() {
                let g = p.grad();
                let largest = if g.defined() {
                    g.abs().max().double_value(&[])
                } else {
                    0.0
                };
                assert!(largest > 1e-4, "{name}: gradient at most {largest:e}");
                names.push(name);
            }
            names.sort();
            assert_eq!(
                names,
                [
                    "aggregator.attention_u.bias",
                    "aggregator.attention_u.weight",
                    "aggregator.attention_v.bias",
                    "aggregator.attention_v.weight",
                    "aggregator.attention_w.weight",
                    "aggregator.norm.bias",
                    "aggregator.norm.weight",
                    "aggregator.project.bias",
                    "aggregator.project.weight",
                ]
            );
        }
    }

    #[test]
    fn non_positive_widths_are_errors_naming_the_key() {
        let vs = nn::VarStore::new(Device::Cpu);
        for (cfg, key) in [
            (
                AttentionPoolConfig {
                    output_dim: 0,
                    ..Default::default()
                },
                "aggregator.output_dim",
            ),
            (
                AttentionPoolConfig {
                    attention_dim: -1,
                    ..Default::default()
                },
                "aggregator.attention_dim",
            ),
        ] {
            let err = AttentionPoolAggregator::new(vs.root(), cfg, 6)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(key) && err.contains("must be positive"), "{err}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn outputs_are_finite_and_volumes_unit_norm(
            b in 1i64..4, n in 1i64..8, seed in 0i64..1_000, mask in proptest::collection::vec(any::<bool>(), 32),
        ) {
            tch::manual_seed(seed);
            let vs = nn::VarStore::new(Device::Cpu);
            let agg = aggregator(&vs, 6, true);
            let valid = Tensor::from_slice(&mask[..(b * n) as usize]).view([b, n]);
            let out = agg.forward(&randn(&[b, n, 6]), Some(&valid), true);
            prop_assert_eq!(out.slices.size(), vec![b, n, 8]);
            prop_assert!(bool::try_from(out.slices.isfinite().all()).unwrap());
            prop_assert!(bool::try_from(out.volume.isfinite().all()).unwrap());
            let norms = out.volume.norm_scalaropt_dim(2, [-1], false);
            prop_assert!(max_abs_diff(&norms, &norms.ones_like()) < 1e-5, "{:?}", norms);
        }
    }
}
