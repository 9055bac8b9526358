//! 3D segmentation fine-tuning (a [`crate::head::Task::VolumeSegmentation`] head, e.g.
//! `unetr`): the protocol of MONAI's UNETR fine-tuning (Hatamizadeh et al., WACV 2022; the
//! tutorial `self_supervised_pretraining/vit_unetr_ssl/ssl_finetune`).
//!
//! Every volume is prepared once as the pre-training run's crops were: resampled to its
//! `data.views.spacing_mm` (image trilinear, mask nearest), windowed by `clip`, cut to the
//! foreground and padded to at least the crop size ([`crate::volume_crops::prepare`]); the
//! crop size is the run's `data.views.crop_size`, which a ViT's position embeddings fix.
//! - Training: a step takes `train.batch_size` volumes and cuts `input.crops_per_volume`
//!   crops of each, centred on a foreground voxel with probability `input.positive_fraction`
//!   and on a background voxel otherwise (MONAI's `RandCropByPosNegLabel`), each flipped
//!   along every axis with probability `input.flip` and turned by k·90° in the (H, W) plane
//!   with probability `input.rotate90`; every draw is seeded by (seed, epoch, volume, crop).
//! - Evaluation: every whole evaluation volume by sliding-window inference (window = crop
//!   size, `input.sliding_window`'s overlap and blending), arg-max, and per-class 3D Dice and
//!   IoU of the prepared volume ([`crate::segmentation::volume_scores`]). The padding is
//!   background in both prediction and truth, so it adds to neither score.

use super::data::{self, stream, MaskedVolume, Split};
use crate::dataset::Dataset;
use crate::rng::{self, domain};
use crate::sliding_window::{self, SlidingWindowConfig};
use crate::sources;
use crate::views::ViewConfig;
use crate::volume_crops::{self, CropSettings, Orientation};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// How training crops are drawn.
#[derive(Debug, Clone, Copy)]
pub struct CropSampling {
    pub settings: CropSettings,
    pub crops_per_volume: usize,
    /// Probability that a crop is centred on a foreground voxel.
    pub positive: f64,
}

/// Every volume of a 3D segmentation set with its mask, prepared as the run's crops are.
pub fn prepared_volumes(
    dataset: &dyn Dataset,
    classes: i64,
    views: &ViewConfig,
    workers: usize,
    split: Split,
) -> Result<Vec<MaskedVolume>> {
    let settings = views.crop_settings();
    data::masked_volumes_with(dataset, classes, workers, split, |voxels, mask, spacing| {
        let (voxels, mask) = match (views.spacing_mm, spacing) {
            (Some(target), Some(spacing)) => (
                sources::resample_to_spacing(&voxels, spacing, target),
                sources::resample_labels_to_spacing(&mask, spacing, target),
            ),
            _ => (voxels, mask),
        };
        let (voxels, mask) = volume_crops::prepare(&voxels, Some(&mask), &settings);
        (voxels, mask.expect("a mask was given"))
    })
}

/// The crops of a batch of volumes: images `[B·k, 1, D, H, W]` and masks `[B·k, D, H, W]`,
/// `k = crops_per_volume`; `index` names each volume in the seeds.
pub fn training_crops(
    volumes: &[(usize, &MaskedVolume)],
    sampling: &CropSampling,
    seed: u64,
    epoch: usize,
) -> (Tensor, Tensor) {
    let size = sampling.settings.size;
    let mut images = Vec::new();
    let mut masks = Vec::new();
    for &(index, volume) in volumes {
        for crop in 0..sampling.crops_per_volume {
            let mut g = rng::generator(
                seed,
                &[domain::FINETUNE, stream::CROP, epoch as u64, index as u64, crop as u64],
            );
            let start = volume_crops::pos_neg_start(&mut g, &volume.mask, size, sampling.positive);
            let orientation = Orientation::draw(&mut g, &sampling.settings);
            images.push(
                orientation
                    .apply(&volume_crops::crop_at(&volume.voxels, start, size))
                    .unsqueeze(0),
            );
            masks.push(orientation.apply(&volume_crops::crop_at(&volume.mask, start, size)));
        }
    }
    (
        Tensor::stack(&images, 0).contiguous(),
        Tensor::stack(&masks, 0).contiguous(),
    )
}

/// The class map `[D, H, W]` (int64, on the CPU) that `logits` gives the prepared volume
/// `voxels` `[D, H, W]` by sliding windows of `window`, on `device`.
pub fn predict_volume(
    voxels: &Tensor,
    window: [i64; 3],
    config: &SlidingWindowConfig,
    device: Device,
    logits: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let x = voxels.to_kind(Kind::Float).unsqueeze(0).unsqueeze(0).to_device(device);
    let scores = sliding_window::sliding_window_inference(&x, &window, config, logits)?;
    Ok(scores.argmax(1, false).squeeze_dim(0).to_device(Device::Cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(d: i64, h: i64, w: i64) -> MaskedVolume {
        let voxels = Tensor::rand([d, h, w], (Kind::Float, Device::Cpu));
        let mask = Tensor::zeros([d, h, w], (Kind::Int64, Device::Cpu));
        let _ = mask.narrow(0, 1, 2).narrow(1, 2, 2).narrow(2, 3, 2).fill_(2);
        MaskedVolume {
            name: "v".into(),
            voxels,
            mask,
        }
    }

    #[test]
    fn training_crops_align_images_and_masks_and_repeat_for_the_same_seed() {
        let v = volume(6, 8, 9);
        let sampling = CropSampling {
            settings: CropSettings {
                size: [4, 4, 4],
                clip: None,
                foreground_threshold: None,
                flip: 0.5,
                rotate90: 0.5,
            },
            crops_per_volume: 3,
            positive: 1.0,
        };
        let (x, y) = training_crops(&[(0, &v), (5, &v)], &sampling, 7, 0);
        assert_eq!(x.size(), [6, 1, 4, 4, 4]);
        assert_eq!(y.size(), [6, 4, 4, 4]);
        let (x2, y2) = training_crops(&[(0, &v), (5, &v)], &sampling, 7, 0);
        assert!(x.equal(&x2) && y.equal(&y2));
        // Every crop is centred on the foreground (positive = 1), and the mask moved with it.
        for i in 0..6 {
            assert!(
                bool::try_from(y.get(i).eq(2).any()).unwrap(),
                "crop {i} misses the foreground"
            );
        }
        let (x3, _) = training_crops(&[(0, &v), (5, &v)], &sampling, 7, 1);
        assert!(!x.equal(&x3), "another epoch draws other crops");
    }
}
