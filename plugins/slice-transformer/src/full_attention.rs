//! Full multi-head self-attention over the slice axis: every slice attends to every valid
//! slice, with a learned relative position bias per head (a table of `2 n - 1` entries). The
//! baseline for the paper's deformable f_inter (Nguyen et al., AAAI 2023, Eq. 6-10): the same
//! trunk ([`crate::block`]) and the same parameter names, with keys at every slice instead of
//! `ceil(n / r)` deformed points, so its cost grows as `n^2` where the deformable layer's grows
//! as `n^2 / r`.

use crate::block::{
    ensure_positive, keys_or_all, HeadProjections, RelativePositionBias, SliceAttention, SliceTransformer, TrunkSpec,
};
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FullAttentionConfig {
    /// Width of the transformer, of the contextual slice embeddings and of the volume
    /// embedding; the slice features are projected to it.
    pub width: i64,
    /// Transformer blocks.
    pub layers: i64,
    /// Attention heads; must divide `width`.
    pub heads: i64,
    /// Hidden width of each block's feed-forward network.
    pub ffn_dim: i64,
    /// Dropout on the attention and feed-forward outputs (training only).
    pub dropout: f64,
    /// Down-sampling factor of the slice sequence between consecutive blocks (masked mean
    /// over windows); `[]` for none, else one entry per gap (`layers - 1` entries).
    pub pyramid_strides: Vec<i64>,
}

impl Default for FullAttentionConfig {
    fn default() -> Self {
        FullAttentionConfig {
            width: 640,
            layers: 4,
            heads: 8,
            ffn_dim: 1280,
            dropout: 0.0,
            pyramid_strides: Vec::new(),
        }
    }
}

impl FullAttentionConfig {
    pub fn trunk(&self) -> TrunkSpec {
        TrunkSpec {
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            ffn_dim: self.ffn_dim,
            dropout: self.dropout,
            pyramid_strides: self.pyramid_strides.clone(),
        }
    }
}

/// One layer of full attention over `slices` slices.
#[derive(Debug)]
pub struct FullAttention {
    pub projections: HeadProjections,
    pub bias: RelativePositionBias,
}

impl FullAttention {
    pub fn new(p: &nn::Path, width: i64, heads: i64, slices: i64) -> Result<Self> {
        ensure_positive("width", width)?;
        ensure_positive("heads", heads)?;
        ensure!(
            width % heads == 0,
            "aggregator.width = {width} is not divisible by aggregator.heads = {heads}"
        );
        ensure!(slices > 0, "full attention needs at least one slice, got {slices}");
        Ok(FullAttention {
            projections: HeadProjections::new(p, width, heads),
            bias: RelativePositionBias::new(p, heads, slices),
        })
    }
}

impl SliceAttention for FullAttention {
    fn forward(&self, x: &Tensor, valid: Option<&Tensor>) -> Tensor {
        let [b, n, _] = x.size()[..] else {
            unreachable!("slice sequences are [B, n, width]")
        };
        let heads = &self.projections;
        let queries = heads.scaled_queries(&x.apply(&heads.query));
        let keys = heads.split_heads(&x.apply(&heads.key));
        let values = heads.split_heads(&x.apply(&heads.value));
        let key_valid = valid.map(|v| keys_or_all(v).view([b, 1, 1, n]));
        heads.attend(&queries, &keys, &values, &self.bias.dense(n), key_valid.as_ref())
    }
}

/// The `full-attention` aggregator.
pub type FullAttentionAggregator = SliceTransformer<FullAttention>;

impl FullAttentionAggregator {
    pub fn build(p: &nn::Path, cfg: &FullAttentionConfig, shape: &AggregatorShape) -> Result<Self> {
        let trunk = cfg.trunk();
        let lengths = trunk.level_lengths(shape)?;
        SliceTransformer::new(p, &trunk, shape.input_dim, &lengths, |p, slices| {
            FullAttention::new(p, cfg.width, cfg.heads, slices)
        })
    }
}

