//! Axis-aligned boxes in corner form `[x1, y1, x2, y2]`, in pixels of the image, continuous
//! coordinates: a box's width is `x2 - x1` (no `+ 1`), so the integer box `[0, 0, 2, 3]`
//! covers the 2 x 3 pixels with centres `(0.5 + i, 0.5 + j)`. This is the convention of
//! torchvision's detection models and of COCO's `[x, y, width, height]` boxes.
//!
//! The box coder is Faster R-CNN's parameterisation (Ren et al., NeurIPS 2015, Eq. 2; Girshick
//! et al., R-CNN, appendix C): a target box relative to a reference box as
//! `t_x = w_x (x - x_a) / w_a`, `t_y = w_y (y - y_a) / h_a`, `t_w = w_w log(w / w_a)`,
//! `t_h = w_h log(h / h_a)` with centres `(x, y)` and the per-coordinate weights `w_*`
//! (`(1, 1, 1, 1)` for the RPN, `(10, 10, 5, 5)` for the box head, as in torchvision).
//! Decoding clamps `t_w / w_w` and `t_h / w_h` from above at `log(1000 / 16)`, so an untrained
//! head cannot overflow `exp`.
//!
//! The regression loss on those deltas is Fast R-CNN's smooth L1 (Girshick, ICCV 2015, Eq. 3)
//! with torchvision's transition point `beta` (1/9: quadratic only for errors below 1/9), or
//! plain L1.

// Shared with core's fine-tuning loop and AP metric.
pub use medssl_core::detection::{boxes_of, iou_xyxy, tensor_of, ImageTargets};
use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};

/// The largest log-size change the decoder applies (torchvision's `bbox_xform_clip`).
pub const DEFAULT_LOG_SIZE_CLAMP: f64 = 4.135166556742356; // ln(1000 / 16)

/// Area of each box of `[N, 4]`; boxes with `x2 < x1` or `y2 < y1` have area 0.
pub fn area(boxes: &Tensor) -> Tensor {
    let w = (boxes.select(1, 2) - boxes.select(1, 0)).clamp_min(0.0);
    let h = (boxes.select(1, 3) - boxes.select(1, 1)).clamp_min(0.0);
    w * h
}

/// Intersection over union of every pair: `[N, 4]` x `[M, 4]` to `[N, M]`. A pair whose union
/// is empty (two empty boxes) has IoU 0.
pub fn iou(a: &Tensor, b: &Tensor) -> Tensor {
    let area_a = area(a).unsqueeze(1);
    let area_b = area(b).unsqueeze(0);
    let top_left = a.narrow(1, 0, 2).unsqueeze(1).maximum(&b.narrow(1, 0, 2).unsqueeze(0));
    let bottom_right = a.narrow(1, 2, 2).unsqueeze(1).minimum(&b.narrow(1, 2, 2).unsqueeze(0));
    let wh = (bottom_right - top_left).clamp_min(0.0);
    let inter = wh.select(2, 0) * wh.select(2, 1);
    let union = area_a + area_b - &inter;
    // Where the union is 0 the intersection is 0 too; dividing by 1 there gives 0, not NaN.
    let safe_union = union.clamp_min(0.0).where_self(&union.gt(0.0), &union.ones_like());
    inter / safe_union
}

/// Boxes of `[N, 4]` clipped to an image of `height` x `width` pixels.
pub fn clip(boxes: &Tensor, height: f64, width: f64) -> Tensor {
    let x1 = boxes.select(1, 0).clamp(0.0, width);
    let y1 = boxes.select(1, 1).clamp(0.0, height);
    let x2 = boxes.select(1, 2).clamp(0.0, width);
    let y2 = boxes.select(1, 3).clamp(0.0, height);
    Tensor::stack(&[x1, y1, x2, y2], 1)
}

/// Indices (int64) of the boxes whose width and height are both at least `min_size`.
pub fn keep_min_size(boxes: &Tensor, min_size: f64) -> Tensor {
    let w = boxes.select(1, 2) - boxes.select(1, 0);
    let h = boxes.select(1, 3) - boxes.select(1, 1);
    w.ge(min_size).logical_and(&h.ge(min_size)).nonzero().view([-1])
}

