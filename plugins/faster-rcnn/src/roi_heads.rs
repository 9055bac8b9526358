//! The box head of Faster R-CNN: Fast R-CNN on the RPN's proposals (Girshick, ICCV 2015,
//! Sec. 2; Ren et al., NeurIPS 2015, Sec. 3.2), with the FPN's RoI-to-level rule and
//! two-layer MLP head (Lin et al., CVPR 2017, Sec. 4.2).
//!
//! Training (Fast R-CNN Sec. 2.3, torchvision's sizes): the ground-truth boxes join each
//! image's proposals (so the head sees perfect regions from the first step); each region is
//! matched by IoU, foreground at or above `fg_iou_threshold` with its box's class, background
//! below `bg_iou_threshold`; `batch_size_per_image` regions are drawn, at most
//! `positive_fraction` foreground. Every region is pooled by RoIAlign ([`crate::roi_align`],
//! He et al., ICCV 2017) to `output_size` bins from one pyramid level: by FPN's Eq. 1,
//! `k = floor(k0 + log2(sqrt(w h) / 224))` with `k0 = canonical_level` and 224 =
//! `canonical_scale`, or a fixed `pool_level`. Two fully connected layers of
//! `representation_size` with ReLU follow (FPN's "2fc" head), then sibling layers: class
//! scores over `num_classes` (background included) and per-class box deltas (Fast R-CNN
//! Sec. 2.2, coder weights 10, 10, 5, 5). The loss is Fast R-CNN's Eq. 1: cross entropy
//! over the drawn regions, plus the box loss of each foreground region's deltas for its own
//! class, divided by the number drawn (torchvision).
//!
//! Inference: softmax scores; every class's deltas decoded on every proposal and clipped
//! to the image; background dropped; detections below `score_threshold` or smaller than
//! `min_size` dropped; NMS at `nms_threshold` within each class; the
//! `detections_per_image` best kept (torchvision's 0.05, 0.5, 100).
//!
//! The sibling layers start as Fast R-CNN Sec. 3.1 says (zero-mean Gaussians of standard
//! deviation 0.01 for classification and 0.001 for box regression, zero bias), so early box
//! deltas are small and the first decoded boxes stay near their proposals.

use crate::boxes::{box_loss, clip, keep_min_size, BoxCoder, BoxLoss, ImageTargets};
use crate::matching::{sample, Matcher};
use crate::nms::batched_nms;
use crate::roi_align::{rois_of, MultiScaleRoiAlign};
use anyhow::{ensure, Result};
pub use medssl_core::detection::Detections;
use medssl_core::layers;
use medssl_core::rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Seed domain of the box head's region draw.
const SAMPLE_DOMAIN: u64 = 0x0052_4f49; // "ROI" in ASCII

/// Keys of `[head.roi]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoiHeadsConfig {
    /// RoIAlign bins per side.
    pub output_size: i64,
    /// Bilinear samples per bin and axis.
    pub sampling_ratio: i64,
    /// Half-pixel-aligned RoIAlign (Detectron2's `ROIAlignV2`); torchvision's Faster R-CNN
    /// uses `false`.
    pub aligned: bool,
    /// Pool every region from this pyramid level (index among the levels built on the
    /// encoder, shallow first); unset: each region's level by FPN Eq. 1.
    pub pool_level: Option<usize>,
    /// Eq. 1's canonical region size (224, the ImageNet pre-training size).
    pub canonical_scale: f64,
    /// Eq. 1's level of a canonical region (4: stride 16).
    pub canonical_level: f64,
    /// Width of the two fully connected layers.
    pub representation_size: i64,
    /// Regions with IoU at or above this are foreground.
    pub fg_iou_threshold: f64,
    /// Regions with IoU below this are background.
    pub bg_iou_threshold: f64,
    /// Regions drawn per image for the loss.
    pub batch_size_per_image: usize,
    /// Largest share of foreground among them.
    pub positive_fraction: f64,
    /// Weights of the box coder's (x, y, w, h) deltas.
    pub box_weights: [f64; 4],
    /// `"smooth_l1"` or `"l1"`.
    pub box_loss: BoxLoss,
    /// Transition point of the smooth L1 loss.
    pub smooth_l1_beta: f64,
    /// Detections with a lower class probability are dropped.
    pub score_threshold: f64,
    /// IoU above which per-class NMS drops the lower-scoring detection.
    pub nms_threshold: f64,
    /// Detections kept per image.
    pub detections_per_image: usize,
    /// Detections narrower or lower than this (pixels) are dropped.
    pub min_size: f64,
}

