//! What a detection head and the fine-tuning loop share: per-image box targets, per-image
//! detections, the COCO annotation format ([`coco`]) and the metric, average precision at an
//! IoU threshold ([`ap`]; the paper's AP50 of Table 5, Nguyen et al., AAAI 2023, Sec. 4).
//!
//! Boxes are in corner form `[x1, y1, x2, y2]`, in pixels of the image, continuous
//! coordinates: a box's width is `x2 - x1` (no `+ 1`), so the integer box `[0, 0, 2, 3]`
//! covers the 2 x 3 pixels with centres `(0.5 + i, 0.5 + j)`: the convention of COCO's
//! `[x, y, width, height]` boxes and of torchvision's detection models.
//!
//! Labels count the background as 0 (torchvision's convention): with C object categories,
//! targets and detections carry labels 1..=C and a detector predicts `C + 1` classes.

pub mod ap;
pub mod coco;

use tch::{Kind, Tensor};

/// The objects of one training image: corner boxes `[G, 4]` (float32, input pixels) and
/// their class labels `[G]` (int64 in `1..=C`). An image without objects has `G = 0` and
/// trains as background only.
#[derive(Debug)]
pub struct ImageTargets {
    pub boxes: Tensor,
    pub labels: Tensor,
}

impl ImageTargets {
    pub fn new(boxes: &[[f64; 4]], labels: &[i64]) -> ImageTargets {
        ImageTargets {
            boxes: tensor_of(boxes),
            labels: Tensor::from_slice(labels),
        }
    }

    pub fn to_device(&self, device: tch::Device) -> ImageTargets {
        ImageTargets {
            boxes: self.boxes.to_device(device),
            labels: self.labels.to_device(device),
        }
    }
}

/// What a detector finds in one image.
#[derive(Debug)]
pub struct Detections {
    /// `[k, 4]` corner boxes in input pixels.
    pub boxes: Tensor,
    /// `[k]` class probabilities, best first.
    pub scores: Tensor,
    /// `[k]` int64 labels in `1..=C`.
    pub labels: Tensor,
}

/// IoU of two corner boxes, in plain arithmetic (NMS and AP work box by box). A pair whose
/// union is empty has IoU 0.
pub fn iou_xyxy(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// A `[N, 4]` float32 tensor from plain boxes.
pub fn tensor_of(boxes: &[[f64; 4]]) -> Tensor {
    let flat: Vec<f32> = boxes.iter().flat_map(|b| b.iter().map(|&v| v as f32)).collect();
    Tensor::from_slice(&flat).view([boxes.len() as i64, 4])
}

/// Plain boxes from a `[N, 4]` tensor (on any device, any float kind).
pub fn boxes_of(boxes: &Tensor) -> Vec<[f64; 4]> {
    let flat: Vec<f64> = Vec::try_from(
        boxes
            .to_kind(Kind::Double)
            .to_device(tch::Device::Cpu)
            .contiguous()
            .view([-1]),
    )
    .unwrap_or_default();
    flat.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_survive_the_round_trip_through_a_tensor() {
        let boxes = [[0.0, 1.0, 2.5, 3.0], [4.0, 5.0, 6.0, 7.25]];
        assert_eq!(boxes_of(&tensor_of(&boxes)), boxes);
        assert_eq!(tensor_of(&[]).size(), [0, 4]);
    }

    #[test]
    fn iou_of_hand_computed_pairs() {
        assert_eq!(iou_xyxy([0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]), 1.0);
        // Intersection 1, union 4 + 4 - 1.
        assert!((iou_xyxy([0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]) - 1.0 / 7.0).abs() < 1e-12);
        assert_eq!(iou_xyxy([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]), 0.0);
        assert_eq!(iou_xyxy([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]), 0.0);
    }
}
