//! NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., "A Simple
//! Framework for Contrastive Learning of Visual Representations", ICML 2020, Eq. 1), with its
//! projection head g (Sec. 2.1: Linear-BN-ReLU-Linear).
//!
//! With V views of N samples, every projected embedding z is contrasted against the other
//! V*N - 1: its positives are the other views of the same sample, all else are negatives.
//! For V = 2 this is exactly Eq. 1 averaged over the 2N anchors; for V > 2 each anchor's
//! loss is averaged over its V - 1 positives. `level = "volume"` applies the same loss to
//! volume embeddings of 3D views (a contrastive stand-in for the paper's L_inter).

use medssl_core::contrastive::{nt_xent, nt_xent_of_anchors};
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NtXentConfig {
    /// `slice` (2D views through the encoder) or `volume` (3D views through the aggregator).
    pub level: ViewLevel,
    /// Temperature tau of Eq. 1.
    pub temperature: f64,
    /// Hidden width of the projection head.
    pub hidden_dim: i64,
    /// Output width of the projection head.
    pub output_dim: i64,
}

impl Default for NtXentConfig {
    fn default() -> Self {
        NtXentConfig {
            level: ViewLevel::Slice,
            temperature: 0.1,
            hidden_dim: 512,
            output_dim: 128,
        }
    }
}

pub struct NtXentObjective {
    cfg: NtXentConfig,
    consumes: Consumes,
    projector: nn::SequentialT,
}

impl NtXentObjective {
    pub fn new(p: nn::Path, cfg: NtXentConfig, shape: &ObjectiveShape) -> Result<Self> {
        let (consumes, input_dim) = cfg.level.resolve(shape, "ntxent")?;
        ensure!(
            cfg.temperature > 0.0,
            "ntxent: `temperature` must be positive, got {}",
            cfg.temperature
        );
        ensure!(
            cfg.hidden_dim > 0 && cfg.output_dim > 0,
            "ntxent: `hidden_dim` and `output_dim` must be positive"
        );
        // SimCLR's projection head with PyTorch's default init (solo-learn, lightly).
        let projector = projection_head(&p / "projector", &[input_dim, cfg.hidden_dim, cfg.output_dim]);
        Ok(NtXentObjective {
            cfg,
            consumes,
            projector,
        })
    }
}

impl Objective for NtXentObjective {
    fn consumes(&self) -> Consumes {
        self.consumes
    }

    fn loss(&mut self, input: &StepInput, _: &Progress) -> Result<Loss> {
        let views = self.cfg.level.views(input, "ntxent")?;
        let projected: Vec<Tensor> = views.iter().map(|h| h.apply_t(&self.projector, true)).collect();
        let comm = distributed::communicator();
        let total = if comm.world_size() == 1 {
            nt_xent(&projected, self.cfg.temperature)
        } else {
            // Negatives from every rank's batch; this rank's samples are the anchors.
            let gathered = projected
                .iter()
                .map(|z| comm.all_gather_with_grad(z))
                .collect::<Result<Vec<_>>>()
                .context("ntxent: gathering the projections of every rank")?;
            let b = projected[0].size()[0];
            nt_xent_of_anchors(&gathered, comm.rank() as i64 * b, b, self.cfg.temperature)
        };
        Ok(Loss {
            total,
            terms: Vec::new(),
            health: Vec::new(),
        })
    }
}

fn build(section: &Section, p: nn::Path, shape: &ObjectiveShape) -> Result<Box<dyn Objective>> {
    Ok(Box::new(NtXentObjective::new(p, section.parse()?, shape)?))
}

register!(OBJECTIVES, NTXENT: ObjectiveEntry = ObjectiveEntry {
    name: "ntxent",
    about: "SimCLR NT-Xent contrastive loss with an MLP projector, on slice or volume views",
    default_config: default_toml::<NtXentConfig>,
    smoke_configs: &[
        "level = \"slice\"\nhidden_dim = 16\noutput_dim = 8",
        "level = \"volume\"\nhidden_dim = 16\noutput_dim = 8",
    ],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::device::test_device;
    use proptest::prelude::*;

    /// Eq. 1 of SimCLR for two views, written out anchor by anchor.
    fn reference(a: &[Vec<f64>], b: &[Vec<f64>], tau: f64) -> f64 {
        let norm = |v: &Vec<f64>| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter().map(|x| x / n).collect::<Vec<_>>()
        };
        let z: Vec<Vec<f64>> = a.iter().chain(b).map(norm).collect();
        let n = a.len();
        let sim = |i: usize, j: usize| z[i].iter().zip(&z[j]).map(|(x, y)| x * y).sum::<f64>() / tau;
        let mut total = 0.0;
        for i in 0..2 * n {
            let pos = (i + n) % (2 * n);
            let denom: f64 = (0..2 * n).filter(|&k| k != i).map(|k| sim(i, k).exp()).sum();
            total += -(sim(i, pos).exp() / denom).ln();
        }
        total / (2 * n) as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn matches_simclr_equation_1(
            n in 2usize..6, d in 2usize..6, tau in 0.05f64..1.0, seed in 0u64..1000,
            // Read as the strategies are built, before any case runs: a bad MEDSSL_TEST_DEVICE
            // fails plainly, not as a shrunk case saved to proptest-regressions.
            device in Just(test_device()),
        ) {
            let gen = |k: u64| -> Vec<Vec<f64>> {
                (0..n).map(|i| (0..d).map(|j| (((seed * 31 + k * 17 + i as u64 * 7 + j as u64 * 3) % 97) as f64 / 48.5) - 1.0).collect()).collect()
            };
            let (a, b) = (gen(1), gen(2));
            let to_t = |m: &Vec<Vec<f64>>| {
                Tensor::from_slice(&m.concat())
                    .view([n as i64, d as i64])
                    .to_device(device)
            };
            let got = nt_xent(&[to_t(&a), to_t(&b)], tau).double_value(&[]);
            let want = reference(&a, &b, tau);
            prop_assert!((got - want).abs() < 1e-6 * want.abs().max(1.0), "{} vs {}", got, want);
        }
    }

    #[test]
    fn identical_views_of_distinct_samples_give_a_lower_loss_than_random_ones() {
        let x = Tensor::eye(4, (Kind::Float, test_device()));
        let aligned = nt_xent(&[x.shallow_clone(), x.shallow_clone()], 0.1).double_value(&[]);
        let shuffled = nt_xent(&[x.shallow_clone(), x.flip([0])], 0.1).double_value(&[]);
        assert!(aligned < shuffled, "{aligned} vs {shuffled}");
    }

    #[test]
    fn volume_level_without_an_aggregator_is_a_clear_error() {
        let vs = nn::VarStore::new(test_device());
        let cfg = NtXentConfig {
            level: ViewLevel::Volume,
            ..Default::default()
        };
        let shape = ObjectiveShape {
            spatial_dims: medssl_core::encoder::SpatialDims::Two,
            in_channels: 1,
            deepest_level: (8, 32),
            levels: Vec::new(),
            input_size: None,
            slice_dim: 8,
            volume_dim: None,
            sequence_dim: None,
            global_slice_views: 2,
            local_slice_views: 0,
            volume_views: 2,
            seed: 0,
            num_samples: 4,
        };
        let err = NtXentObjective::new(vs.root(), cfg, &shape).err().unwrap().to_string();
        assert!(err.contains("aggregator"), "{err}");
    }
}
