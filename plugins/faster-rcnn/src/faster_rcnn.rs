//! Faster R-CNN with a feature pyramid (Ren et al., NeurIPS 2015; Lin et al., CVPR 2017) over
//! any encoder's levels: the paper's detection downstream, with f_intra as the backbone
//! (Nguyen et al., AAAI 2023, Sec. 4), scored by AP at IoU 0.5 (`medssl_core::detection::ap`).
//!
//! The model takes the encoder's feature maps, not images, so the backbone stays the
//! caller's: the fine-tune loop runs the encoder (frozen or not) and hands its levels here.
//! [`FasterRcnn::losses`] trains the four losses of the paper's approximate joint training
//! (Ren et al., Sec. 3.2: RPN objectness and box regression, box-head classification and
//! box regression, summed with weight 1 each as in torchvision); [`FasterRcnn::detect`]
//! gives each image's boxes, scores and labels.
//!
//! Registered as the head `faster-rcnn` (task [`Task::Detection`]); config: `[head.fpn]`
//! ([`FpnConfig`]), `[head.anchors]` ([`AnchorConfig`], one size list per pyramid level, the
//! pooled level included), `[head.rpn]` ([`RpnConfig`]), `[head.roi]` ([`RoiHeadsConfig`]).
//!
//! `memory_format = "channels_last"` (top level of `[head]`) lays the pyramid's and the RPN's
//! convolution weights out NHWC and the encoder levels the pyramid reads at its entry, as
//! `model.to(memory_format=torch.channels_last)` in PyTorch ([`MemoryFormat`]); RoIAlign's
//! gathers read the channels-last rows it then has without a copy.
//!
//! `num_classes` counts the background (torchvision's convention): with C object categories
//! the labels of [`ImageTargets`] are 1..=C and `num_classes = C + 1`.

use crate::anchors::AnchorConfig;
pub use crate::boxes::ImageTargets;
use crate::fpn::{Fpn, FpnConfig};
pub use crate::roi_heads::Detections;
use crate::roi_heads::{RoiHeads, RoiHeadsConfig};
use crate::rpn::{Rpn, RpnConfig};
use anyhow::{bail, ensure, Result};
use medssl_core::config::Section;
use medssl_core::encoder::{Level, SpatialDims};
use medssl_core::head::{Head, HeadEntry, HeadInput, HeadShape, Prediction, Targets, Task};
use medssl_core::memory_format::MemoryFormat;
use medssl_core::register;
use medssl_core::registry::default_toml;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Keys of the detector's config, one table per part.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FasterRcnnConfig {
    /// Layout of the pyramid's and the RPN's convolutions: `"contiguous"` (NCHW) or
    /// `"channels_last"` (NHWC). First: TOML writes plain keys before the tables.
    pub memory_format: MemoryFormat,
    pub fpn: FpnConfig,
    pub anchors: AnchorConfig,
    pub rpn: RpnConfig,
    pub roi: RoiHeadsConfig,
}

/// The four training losses (scalars) and their sum.
#[derive(Debug)]
pub struct DetectionLosses {
    /// RPN objectness binary cross entropy.
    pub objectness: Tensor,
    /// RPN box regression.
    pub rpn_box: Tensor,
    /// Box-head classification cross entropy.
    pub classifier: Tensor,
    /// Box-head box regression.
    pub box_reg: Tensor,
    /// The sum of the four.
    pub total: Tensor,
}

/// FPN, RPN and box head over one encoder's declared levels.
#[derive(Debug)]
pub struct FasterRcnn {
    fpn: Fpn,
    rpn: Rpn,
    roi_heads: RoiHeads,
    levels: Vec<Level>,
    num_classes: i64,
}

