//! Multi-level slice features: Nguyen et al., "Joint Self-Supervised Image-Volume
//! Representation Learning with Intra-inter Contrastive Clustering", AAAI 2023, Eq. 9.
//!
//! A slice enters f_inter as the concatenation of its average-pooled feature maps at several
//! encoder levels, each L2-normalised first so that no level dominates by scale (ResNet-50's
//! stem + layer1..layer4 give 64 + 256 + 512 + 1024 + 2048 = 3904). The projection to the
//! aggregator's width belongs to the aggregator, which is built with this width as its
//! input. The paper's "without multi-level features" ablation is `levels = ["layer4"]`.
//!
//! Config: the `levels` key of the `[aggregator]` section (core takes it before the plugin
//! sees the section). Empty, the default, feeds the encoder's pooled embedding unchanged.

use crate::encoder::{Encoder, EncoderOutput};
use crate::ops::l2_normalize;
use anyhow::{ensure, Result};
use tch::Tensor;

/// The `[aggregator]` key core reads for itself.
pub const LEVELS_KEY: &str = "levels";

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SliceFeatureConfig {
    /// Encoder levels whose pooled, L2-normalised features are concatenated per slice
    /// (Eq. 9), e.g. `["stem", "layer1", "layer2", "layer3", "layer4"]`. Empty: the pooled
    /// embedding.
    pub levels: Vec<String>,
}

/// Which levels of an encoder make a slice's feature, and its width.
#[derive(Debug, Clone)]
pub struct SliceFeatures {
    /// Indices into the encoder's levels; empty for the pooled embedding.
    indices: Vec<usize>,
    dim: i64,
}

impl SliceFeatures {
    /// Checks `cfg.levels` against the levels `encoder` declares; an unknown or repeated
    /// level is an error naming `aggregator.levels` and the encoder's levels.
    pub fn new(cfg: &SliceFeatureConfig, encoder: &dyn Encoder) -> Result<SliceFeatures> {
        let declared = encoder.levels();
        let names: Vec<&str> = declared.iter().map(|l| l.name.as_str()).collect();
        let mut indices = Vec::new();
        for level in &cfg.levels {
            let index = names.iter().position(|n| n == level);
            let Some(index) = index else {
                anyhow::bail!(
                    "config key `aggregator.levels`: the encoder has no level `{level}`; its levels are: {}",
                    names.join(", ")
                );
            };
            ensure!(
                !indices.contains(&index),
                "config key `aggregator.levels`: level `{level}` is listed twice"
            );
            indices.push(index);
        }
        let dim = if indices.is_empty() {
            encoder.embedding_dim()
        } else {
            indices.iter().map(|&i| declared[i].channels).sum()
        };
        Ok(SliceFeatures { indices, dim })
    }

    /// Width of one slice's feature.
    pub fn dim(&self) -> i64 {
        self.dim
    }

    /// Whether the feature is more than the pooled embedding (the encoder's level maps are
    /// needed).
    pub fn multi_level(&self) -> bool {
        !self.indices.is_empty()
    }

    /// `[N, dim]` features of the `N` images whose encoder output is `out`.
    pub fn compute(&self, out: &EncoderOutput) -> Tensor {
        if self.indices.is_empty() {
            return out.pooled.shallow_clone();
        }
        let parts: Vec<Tensor> = self
            .indices
            .iter()
            .map(|&i| {
                let pooled = out.levels[i].mean_dim([2i64, 3].as_slice(), false, out.levels[i].kind());
                l2_normalize(&pooled)
            })
            .collect();
        Tensor::cat(&parts, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{EncoderOutput, Level};
    use tch::{Device, Kind};

    struct TwoLevels(Vec<Level>);

    impl Encoder for TwoLevels {
        fn in_channels(&self) -> i64 {
            1
        }
        fn levels(&self) -> &[Level] {
            &self.0
        }
        fn embedding_dim(&self) -> i64 {
            5
        }
        fn forward(&self, images: &Tensor, _: bool) -> EncoderOutput {
            let n = images.size()[0];
            EncoderOutput {
                levels: vec![
                    Tensor::randn([n, 3, 4, 4], (Kind::Float, Device::Cpu)),
                    Tensor::randn([n, 5, 2, 2], (Kind::Float, Device::Cpu)),
                ],
                pooled: Tensor::randn([n, 5], (Kind::Float, Device::Cpu)),
            }
        }
    }

    fn encoder() -> TwoLevels {
        TwoLevels(vec![
            Level {
                name: "a".into(),
                channels: 3,
                stride: 2,
            },
            Level {
                name: "b".into(),
                channels: 5,
                stride: 4,
            },
        ])
    }

    fn config(levels: &[&str]) -> SliceFeatureConfig {
        SliceFeatureConfig {
            levels: levels.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn concatenates_normalised_pooled_levels() {
        let enc = encoder();
        let features = SliceFeatures::new(&config(&["a", "b"]), &enc).unwrap();
        assert_eq!(features.dim(), 8);
        let out = enc.forward(&Tensor::zeros([2, 1, 8, 8], (Kind::Float, Device::Cpu)), true);
        let f = features.compute(&out);
        assert_eq!(f.size(), vec![2, 8]);
        // Each level's block has unit norm and is the spatial mean of its map, rescaled.
        for (block, (start, len)) in [(0usize, (0i64, 3i64)), (1, (3, 5))] {
            let part = f.narrow(1, start, len);
            let norms = part.norm_scalaropt_dim(2, [1], false);
            assert!(norms.allclose(&norms.ones_like(), 1e-5, 1e-5, false));
            let mean = out.levels[block].mean_dim([2i64, 3].as_slice(), false, Kind::Float);
            let expected = &mean / mean.norm_scalaropt_dim(2, [1], true);
            assert!(part.allclose(&expected, 1e-5, 1e-6, false));
        }
    }

    #[test]
    fn no_levels_means_the_pooled_embedding() {
        let enc = encoder();
        let features = SliceFeatures::new(&SliceFeatureConfig::default(), &enc).unwrap();
        assert_eq!(features.dim(), 5);
        let out = enc.forward(&Tensor::zeros([2, 1, 8, 8], (Kind::Float, Device::Cpu)), true);
        assert!(features.compute(&out).equal(&out.pooled));
    }

    #[test]
    fn unknown_and_repeated_levels_are_named() {
        let enc = encoder();
        let err = SliceFeatures::new(&config(&["a", "layer9"]), &enc)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("aggregator.levels") && err.contains("layer9") && err.contains("a, b"),
            "{err}"
        );
        let err = SliceFeatures::new(&config(&["b", "b"]), &enc).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
    }
}
