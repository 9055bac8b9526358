//! The kNN probe: a weighted vote of the k training samples most similar to a query by
//! cosine similarity, as in Wu et al., "Unsupervised Feature Learning via Non-Parametric
//! Instance Discrimination", CVPR 2018 (Sec. 3.4): neighbour i with similarity s_i votes
//! for its class with weight exp(s_i / tau). Class probabilities are the normalised votes
//! (their AUC is the probe's). Wu et al. use k = 200, DINO (Caron et al. 2021) k = 20, both
//! with tau = 0.07; the default here is k = 20.

use crate::ops::l2_normalize;
use anyhow::{ensure, Result};
use serde::Serialize;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KnnConfig {
    /// Neighbours that vote (at most the training set's size).
    pub k: usize,
    /// Temperature of the vote weights exp(similarity / temperature).
    pub temperature: f64,
}

impl Default for KnnConfig {
    fn default() -> Self {
        KnnConfig {
            k: 20,
            temperature: 0.07,
        }
    }
}

impl KnnConfig {
    pub fn check(&self) -> Result<()> {
        ensure!(self.k >= 1, "--k {}: expected at least 1 neighbour", self.k);
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "--temperature {}: expected a positive temperature",
            self.temperature
        );
        Ok(())
    }
}

/// Queries compared against the training set at once (bounds the similarity matrix).
const QUERY_CHUNK: i64 = 1024;

/// Class probabilities `[M, classes]` of `queries` `[M, F]` by the vote of their nearest
/// `train` `[N, F]` samples, whose labels are `labels` `[N]` (int64).
pub fn probabilities(
    train: &Tensor,
    labels: &Tensor,
    queries: &Tensor,
    classes: i64,
    cfg: &KnnConfig,
) -> Result<Tensor> {
    cfg.check()?;
    let unit = |x: &Tensor| l2_normalize(&x.to_kind(Kind::Float));
    let device = train.device();
    let train = unit(train);
    let labels = labels.to_device(device).to_kind(Kind::Int64);
    let queries = unit(&queries.to_device(device));
    let k = (cfg.k as i64).min(train.size()[0]);
    let m = queries.size()[0];
    let chunks: Vec<Tensor> = tch::no_grad(|| {
        (0..m)
            .step_by(QUERY_CHUNK as usize)
            .map(|start| {
                let q = queries.narrow(0, start, QUERY_CHUNK.min(m - start));
                let (similarity, index) = q.matmul(&train.tr()).topk(k, 1, true, true);
                let neighbour_labels = labels.index_select(0, &index.flatten(0, -1)).view([-1, k]);
                // Shifted by the largest possible similarity (1): the same ratios, no overflow.
                let weights = ((similarity - 1.0) / cfg.temperature).exp();
                let votes = Tensor::zeros([q.size()[0], classes], (Kind::Float, device)).scatter_add(
                    1,
                    &neighbour_labels,
                    &weights,
                );
                &votes / votes.sum_dim_intlist(1, true, Kind::Float).clamp_min(f64::MIN_POSITIVE)
            })
            .collect()
    });
    Ok(Tensor::cat(&chunks, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Device;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn one_neighbour_on_the_training_set_itself_is_always_right(
            seed in 0i64..1000, n in 2i64..60, dims in 3i64..16, classes in 2i64..5,
        ) {
            tch::manual_seed(seed);
            let x = Tensor::randn([n, dims], (Kind::Float, Device::Cpu));
            let labels = Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu));
            let cfg = KnnConfig { k: 1, ..Default::default() };
            let p = probabilities(&x, &labels, &x, classes, &cfg).unwrap();
            prop_assert_eq!(p.size(), vec![n, classes]);
            prop_assert!(p.argmax(-1, false).equal(&labels));
        }
    }

    #[test]
    fn votes_are_weighted_by_similarity() {
        // Two neighbours of class 0 far from the query, one of class 1 close to it.
        let train = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 0.1, 1.0]).view([3, 2]);
        let labels = Tensor::from_slice(&[1i64, 0, 0]);
        let query = Tensor::from_slice(&[1.0f32, 0.05]).view([1, 2]);
        let cfg = KnnConfig {
            k: 3,
            temperature: 0.07,
        };
        let p = probabilities(&train, &labels, &query, 2, &cfg).unwrap();
        assert_eq!(i64::try_from(p.argmax(-1, false)).unwrap(), 1);
        // With a large temperature every vote counts alike: the majority wins.
        let flat = KnnConfig { k: 3, temperature: 1e3 };
        let p = probabilities(&train, &labels, &query, 2, &flat).unwrap();
        assert_eq!(i64::try_from(p.argmax(-1, false)).unwrap(), 0);
        let err = probabilities(&train, &labels, &query, 2, &KnnConfig { k: 0, ..cfg })
            .unwrap_err()
            .to_string();
        assert!(err.contains("--k"), "{err}");
    }
}
