//! Segmentation metrics: per-class overlap counts, IoU (Jaccard index) and Dice (Sørensen-Dice
//! coefficient), over whole volumes and slice by slice.
//!
//! The paper scores its 2D U-Net by merging the slice predictions of each volume back into
//! the volume and measuring 3D IoU and Dice (Nguyen et al., AAAI 2023, Sec. 4). For a class
//! `c` with predicted set `P` and true set `T`:
//!
//! - IoU = |P ∩ T| / |P ∪ T|,
//! - Dice = 2 |P ∩ T| / (|P| + |T|), so Dice = 2 IoU / (1 + IoU).
//!
//! A class absent from both prediction and truth has neither: it is `None` and left out of
//! every average (MONAI's `ignore_empty`), so an image without a structure neither rewards nor
//! punishes the model for that structure. `dice_2d` is the mean over slices of the per-slice
//! Dice, the number 2D papers report, beside the 3D one the paper reports.
//!
//! Everything here counts integers: one `bincount` of `truth * K + prediction` (offset by
//! `slice * K * K` for per-slice counts) is the confusion matrix, and the scores are exact
//! ratios of its entries.

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

/// The pixel (or voxel) counts of one class: in both prediction and truth, in the
/// prediction, in the truth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassOverlap {
    pub intersection: u64,
    pub predicted: u64,
    pub truth: u64,
}

impl ClassOverlap {
    /// |P ∪ T|.
    pub fn union(&self) -> u64 {
        self.predicted + self.truth - self.intersection
    }

    /// |P ∩ T| / |P ∪ T|; `None` when the class is in neither.
    pub fn iou(&self) -> Option<f64> {
        let union = self.union();
        (union > 0).then(|| self.intersection as f64 / union as f64)
    }

    /// 2 |P ∩ T| / (|P| + |T|); `None` when the class is in neither.
    pub fn dice(&self) -> Option<f64> {
        let total = self.predicted + self.truth;
        (total > 0).then(|| 2.0 * self.intersection as f64 / total as f64)
    }
}

impl std::ops::AddAssign for ClassOverlap {
    fn add_assign(&mut self, other: ClassOverlap) {
        self.intersection += other.intersection;
        self.predicted += other.predicted;
        self.truth += other.truth;
    }
}

/// Checks that `tensor` holds int64 class ids in `0..classes`; `what` names it in messages.
fn check_class_ids(tensor: &Tensor, what: &str, classes: i64) -> Result<()> {
    ensure!(
        tensor.kind() == Kind::Int64,
        "the {what} must hold int64 class ids, found {:?} values",
        tensor.kind()
    );
    if tensor.numel() == 0 {
        return Ok(());
    }
    let low = tensor.min().int64_value(&[]);
    let high = tensor.max().int64_value(&[]);
    if low < 0 || high >= classes {
        let bad = if low < 0 { low } else { high };
        bail!(
            "the {what} holds class id {bad}, outside 0..{classes} (expected ids of {classes} classes, \
             background 0 included)"
        );
    }
    Ok(())
}

/// Checks a prediction / truth pair: equal shapes, int64 ids in `0..classes`.
fn check_pair(prediction: &Tensor, truth: &Tensor, classes: i64) -> Result<()> {
    ensure!(
        classes >= 1,
        "the number of classes must be at least 1, found {classes}"
    );
    ensure!(
        prediction.size() == truth.size(),
        "the prediction has shape {:?} but the truth {:?}; they must be equal",
        prediction.size(),
        truth.size()
    );
    // Caught here rather than as libtorch's error from deep inside the counting.
    ensure!(
        prediction.device() == truth.device(),
        "the prediction is on {:?} but the truth on {:?}; they must be on one device",
        prediction.device(),
        truth.device()
    );
    check_class_ids(prediction, "prediction", classes)?;
    check_class_ids(truth, "truth", classes)
}