impl Default for RoiHeadsConfig {
    /// torchvision's `fasterrcnn_resnet50_fpn`, with aligned RoIAlign.
    fn default() -> Self {
        RoiHeadsConfig {
            output_size: 7,
            sampling_ratio: 2,
            aligned: true,
            pool_level: None,
            canonical_scale: 224.0,
            canonical_level: 4.0,
            representation_size: 1024,
            fg_iou_threshold: 0.5,
            bg_iou_threshold: 0.5,
            batch_size_per_image: 512,
            positive_fraction: 0.25,
            box_weights: [10.0, 10.0, 5.0, 5.0],
            box_loss: BoxLoss::SmoothL1,
            smooth_l1_beta: 1.0 / 9.0,
            score_threshold: 0.05,
            nms_threshold: 0.5,
            detections_per_image: 100,
            min_size: 1e-2,
        }
    }
}

/// The box head's two training losses.
pub struct RoiLosses {
    pub classifier: Tensor,
    pub box_regression: Tensor,
}

/// The regions drawn for one batch's loss, with their targets.
#[derive(Debug)]
pub struct RegionTargets {
    /// `[K, 5]` (image index, box) regions, each image's foreground first.
    pub rois: Tensor,
    /// `[K]` int64 class of each region (0: background).
    pub labels: Tensor,
    /// Rows of `rois` that are foreground.
    pub positives: Vec<i64>,
    /// `[P, 4]` box deltas from each foreground region to its matched box.
    pub deltas: Tensor,
}

/// The box head.
#[derive(Debug)]
pub struct RoiHeads {
    config: RoiHeadsConfig,
    pooler: MultiScaleRoiAlign,
    /// Index of the pooled levels among the pyramid's outputs.
    pooled_levels: Vec<usize>,
    fc6: nn::Linear,
    fc7: nn::Linear,
    cls_score: nn::Linear,
    bbox_pred: nn::Linear,
    num_classes: i64,
    coder: BoxCoder,
    matcher: Matcher,
}

fn gaussian_linear(p: nn::Path, c_in: i64, c_out: i64, stdev: f64) -> nn::Linear {
    layers::linear_initialised(
        p,
        c_in,
        c_out,
        nn::Init::Randn { mean: 0.0, stdev },
        Some(nn::Init::Const(0.0)),
    )
}

