//! Region proposal network (Ren et al., Faster R-CNN, NeurIPS 2015, Sec. 3.1; on a feature
//! pyramid as in Lin et al., FPN, CVPR 2017, Sec. 4.1).
//!
//! The head is one 3x3 convolution with ReLU and two sibling 1x1 convolutions, an objectness
//! logit and four box deltas per anchor, shared by every pyramid level (FPN: "the parameters
//! of the heads are shared across all feature pyramid levels"). Weights start as
//! N(0, 0.01), biases at 0 (Faster R-CNN Sec. 3.1.3).
//!
//! Training (Sec. 3.1.2): anchors are matched to the ground truth by IoU ([`Matcher`]:
//! positive at or above `fg_iou_threshold`, negative below `bg_iou_threshold`, and each
//! box's best anchors positive whatever their IoU); `batch_size_per_image` anchors are drawn
//! per image, at most `positive_fraction` of them positive. The loss is Eq. 1: binary cross
//! entropy of the objectness over the drawn anchors plus the box loss of the positives'
//! deltas (smooth L1 or L1, [`crate::boxes::box_loss`]), both divided by the number drawn, as
//! torchvision does.
//!
//! Proposals (Sec. 3.3, FPN Sec. 4.1, torchvision's order): per level the `pre_nms_top_n`
//! anchors of highest objectness; their deltas decoded, boxes clipped to the image, boxes
//! smaller than `min_size` and scores (sigmoid) below `score_threshold` dropped; NMS at
//! `nms_threshold` within each level; the `post_nms_top_n` best of the image kept. Training
//! and inference have their own top-n (torchvision: 2000 / 2000 and 1000 / 1000). Proposals
//! carry no gradient: the box head trains on them as fixed regions (the approximate joint
//! training of Sec. 3.2).

use crate::anchors::{AnchorConfig, AnchorGenerator};
use crate::boxes::{box_loss, clip, keep_min_size, BoxCoder, BoxLoss, ImageTargets};
use crate::matching::{sample, Matcher};
use crate::nms::batched_nms;
use anyhow::{ensure, Result};
use medssl_core::layers;
use medssl_core::memory_format::MemoryFormat;
use medssl_core::rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Seed domain of the RPN's anchor draw (the box head has its own).
const SAMPLE_DOMAIN: u64 = 0x0052_504e; // "RPN" in ASCII

/// Keys of `[head.rpn]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RpnConfig {
    /// Anchors with IoU at or above this are positives.
    pub fg_iou_threshold: f64,
    /// Anchors with IoU below this are negatives (between the two: ignored).
    pub bg_iou_threshold: f64,
    /// Anchors drawn per image for the loss.
    pub batch_size_per_image: usize,
    /// Largest share of positives among them.
    pub positive_fraction: f64,
    /// Proposals kept per level before NMS, in training.
    pub pre_nms_top_n_train: usize,
    /// Proposals kept per level before NMS, at inference.
    pub pre_nms_top_n_test: usize,
    /// Proposals kept per image after NMS, in training.
    pub post_nms_top_n_train: usize,
    /// Proposals kept per image after NMS, at inference.
    pub post_nms_top_n_test: usize,
    /// IoU above which NMS drops the lower-scoring proposal.
    pub nms_threshold: f64,
    /// Proposals narrower or lower than this (pixels) are dropped.
    pub min_size: f64,
    /// Proposals whose objectness probability is below this are dropped.
    pub score_threshold: f64,
    /// `"smooth_l1"` or `"l1"`.
    pub box_loss: BoxLoss,
    /// Transition point of the smooth L1 loss.
    pub smooth_l1_beta: f64,
    /// Weights of the box coder's (x, y, w, h) deltas.
    pub box_weights: [f64; 4],
}

