//! The sets of a fine-tune: decoded once on worker threads and checked before any training
//! (labels inside the configured classes, masks shaped like their images, no volume in both
//! sets), then held in memory: downstream sets are small (Task04: 208 volumes of about
//! 35 x 50 x 36 voxels; AdrenalMNIST3D: 1286 volumes of 28^3).
//!
//! Segmentation trains on the slices of the selected training volumes, resized to the input
//! size (images bilinear, masks nearest); evaluation predicts every slice of each evaluation
//! volume and scores the merged volume at its own size. Classification turns each volume
//! into the pre-training run's slice sequence (`views::sequence_view`).

use crate::dataset::{Dataset, Volume};
use crate::encoder::SpatialDims;
use crate::registry::{self, Registered};
use crate::rng::{self, domain};
use crate::section::Section;
use crate::views::{self, ViewConfig};
use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::BTreeSet;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// Sub-domains of [`domain::FINETUNE`].
pub mod stream {
    /// The label-fraction draw.
    pub const FRACTION: u64 = 1;
    /// The backbone's initialisation (what the scratch row starts from).
    pub const INIT: u64 = 2;
    /// The order of the training samples in an epoch.
    pub const ORDER: u64 = 3;
    /// A training sample's flips.
    pub const FLIP: u64 = 4;
    /// libtorch's generator before each step (dropout).
    pub const STEP: u64 = 5;
    /// The head's initialisation: its own stream, so that it does not depend on how much
    /// the backbone drew (an aggregator a segmentation head never uses included).
    pub const HEAD: u64 = 6;
    /// A 3D training crop's position and orientation.
    pub const CROP: u64 = 7;
}

/// Which set, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn key(self) -> &'static str {
        match self {
            Split::Train => "data.train",
            Split::Eval => "data.eval",
        }
    }
}

/// An opened set: its reader, its section as recorded (defaults filled in, paths absolute),
/// and the COCO file of its boxes (detection sets).
pub struct OpenedSet {
    pub dataset: Box<dyn Dataset>,
    pub resolved: toml::Value,
    pub boxes: Option<PathBuf>,
    /// The reader's `slice_axis`, where it has one.
    pub slice_axis: Option<usize>,
}

/// Keys of a set's section that core reads beside its reader's own.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetKeys {
    /// COCO JSON with the boxes of the set's images (detection).
    boxes: Option<PathBuf>,
}

/// Builds the reader that `section` names (its `format`) and checks it has samples.
pub fn open(section: &Section) -> Result<OpenedSet> {
    let mut section = section.clone();
    let keys = section.take(&["boxes"]);
    let boxes = keys
        .parse::<SetKeys>()?
        .boxes
        .map(|path| keys.resolve_path("boxes", &path));
    let entry = registry::datasets()
        .get(&section.name)
        .with_context(|| section.selector_context())?;
    let dataset = (entry.build)(&section)?;
    ensure!(
        !dataset.is_empty(),
        "config section `[{}]` (format `{}`): the set has no samples",
        section.key,
        section.name
    );
    let mut resolved = section.resolved("format", &entry.default_config())?;
    let slice_axis = resolved
        .get("slice_axis")
        .and_then(|v| v.as_integer())
        .and_then(|v| usize::try_from(v).ok());
    if let (Some(path), toml::Value::Table(table)) = (&boxes, &mut resolved) {
        table.insert("boxes".into(), toml::Value::String(path.display().to_string()));
    }
    Ok(OpenedSet {
        dataset,
        resolved,
        boxes,
        slice_axis,
    })
}

