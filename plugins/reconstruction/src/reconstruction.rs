//! The `reconstruction` objective of MONAI's ViT self-supervised tutorial
//! (Project-MONAI/tutorials, `self_supervised_pretraining/vit_unetr_ssl/ssl_train.ipynb`;
//! the network is MONAI's `ViTAutoEnc`, `monai/networks/nets/vitautoenc.py`): each 3D crop
//! `x` is corrupted twice, independently ([`crate::corruption`]: in- or out-painting, then
//! local voxel shuffling), both copies go through the encoder, and a decoder owned by the
//! objective turns the deepest level (the ViT's normed tokens as their patch grid) back into
//! voxels with two transposed 3D convolutions (`ViTAutoEnc`'s `conv3d_transpose` and
//! `conv3d_transpose_1`, kernel = stride = √patch each: 4 and 4 for the default patch 16).
//! With `o1, o2` the two reconstructions,
//!
//! - r = L1(o1, x) (only the first copy is supervised, as in the tutorial),
//! - c = ContrastiveLoss_τ(flatten o1, flatten o2) (MONAI's, [`medssl_core::contrastive`],
//!   τ = 0.05),
//! - loss = r + c · r (the tutorial's `total_loss = r_loss + cl_loss * r_loss`, the contrastive
//!   term weighted by the reconstruction error, gradients through both factors).
//!
//! Each term is logged, with `corrupted_l1` = L1(corrupted copy 1, x), the identity baseline
//! of returning the corrupted input: a reconstruction below it restores something.
//!
//! Where medssl differs on purpose: the corruptions are drawn per (seed, epoch, sample id,
//! crop, copy) rather than from one global NumPy generator, so a resumed run corrupts as the
//! uninterrupted one would; both copies go through the encoder as one batch (the ViT has no
//! batch statistics, so this changes nothing but speed).

use crate::corruption::{corrupt_batch, CorruptionConfig};
use medssl_core::contrastive::nt_xent;
use medssl_core::objective::VolumeCrops;
use medssl_core::prelude::*;
use medssl_core::rng;
use serde::{Deserialize, Serialize};

const NAME: &str = "reconstruction";
/// The objective's stream of draws, beside the views' ([`rng::domain`]).
const CORRUPTION_STREAM: u64 = 0x5245_434f;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconstructionConfig {
    /// Temperature of the contrastive term (the tutorial's `ContrastiveLoss(temperature=0.05)`).
    pub temperature: f64,
    /// Channels between the two transposed convolutions (`ViTAutoEnc`'s `deconv_chns`).
    pub decoder_channels: i64,
    /// How each copy is corrupted.
    pub corruption: CorruptionConfig,
}

impl Default for ReconstructionConfig {
    fn default() -> Self {
        ReconstructionConfig {
            temperature: 0.05,
            decoder_channels: 16,
            corruption: CorruptionConfig::default(),
        }
    }
}

pub struct ReconstructionObjective {
    cfg: ReconstructionConfig,
    conv3d_transpose: nn::ConvTranspose3D,
    conv3d_transpose_1: nn::ConvTranspose3D,
    seed: u64,
}

impl ReconstructionObjective {
    pub fn new(p: nn::Path, cfg: ReconstructionConfig, shape: &ObjectiveShape, key: &str) -> Result<Self> {
        ensure!(
            shape.spatial_dims == SpatialDims::Three,
            "objective `{key}` ({NAME}) decodes a 3D encoder's patch grid, but the run's encoder is {}",
            shape.spatial_dims
        );
        ensure!(
            cfg.temperature > 0.0 && cfg.temperature.is_finite(),
            "config key `objectives.{key}.temperature` must be positive, got {}",
            cfg.temperature
        );
        ensure!(
            cfg.decoder_channels >= 1,
            "config key `objectives.{key}.decoder_channels` must be at least 1, got {}",
            cfg.decoder_channels
        );
        cfg.corruption.validate(&format!("objectives.{key}.corruption"))?;
        let (hidden, patch) = shape.deepest_level;
        // Two equal upsamplings, as ViTAutoEnc's two convolutions of 4 for its patch 16.
        let step = (patch as f64).sqrt().round() as i64;
        ensure!(
            step * step == patch && step >= 1,
            "objective `{key}` ({NAME}) upsamples the encoder's patch grid by two equal transposed convolutions, which needs a square patch size (4, 16, 64, ...); the encoder's deepest level has stride {patch}"
        );
        let up = |p: nn::Path, c_in, c_out| {
            layers::conv_transpose3d(
                p,
                c_in,
                c_out,
                step,
                layers::ConvTranspose {
                    stride: step,
                    ..Default::default()
                },
            )
        };
        Ok(ReconstructionObjective {
            conv3d_transpose: up(&p / "conv3d_transpose", hidden, cfg.decoder_channels),
            conv3d_transpose_1: up(&p / "conv3d_transpose_1", cfg.decoder_channels, shape.in_channels),
            cfg,
            seed: shape.seed,
        })
    }