impl Default for RpnConfig {
    /// torchvision's `fasterrcnn_resnet50_fpn`.
    fn default() -> Self {
        RpnConfig {
            fg_iou_threshold: 0.7,
            bg_iou_threshold: 0.3,
            batch_size_per_image: 256,
            positive_fraction: 0.5,
            pre_nms_top_n_train: 2000,
            pre_nms_top_n_test: 1000,
            post_nms_top_n_train: 2000,
            post_nms_top_n_test: 1000,
            nms_threshold: 0.7,
            min_size: 1e-3,
            score_threshold: 0.0,
            box_loss: BoxLoss::SmoothL1,
            smooth_l1_beta: 1.0 / 9.0,
            box_weights: [1.0; 4],
        }
    }
}

/// The head's outputs on one batch, flattened per level in anchor order.
pub struct RpnOutputs {
    /// `[N, A_l]` objectness logits per level (`A_l` anchors of level `l`).
    pub objectness: Vec<Tensor>,
    /// `[N, A_l, 4]` box deltas per level.
    pub deltas: Vec<Tensor>,
    /// `[A_l, 4]` anchors per level (the same for every image of the batch).
    pub anchors: Vec<Tensor>,
}

/// The RPN's two training losses.
pub struct RpnLosses {
    pub objectness: Tensor,
    pub box_regression: Tensor,
}

/// The RPN: its head, anchors, matcher and box coder.
#[derive(Debug)]
pub struct Rpn {
    config: RpnConfig,
    conv: nn::Conv2D,
    logits: nn::Conv2D,
    bbox: nn::Conv2D,
    anchors: AnchorGenerator,
    strides: Vec<i64>,
    coder: BoxCoder,
    matcher: Matcher,
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64) -> nn::Conv2D {
    let config = layers::Conv {
        padding: k / 2,
        weight: nn::Init::Randn { mean: 0.0, stdev: 0.01 },
        bias_init: Some(nn::Init::Const(0.0)),
        ..Default::default()
    };
    layers::conv2d(p, c_in, c_out, k, config)
}

impl Rpn {
    /// The RPN on pyramid levels of `width` channels and `strides`; parameters under `p`.
    pub fn new(config: &RpnConfig, anchors: &AnchorConfig, p: nn::Path, width: i64, strides: &[i64]) -> Result<Rpn> {
        let matcher = Matcher::new(config.fg_iou_threshold, config.bg_iou_threshold, true, "head.rpn")?;
        ensure!(
            config.batch_size_per_image >= 1,
            "config key `head.rpn.batch_size_per_image` must be at least 1, found 0"
        );
        ensure!(
            (0.0..=1.0).contains(&config.positive_fraction),
            "config key `head.rpn.positive_fraction` must lie in [0, 1], found {}",
            config.positive_fraction
        );
        for (key, value) in [
            ("pre_nms_top_n_train", config.pre_nms_top_n_train),
            ("pre_nms_top_n_test", config.pre_nms_top_n_test),
            ("post_nms_top_n_train", config.post_nms_top_n_train),
            ("post_nms_top_n_test", config.post_nms_top_n_test),
        ] {
            ensure!(value >= 1, "config key `head.rpn.{key}` must be at least 1, found 0");
        }
        ensure!(
            (0.0..=1.0).contains(&config.nms_threshold),
            "config key `head.rpn.nms_threshold` must lie in [0, 1], found {}",
            config.nms_threshold
        );
        ensure!(
            config.min_size >= 0.0 && config.smooth_l1_beta >= 0.0,
            "config keys `head.rpn.min_size` ({}) and `head.rpn.smooth_l1_beta` ({}) must not be negative",
            config.min_size,
            config.smooth_l1_beta
        );
        ensure!(
            config.box_weights.iter().all(|w| w.is_finite() && *w > 0.0),
            "config key `head.rpn.box_weights` must hold four positive weights, found {:?}",
            config.box_weights
        );
        let anchors = AnchorGenerator::new(anchors, strides.len())?;
        let a = anchors.per_cell();
        Ok(Rpn {
            config: config.clone(),
            conv: conv(&p / "head" / "conv", width, width, 3),
            logits: conv(&p / "head" / "cls_logits", width, a, 1),
            bbox: conv(&p / "head" / "bbox_pred", width, 4 * a, 1),
            anchors,
            strides: strides.to_vec(),
            coder: BoxCoder::new(config.box_weights),
            matcher,
        })
    }