impl RoiHeads {
    /// The head over pyramid levels of `width` channels and `strides` (those built on the
    /// encoder, without the extra pooled level), for `num_classes` classes counting the
    /// background.
    pub fn new(
        config: &RoiHeadsConfig,
        p: nn::Path,
        width: i64,
        strides: &[i64],
        num_classes: i64,
    ) -> Result<RoiHeads> {
        ensure!(
            num_classes >= 2,
            "a detector needs num_classes >= 2 (the background and at least one object class), found {num_classes}"
        );
        let matcher = Matcher::new(config.fg_iou_threshold, config.bg_iou_threshold, false, "head.roi")?;
        ensure!(
            config.batch_size_per_image >= 1,
            "config key `head.roi.batch_size_per_image` must be at least 1, found 0"
        );
        ensure!(
            (0.0..=1.0).contains(&config.positive_fraction),
            "config key `head.roi.positive_fraction` must lie in [0, 1], found {}",
            config.positive_fraction
        );
        ensure!(
            config.representation_size >= 1,
            "config key `head.roi.representation_size` must be at least 1, found {}",
            config.representation_size
        );
        ensure!(
            (0.0..=1.0).contains(&config.nms_threshold) && (0.0..=1.0).contains(&config.score_threshold),
            "config keys `head.roi.nms_threshold` ({}) and `head.roi.score_threshold` ({}) must lie in [0, 1]",
            config.nms_threshold,
            config.score_threshold
        );
        ensure!(
            config.detections_per_image >= 1,
            "config key `head.roi.detections_per_image` must be at least 1, found 0"
        );
        ensure!(
            config.canonical_scale > 0.0 && config.canonical_scale.is_finite() && config.canonical_level.is_finite(),
            "config keys `head.roi.canonical_scale` ({}) and `head.roi.canonical_level` ({}) must be finite, the scale positive",
            config.canonical_scale,
            config.canonical_level
        );
        ensure!(
            config.box_weights.iter().all(|w| w.is_finite() && *w > 0.0),
            "config key `head.roi.box_weights` must hold four positive weights, found {:?}",
            config.box_weights
        );
        let output = (config.output_size, config.output_size);
        let (pooled_levels, pooled_strides): (Vec<usize>, Vec<i64>) = match config.pool_level {
            Some(level) => {
                ensure!(
                    level < strides.len(),
                    "config key `head.roi.pool_level` is {level}, but the pyramid has {} levels built on the encoder (0..{})",
                    strides.len(),
                    strides.len()
                );
                (vec![level], vec![strides[level]])
            }
            None => ((0..strides.len()).collect(), strides.to_vec()),
        };
        let mut pooler = MultiScaleRoiAlign::new(&pooled_strides, output, config.sampling_ratio, config.aligned)?;
        pooler.canonical_scale = config.canonical_scale;
        pooler.canonical_level = config.canonical_level;
        let flat = width * config.output_size * config.output_size;
        let r = config.representation_size;
        Ok(RoiHeads {
            config: config.clone(),
            pooler,
            pooled_levels,
            fc6: layers::linear(&p / "box_head" / "fc6", flat, r),
            fc7: layers::linear(&p / "box_head" / "fc7", r, r),
            cls_score: gaussian_linear(&p / "box_predictor" / "cls_score", r, num_classes, 0.01),
            bbox_pred: gaussian_linear(&p / "box_predictor" / "bbox_pred", r, 4 * num_classes, 0.001),
            num_classes,
            coder: BoxCoder::new(config.box_weights),
            matcher,
        })
    }

    /// Class logits `[K, num_classes]` and box deltas `[K, 4 num_classes]` of `rois` `[K, 5]`
    /// on the pyramid `features`.
    pub fn forward(&self, features: &[Tensor], rois: &Tensor) -> (Tensor, Tensor) {
        let pooled_features: Vec<Tensor> = self
            .pooled_levels
            .iter()
            .map(|&l| features[l].shallow_clone())
            .collect();
        let pooled = self.pooler.forward(&pooled_features, rois);
        let hidden = pooled.flatten(1, -1).apply(&self.fc6).relu().apply(&self.fc7).relu();
        (hidden.apply(&self.cls_score), hidden.apply(&self.bbox_pred))
    }

