//! Mean pooling over the slice axis: the volume embedding is the average of the (optionally
//! L2-normalised) slice embeddings of the real slices, padding excluded. It is the
//! "no inter-slice context" baseline against which the paper's deformable-attention f_inter
//! (Nguyen et al., AAAI 2023, Eq. 6-10) is measured; Eq. 10's normalise-then-pool is kept.

use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeanPoolConfig {
    /// L2-normalise each slice embedding before pooling (Eq. 10).
    pub normalize: bool,
}

impl Default for MeanPoolConfig {
    fn default() -> Self {
        MeanPoolConfig { normalize: true }
    }
}

pub struct MeanPoolAggregator {
    cfg: MeanPoolConfig,
    dim: i64,
}

impl Aggregator for MeanPoolAggregator {
    fn input_dim(&self) -> i64 {
        self.dim
    }

    fn output_dim(&self) -> i64 {
        self.dim
    }

    fn forward(&self, slices: &Tensor, valid: Option<&Tensor>, _train: bool) -> AggregatorOutput {
        let slices = if self.cfg.normalize {
            l2_normalize(slices)
        } else {
            slices.shallow_clone()
        };
        let volume = match valid {
            Some(valid) => {
                let weights = valid.to_kind(slices.kind()).unsqueeze(-1);
                (&slices * &weights).sum_dim_intlist(1, false, slices.kind())
                    / weights.sum_dim_intlist(1, false, slices.kind()).clamp_min(1.0)
            }
            None => slices.mean_dim(1, false, slices.kind()),
        };
        AggregatorOutput { slices, volume }
    }
}

fn build(section: &Section, _: nn::Path, shape: &AggregatorShape) -> Result<Box<dyn Aggregator>> {
    Ok(Box::new(MeanPoolAggregator {
        cfg: section.parse()?,
        dim: shape.input_dim,
    }))
}

register!(AGGREGATORS, MEAN_POOL: AggregatorEntry = AggregatorEntry {
    name: "mean-pool",
    about: "Mean of the L2-normalised slice embeddings (no parameters; baseline for f_inter)",
    default_config: default_toml::<MeanPoolConfig>,
    smoke_configs: &["", "normalize = false"],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_does_not_change_the_volume_embedding() {
        let agg = MeanPoolAggregator {
            cfg: MeanPoolConfig { normalize: false },
            dim: 3,
        };
        let x = Tensor::from_slice(&[1f32, 2., 3., 5., 6., 7., 100., 100., 100.]).view([1, 3, 3]);
        let valid = Tensor::from_slice(&[true, true, false]).view([1, 3]);
        let out = agg.forward(&x, Some(&valid), true);
        assert_eq!(Vec::<f32>::try_from(out.volume.view([-1])).unwrap(), vec![3., 4., 5.]);
        assert_eq!(out.slices.size(), vec![1, 3, 3]);
    }

    #[test]
    fn normalised_slices_have_unit_norm() {
        let agg = MeanPoolAggregator {
            cfg: MeanPoolConfig::default(),
            dim: 8,
        };
        let out = agg.forward(&Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu)), None, true);
        let norms = out.slices.norm_scalaropt_dim(2, [-1], false);
        assert!(norms.allclose(&norms.ones_like(), 1e-5, 1e-5, false));
        assert_eq!(out.volume.size(), vec![2, 8]);
    }
}