    /// The RPN with its convolution weights in `format` ([`MemoryFormat`]), as the pyramid
    /// levels it reads.
    pub fn laid_out(self, format: MemoryFormat) -> Rpn {
        for conv in [&self.conv, &self.logits, &self.bbox] {
            format.convert_parameter(&conv.ws);
        }
        self
    }

    /// Runs the head on every pyramid level and lays its outputs out in anchor order
    /// (row, column, anchor).
    pub fn head(&self, features: &[Tensor]) -> RpnOutputs {
        let a = self.anchors.per_cell();
        let mut outputs = RpnOutputs {
            objectness: Vec::with_capacity(features.len()),
            deltas: Vec::with_capacity(features.len()),
            anchors: Vec::with_capacity(features.len()),
        };
        for (level, feature) in features.iter().enumerate() {
            let (n, _, h, w) = feature.size4().unwrap_or((0, 0, 0, 0));
            let hidden = feature.apply(&self.conv).relu();
            // [N, A, H, W] -> [N, H, W, A]: the anchors' order.
            let logits = hidden.apply(&self.logits).permute([0, 2, 3, 1]).reshape([n, -1]);
            let deltas = hidden
                .apply(&self.bbox)
                .view([n, a, 4, h, w])
                .permute([0, 3, 4, 1, 2])
                .reshape([n, -1, 4]);
            outputs.objectness.push(logits);
            outputs.deltas.push(deltas);
            outputs.anchors.push(
                self.anchors
                    .level_anchors(level, h, w, self.strides[level] as f64, feature.device()),
            );
        }
        outputs
    }

    /// The anchor targets of one image: for each anchor of `anchors` `[T, 4]` its matched
    /// box index or [`crate::matching::NEGATIVE`] / [`crate::matching::IGNORED`], and the
    /// drawn sample.
    pub fn anchor_targets(
        &self,
        anchors: &Tensor,
        target: &ImageTargets,
        seed: u64,
    ) -> (Vec<i64>, crate::matching::Sample) {
        let matches = self.matcher.assign(&target.boxes, anchors);
        let drawn = sample(
            &matches,
            self.config.batch_size_per_image,
            self.config.positive_fraction,
            seed,
        );
        (matches, drawn)
    }

    /// Objectness and box losses of `outputs` against `targets` (one per image), with the
    /// anchor draw seeded by `seed`.
    pub fn losses(&self, outputs: &RpnOutputs, targets: &[ImageTargets], seed: u64) -> RpnLosses {
        let anchors = Tensor::cat(&outputs.anchors, 0);
        let objectness = Tensor::cat(&outputs.objectness, 1);
        let deltas = Tensor::cat(&outputs.deltas, 1);
        let device = objectness.device();
        let total = anchors.size()[0];
        let (mut drawn_rows, mut drawn_labels) = (Vec::new(), Vec::new());
        let (mut positive_rows, mut positive_targets) = (Vec::new(), Vec::new());
        for (image, target) in targets.iter().enumerate() {
            let (matches, drawn) =
                self.anchor_targets(&anchors, target, rng::derive(seed, &[SAMPLE_DOMAIN, image as u64]));
            let offset = image as i64 * total;
            drawn_rows.extend(drawn.positives.iter().chain(&drawn.negatives).map(|&i| i + offset));
            drawn_labels.extend(std::iter::repeat_n(1.0f32, drawn.positives.len()));
            drawn_labels.extend(std::iter::repeat_n(0.0f32, drawn.negatives.len()));
            if !drawn.positives.is_empty() {
                let indices = Tensor::from_slice(&drawn.positives).to_device(device);
                let matched: Vec<i64> = drawn.positives.iter().map(|&i| matches[i as usize]).collect();
                let matched_boxes = target
                    .boxes
                    .to_device(device)
                    .to_kind(Kind::Float)
                    .index_select(0, &Tensor::from_slice(&matched).to_device(device));
                positive_targets.push(self.coder.encode(&matched_boxes, &anchors.index_select(0, &indices)));
                positive_rows.extend(drawn.positives.iter().map(|&i| i + offset));
            }
        }
        let drawn_count = drawn_rows.len().max(1) as f64;
        let flat_logits = objectness.reshape([-1]);
        let flat_deltas = deltas.reshape([-1, 4]);
        let objectness_loss = if drawn_rows.is_empty() {
            flat_logits.sum(Kind::Float) * 0.0
        } else {
            let rows = Tensor::from_slice(&drawn_rows).to_device(device);
            let labels = Tensor::from_slice(&drawn_labels).to_device(device);
            flat_logits
                .index_select(0, &rows)
                .binary_cross_entropy_with_logits::<Tensor>(&labels, None, None, tch::Reduction::Sum)
                / drawn_count
        };
        let box_regression = if positive_rows.is_empty() {
            flat_deltas.sum(Kind::Float) * 0.0
        } else {
            let rows = Tensor::from_slice(&positive_rows).to_device(device);
            box_loss(
                &flat_deltas.index_select(0, &rows),
                &Tensor::cat(&positive_targets, 0),
                self.config.box_loss,
                self.config.smooth_l1_beta,
            ) / drawn_count
        };
        RpnLosses {
            objectness: objectness_loss,
            box_regression,
        }
    }