/// Decodes every sample of `dataset` on `workers` threads and maps it with `prepare`.
pub(super) fn decode_all<T: Send>(
    dataset: &dyn Dataset,
    workers: usize,
    split: Split,
    prepare: impl Fn(usize, Volume) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let n = dataset.len();
    let threads = workers.clamp(1, n.max(1));
    let mut slots: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|w| {
                let prepare = &prepare;
                scope.spawn(move || {
                    (w..n)
                        .step_by(threads)
                        .map(|i| {
                            let decoded = dataset
                                .load(i)
                                .with_context(|| format!("[{}]: cannot read {}", split.key(), dataset.describe(i)))
                                .and_then(|volume| prepare(i, volume));
                            (i, decoded)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (i, result) in handle.join().unwrap_or_default() {
                slots[i] = Some(result);
            }
        }
    });
    slots
        .into_iter()
        .map(|slot| slot.unwrap_or_else(|| Err(anyhow!("[{}]: a decoding thread failed", split.key()))))
        .collect()
}

/// A volume with its mask, at its own size.
pub struct MaskedVolume {
    pub name: String,
    /// `[D, H, W]` float32, normalised by the reader.
    pub voxels: Tensor,
    /// `[D, H, W]` int64 class ids.
    pub mask: Tensor,
}

/// Checks that `values` (int64) are class ids below `classes`, naming the sample.
fn check_classes(values: &Tensor, classes: i64, what: &str, name: &str, split: Split) -> Result<()> {
    let (low, high) = (values.min().int64_value(&[]), values.max().int64_value(&[]));
    if low < 0 || high >= classes {
        let found: Vec<i64> = Vec::<i64>::try_from(values.flatten(0, -1).unique_dim(0, true, false, false).0)?;
        bail!(
            "[{}]: {name} has {what} {found:?}, but config key `classes` = {classes} allows 0..={}",
            split.key(),
            classes - 1
        );
    }
    Ok(())
}

/// Every volume of a segmentation set with its mask.
pub fn masked_volumes(dataset: &dyn Dataset, classes: i64, workers: usize, split: Split) -> Result<Vec<MaskedVolume>> {
    masked_volumes_with(dataset, classes, workers, split, |voxels, mask, _| (voxels, mask))
}

/// [`masked_volumes`], each volume and mask then mapped by `prepare` (given the file's voxel
/// spacing, where it records one), e.g. resampled and cropped as a 3D encoder's inputs are.
pub fn masked_volumes_with(
    dataset: &dyn Dataset,
    classes: i64,
    workers: usize,
    split: Split,
    prepare: impl Fn(Tensor, Tensor, Option<[f64; 3]>) -> (Tensor, Tensor) + Sync,
) -> Result<Vec<MaskedVolume>> {
    decode_all(dataset, workers, split, |i, volume| {
        let name = dataset.describe(i);
        let Some(mask) = volume.mask else {
            bail!(
                "[{}]: {name} has no segmentation mask; a segmentation head needs a reader that pairs masks with images (e.g. `decathlon`)",
                split.key()
            );
        };
        ensure!(
            mask.size() == volume.voxels.size(),
            "[{}]: {name}: the mask has shape {:?} but the image {:?}",
            split.key(),
            mask.size(),
            volume.voxels.size()
        );
        let mask = mask.to_kind(Kind::Int64);
        check_classes(&mask, classes, "mask values", &name, split)?;
        let (voxels, mask) = prepare(volume.voxels.to_kind(Kind::Float), mask, volume.spacing);
        Ok(MaskedVolume { name, voxels, mask })
    })
}

/// A classification set as the backbone reads it.
pub struct SequenceSet {
    pub names: Vec<String>,
    /// `[N, 1, T, S, S]`.
    pub inputs: Tensor,
    /// `[N, T]` bool: real slices.
    pub valid: Tensor,
    pub labels: Vec<i64>,
}

/// Every volume of a classification set as the run's slice sequence, with its label; for a
/// 3D encoder, the whole volume (windowed and cut to its foreground as the run's crops are)
/// resized to the run's `data.views.crop_size`, every slice real.
pub fn sequences(
    dataset: &dyn Dataset,
    classes: i64,
    views: &ViewConfig,
    dims: SpatialDims,
    workers: usize,
    split: Split,
) -> Result<SequenceSet> {
    let prepared = decode_all(dataset, workers, split, |i, volume| {
        let name = dataset.describe(i);
        let Some(label) = volume.label else {
            bail!(
                "[{}]: {name} has no class label; a classification head needs a labelled set (e.g. a MedMNIST .npz with its `<split>_labels`)",
                split.key()
            );
        };
        check_classes(&Tensor::from(label), classes, "label", &name, split)?;
        let voxels = volume.voxels.to_kind(Kind::Float);
        ensure!(
            voxels.dim() == 3 && voxels.size()[0] > 1,
            "[{}]: {name} decoded to shape {:?}; a volume classification head needs volumes [D, H, W] with D > 1",
            split.key(),
            voxels.size()
        );
        let stack = views::whole_volume(&voxels, views, dims);
        let (voxels, valid) = (stack.voxels, stack.valid);
        Ok((name, voxels, valid, label))
    })?;
    let names = prepared.iter().map(|p| p.0.clone()).collect();
    let inputs = Tensor::stack(&prepared.iter().map(|p| p.1.shallow_clone()).collect::<Vec<_>>(), 0);
    let valid = Tensor::stack(&prepared.iter().map(|p| p.2.shallow_clone()).collect::<Vec<_>>(), 0);
    let labels = prepared.iter().map(|p| p.3).collect();
    Ok(SequenceSet {
        names,
        inputs,
        valid,
        labels,
    })
}

/// Fails when a sample is in both sets (by its reader's description: file path, series
/// folder, archive entry), so no volume leaks from training into evaluation.
pub fn check_disjoint(train: &[String], eval: &[String]) -> Result<()> {
    let train: BTreeSet<&String> = train.iter().collect();
    let shared: Vec<&String> = eval.iter().filter(|n| train.contains(n)).collect();
    if let Some(first) = shared.first() {
        bail!(
            "{} sample(s) are in both [data.train] and [data.eval], e.g. {first}: split the volumes (e.g. the `decathlon` reader's `ids`) so that none is in both",
            shared.len()
        );
    }
    Ok(())
}

/// A seeded `fraction` of `n` volumes (at least one), ascending: the same for a seed, and
/// drawn by volume so the slices of a volume are all in or all out.
pub fn volume_fraction(n: usize, fraction: f64, seed: u64) -> Vec<usize> {
    let keep = ((fraction * n as f64).round() as usize).clamp(1, n.max(1)).min(n);
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(&mut rng::generator(seed, &[domain::FINETUNE, stream::FRACTION]));
    let mut chosen = all[..keep].to_vec();
    chosen.sort_unstable();
    chosen
}

/// The slices of `volumes`, resized to `size`: images `[N, 1, S, S]` and masks `[N, S, S]`.
pub fn training_slices(volumes: &[&MaskedVolume], size: i64) -> (Tensor, Tensor) {
    let mut images = Vec::new();
    let mut masks = Vec::new();
    for v in volumes {
        let (d, h, w) = v.voxels.size3().expect("volumes are [D, H, W]");
        images.push(resize_slices(&v.voxels, size));
        masks.push(
            v.mask
                .to_kind(Kind::Float)
                .view([d, 1, h, w])
                .upsample_nearest2d([size, size], None, None)
                .view([d, size, size])
                .to_kind(Kind::Int64),
        );
    }
    (Tensor::cat(&images, 0), Tensor::cat(&masks, 0))
}

/// `[D, H, W]` to `[D, 1, S, S]`, bilinear.
pub fn resize_slices(voxels: &Tensor, size: i64) -> Tensor {
    let (d, h, w) = voxels.size3().expect("volumes are [D, H, W]");
    voxels
        .view([d, 1, h, w])
        .upsample_bilinear2d([size, size], false, None, None)
}

/// The seeded (horizontal, vertical) flips of each sample of a batch, drawn from (seed,
/// epoch, sample index) with `probability` each.
pub fn flips(indices: &[usize], probability: f64, seed: u64, epoch: usize) -> Vec<(bool, bool)> {
    indices
        .iter()
        .map(|&i| {
            if probability <= 0.0 {
                return (false, false);
            }
            let mut g = rng::generator(seed, &[domain::FINETUNE, stream::FLIP, epoch as u64, i as u64]);
            (g.random_bool(probability), g.random_bool(probability))
        })
        .collect()
}

/// Applies `flips` (horizontal: the last axis, vertical: the one before) to each sample of
/// a batch, alike across `tensors` (an image and its mask, every slice of a volume).
pub fn flip_batch(tensors: &[&Tensor], flips: &[(bool, bool)]) -> Vec<Tensor> {
    if flips.iter().all(|&f| f == (false, false)) {
        return tensors.iter().map(|t| t.shallow_clone()).collect();
    }
    tensors
        .iter()
        .map(|t| {
            let rank = t.dim() as i64 - 1;
            let samples: Vec<Tensor> = flips
                .iter()
                .enumerate()
                .map(|(b, &(horizontal, vertical))| {
                    let mut x = t.get(b as i64);
                    if horizontal {
                        x = x.flip([rank - 1]);
                    }
                    if vertical {
                        x = x.flip([rank - 2]);
                    }
                    x
                })
                .collect();
            Tensor::stack(&samples, 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn the_volume_fraction_is_deterministic_and_sized(n in 1usize..300, fraction in 0.001f64..=1.0, seed in 0u64..100) {
            let a = volume_fraction(n, fraction, seed);
            prop_assert_eq!(&a, &volume_fraction(n, fraction, seed));
            prop_assert_eq!(a.len(), ((fraction * n as f64).round() as usize).clamp(1, n));
            prop_assert!(a.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(a.iter().all(|&i| i < n));
        }
    }

    #[test]
    fn a_sample_in_both_sets_is_an_error_naming_it() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check_disjoint(&names(&["a", "b"]), &names(&["c"])).unwrap();
        let err = check_disjoint(&names(&["a", "b"]), &names(&["c", "b"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 sample(s)") && err.contains("e.g. b"), "{err}");
    }

    #[test]
    fn flips_move_an_image_and_its_mask_together() {
        let image = Tensor::arange(2 * 3 * 4, (Kind::Float, tch::Device::Cpu)).view([2, 1, 3, 4]);
        let mask = image.squeeze_dim(1).to_kind(Kind::Int64);
        for epoch in 0..8 {
            let out = flip_batch(&[&image, &mask], &flips(&[5, 9], 0.5, 3, epoch));
            assert!(out[0].squeeze_dim(1).to_kind(Kind::Int64).equal(&out[1]));
            assert_eq!(out[0].size(), image.size());
        }
        let same = flip_batch(&[&image], &flips(&[5, 9], 0.0, 3, 0));
        assert!(same[0].equal(&image));
    }
}