/// Encodes boxes as deltas from reference boxes and back (the module doc gives the
/// parameterisation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxCoder {
    /// Weights of `(t_x, t_y, t_w, t_h)`.
    pub weights: [f64; 4],
    /// Upper clamp of the decoded log-size changes.
    pub log_size_clamp: f64,
}

impl BoxCoder {
    pub fn new(weights: [f64; 4]) -> BoxCoder {
        BoxCoder {
            weights,
            log_size_clamp: DEFAULT_LOG_SIZE_CLAMP,
        }
    }

    /// Deltas `[N, 4]` that take each reference box `[N, 4]` to its target box `[N, 4]`.
    /// Reference and target boxes must have positive width and height.
    pub fn encode(&self, targets: &Tensor, references: &Tensor) -> Tensor {
        let (rx, ry, rw, rh) = centre_size(references);
        let (tx, ty, tw, th) = centre_size(targets);
        let [wx, wy, ww, wh] = self.weights;
        Tensor::stack(
            &[
                (tx - &rx) / &rw * wx,
                (ty - &ry) / &rh * wy,
                (tw / &rw).log() * ww,
                (th / &rh).log() * wh,
            ],
            1,
        )
    }

    /// Boxes from deltas `[N, 4 k]` (k boxes per reference: one per class in the box head)
    /// and reference boxes `[N, 4]`; returns `[N, 4 k]`.
    pub fn decode(&self, deltas: &Tensor, references: &Tensor) -> Tensor {
        let n = deltas.size()[0];
        // The per-reference box count from the width, not `-1`: with no references (an
        // image without proposals) `-1` cannot be inferred from zero elements.
        let per_reference = deltas.size().get(1).copied().unwrap_or(4) / 4;
        let deltas = deltas.view([n, per_reference, 4]).to_kind(references.kind());
        let (rx, ry, rw, rh) = centre_size(references);
        let (rx, ry, rw, rh) = (rx.unsqueeze(1), ry.unsqueeze(1), rw.unsqueeze(1), rh.unsqueeze(1));
        let [wx, wy, ww, wh] = self.weights;
        let dx = deltas.select(2, 0) / wx;
        let dy = deltas.select(2, 1) / wy;
        let dw = (deltas.select(2, 2) / ww).clamp_max(self.log_size_clamp);
        let dh = (deltas.select(2, 3) / wh).clamp_max(self.log_size_clamp);
        let cx = dx * &rw + rx;
        let cy = dy * &rh + ry;
        let half_w = dw.exp() * rw * 0.5;
        let half_h = dh.exp() * rh * 0.5;
        Tensor::stack(&[&cx - &half_w, &cy - &half_h, cx + half_w, cy + half_h], 2).view([n, 4 * per_reference])
    }
}

/// Centres and sizes `(cx, cy, w, h)`, each `[N]`.
fn centre_size(boxes: &Tensor) -> (Tensor, Tensor, Tensor, Tensor) {
    let w = boxes.select(1, 2) - boxes.select(1, 0);
    let h = boxes.select(1, 3) - boxes.select(1, 1);
    let cx = boxes.select(1, 0) + &w * 0.5;
    let cy = boxes.select(1, 1) + &h * 0.5;
    (cx, cy, w, h)
}

/// The box regression loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxLoss {
    /// Fast R-CNN's smooth L1 with transition point `beta`.
    SmoothL1,
    /// `|x|`.
    L1,
}