    /// Proposals `[P_i, 4]` of every image (no gradient), best first; `train` picks the
    /// training or inference top-n.
    pub fn proposals(&self, outputs: &RpnOutputs, image_size: [i64; 2], train: bool) -> Vec<Tensor> {
        let (pre, post) = if train {
            (self.config.pre_nms_top_n_train, self.config.post_nms_top_n_train)
        } else {
            (self.config.pre_nms_top_n_test, self.config.post_nms_top_n_test)
        };
        let n = outputs.objectness.first().map_or(0, |o| o.size()[0]);
        let [height, width] = image_size;
        (0..n)
            .map(|image| {
                let (mut boxes, mut scores, mut levels) = (Vec::new(), Vec::new(), Vec::new());
                for (level, ((logits, deltas), anchors)) in outputs
                    .objectness
                    .iter()
                    .zip(&outputs.deltas)
                    .zip(&outputs.anchors)
                    .enumerate()
                {
                    let logits = logits.get(image).detach();
                    let k = (pre as i64).min(logits.size()[0]);
                    let (top, index) = logits.topk(k, 0, true, true);
                    let decoded = self.coder.decode(
                        &deltas.get(image).detach().index_select(0, &index),
                        &anchors.index_select(0, &index),
                    );
                    boxes.push(clip(&decoded, height as f64, width as f64));
                    scores.push(top.sigmoid());
                    levels.push(Tensor::full([k], level as i64, (Kind::Int64, logits.device())));
                }
                let boxes = Tensor::cat(&boxes, 0);
                let scores = Tensor::cat(&scores, 0);
                let levels = Tensor::cat(&levels, 0);
                let keep = keep_min_size(&boxes, self.config.min_size);
                let keep = keep.index_select(
                    0,
                    &scores
                        .index_select(0, &keep)
                        .ge(self.config.score_threshold)
                        .nonzero()
                        .view([-1]),
                );
                let (boxes, scores, levels) = (
                    boxes.index_select(0, &keep),
                    scores.index_select(0, &keep),
                    levels.index_select(0, &keep),
                );
                let kept = batched_nms(&boxes, &scores, &levels, self.config.nms_threshold);
                let kept = kept.narrow(0, 0, (post as i64).min(kept.size()[0]));
                boxes.index_select(0, &kept)
            })
            .collect()
    }