    /// Voxels `[N, C, D, H, W]` from the deepest level `[N, hidden, D / p, H / p, W / p]`.
    pub fn decode(&self, grid: &Tensor) -> Tensor {
        grid.apply(&self.conv3d_transpose).apply(&self.conv3d_transpose_1)
    }

    /// The two corrupted copies of every crop: `[2N, C, D, H, W]`, copy 1 first.
    fn corrupted(&self, crops: &VolumeCrops, ids: &[i64], epoch: usize) -> Result<(Tensor, Tensor)> {
        let mut copies = Vec::new();
        let mut clean = Vec::new();
        for copy in 0..2u64 {
            for (view, crop) in crops.crops.iter().enumerate() {
                let mut rngs: Vec<_> = ids
                    .iter()
                    .map(|&id| {
                        rng::generator(
                            self.seed,
                            &[CORRUPTION_STREAM, epoch as u64, id as u64, view as u64, copy],
                        )
                    })
                    .collect();
                let (corrupted, _) = corrupt_batch(crop, &self.cfg.corruption, &mut rngs)?;
                copies.push(corrupted);
                if copy == 0 {
                    clean.push(crop.shallow_clone());
                }
            }
        }
        Ok((Tensor::cat(&copies, 0), Tensor::cat(&clean, 0)))
    }
}

impl Objective for ReconstructionObjective {
    fn consumes(&self) -> Consumes {
        Consumes::VolumeCrops
    }

    fn loss(&mut self, input: &StepInput, progress: &Progress) -> Result<Loss> {
        let crops = input
            .volume_crops
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{NAME}: the runner supplied no 3D crops"))?;
        ensure!(
            !crops.crops.is_empty(),
            "{NAME} needs at least one crop a volume (data.views.volume_views)"
        );
        let ids = Vec::<i64>::try_from(input.ids.to_device(Device::Cpu))?;
        let (corrupted, clean) = self.corrupted(crops, &ids, progress.epoch)?;
        let out = (crops.encode)(&corrupted)?;
        let grid = out
            .levels
            .last()
            .ok_or_else(|| anyhow::anyhow!("{NAME}: the encoder returned no level"))?;
        let reconstruction = self.decode(grid);
        ensure!(
            reconstruction.size() == corrupted.size(),
            "{NAME}: the decoder gives {:?} from the encoder's grid {:?}, but the crops are {:?}; the crop size must be a multiple of the patch size",
            reconstruction.size(),
            grid.size(),
            corrupted.size()
        );
        let n = clean.size()[0];
        let (o1, o2) = (reconstruction.narrow(0, 0, n), reconstruction.narrow(0, n, n));
        let kind = loss_kind(&o1);
        let r = (&o1 - &clean).abs().mean(kind);
        let c = nt_xent(&[o1.flatten(1, -1), o2.flatten(1, -1)], self.cfg.temperature);
        let total = &r + &c * &r;
        let baseline = tch::no_grad(|| (corrupted.narrow(0, 0, n) - &clean).abs().mean(kind).double_value(&[]));
        Ok(Loss {
            terms: vec![
                ("l1".into(), r.double_value(&[])),
                ("contrastive".into(), c.double_value(&[])),
                ("corrupted_l1".into(), baseline),
            ],
            health: Vec::new(),
            total,
        })
    }
}

fn build(section: &Section, p: nn::Path, shape: &ObjectiveShape) -> Result<Box<dyn Objective>> {
    let cfg: ReconstructionConfig = section.parse()?;
    let key = section.key.strip_prefix("objectives.").unwrap_or(&section.key);
    Ok(Box::new(ReconstructionObjective::new(p, cfg, shape, key)?))
}