    /// Draws the training regions of every image from its `proposals` and ground truth,
    /// seeded by `seed`.
    pub fn region_targets(&self, proposals: &[Tensor], targets: &[ImageTargets], seed: u64) -> RegionTargets {
        let device = proposals.first().map_or(tch::Device::Cpu, |p| p.device());
        let (mut regions, mut labels, mut deltas, mut positives) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut row = 0i64;
        for (image, (proposal, target)) in proposals.iter().zip(targets).enumerate() {
            let truth = target.boxes.to_device(device).to_kind(Kind::Float);
            let candidates = Tensor::cat(&[proposal.detach().to_kind(Kind::Float), truth.shallow_clone()], 0);
            let matches = self.matcher.assign(&truth, &candidates);
            let drawn = sample(
                &matches,
                self.config.batch_size_per_image,
                self.config.positive_fraction,
                rng::derive(seed, &[SAMPLE_DOMAIN, image as u64]),
            );
            let order: Vec<i64> = drawn.positives.iter().chain(&drawn.negatives).copied().collect();
            let chosen = candidates.index_select(0, &Tensor::from_slice(&order).to_device(device));
            regions.push(chosen);
            let truth_labels: Vec<i64> =
                Vec::try_from(target.labels.to_device(tch::Device::Cpu).to_kind(Kind::Int64)).unwrap_or_default();
            for &k in &drawn.positives {
                labels.push(truth_labels[matches[k as usize] as usize]);
            }
            labels.extend(std::iter::repeat_n(0i64, drawn.negatives.len()));
            if !drawn.positives.is_empty() {
                let matched: Vec<i64> = drawn.positives.iter().map(|&k| matches[k as usize]).collect();
                let matched_boxes = truth.index_select(0, &Tensor::from_slice(&matched).to_device(device));
                let positive_boxes =
                    candidates.index_select(0, &Tensor::from_slice(&drawn.positives).to_device(device));
                deltas.push(self.coder.encode(&matched_boxes, &positive_boxes));
            }
            positives.extend(row..row + drawn.positives.len() as i64);
            row += order.len() as i64;
        }
        RegionTargets {
            rois: rois_of(&regions, device),
            labels: Tensor::from_slice(&labels).to_device(device),
            positives,
            deltas: if deltas.is_empty() {
                Tensor::zeros([0, 4], (Kind::Float, device))
            } else {
                Tensor::cat(&deltas, 0)
            },
        }
    }

    /// Classification and box losses on `proposals` (one `[P_i, 4]` per image) against
    /// `targets`, with the region draw seeded by `seed`.
    pub fn losses(&self, features: &[Tensor], proposals: &[Tensor], targets: &[ImageTargets], seed: u64) -> RoiLosses {
        let drawn = self.region_targets(proposals, targets, seed);
        let (logits, deltas) = self.forward(features, &drawn.rois);
        let k = logits.size()[0];
        if k == 0 {
            let zero = (logits.sum(Kind::Float) + deltas.sum(Kind::Float)) * 0.0;
            return RoiLosses {
                classifier: zero.shallow_clone(),
                box_regression: zero,
            };
        }
        let classifier = logits.cross_entropy_for_logits(&drawn.labels);
        let box_regression = if drawn.positives.is_empty() {
            deltas.sum(Kind::Float) * 0.0
        } else {
            let device = logits.device();
            let rows = Tensor::from_slice(&drawn.positives).to_device(device);
            let classes = drawn.labels.index_select(0, &rows);
            // Each foreground region's deltas for its own class: [P, C, 4] picked at the label.
            let per_class = deltas.index_select(0, &rows).view([-1, self.num_classes, 4]);
            let picked = per_class
                .gather(1, &classes.view([-1, 1, 1]).expand([-1, 1, 4], false), false)
                .squeeze_dim(1);
            box_loss(&picked, &drawn.deltas, self.config.box_loss, self.config.smooth_l1_beta) / k as f64
        };
        RoiLosses {
            classifier,
            box_regression,
        }
    }