    /// Anchors per cell.
    pub fn anchors_per_cell(&self) -> i64 {
        self.anchors.per_cell()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anchors::AnchorConfig;
    use crate::boxes::boxes_of;
    use crate::matching::NEGATIVE;
    use tch::Device;

    fn small_rpn(vs: &nn::VarStore, config: RpnConfig) -> Rpn {
        let anchors = AnchorConfig {
            sizes: vec![vec![8.0], vec![16.0]],
            aspect_ratios: vec![vec![0.5, 1.0, 2.0]],
        };
        Rpn::new(&config, &anchors, vs.root(), 4, &[4, 8]).unwrap()
    }

    fn features() -> Vec<Tensor> {
        vec![
            Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu)),
            Tensor::randn([2, 4, 4, 4], (Kind::Float, Device::Cpu)),
        ]
    }

    #[test]
    fn head_outputs_follow_the_anchor_order() {
        let vs = nn::VarStore::new(Device::Cpu);
        let rpn = small_rpn(&vs, RpnConfig::default());
        let out = rpn.head(&features());
        assert_eq!(out.objectness[0].size(), vec![2, 8 * 8 * 3]);
        assert_eq!(out.deltas[1].size(), vec![2, 4 * 4 * 3, 4]);
        assert_eq!(out.anchors[1].size(), vec![4 * 4 * 3, 4]);
        // Element (image 1, anchor a at row r, column c) of the flat logits is channel a of
        // the 1x1 convolution at (r, c).
        let feature = features();
        let raw = feature[0].apply(&rpn.conv).relu().apply(&rpn.logits);
        let flat = rpn.head(&feature).objectness[0].shallow_clone();
        let (r, c, a) = (5, 2, 1);
        let want = raw.double_value(&[1, a, r, c]);
        let got = flat.double_value(&[1, (r * 8 + c) * 3 + a]);
        assert!((want - got).abs() < 1e-6);
    }

    #[test]
    fn anchor_targets_draw_the_configured_batch() {
        let vs = nn::VarStore::new(Device::Cpu);
        let rpn = small_rpn(
            &vs,
            RpnConfig {
                batch_size_per_image: 32,
                ..Default::default()
            },
        );
        let out = rpn.head(&features());
        let anchors = Tensor::cat(&out.anchors, 0);
        let target = ImageTargets::new(&[[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 6.0, 10.0]], &[1, 2]);
        let (matches, drawn) = rpn.anchor_targets(&anchors, &target, 3);
        // Both boxes claimed their best anchors.
        assert!(matches.contains(&0) && matches.contains(&1));
        assert!(drawn.positives.len() <= 16 && !drawn.positives.is_empty());
        assert_eq!(drawn.positives.len() + drawn.negatives.len(), 32);
        let background = ImageTargets::new(&[], &[]);
        let (matches, drawn) = rpn.anchor_targets(&anchors, &background, 3);
        assert!(matches.iter().all(|&m| m == NEGATIVE));
        assert!(drawn.positives.is_empty() && drawn.negatives.len() == 32);
    }

    #[test]
    fn losses_are_finite_with_and_without_objects() {
        let vs = nn::VarStore::new(Device::Cpu);
        let rpn = small_rpn(&vs, RpnConfig::default());
        let out = rpn.head(&features());
        let targets = [
            ImageTargets::new(&[[8.0, 8.0, 24.0, 24.0]], &[1]),
            ImageTargets::new(&[], &[]),
        ];
        let losses = rpn.losses(&out, &targets, 0);
        let objectness = losses.objectness.double_value(&[]);
        // Untrained logits are near 0: BCE near ln 2.
        assert!((objectness - std::f64::consts::LN_2).abs() < 0.1, "{objectness}");
        assert!(losses.box_regression.double_value(&[]).is_finite());
        (losses.objectness + losses.box_regression).backward();
        assert!(vs.trainable_variables().iter().all(|v| v.grad().defined()));
    }

    #[test]
    fn proposals_are_clipped_capped_and_detached() {
        let vs = nn::VarStore::new(Device::Cpu);
        let rpn = small_rpn(
            &vs,
            RpnConfig {
                pre_nms_top_n_test: 20,
                post_nms_top_n_test: 15,
                ..Default::default()
            },
        );
        let proposals = rpn.proposals(&rpn.head(&features()), [32, 30], false);
        assert_eq!(proposals.len(), 2);
        for p in &proposals {
            assert!(p.size()[0] >= 1 && p.size()[0] <= 15);
            assert!(!p.requires_grad());
            for b in boxes_of(p) {
                assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 30.0 && b[3] <= 32.0 && b[0] < b[2] && b[1] < b[3]);
            }
        }
    }
}
