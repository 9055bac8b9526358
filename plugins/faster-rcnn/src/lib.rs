//! Faster R-CNN (Ren et al., NeurIPS 2015) with a feature pyramid (Lin et al., CVPR 2017) as
//! the 2D detection downstream of the paper (Nguyen et al., AAAI 2023, Sec. 4: f_intra as the
//! backbone of Faster R-CNN, AP at IoU 0.5).
//!
//! libtorch ships none of torchvision's detection operators, so every piece is built here
//! from tensor ops (or plain Rust where the work is sequential, as in greedy NMS). The box
//! maths (boxes, NMS, anchors, matching, RoIAlign, AP) have property tests against direct
//! references; the model parts have unit tests of shapes and target assignment and a
//! property test that the four losses are finite and reach every parameter:
//!
//! - [`boxes`]: corner boxes, IoU, clipping, the box coder (deltas with weights, clamped
//!   log-size deltas), the smooth-L1 / L1 box loss, [`ImageTargets`];
//! - [`nms`]: greedy non-maximum suppression, per group;
//! - [`anchors`]: anchors per feature level from configured sizes and aspect ratios;
//! - [`matching`]: IoU matching of anchors / regions to ground truth (thresholds, each box's
//!   best candidates forced positive) and the seeded positive / negative draw;
//! - [`roi_align`]: RoIAlign as torchvision defines it, from gathers, and its multi-level
//!   form (FPN Eq. 1);
//! - [`fpn`]: the feature pyramid over any encoder's declared levels (lateral 1x1, top-down
//!   nearest upsampling, 3x3 outputs, optional max-pooled extra level);
//! - [`rpn`]: the region proposal network: shared head, anchor targets, objectness and box
//!   losses, proposals (top-k per level, NMS, top-k per image);
//! - [`roi_heads`]: the box head: region draw against the ground truth, RoIAlign, two FC
//!   layers, class scores and per-class boxes, its losses and per-class NMS inference;
//! - [`faster_rcnn`]: [`FasterRcnn`] and its nested [`FasterRcnnConfig`]: the four losses
//!   ([`DetectionLosses`]) and per-image [`Detections`] from an encoder's feature maps;
//! - [`boxes_from_masks`]: per-slice boxes of connected components of segmentation masks.
//!
//! The detector is the registered head `faster-rcnn` (task `detection`): `medssl finetune`
//! trains it on the encoder's levels and scores it by AP50 (core's `detection::ap`). It also
//! takes feature maps and targets directly, so it can be trained in a plain loop (the
//! overfit test in `tests/overfit.rs` trains a tiny ResNet-18 and the detector on four
//! hippocampus slices to AP50 1.0).

pub mod anchors;
pub mod boxes;
pub mod boxes_from_masks;
pub mod faster_rcnn;
pub mod fpn;
pub mod matching;
pub mod nms;
pub mod roi_align;
pub mod roi_heads;
pub mod rpn;

pub use faster_rcnn::{DetectionLosses, Detections, FasterRcnn, FasterRcnnConfig, ImageTargets};