/// The per-class overlaps of each of `groups` equal parts of the flattened pair (the parts
/// along its first axis: slices of a volume), from one confusion-matrix count.
fn grouped_overlaps(prediction: &Tensor, truth: &Tensor, classes: i64, groups: i64) -> Result<Vec<Vec<ClassOverlap>>> {
    let cells = classes * classes;
    let codes = truth.reshape([groups, -1]) * classes + prediction.reshape([groups, -1]);
    let offsets = Tensor::arange(groups, (Kind::Int64, prediction.device())).unsqueeze(1) * cells;
    // Counted on the pair's device; only the `groups x K x K` counts come to the host, where
    // the overlaps are read out of them.
    let counts = (codes + offsets)
        .reshape([-1])
        .bincount::<Tensor>(None, groups * cells)
        .to_device(Device::Cpu);
    let counts = Vec::<i64>::try_from(&counts)?;
    let k = classes as usize;
    Ok(counts
        .chunks(k * k)
        .map(|confusion| {
            // confusion[t * k + p]: pixels of true class t predicted as p.
            (0..k)
                .map(|c| ClassOverlap {
                    intersection: confusion[c * k + c] as u64,
                    predicted: (0..k).map(|t| confusion[t * k + c] as u64).sum(),
                    truth: confusion[c * k..(c + 1) * k].iter().map(|&n| n as u64).sum(),
                })
                .collect()
        })
        .collect())
}

/// The overlap of each class `0..classes` between `prediction` and `truth`: int64 class-id
/// tensors of equal shape, any rank (one image, a batch, a volume).
pub fn class_overlaps(prediction: &Tensor, truth: &Tensor, classes: i64) -> Result<Vec<ClassOverlap>> {
    check_pair(prediction, truth, classes)?;
    let mut groups = grouped_overlaps(prediction, truth, classes, 1)?;
    Ok(groups
        .pop()
        .unwrap_or_else(|| vec![ClassOverlap::default(); classes as usize]))
}

/// Stacks a volume's slice predictions `[H, W]` (in slice order) into the volume `[D, H, W]`.
/// Every slice must have the same shape; no slices give an empty `[0, 0, 0]` int64 volume.
pub fn merge_slices(slices: &[Tensor]) -> Tensor {
    if slices.is_empty() {
        return Tensor::zeros([0, 0, 0], (Kind::Int64, Device::Cpu));
    }
    Tensor::stack(slices, 0)
}

/// The slices `[H, W]` of a volume `[D, H, W]`, in order (views of its storage).
pub fn split_slices(volume: &Tensor) -> Vec<Tensor> {
    volume.unbind(0)
}

/// Per-class scores of one volume, indexed by class `0..K` (background included); `None`
/// where the class is absent from both prediction and truth.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeScores {
    /// 3D IoU over the whole volume.
    pub iou: Vec<Option<f64>>,
    /// 3D Dice over the whole volume.
    pub dice: Vec<Option<f64>>,
    /// Mean over slices of the per-slice Dice, over the slices where the class is in the
    /// prediction or the truth.
    pub dice_2d: Vec<Option<f64>>,
}

