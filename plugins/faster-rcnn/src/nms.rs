//! Greedy non-maximum suppression (as in Faster R-CNN, Ren et al., NeurIPS 2015, Sec. 3.3, and
//! torchvision's `nms`): take the highest-scoring box, drop every remaining box whose IoU with
//! it is strictly greater than the threshold, repeat. Equal scores keep input order (the
//! lower index comes first), so the result is deterministic.
//!
//! NMS is sequential by nature; it runs in plain Rust on the boxes copied to the CPU, with
//! each IoU computed only against boxes already kept.

use crate::boxes::{boxes_of, iou_xyxy};
use tch::{Device, Kind, Tensor};

/// Indices of the boxes kept from `boxes` (`[N, 4]`) with `scores` (`[N]`), by decreasing
/// score, as an int64 tensor on the boxes' device.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    let kept = nms_plain(&boxes_of(boxes), &values_of(scores), iou_threshold);
    indices_tensor(&kept, boxes.device())
}

/// NMS within each group (class, or feature level): boxes of different groups never suppress
/// each other. `groups` is `[N]` integers. Returns the kept indices by decreasing score.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, groups: &Tensor, iou_threshold: f64) -> Tensor {
    let groups: Vec<i64> = Vec::try_from(groups.to_kind(Kind::Int64).to_device(Device::Cpu)).unwrap_or_default();
    let kept = batched_nms_plain(&boxes_of(boxes), &values_of(scores), &groups, iou_threshold);
    indices_tensor(&kept, boxes.device())
}

/// The order NMS visits boxes in: by decreasing score, ties by index. NaN scores go last.
fn score_order(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| {
        let (a, b) = (scores[i], scores[j]);
        match (a.is_nan(), b.is_nan()) {
            (false, false) => b.total_cmp(&a),
            (a_nan, b_nan) => a_nan.cmp(&b_nan),
        }
        .then(i.cmp(&j))
    });
    order
}

/// Greedy NMS on plain boxes; returns kept indices by decreasing score.
pub fn nms_plain(boxes: &[[f64; 4]], scores: &[f64], iou_threshold: f64) -> Vec<usize> {
    let mut kept: Vec<usize> = Vec::new();
    for i in score_order(scores) {
        if kept.iter().all(|&k| iou_xyxy(boxes[k], boxes[i]) <= iou_threshold) {
            kept.push(i);
        }
    }
    kept
}

/// [`nms_plain`] within each group; the union comes back by decreasing score.
pub fn batched_nms_plain(boxes: &[[f64; 4]], scores: &[f64], groups: &[i64], iou_threshold: f64) -> Vec<usize> {
    let mut kept_by_group: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
    let mut kept = Vec::new();
    for i in score_order(scores) {
        let group = kept_by_group.entry(groups[i]).or_default();
        if group.iter().all(|&k| iou_xyxy(boxes[k], boxes[i]) <= iou_threshold) {
            group.push(i);
            kept.push(i);
        }
    }
    kept
}

fn values_of(scores: &Tensor) -> Vec<f64> {
    Vec::try_from(
        scores
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .contiguous()
            .view([-1]),
    )
    .unwrap_or_default()
}

fn indices_tensor(kept: &[usize], device: Device) -> Tensor {
    let kept: Vec<i64> = kept.iter().map(|&i| i as i64).collect();
    Tensor::from_slice(&kept).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::tensor_of;
    use proptest::prelude::*;

    /// The textbook loop: while boxes remain, take the best (lowest index on ties), remove
    /// it and every box overlapping it above the threshold.
    fn reference(boxes: &[[f64; 4]], scores: &[f64], threshold: f64) -> Vec<usize> {
        let mut remaining: Vec<usize> = (0..boxes.len()).collect();
        let mut kept = Vec::new();
        while !remaining.is_empty() {
            let mut best = remaining[0];
            for &i in &remaining {
                if scores[i] > scores[best] || (scores[i] == scores[best] && i < best) {
                    best = i;
                }
            }
            kept.push(best);
            remaining.retain(|&i| i != best && iou_xyxy(boxes[i], boxes[best]) <= threshold);
        }
        kept
    }

    fn random_boxes() -> impl Strategy<Value = Vec<([f64; 4], f64, i64)>> {
        prop::collection::vec(
            (
                0.0..40.0f64,
                0.0..40.0f64,
                1.0..25.0f64,
                1.0..25.0f64,
                0.0..1.0f64,
                0..3i64,
            )
                // Scores on a coarse grid, so ties occur.
                .prop_map(|(x, y, w, h, s, g)| ([x, y, x + w, y + h], (s * 8.0).floor() / 8.0, g)),
            0..40,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn nms_equals_the_greedy_reference(items in random_boxes(), threshold in 0.1..0.9f64) {
            let boxes: Vec<[f64; 4]> = items.iter().map(|i| i.0).collect();
            let scores: Vec<f64> = items.iter().map(|i| i.1).collect();
            let want = reference(&boxes, &scores, threshold);
            prop_assert_eq!(nms_plain(&boxes, &scores, threshold), want.clone());
            let got = nms(&tensor_of(&boxes).to_kind(Kind::Double), &Tensor::from_slice(&scores), threshold);
            let got: Vec<i64> = Vec::try_from(got).unwrap();
            prop_assert_eq!(got, want.iter().map(|&i| i as i64).collect::<Vec<_>>());
        }

        #[test]
        fn batched_nms_equals_the_reference_per_group(items in random_boxes(), threshold in 0.1..0.9f64) {
            let boxes: Vec<[f64; 4]> = items.iter().map(|i| i.0).collect();
            let scores: Vec<f64> = items.iter().map(|i| i.1).collect();
            let groups: Vec<i64> = items.iter().map(|i| i.2).collect();
            let got: Vec<i64> = Vec::try_from(batched_nms(
                &tensor_of(&boxes).to_kind(Kind::Double),
                &Tensor::from_slice(&scores),
                &Tensor::from_slice(&groups),
                threshold,
            ))
            .unwrap();
            let mut want: Vec<usize> = Vec::new();
            for g in 0..3 {
                let members: Vec<usize> = (0..boxes.len()).filter(|&i| groups[i] == g).collect();
                let sub_boxes: Vec<[f64; 4]> = members.iter().map(|&i| boxes[i]).collect();
                let sub_scores: Vec<f64> = members.iter().map(|&i| scores[i]).collect();
                want.extend(reference(&sub_boxes, &sub_scores, threshold).into_iter().map(|k| members[k]));
            }
            let mut got_sorted: Vec<usize> = got.iter().map(|&i| i as usize).collect();
            got_sorted.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(got_sorted, want);
            // By decreasing score.
            prop_assert!(got.windows(2).all(|w| scores[w[0] as usize] >= scores[w[1] as usize]));
        }
    }

    #[test]
    fn nan_scores_go_last_and_empty_input_keeps_nothing() {
        let boxes = [[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]];
        assert_eq!(nms_plain(&boxes, &[f64::NAN, 0.1], 0.5), vec![1, 0]);
        assert!(nms_plain(&[], &[], 0.5).is_empty());
        let none = nms(
            &Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
            &Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            0.5,
        );
        assert_eq!(none.size(), vec![0]);
    }
}