impl FasterRcnn {
    /// Builds the detector on an encoder's `levels` (shallow to deep) for `num_classes`
    /// classes counting the background; parameters under `p` as `fpn.*`, `rpn.*` and
    /// `roi_heads.*`.
    pub fn new(config: &FasterRcnnConfig, p: nn::Path, levels: &[Level], num_classes: i64) -> Result<FasterRcnn> {
        let fpn = Fpn::new(&config.fpn, &p / "fpn", levels)?.laid_out(config.memory_format);
        let strides = fpn.strides();
        let rpn =
            Rpn::new(&config.rpn, &config.anchors, &p / "rpn", fpn.width(), &strides)?.laid_out(config.memory_format);
        let roi_heads = RoiHeads::new(
            &config.roi,
            &p / "roi_heads",
            fpn.width(),
            &strides[..fpn.num_encoder_levels()],
            num_classes,
        )?;
        Ok(FasterRcnn {
            fpn,
            rpn,
            roi_heads,
            levels: levels.to_vec(),
            num_classes,
        })
    }

    /// Classes predicted, the background included.
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// Strides of the pyramid levels (the RPN's), the pooled level last.
    pub fn pyramid_strides(&self) -> Vec<i64> {
        self.fpn.strides()
    }

    /// The four losses on one batch: `encoder_levels` is the encoder's output on images of
    /// `image_size` (height, width), `targets` one per image; `seed` fixes the anchor and
    /// region draws.
    pub fn losses(
        &self,
        encoder_levels: &[Tensor],
        image_size: [i64; 2],
        targets: &[ImageTargets],
        seed: u64,
    ) -> Result<DetectionLosses> {
        let batch = self.check_levels(encoder_levels, image_size)?;
        ensure!(
            targets.len() as i64 == batch,
            "the batch has {batch} images but {} targets were given",
            targets.len()
        );
        let targets = targets
            .iter()
            .enumerate()
            .map(|(image, target)| self.checked_target(image, target, image_size))
            .collect::<Result<Vec<_>>>()?;
        let features = self.fpn.forward(encoder_levels);
        let outputs = self.rpn.head(&features);
        let rpn = self.rpn.losses(&outputs, &targets, seed);
        let proposals = self.rpn.proposals(&outputs, image_size, true);
        let roi = self
            .roi_heads
            .losses(&features[..self.fpn.num_encoder_levels()], &proposals, &targets, seed);
        let total = &rpn.objectness + &rpn.box_regression + &roi.classifier + &roi.box_regression;
        Ok(DetectionLosses {
            objectness: rpn.objectness,
            rpn_box: rpn.box_regression,
            classifier: roi.classifier,
            box_reg: roi.box_regression,
            total,
        })
    }

    /// Detections of every image of the batch whose encoder output is `encoder_levels`
    /// (images of `image_size`), without gradient; levels that do not match the encoder the
    /// detector was built for are an error.
    pub fn detect(&self, encoder_levels: &[Tensor], image_size: [i64; 2]) -> Result<Vec<Detections>> {
        let batch = self.check_levels(encoder_levels, image_size)?;
        let _guard = tch::no_grad_guard();
        let features = self.fpn.forward(encoder_levels);
        let outputs = self.rpn.head(&features);
        let proposals = self.rpn.proposals(&outputs, image_size, false);
        let detections = self
            .roi_heads
            .detect(&features[..self.fpn.num_encoder_levels()], &proposals, image_size);
        debug_assert_eq!(detections.len() as i64, batch);
        Ok(detections)
    }

    /// Checks the feature maps against the declared levels; returns the batch size.
    fn check_levels(&self, encoder_levels: &[Tensor], image_size: [i64; 2]) -> Result<i64> {
        ensure!(
            image_size[0] >= 1 && image_size[1] >= 1,
            "image size must be positive, found {image_size:?}"
        );
        ensure!(
            encoder_levels.len() == self.levels.len(),
            "the encoder gave {} feature maps, but the detector was built for its {} declared levels {:?}",
            encoder_levels.len(),
            self.levels.len(),
            self.levels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>()
        );
        let mut batch = None;
        for (map, level) in encoder_levels.iter().zip(&self.levels) {
            let size = map.size();
            if size.len() != 4 || size[1] != level.channels {
                bail!(
                    "encoder level `{}` is {:?}, expected [N, {}, H, W]",
                    level.name,
                    size,
                    level.channels
                );
            }
            match batch {
                None => batch = Some(size[0]),
                Some(n) => ensure!(
                    n == size[0],
                    "encoder level `{}` has batch {}, the first level {n}",
                    level.name,
                    size[0]
                ),
            }
        }
        Ok(batch.unwrap_or(0))
    }