/// 3D IoU and Dice, and the mean per-slice Dice, of each class of a volume's merged
/// `prediction` against its `truth`: int64 class ids `[D, H, W]` in `0..classes`.
pub fn volume_scores(prediction: &Tensor, truth: &Tensor, classes: i64) -> Result<VolumeScores> {
    for (what, tensor) in [("prediction", prediction), ("truth", truth)] {
        ensure!(
            tensor.dim() == 3,
            "the {what} volume must be [D, H, W] (slices first), found shape {:?}",
            tensor.size()
        );
    }
    check_pair(prediction, truth, classes)?;
    let depth = prediction.size()[0];
    let per_slice = if prediction.numel() == 0 {
        Vec::new()
    } else {
        grouped_overlaps(prediction, truth, classes, depth)?
    };
    let k = classes as usize;
    let mut whole = vec![ClassOverlap::default(); k];
    for slice in &per_slice {
        for (total, overlap) in whole.iter_mut().zip(slice) {
            *total += *overlap;
        }
    }
    let dice_2d = (0..k)
        .map(|c| {
            let present: Vec<f64> = per_slice.iter().filter_map(|slice| slice[c].dice()).collect();
            (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
        })
        .collect();
    Ok(VolumeScores {
        iou: whole.iter().map(ClassOverlap::iou).collect(),
        dice: whole.iter().map(ClassOverlap::dice).collect(),
        dice_2d,
    })
}

/// The mean of the foreground classes' scores (classes `1..`, background 0 left out),
/// skipping classes without a score; `None` when none has one.
pub fn mean_foreground(values: &[Option<f64>]) -> Option<f64> {
    let scored: Vec<f64> = values.iter().skip(1).flatten().copied().collect();
    (!scored.is_empty()).then(|| scored.iter().sum::<f64>() / scored.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, pixel by pixel.
    fn brute_force(prediction: &[i64], truth: &[i64], classes: i64) -> Vec<ClassOverlap> {
        (0..classes)
            .map(|c| ClassOverlap {
                intersection: prediction.iter().zip(truth).filter(|(&p, &t)| p == c && t == c).count() as u64,
                predicted: prediction.iter().filter(|&&p| p == c).count() as u64,
                truth: truth.iter().filter(|&&t| t == c).count() as u64,
            })
            .collect()
    }

    /// A mask of `shape` from its flat values.
    fn mask(values: &[i64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values).reshape(shape)
    }

    /// Random class-id masks: (classes, shape [D, H, W], prediction, truth).
    fn mask_pair() -> impl Strategy<Value = (i64, Vec<i64>, Vec<i64>, Vec<i64>)> {
        (1i64..5, 1i64..4, 1i64..6, 1i64..6).prop_flat_map(|(classes, d, h, w)| {
            let n = (d * h * w) as usize;
            (
                Just(classes),
                Just(vec![d, h, w]),
                proptest::collection::vec(0..classes, n),
                proptest::collection::vec(0..classes, n),
            )
        })
    }

    fn close(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() < 1e-12,
            (None, None) => true,
            _ => false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn overlaps_match_a_brute_force_count((classes, shape, p, t) in mask_pair()) {
            let counted = class_overlaps(&mask(&p, &shape), &mask(&t, &shape), classes).unwrap();
            prop_assert_eq!(counted, brute_force(&p, &t, classes));
        }

        #[test]
        fn a_prediction_scores_one_against_itself((classes, shape, p, _t) in mask_pair()) {
            let m = mask(&p, &shape);
            for (c, overlap) in class_overlaps(&m, &m, classes).unwrap().iter().enumerate() {
                let present = p.contains(&(c as i64));
                prop_assert_eq!(overlap.iou(), present.then_some(1.0));
                prop_assert_eq!(overlap.dice(), present.then_some(1.0));
            }
        }

        #[test]
        fn a_disjoint_prediction_scores_zero((classes, shape, _p, t) in mask_pair()) {
            prop_assume!(classes >= 2);
            // Every pixel's class shifted by one: class c is predicted exactly where the
            // truth is c - 1, so no class overlaps itself.
            let shifted: Vec<i64> = t.iter().map(|&c| (c + 1) % classes).collect();
            let overlaps = class_overlaps(&mask(&shifted, &shape), &mask(&t, &shape), classes).unwrap();
            for overlap in overlaps {
                prop_assert_eq!(overlap.intersection, 0);
                prop_assert!(overlap.iou().is_none_or(|v| v == 0.0));
                prop_assert!(overlap.dice().is_none_or(|v| v == 0.0));
            }
        }

        #[test]
        fn scores_are_symmetric((classes, shape, p, t) in mask_pair()) {
            let forward = volume_scores(&mask(&p, &shape), &mask(&t, &shape), classes).unwrap();
            let backward = volume_scores(&mask(&t, &shape), &mask(&p, &shape), classes).unwrap();
            prop_assert_eq!(forward, backward);
        }

        #[test]
        fn dice_is_two_iou_over_one_plus_iou((classes, shape, p, t) in mask_pair()) {
            for overlap in class_overlaps(&mask(&p, &shape), &mask(&t, &shape), classes).unwrap() {
                let from_iou = overlap.iou().map(|iou| 2.0 * iou / (1.0 + iou));
                prop_assert!(close(overlap.dice(), from_iou), "{:?}", overlap);
            }
        }

        #[test]
        fn volume_scores_match_brute_force_counts((classes, shape, p, t) in mask_pair()) {
            let scores = volume_scores(&mask(&p, &shape), &mask(&t, &shape), classes).unwrap();
            let whole = brute_force(&p, &t, classes);
            let slice_len = (shape[1] * shape[2]) as usize;
            let slices: Vec<Vec<ClassOverlap>> = p
                .chunks(slice_len)
                .zip(t.chunks(slice_len))
                .map(|(ps, ts)| brute_force(ps, ts, classes))
                .collect();
            for c in 0..classes as usize {
                prop_assert!(close(scores.iou[c], whole[c].iou()));
                prop_assert!(close(scores.dice[c], whole[c].dice()));
                let per_slice: Vec<f64> = slices.iter().filter_map(|s| s[c].dice()).collect();
                let expected = (!per_slice.is_empty()).then(|| per_slice.iter().sum::<f64>() / per_slice.len() as f64);
                prop_assert!(close(scores.dice_2d[c], expected));
            }
        }

        #[test]
        fn merging_split_slices_gives_the_volume_back((_classes, shape, p, _t) in mask_pair()) {
            let volume = mask(&p, &shape);
            let slices = split_slices(&volume);
            prop_assert_eq!(slices.len() as i64, shape[0]);
            prop_assert!(slices.iter().all(|s| s.size() == shape[1..]));
            prop_assert!(merge_slices(&slices).equal(&volume));
        }
    }

    #[test]
    fn a_hand_counted_volume() {
        // Three 3 x 3 slices. Truth: class 1 on 4 pixels of slice 0, class 2 on 2 of slice 2.
        // Prediction: 3 of the class-1 pixels and one more; class 2 nowhere.
        #[rustfmt::skip]
        let truth = mask(&[
            1, 1, 1, 1, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 2, 2, 0,
        ], &[3, 3, 3]);
        #[rustfmt::skip]
        let prediction = mask(&[
            1, 1, 1, 0, 1, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0,
        ], &[3, 3, 3]);
        let scores = volume_scores(&prediction, &truth, 3).unwrap();
        // Class 1: intersection 3, |P| = 4, |T| = 4: IoU 3/5, Dice 6/8.
        assert_eq!(scores.iou[1], Some(0.6));
        assert_eq!(scores.dice[1], Some(0.75));
        // Only slice 0 holds class 1.
        assert_eq!(scores.dice_2d[1], Some(0.75));
        // Class 2: in the truth only: 0.
        assert_eq!(scores.dice[2], Some(0.0));
        assert_eq!(mean_foreground(&scores.dice), Some(0.375));
        // A class absent everywhere is left out.
        assert_eq!(mean_foreground(&[Some(1.0), None, Some(0.5)]), Some(0.5));
        assert_eq!(mean_foreground(&[Some(1.0), None]), None);
    }

    #[test]
    fn bad_inputs_are_errors_saying_what() {
        let a = mask(&[0, 1, 2, 1], &[2, 2]);
        let message = class_overlaps(&a, &mask(&[0, 1, 2], &[3]), 3).unwrap_err().to_string();
        assert!(message.contains("[2, 2]") && message.contains("[3]"), "{message}");
        let message = class_overlaps(&a, &a, 2).unwrap_err().to_string();
        assert!(
            message.contains("prediction") && message.contains("class id 2") && message.contains("0..2"),
            "{message}"
        );
        let negative = mask(&[0, -1, 0, 0], &[2, 2]);
        let message = class_overlaps(&a, &negative, 3).unwrap_err().to_string();
        assert!(message.contains("truth") && message.contains("-1"), "{message}");
        let message = class_overlaps(&a.to_kind(Kind::Float), &a, 3).unwrap_err().to_string();
        assert!(message.contains("int64") && message.contains("Float"), "{message}");
        let message = volume_scores(&a, &a, 3).unwrap_err().to_string();
        assert!(message.contains("[D, H, W]") && message.contains("[2, 2]"), "{message}");
        assert!(class_overlaps(&a, &a, 0).is_err());
    }

    #[test]
    fn empty_inputs_have_no_scores() {
        let empty = Tensor::zeros([0, 4, 4], (Kind::Int64, Device::Cpu));
        let scores = volume_scores(&empty, &empty, 2).unwrap();
        assert_eq!(scores.dice, vec![None, None]);
        assert_eq!(scores.dice_2d, vec![None, None]);
        assert_eq!(merge_slices(&[]).size(), [0, 0, 0]);
    }
}
