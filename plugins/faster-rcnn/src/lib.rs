//! Faster R-CNN (Ren et al., NeurIPS 2015) with a feature pyramid (Lin et al., CVPR 2017) as
//! the 2D detection downstream of the paper (Nguyen et al., AAAI 2023, Sec. 4: f_intra as the
//! backbone of Faster R-CNN, AP at IoU 0.5).
//!
//! libtorch ships none of torchvision's detection operators, so every piece is built here
//! from tensor ops (or plain Rust where the work is sequential, as in greedy NMS), each with
//! property tests against a direct reference:
//!
//! - [`boxes`]: corner boxes, IoU, clipping, the box coder (deltas with weights, clamped
//!   log-size deltas);
//! - [`nms`]: greedy non-maximum suppression, per group;
//! - [`anchors`]: anchors per feature level from configured sizes and aspect ratios;
//! - [`roi_align`]: RoIAlign as torchvision defines it, from gathers;
//! - [`ap`]: average precision at an IoU threshold (AP50) and the precision-recall plot;
//! - [`coco`]: COCO JSON records and a validating reader;
//! - [`boxes_from_masks`]: per-slice boxes of connected components of segmentation masks;
//! - [`fpn`], [`rpn`], [`roi_heads`], [`faster_rcnn`]: the model over any encoder's declared
//!   levels, its four training losses and its inference.

pub mod anchors;
pub mod ap;
pub mod boxes;
pub mod boxes_from_masks;
pub mod coco;
pub mod nms;
pub mod roi_align;