    /// Image `image`'s target as float32 boxes and int64 labels, checked.
    fn checked_target(&self, image: usize, target: &ImageTargets, image_size: [i64; 2]) -> Result<ImageTargets> {
        let (boxes, labels) = (&target.boxes, &target.labels);
        let m = labels.size().first().copied().unwrap_or(-1);
        ensure!(
            labels.dim() == 1 && boxes.size() == [m, 4],
            "target of image {image}: expected boxes [m, 4] and labels [m], found boxes {:?} and labels {:?}",
            boxes.size(),
            labels.size()
        );
        let boxes = boxes.to_kind(Kind::Float);
        let labels = labels.to_kind(Kind::Int64);
        let plain = crate::boxes::boxes_of(&boxes);
        let label_values: Vec<i64> = Vec::try_from(labels.to_device(tch::Device::Cpu)).unwrap_or_default();
        for (k, (b, &label)) in plain.iter().zip(&label_values).enumerate() {
            ensure!(
                (1..self.num_classes).contains(&label),
                "target of image {image}, box {k}: label {label} is outside 1..{} (0 is the background; num_classes counts it)",
                self.num_classes
            );
            ensure!(
                b.iter().all(|v| v.is_finite()) && b[2] > b[0] && b[3] > b[1],
                "target of image {image}, box {k}: {b:?} is not a corner box [x1, y1, x2, y2] with x2 > x1 and y2 > y1"
            );
            let [height, width] = image_size;
            ensure!(
                b[2] > 0.0 && b[3] > 0.0 && b[0] < width as f64 && b[1] < height as f64,
                "target of image {image}, box {k}: {b:?} lies outside the {height} x {width} image"
            );
        }
        Ok(ImageTargets { boxes, labels })
    }
}

impl Head for FasterRcnn {
    fn task(&self) -> Task {
        Task::Detection
    }

    fn loss(&self, input: &HeadInput, targets: &Targets, seed: u64) -> Result<Tensor> {
        let targets = targets.boxes("faster-rcnn")?;
        Ok(self
            .losses(&input.encoder.levels, input.image_size, targets, seed)?
            .total)
    }

    fn predict(&self, input: &HeadInput) -> Result<Prediction> {
        Ok(Prediction::Detections(
            self.detect(&input.encoder.levels, input.image_size)?,
        ))
    }
}

fn build(section: &Section, p: nn::Path, shape: &HeadShape) -> Result<Box<dyn Head>> {
    ensure!(
        shape.spatial_dims == SpatialDims::Two,
        "head `faster-rcnn` detects objects in 2D images from a 2D encoder's feature maps, but the run's encoder is {}: use a 3D head (e.g. `unetr`)",
        shape.spatial_dims
    );
    let cfg: FasterRcnnConfig = section.parse()?;
    cfg.memory_format
        .check_device(p.device(), &format!("{}.memory_format", section.key))?;
    Ok(Box::new(FasterRcnn::new(&cfg, p, &shape.levels, shape.num_classes)?))
}