    /// Detections of every image from its `proposals`.
    pub fn detect(&self, features: &[Tensor], proposals: &[Tensor], image_size: [i64; 2]) -> Vec<Detections> {
        let device = features[0].device();
        let rois = rois_of(proposals, device);
        let (logits, deltas) = self.forward(features, &rois);
        let scores = logits.softmax(-1, Kind::Float);
        let c = self.num_classes;
        let [height, width] = image_size;
        let mut start = 0;
        proposals
            .iter()
            .map(|proposal| {
                let p = proposal.size()[0];
                let (scores, deltas) = (scores.narrow(0, start, p), deltas.narrow(0, start, p));
                start += p;
                let decoded = self.coder.decode(&deltas, &proposal.to_kind(Kind::Float));
                let boxes = clip(&decoded.view([-1, 4]), height as f64, width as f64).view([p, c, 4]);
                // Drop the background column.
                let boxes = boxes.narrow(1, 1, c - 1).reshape([-1, 4]);
                let scores = scores.narrow(1, 1, c - 1).reshape([-1]);
                let labels = Tensor::arange_start(1, c, (Kind::Int64, device)).repeat([p]);
                let keep = scores.gt(self.config.score_threshold).nonzero().view([-1]);
                let (boxes, scores, labels) = (
                    boxes.index_select(0, &keep),
                    scores.index_select(0, &keep),
                    labels.index_select(0, &keep),
                );
                let keep = keep_min_size(&boxes, self.config.min_size);
                let (boxes, scores, labels) = (
                    boxes.index_select(0, &keep),
                    scores.index_select(0, &keep),
                    labels.index_select(0, &keep),
                );
                let kept = batched_nms(&boxes, &scores, &labels, self.config.nms_threshold);
                let kept = kept.narrow(0, 0, (self.config.detections_per_image as i64).min(kept.size()[0]));
                Detections {
                    boxes: boxes.index_select(0, &kept).detach(),
                    scores: scores.index_select(0, &kept).detach(),
                    labels: labels.index_select(0, &kept),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::{boxes_of, iou_xyxy, tensor_of};
    use tch::Device;

    fn head(vs: &nn::VarStore, config: RoiHeadsConfig) -> RoiHeads {
        RoiHeads::new(&config, vs.root(), 4, &[4, 8], 3).unwrap()
    }

    fn features() -> Vec<Tensor> {
        vec![
            Tensor::randn([2, 4, 16, 16], (Kind::Float, Device::Cpu)),
            Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu)),
        ]
    }

    #[test]
    fn drawn_regions_carry_their_boxes_classes_and_deltas() {
        let vs = nn::VarStore::new(Device::Cpu);
        let roi = head(
            &vs,
            RoiHeadsConfig {
                batch_size_per_image: 8,
                ..Default::default()
            },
        );
        let proposals = [
            tensor_of(&[
                [10.0, 10.0, 30.0, 30.0],
                [11.0, 9.0, 31.0, 29.0],
                [40.0, 40.0, 60.0, 60.0],
            ]),
            tensor_of(&[[0.0, 0.0, 8.0, 8.0]]),
        ];
        let targets = [
            ImageTargets::new(&[[10.0, 10.0, 30.0, 30.0]], &[2]),
            ImageTargets::new(&[], &[]),
        ];
        let drawn = roi.region_targets(&proposals, &targets, 5);
        // Image 0: the two overlapping proposals and the added ground truth are foreground
        // (8 * 0.25 = 2 drawn of the 3), the far one background; image 1 is background only.
        assert_eq!(drawn.positives, vec![0, 1]);
        let labels: Vec<i64> = Vec::try_from(&drawn.labels).unwrap();
        assert_eq!(labels, vec![2, 2, 0, 0]);
        let rois: Vec<Vec<f32>> = Vec::try_from(&drawn.rois).unwrap();
        assert_eq!(rois.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![0.0, 0.0, 0.0, 1.0]);
        for &row in &drawn.positives {
            let r = &rois[row as usize];
            assert!(
                iou_xyxy(
                    [r[1] as f64, r[2] as f64, r[3] as f64, r[4] as f64],
                    [10.0, 10.0, 30.0, 30.0]
                ) >= 0.5
            );
        }
        assert_eq!(drawn.deltas.size(), vec![2, 4]);
        // Decoding the targets on their regions gives the matched box back.
        let regions = drawn.rois.narrow(0, 0, 2).narrow(1, 1, 4);
        for b in boxes_of(&roi.coder.decode(&drawn.deltas, &regions)) {
            assert!(
                (0..4).all(|k| (b[k] - [10.0, 10.0, 30.0, 30.0][k]).abs() < 1e-4),
                "{b:?}"
            );
        }
    }

    #[test]
    fn losses_and_detections_have_the_documented_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let roi = head(
            &vs,
            RoiHeadsConfig {
                representation_size: 16,
                score_threshold: 0.0,
                detections_per_image: 5,
                ..Default::default()
            },
        );
        let proposals = [
            tensor_of(&[
                [10.0, 10.0, 30.0, 30.0],
                [2.0, 3.0, 20.0, 40.0],
                [40.0, 40.0, 60.0, 60.0],
            ]),
            tensor_of(&[[0.0, 0.0, 8.0, 8.0], [5.0, 5.0, 9.0, 12.0]]),
        ];
        let targets = [
            ImageTargets::new(&[[10.0, 10.0, 30.0, 30.0]], &[1]),
            ImageTargets::new(&[], &[]),
        ];
        let losses = roi.losses(&features(), &proposals, &targets, 0);
        // Untrained logits are near 0: cross entropy near ln 3.
        let ce = losses.classifier.double_value(&[]);
        assert!((ce - 3f64.ln()).abs() < 0.2, "{ce}");
        assert!(losses.box_regression.double_value(&[]).is_finite());
        let detections = roi.detect(&features(), &proposals, [64, 64]);
        assert_eq!(detections.len(), 2);
        // An image without proposals has no detections.
        let none = [
            proposals[0].shallow_clone(),
            Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
        ];
        let found = roi.detect(&features(), &none, [64, 64]);
        assert_eq!(found[1].boxes.size(), vec![0, 4]);
        assert_eq!(found[1].labels.size(), vec![0]);
        for d in &detections {
            let k = d.boxes.size()[0];
            assert!(k <= 5);
            assert_eq!(d.scores.size(), vec![k]);
            assert_eq!(d.labels.size(), vec![k]);
            assert_eq!(d.labels.kind(), Kind::Int64);
            let labels: Vec<i64> = Vec::try_from(&d.labels).unwrap();
            assert!(labels.iter().all(|&l| (1..3).contains(&l)));
            let scores: Vec<f32> = Vec::try_from(&d.scores).unwrap();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn a_fixed_pool_level_must_exist() {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = RoiHeadsConfig {
            pool_level: Some(2),
            ..Default::default()
        };
        let error = RoiHeads::new(&config, vs.root(), 4, &[4, 8], 3)
            .unwrap_err()
            .to_string();
        assert!(error.contains("head.roi.pool_level"), "{error}");
        // A fixed level pools every region from that map alone: zeroing the other level
        // changes nothing.
        let single = RoiHeads::new(
            &RoiHeadsConfig {
                pool_level: Some(1),
                representation_size: 8,
                ..Default::default()
            },
            vs.root() / "single",
            4,
            &[4, 8],
            3,
        )
        .unwrap();
        let rois = crate::roi_align::rois_of(
            &[tensor_of(&[[2.0, 2.0, 10.0, 12.0], [0.0, 0.0, 60.0, 60.0]])],
            Device::Cpu,
        );
        let maps = features();
        let (logits, deltas) = single.forward(&maps, &rois);
        assert_eq!((logits.size(), deltas.size()), (vec![2, 3], vec![2, 12]));
        let blank = [maps[0].zeros_like(), maps[1].shallow_clone()];
        let (again, _) = single.forward(&blank, &rois);
        assert!(logits.allclose(&again, 1e-6, 1e-6, false));
        let error = RoiHeads::new(&RoiHeadsConfig::default(), vs.root(), 4, &[4, 8], 1)
            .unwrap_err()
            .to_string();
        assert!(error.contains("num_classes"), "{error}");
    }
}