/// Summed regression loss of `predicted` against `target` deltas (same shape); callers divide
/// by their sample count, as torchvision does (by all sampled candidates, not the positives
/// alone, so an image with few positives does not weigh them up).
pub fn box_loss(predicted: &Tensor, target: &Tensor, loss: BoxLoss, beta: f64) -> Tensor {
    match loss {
        BoxLoss::SmoothL1 if beta > 0.0 => predicted.smooth_l1_loss(target, Reduction::Sum, beta),
        _ => (predicted - target).abs().sum(predicted.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Kind;

    /// A box with positive size inside a 64 x 64 image, from (x, y, w, h).
    fn boxed(x: f64, y: f64, w: f64, h: f64) -> [f64; 4] {
        [x, y, x + w, y + h]
    }

    fn positive_box() -> impl Strategy<Value = [f64; 4]> {
        (0.0..60.0f64, 0.0..60.0f64, 0.5..40.0f64, 0.5..40.0f64).prop_map(|(x, y, w, h)| boxed(x, y, w, h))
    }

    /// A box whose sides lie in 1..40, so two of them differ in size by less than the
    /// decoder's clamp (62.5x): `positive_box` pairs reach 80x, which the decoder clamps.
    fn unclamped_box() -> impl Strategy<Value = [f64; 4]> {
        (0.0..60.0f64, 0.0..60.0f64, 1.0..40.0f64, 1.0..40.0f64).prop_map(|(x, y, w, h)| boxed(x, y, w, h))
    }

    fn integer_box() -> impl Strategy<Value = [f64; 4]> {
        (0..12i32, 0..12i32, 0..8i32, 0..8i32).prop_map(|(x, y, w, h)| boxed(x as f64, y as f64, w as f64, h as f64))
    }

    /// IoU by counting the pixels each integer box covers.
    fn pixel_iou(a: [f64; 4], b: [f64; 4]) -> f64 {
        let inside = |r: [f64; 4], x: i32, y: i32| {
            let (cx, cy) = (x as f64 + 0.5, y as f64 + 0.5);
            cx > r[0] && cx < r[2] && cy > r[1] && cy < r[3]
        };
        let (mut inter, mut union) = (0, 0);
        for y in 0..24 {
            for x in 0..24 {
                let (ia, ib) = (inside(a, x, y), inside(b, x, y));
                inter += (ia && ib) as i32;
                union += (ia || ib) as i32;
            }
        }
        if union == 0 {
            0.0
        } else {
            inter as f64 / union as f64
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn encoding_then_decoding_returns_the_boxes(
            pairs in prop::collection::vec((unclamped_box(), unclamped_box()), 1..8),
            weights in prop::array::uniform4(0.5..10.0f64),
        ) {
            let targets: Vec<[f64; 4]> = pairs.iter().map(|p| p.0).collect();
            let references: Vec<[f64; 4]> = pairs.iter().map(|p| p.1).collect();
            let coder = BoxCoder::new(weights);
            let t = tensor_of(&targets).to_kind(Kind::Double);
            let r = tensor_of(&references).to_kind(Kind::Double);
            let back = boxes_of(&coder.decode(&coder.encode(&t, &r), &r));
            for (got, want) in back.iter().zip(&targets) {
                for k in 0..4 {
                    // Sizes differ by at most 40x, inside the clamp of 62.5x (larger changes
                    // are clamped by design: `decoding_clamps_huge_log_size_deltas`).
                    prop_assert!((got[k] - want[k] as f32 as f64).abs() < 1e-6, "{got:?} vs {want:?}");
                }
            }
        }

        #[test]
        fn decoding_clamps_huge_log_size_deltas(dw in 5.0..50.0f64) {
            let coder = BoxCoder::new([1.0; 4]);
            let reference = tensor_of(&[[10.0, 10.0, 20.0, 20.0]]);
            let deltas = Tensor::from_slice(&[0.0f32, 0.0, dw as f32, dw as f32]).view([1, 4]);
            let decoded = boxes_of(&coder.decode(&deltas, &reference))[0];
            let width = decoded[2] - decoded[0];
            prop_assert!(width.is_finite());
            prop_assert!((width - 10.0 * DEFAULT_LOG_SIZE_CLAMP.exp()).abs() < 1e-2, "{width}");
        }

        #[test]
        fn iou_is_symmetric_one_on_itself_and_in_unit_range(
            a in prop::collection::vec(positive_box(), 1..6),
            b in prop::collection::vec(positive_box(), 1..6),
        ) {
            let (ta, tb) = (tensor_of(&a).to_kind(Kind::Double), tensor_of(&b).to_kind(Kind::Double));
            let ab: Vec<Vec<f64>> = Vec::try_from(iou(&ta, &tb)).unwrap();
            let ba: Vec<Vec<f64>> = Vec::try_from(iou(&tb, &ta)).unwrap();
            let aa: Vec<Vec<f64>> = Vec::try_from(iou(&ta, &ta)).unwrap();
            for i in 0..a.len() {
                prop_assert!((aa[i][i] - 1.0).abs() < 1e-12);
                for j in 0..b.len() {
                    prop_assert!((ab[i][j] - ba[j][i]).abs() < 1e-12);
                    prop_assert!((0.0..=1.0).contains(&ab[i][j]));
                    prop_assert!((ab[i][j] - iou_xyxy(a[i], b[j])).abs() < 1e-5);
                }
            }
        }

        #[test]
        fn iou_is_zero_on_disjoint_boxes(a in positive_box(), gap in 0.0..10.0f64, b in positive_box()) {
            // b moved wholly to the right of a (touching edges count as disjoint).
            let shift = a[2] - b[0] + gap;
            let b = [b[0] + shift, b[1], b[2] + shift, b[3]];
            let value = iou(&tensor_of(&[a]).to_kind(Kind::Double), &tensor_of(&[b]).to_kind(Kind::Double));
            prop_assert_eq!(value.double_value(&[0, 0]), 0.0);
            prop_assert_eq!(iou_xyxy(a, b), 0.0);
        }

        #[test]
        fn iou_equals_a_pixel_count_on_integer_boxes(
            a in prop::collection::vec(integer_box(), 1..5),
            b in prop::collection::vec(integer_box(), 1..5),
        ) {
            let got: Vec<Vec<f64>> =
                Vec::try_from(iou(&tensor_of(&a).to_kind(Kind::Double), &tensor_of(&b).to_kind(Kind::Double))).unwrap();
            for i in 0..a.len() {
                for j in 0..b.len() {
                    let want = pixel_iou(a[i], b[j]);
                    prop_assert!((got[i][j] - want).abs() < 1e-12, "{:?} {:?}: {} vs {}", a[i], b[j], got[i][j], want);
                    prop_assert!((iou_xyxy(a[i], b[j]) - want).abs() < 1e-12);
                }
            }
        }

        #[test]
        fn clipped_boxes_lie_inside_the_image(a in prop::collection::vec(
            (-30.0..90.0f64, -30.0..90.0f64, 0.0..50.0f64, 0.0..50.0f64), 1..8)
        ) {
            let raw: Vec<[f64; 4]> = a.iter().map(|&(x, y, w, h)| boxed(x, y, w, h)).collect();
            for clipped in boxes_of(&clip(&tensor_of(&raw), 40.0, 60.0)) {
                prop_assert!(clipped[0] >= 0.0 && clipped[2] <= 60.0 && clipped[0] <= clipped[2]);
                prop_assert!(clipped[1] >= 0.0 && clipped[3] <= 40.0 && clipped[1] <= clipped[3]);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn smooth_l1_is_quadratic_below_beta_and_linear_above(
            errors in prop::collection::vec(-3.0..3.0f64, 1..12),
            beta in 0.01..1.0f64,
        ) {
            let predicted = Tensor::from_slice(&errors);
            let target = predicted.zeros_like();
            let want: f64 = errors
                .iter()
                .map(|e| if e.abs() < beta { 0.5 * e * e / beta } else { e.abs() - 0.5 * beta })
                .sum();
            let got = box_loss(&predicted, &target, BoxLoss::SmoothL1, beta).double_value(&[]);
            prop_assert!((got - want).abs() < 1e-9 * (1.0 + want), "{got} vs {want}");
            let l1 = box_loss(&predicted, &target, BoxLoss::L1, beta).double_value(&[]);
            prop_assert!((l1 - errors.iter().map(|e| e.abs()).sum::<f64>()).abs() < 1e-6);
        }
    }

    #[test]
    fn small_boxes_are_dropped() {
        let boxes = tensor_of(&[[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 0.5, 5.0], [1.0, 1.0, 2.0, 2.0]]);
        let keep: Vec<i64> = Vec::try_from(keep_min_size(&boxes, 1.0)).unwrap();
        assert_eq!(keep, vec![0, 2]);
    }
}