register!(HEADS, FASTER_RCNN: HeadEntry = HeadEntry {
    name: "faster-rcnn",
    about: "Faster R-CNN with a feature pyramid over the encoder's levels: RPN, RoIAlign, two-FC box head; AP at IoU 0.5",
    default_config: default_toml::<FasterRcnnConfig>,
    // Small enough for the composition test's 17 x 15 images; anchors for a pyramid of four
    // encoder levels and the pooled one.
    smoke_configs: &[
        "[fpn]\nwidth = 8\n[anchors]\nsizes = [[4.0], [8.0], [12.0], [16.0], [24.0]]\n[rpn]\npre_nms_top_n_train = 50\npost_nms_top_n_train = 20\nbatch_size_per_image = 32\n[roi]\nbatch_size_per_image = 16\nrepresentation_size = 8",
    ],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::tensor_of;
    use proptest::prelude::*;
    use tch::Device;

    /// An encoder's levels: strides 2..16, small widths.
    fn levels() -> Vec<Level> {
        [(2, 3), (4, 4), (8, 6), (16, 8)]
            .iter()
            .enumerate()
            .map(|(i, &(stride, channels))| Level {
                name: format!("layer{i}"),
                channels,
                stride,
            })
            .collect()
    }

    fn small_config() -> FasterRcnnConfig {
        let mut config = FasterRcnnConfig::default();
        config.fpn.width = 8;
        config.anchors.sizes = vec![vec![8.0], vec![16.0], vec![32.0], vec![64.0], vec![128.0]];
        config.rpn.pre_nms_top_n_train = 100;
        config.rpn.post_nms_top_n_train = 50;
        config.rpn.pre_nms_top_n_test = 100;
        config.rpn.post_nms_top_n_test = 50;
        config.rpn.batch_size_per_image = 64;
        config.roi.batch_size_per_image = 32;
        config.roi.representation_size = 16;
        config
    }

    fn maps(batch: i64, size: i64, seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        levels()
            .iter()
            .map(|l| {
                Tensor::randn(
                    [batch, l.channels, size / l.stride, size / l.stride],
                    (Kind::Float, Device::Cpu),
                )
            })
            .collect()
    }

    #[test]
    fn default_config_round_trips_and_rejects_unknown_keys() {
        let text = toml::to_string(&FasterRcnnConfig::default()).unwrap();
        let back: FasterRcnnConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, FasterRcnnConfig::default());
        let error = toml::from_str::<FasterRcnnConfig>("[rpn]\nnms_treshold = 0.5\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("nms_treshold"), "{error}");
        let nested: FasterRcnnConfig = toml::from_str("[roi]\npool_level = 0\n[fpn]\nextra_pool = false\n").unwrap();
        assert_eq!(nested.roi.pool_level, Some(0));
        assert!(!nested.fpn.extra_pool);
    }

    #[test]
    fn mismatched_inputs_are_errors_naming_what_was_expected() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = FasterRcnn::new(&small_config(), vs.root(), &levels(), 3).unwrap();
        let features = maps(1, 32, 0);
        let good = [ImageTargets::new(&[[4.0, 4.0, 12.0, 12.0]], &[1])];
        let error = model
            .losses(&features[..3], [32, 32], &good, 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("4 declared levels"), "{error}");
        let bad_label = [ImageTargets::new(&[[4.0, 4.0, 12.0, 12.0]], &[3])];
        let error = model
            .losses(&features, [32, 32], &bad_label, 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("image 0, box 0") && error.contains("label 3"), "{error}");
        let flat_box = [ImageTargets::new(&[[4.0, 4.0, 4.0, 12.0]], &[1])];
        let error = model.losses(&features, [32, 32], &flat_box, 0).unwrap_err().to_string();
        assert!(error.contains("x2 > x1"), "{error}");
        let error = model.losses(&features, [32, 32], &[], 0).unwrap_err().to_string();
        assert!(error.contains("1 images but 0 targets"), "{error}");
        // Anchor lists must match the pyramid (4 levels + pool here).
        let mut wrong = small_config();
        wrong.anchors.sizes.pop();
        let error = FasterRcnn::new(&wrong, vs.root(), &levels(), 3)
            .unwrap_err()
            .to_string();
        assert!(error.contains("head.anchors.sizes"), "{error}");
        let error = model.detect(&features[..2], [32, 32]).unwrap_err().to_string();
        assert!(error.contains("4 declared levels"), "{error}");
    }

    #[test]
    fn detections_have_the_documented_shapes_per_image() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut config = small_config();
        config.roi.score_threshold = 0.0;
        let model = FasterRcnn::new(&config, vs.root(), &levels(), 3).unwrap();
        assert_eq!(model.pyramid_strides(), vec![2, 4, 8, 16, 32]);
        let detections = model.detect(&maps(3, 32, 1), [32, 32]).unwrap();
        assert_eq!(detections.len(), 3);
        for d in detections {
            let k = d.boxes.size()[0];
            assert!((1..=100).contains(&k));
            assert_eq!(d.boxes.size(), vec![k, 4]);
            assert_eq!(d.scores.size(), vec![k]);
            assert_eq!(d.labels.kind(), Kind::Int64);
            assert!(!d.boxes.requires_grad());
        }
    }

    /// Largest absolute difference over the largest magnitude of `a`.
    fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
        let scale = a.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
        (a - b).abs().max().double_value(&[]) / scale
    }

    /// channels_last against contiguous, with the same weights: the pyramid's outputs in
    /// fp32 and f64 to 1e-5 and 1e-10 of their largest magnitude (measured: equal in fp32,
    /// 6e-16 in f64); the four losses and every gradient (the detector's and the encoder
    /// maps') in f64 to 1e-10 (measured 1e-15). Not in fp32: there the proposals' top-k and
    /// NMS may order scores within rounding of each other either way, and then train on
    /// other regions.
    #[test]
    fn channels_last_equals_contiguous_in_pyramid_losses_and_gradients() {
        let reference = nn::VarStore::new(Device::Cpu);
        FasterRcnn::new(&small_config(), reference.root(), &levels(), 3).unwrap();
        let mut init: Vec<(String, Tensor)> = reference.variables().into_iter().collect();
        init.sort_by(|a, b| a.0.cmp(&b.0));
        let encoder_maps = maps(2, 32, 3);
        let targets = [
            ImageTargets::new(&[[4.0, 4.0, 12.0, 12.0]], &[1]),
            ImageTargets::new(&[[10.0, 8.0, 30.0, 20.0], [2.0, 2.0, 9.0, 9.0]], &[2, 1]),
        ];
        let mut measured = Vec::new();
        for (kind, tolerance) in [(Kind::Float, 1e-5), (Kind::Double, 1e-10)] {
            let mut runs = Vec::new();
            for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
                let config = FasterRcnnConfig {
                    memory_format: format,
                    ..small_config()
                };
                let mut vs = nn::VarStore::new(Device::Cpu);
                let model = FasterRcnn::new(&config, vs.root(), &levels(), 3).unwrap();
                let variables = vs.variables();
                tch::no_grad(|| {
                    for (name, t) in &init {
                        variables[name].shallow_clone().copy_(t);
                    }
                });
                if kind == Kind::Double {
                    vs.double();
                }
                for (name, t) in &vs.variables() {
                    if t.dim() == 4 {
                        assert!(format.holds(t), "{name} in {}: {:?}", format.name(), t.stride());
                    }
                }
                // Fresh leaves each run, so that no gradient accumulates across runs.
                let features: Vec<Tensor> = encoder_maps
                    .iter()
                    .map(|m| m.to_kind(kind).detach().set_requires_grad(true))
                    .collect();
                let pyramid = model.fpn.forward(&features);
                for (i, level) in pyramid.iter().enumerate() {
                    assert!(
                        format.holds(level),
                        "pyramid level {i} in {}: {:?}",
                        format.name(),
                        level.stride()
                    );
                }
                let losses = model.losses(&features, [32, 32], &targets, 7).unwrap();
                losses.total.backward();
                // A pyramid level the RPN's draw missed gets no gradient, in either layout.
                let gradient = |t: &Tensor| {
                    let g = t.grad();
                    if g.defined() {
                        g
                    } else {
                        t.zeros_like()
                    }
                };
                let mut gradients: Vec<Tensor> = init.iter().map(|(name, _)| gradient(&vs.variables()[name])).collect();
                gradients.extend(features.iter().map(Tensor::grad));
                let losses = [losses.objectness, losses.rpn_box, losses.classifier, losses.box_reg];
                runs.push((pyramid, losses, gradients));
            }
            let worst = |a: &[Tensor], b: &[Tensor]| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| relative_difference(a, b))
                    .fold(0.0, f64::max)
            };
            let [(pyramid_a, losses_a, gradients_a), (pyramid_b, losses_b, gradients_b)] = &runs[..] else {
                unreachable!("two layouts")
            };
            let name = if kind == Kind::Float { "fp32" } else { "f64" };
            measured.push((name, "pyramid", worst(pyramid_a, pyramid_b), tolerance));
            if kind == Kind::Double {
                measured.push((name, "losses", worst(losses_a, losses_b), tolerance));
                measured.push((name, "gradients", worst(gradients_a, gradients_b), tolerance));
            }
        }
        eprintln!(
            "faster-rcnn, channels_last vs contiguous, relative: {}",
            measured
                .iter()
                .map(|(kind, what, diff, _)| format!("{kind} {what} {diff:.1e}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (kind, what, diff, tolerance) in measured {
            assert!(diff <= tolerance, "{kind} {what}: {diff:e} > {tolerance:e}");
        }
    }

    fn random_targets() -> impl Strategy<Value = Vec<Vec<([f64; 4], i64)>>> {
        prop::collection::vec(
            prop::collection::vec(
                (0.0..24.0f64, 0.0..24.0f64, 2.0..16.0f64, 2.0..16.0f64, 1i64..3)
                    .prop_map(|(x, y, w, h, l)| ([x, y, (x + w).min(32.0), (y + h).min(32.0)], l)),
                0..3,
            ),
            1..3,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]

        #[test]
        fn losses_are_finite_and_gradients_reach_every_part(images in random_targets(), seed in 0u64..1000) {
            let vs = nn::VarStore::new(Device::Cpu);
            // Every anchor in the RPN's draw: a draw of 64 of the ~1000 anchors often misses
            // the 15 of the two coarsest levels, whose output convolution then rightly gets
            // no gradient (background-only regions pool from the finest level).
            let mut config = small_config();
            config.rpn.batch_size_per_image = 4096;
            let model = FasterRcnn::new(&config, vs.root() / "head", &levels(), 3).unwrap();
            let batch = images.len() as i64;
            let features: Vec<Tensor> = maps(batch, 32, seed as i64)
                .into_iter()
                .map(|m| m.set_requires_grad(true))
                .collect();
            let targets: Vec<ImageTargets> = images
                .iter()
                .map(|objects| {
                    let boxes: Vec<[f64; 4]> = objects.iter().map(|o| o.0).collect();
                    let labels: Vec<i64> = objects.iter().map(|o| o.1).collect();
                    ImageTargets { boxes: tensor_of(&boxes), labels: Tensor::from_slice(&labels) }
                })
                .collect();
            let losses = model.losses(&features, [32, 32], &targets, seed).unwrap();
            for (name, loss) in [
                ("objectness", &losses.objectness),
                ("rpn_box", &losses.rpn_box),
                ("classifier", &losses.classifier),
                ("box_reg", &losses.box_reg),
                ("total", &losses.total),
            ] {
                prop_assert_eq!(loss.dim(), 0, "{} is not a scalar", name);
                let value = loss.double_value(&[]);
                prop_assert!(value.is_finite() && value >= 0.0, "{} = {}", name, value);
            }
            let sum = losses.objectness.double_value(&[]) + losses.rpn_box.double_value(&[])
                + losses.classifier.double_value(&[]) + losses.box_reg.double_value(&[]);
            prop_assert!((losses.total.double_value(&[]) - sum).abs() < 1e-5);
            losses.total.backward();
            let grads = vs.variables();
            let any_objects = images.iter().any(|o| !o.is_empty());
            for (name, var) in &grads {
                let grad = var.grad();
                prop_assert!(grad.defined(), "no gradient for {}", name);
                prop_assert!(grad.isfinite().all().int64_value(&[]) == 1, "non-finite gradient for {}", name);
                let magnitude = grad.abs().sum(Kind::Float).double_value(&[]);
                // Box regression layers only learn from positives; everything else always.
                let regression = name.contains("bbox_pred");
                if !regression || any_objects {
                    prop_assert!(magnitude > 0.0, "zero gradient for {}", name);
                }
            }
            for part in ["head.fpn.", "head.rpn.", "head.roi_heads.box_head.", "head.roi_heads.box_predictor."] {
                prop_assert!(grads.keys().any(|k| k.starts_with(part)), "no parameters under {}", part);
            }
            // The gradient reaches the encoder's maps through the pyramid.
            prop_assert!(features[3].grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
    }
}