register!(OBJECTIVES, RECONSTRUCTION: ObjectiveEntry = ObjectiveEntry {
    name: NAME,
    about: "MONAI ViT SSL: restore in-painted, out-painted and shuffled 3D crops (L1 + contrastive), 3D encoders",
    default_config: default_toml::<ReconstructionConfig>,
    smoke_configs: &["decoder_channels = 4\ncorruption = { inpaint_size = [2, 6], outpaint_size = [4, 10], shuffle_size = 3 }"],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::encoder::EncoderOutput;

    fn shape(hidden: i64, patch: i64) -> ObjectiveShape {
        ObjectiveShape {
            spatial_dims: SpatialDims::Three,
            in_channels: 1,
            deepest_level: (hidden, patch),
            levels: Vec::new(),
            input_size: None,
            slice_dim: hidden,
            volume_dim: Some(hidden),
            sequence_dim: None,
            num_samples: 8,
            global_slice_views: 0,
            local_slice_views: 0,
            volume_views: 1,
            seed: 3,
        }
    }

    fn small() -> ReconstructionConfig {
        ReconstructionConfig {
            decoder_channels: 4,
            corruption: CorruptionConfig {
                inpaint_size: [2, 6],
                outpaint_size: [4, 10],
                shuffle_size: 3,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A stand-in "encoder": average-pools the input into its patch grid and lifts it to
    /// `hidden` channels with a trainable scale, so gradients reach it.
    fn patch_encoder(scale: &Tensor, patch: i64, hidden: i64) -> impl Fn(&Tensor) -> Result<EncoderOutput> + '_ {
        move |x: &Tensor| {
            let grid = x.avg_pool3d([patch; 3], [patch; 3], [0; 3], false, true, None);
            let grid = grid.repeat([1, hidden, 1, 1, 1]) * scale;
            Ok(EncoderOutput {
                pooled: grid.mean_dim([2i64, 3, 4].as_slice(), false, Kind::Float),
                levels: vec![grid],
            })
        }
    }

    #[test]
    fn the_decoder_restores_the_crop_size_and_the_loss_trains_it() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut objective = ReconstructionObjective::new(vs.root(), small(), &shape(8, 4), "recon").unwrap();
        let scale = vs.root().var("scale", &[1], nn::Init::Const(1.0));
        let encode = patch_encoder(&scale, 4, 8);
        let crops = vec![Tensor::rand([2, 1, 16, 16, 16], (Kind::Float, Device::Cpu))];
        let ids = Tensor::from_slice(&[3i64, 5]);
        let input = StepInput::volume_crops(&ids, &crops, &encode);
        let progress = Progress {
            epoch: 0,
            step: 0,
            steps_per_epoch: 1,
        };
        let mut opt = nn::OptimizerConfig::build(nn::Adam::default(), &vs, 1e-2).unwrap();
        let first = objective.loss(&input, &progress).unwrap();
        let l1 = first.terms[0].1;
        let expected = l1 + first.terms[1].1 * l1;
        assert!(
            (first.total.double_value(&[]) - expected).abs() < 1e-5,
            "total = r + c r"
        );
        assert!(first.terms[2].1 > 0.0, "the corruption changed the crops");
        let again = objective.loss(&input, &progress).unwrap();
        assert_eq!(again.terms[2].1, first.terms[2].1, "the same coordinates corrupt alike");
        let mut last = first.total.double_value(&[]);
        let start = last;
        for _ in 0..30 {
            let loss = objective.loss(&input, &progress).unwrap();
            opt.zero_grad();
            loss.total.backward();
            for (name, t) in vs.variables() {
                assert!(
                    t.grad().defined() && t.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0,
                    "{name}"
                );
            }
            opt.step();
            last = loss.total.double_value(&[]);
        }
        assert!(last.is_finite() && last < 0.8 * start, "loss {start} -> {last}");
    }

    #[test]
    fn a_2d_encoder_and_a_patch_that_is_not_a_square_are_refused() {
        let vs = nn::VarStore::new(Device::Cpu);
        let two_d = ObjectiveShape {
            spatial_dims: SpatialDims::Two,
            ..shape(8, 4)
        };
        let err = ReconstructionObjective::new(vs.root(), small(), &two_d, "recon")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`recon`") && err.contains("2D"), "{err}");
        let err = ReconstructionObjective::new(vs.root() / "b", small(), &shape(8, 8), "recon")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("square patch size") && err.contains("stride 8"), "{err}");
        let mut bad = small();
        bad.corruption.inpaint_size = [0, 3];
        let err = ReconstructionObjective::new(vs.root() / "c", bad, &shape(8, 4), "recon")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("objectives.recon.corruption.inpaint_size"), "{err}");
    }
}