fn build(section: &Section, p: nn::Path, shape: &AggregatorShape) -> Result<Box<dyn Aggregator>> {
    let cfg: FullAttentionConfig = section.parse()?;
    Ok(Box::new(FullAttentionAggregator::build(&p, &cfg, shape)?))
}

register!(AGGREGATORS, FULL_ATTENTION: AggregatorEntry = AggregatorEntry {
    name: "full-attention",
    about: "Transformer with full self-attention over the slices and relative position bias (baseline for deformable-attention)",
    default_config: default_toml::<FullAttentionConfig>,
    // One variant: the deformable smoke configs cover two layers, and a pyramid cannot be
    // smoke-tested on the composition test's 2-slice sequences (one slice left, one key,
    // no gradient for the queries).
    smoke_configs: &["width = 16\nlayers = 1\nheads = 2\nffn_dim = 16"],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tiny(layers: i64) -> FullAttentionConfig {
        FullAttentionConfig {
            width: 8,
            layers,
            heads: 2,
            ffn_dim: 12,
            ..Default::default()
        }
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn output_shapes_and_bias_table_size() {
        let vs = nn::VarStore::new(Device::Cpu);
        let shape = AggregatorShape {
            input_dim: 5,
            slices: 7,
        };
        let agg = FullAttentionAggregator::build(&vs.root(), &tiny(2), &shape).unwrap();
        let out = agg.forward(&randn(&[3, 7, 5]), None, true);
        assert_eq!(out.slices.size(), [3, 7, 8]);
        assert_eq!(out.volume.size(), [3, 8]);
        assert_eq!((agg.input_dim(), agg.output_dim()), (5, 8));
        assert_eq!(agg.attention(0).bias.entries(), 13);
        assert_eq!(agg.attention(1).bias.table.size(), [2, 13]);
    }

    #[test]
    fn bad_keys_are_errors_naming_the_key_and_value() {
        let shape = AggregatorShape {
            input_dim: 5,
            slices: 7,
        };
        for (cfg, expected) in [
            (
                FullAttentionConfig {
                    width: 10,
                    heads: 4,
                    ..tiny(1)
                },
                "aggregator.width = 10 is not divisible by aggregator.heads = 4",
            ),
            (
                FullAttentionConfig { layers: 0, ..tiny(1) },
                "aggregator.layers must be positive, got 0",
            ),
            (
                FullAttentionConfig { ffn_dim: -3, ..tiny(1) },
                "aggregator.ffn_dim must be positive, got -3",
            ),
            (
                FullAttentionConfig {
                    pyramid_strides: vec![2, 2],
                    ..tiny(2)
                },
                "aggregator.pyramid_strides = [2, 2]",
            ),
            (
                FullAttentionConfig {
                    pyramid_strides: vec![0],
                    ..tiny(2)
                },
                "aggregator.pyramid_strides[0] must be positive, got 0",
            ),
            (
                FullAttentionConfig {
                    dropout: 1.0,
                    ..tiny(1)
                },
                "aggregator.dropout must be in [0, 1), got 1",
            ),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let err = FullAttentionAggregator::build(&vs.root(), &cfg, &shape)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn gradients_reach_every_parameter() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let shape = AggregatorShape {
            input_dim: 5,
            slices: 6,
        };
        let agg = FullAttentionAggregator::build(&vs.root(), &tiny(2), &shape).unwrap();
        let out = agg.forward(&randn(&[2, 6, 5]), None, true);
        (out.volume * randn(&[2, 8])).sum(Kind::Float).backward();
        // The batch norm's running statistics are buffers, not parameters.
        for (name, var) in vs.variables().into_iter().filter(|(_, v)| v.requires_grad()) {
            let grad = var.grad();
            assert!(grad.defined() && grad.abs().max().double_value(&[]) > 0.0, "{name}");
        }
    }

    #[test]
    fn volumes_with_unrelated_slices_get_distinct_embeddings_at_initialisation() {
        // Multi-level features as Eq. 9 makes them (five L2-normalised levels of non-negative,
        // ReLU-like activations, ResNet-18's widths at base 16): alike within a volume,
        // unrelated between volumes. Their content, not the positions every volume shares nor
        // the direction all such features share, must decide the volume embedding (see
        // `SliceTransformer::normalised_content`).
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = FullAttentionConfig {
            width: 128,
            layers: 2,
            heads: 4,
            ffn_dim: 256,
            ..Default::default()
        };
        let widths = [16, 16, 32, 64, 128];
        let shape = AggregatorShape {
            input_dim: widths.iter().sum(),
            slices: 16,
        };
        let agg = FullAttentionAggregator::build(&vs.root(), &cfg, &shape).unwrap();
        let levels: Vec<Tensor> = widths
            .iter()
            .map(|&w| {
                let x = randn(&[8, 1, w]).abs() + randn(&[8, 16, w]).abs() * 0.3;
                &x / x.norm_scalaropt_dim(2, [-1], true)
            })
            .collect();
        let volume = agg.forward(&Tensor::cat(&levels, -1), None, true).volume;
        let volume = &volume / volume.norm_scalaropt_dim(2, [-1], true);
        let spread = volume.std_dim(0, true, false).mean(Kind::Float).double_value(&[]);
        let isotropic = 1.0 / 128f64.sqrt();
        // Measured on these inputs: 0.073 with the batch norm, 0.039 with a per-slice
        // LayerNorm in its place, 0.020 with neither.
        assert!(
            spread > 0.6 * isotropic,
            "volume embedding std {spread}, isotropic {isotropic}"
        );
    }

    #[test]
    fn trailing_padding_is_never_attended() {
        // Keys at padding are masked and displacements do not depend on the length, so the
        // valid slices come out exactly as if the padding were not there.
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let agg = FullAttentionAggregator::build(
            &vs.root(),
            &tiny(2),
            &AggregatorShape {
                input_dim: 5,
                slices: 6,
            },
        )
        .unwrap();
        let x = randn(&[2, 6, 5]);
        let valid = Tensor::from_slice(&[true, true, true, true, false, false])
            .view([1, 6])
            .repeat([2, 1]);
        let padded = agg.forward(&x, Some(&valid), false);
        let short = agg.forward(&x.narrow(1, 0, 4), None, false);
        assert!(
            (padded.slices.narrow(1, 0, 4) - &short.slices)
                .abs()
                .max()
                .double_value(&[])
                < 1e-6
        );
        assert!((padded.volume - short.volume).abs().max().double_value(&[]) < 1e-6);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn padding_never_changes_the_volume_embedding(
            b in 1i64..4, n in 1i64..9, seed in 0i64..1000, pyramid in any::<bool>(),
            mask in proptest::collection::vec(any::<bool>(), 32), train in any::<bool>(),
        ) {
            tch::manual_seed(seed);
            let vs = nn::VarStore::new(Device::Cpu);
            let cfg = FullAttentionConfig { pyramid_strides: if pyramid { vec![2] } else { vec![] }, ..tiny(2) };
            let agg = FullAttentionAggregator::build(&vs.root(), &cfg, &AggregatorShape { input_dim: 5, slices: n }).unwrap();
            let valid = Tensor::from_slice(&mask[..(b * n) as usize]).view([b, n]);
            let x = randn(&[b, n, 5]);
            let noisy = x.where_self(&valid.unsqueeze(-1), &(randn(&[b, n, 5]) * 100.0));
            // In training the input batch norm's statistics come from the valid slices only.
            let before = agg.forward(&x, Some(&valid), train);
            let after = agg.forward(&noisy, Some(&valid), train);
            prop_assert_eq!((before.volume - after.volume).abs().max().double_value(&[]), 0.0);
            let kept = valid.unsqueeze(-1);
            let diff = (&before.slices - &after.slices).abs().masked_select(&kept.expand([b, n, 8], false));
            prop_assert!(diff.numel() == 0 || diff.max().double_value(&[]) == 0.0);
            prop_assert!(bool::try_from(before.slices.isfinite().all()).unwrap());
        }
    }
}
