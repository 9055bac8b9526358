//! The sets of a detection fine-tune: the images of a dataset (2D images, or the slices of
//! volumes) with the boxes of a COCO file, as the paper fine-tunes Faster R-CNN on f_intra
//! and scores it by AP at IoU 0.5 (Nguyen et al., AAAI 2023, Sec. 4, Table 5).
//!
//! A set's `format` reader gives the pixels; its `boxes` key names the COCO JSON that gives
//! the objects (`medssl data boxes-from-masks` writes one from segmentation masks). A COCO
//! image belongs to the sample whose path ends with its `file_name`; its `slice` (medssl's
//! extension) picks the slice along the reader's slice axis, and a COCO image without `slice`
//! is a 2D sample. Every sample of the set must have at least one COCO image (otherwise the
//! file and the set disagree, e.g. a different task folder), and each COCO image's width and
//! height must be its slice's; COCO images of samples outside the set are ignored (one file
//! serves the training and the evaluation set). Slices without a COCO image are not used.
//!
//! Training resizes each image to `S x S` and its boxes with it; evaluation predicts each
//! resized image, scales the detections back to the image's own size and scores them
//! against the file's boxes there, crowd regions included as COCO treats them.

use super::data::{decode_all, resize_slices, Split};
use crate::dataset::Dataset;
use crate::detection::ap::{Detection, GroundTruth};
use crate::detection::coco::DetectionSet as CocoSet;
use crate::detection::{boxes_of, Detections, ImageTargets};
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// One image of a detection set, at its own size.
pub struct DetectionImage {
    /// Index of its sample (volume) in the set.
    pub sample: usize,
    /// The COCO image id.
    pub image_id: i64,
    /// `[H, W]` float32, normalised by the reader.
    pub pixels: Tensor,
    /// Non-crowd objects: corner boxes in pixels and labels 1..=C.
    pub boxes: Vec<[f64; 4]>,
    pub labels: Vec<i64>,
}

/// A detection set: its samples, their images and the AP ground truth.
pub struct DetectionSet {
    /// Each sample's description (its file or series folder).
    pub names: Vec<String>,
    pub images: Vec<DetectionImage>,
    /// Every object of the set's images, crowd regions included.
    pub ground_truth: Vec<GroundTruth>,
    /// (COCO category id, name) of labels 1..=C, in label order.
    pub categories: Vec<(i64, String)>,
}

impl DetectionSet {
    /// The COCO category id of model label `label` (1..=C).
    pub fn category_of(&self, label: i64) -> Option<i64> {
        usize::try_from(label - 1)
            .ok()
            .and_then(|k| self.categories.get(k))
            .map(|c| c.0)
    }
}

/// The images of `dataset` with their boxes from `coco` (read from `coco_path`); `classes`
/// counts the background, so the file must have `classes - 1` categories. `slice_axis` is
/// the reader's, where it has one, checked against the COCO images' `axis`.
pub fn detection_set(
    dataset: &dyn Dataset,
    coco: &CocoSet,
    coco_path: &Path,
    classes: i64,
    slice_axis: Option<usize>,
    workers: usize,
    split: Split,
) -> Result<DetectionSet> {
    let file = coco_path.display();
    ensure!(
        coco.categories.len() as i64 == classes - 1,
        "[{}]: the boxes file `{file}` has {} categories ({}), but config key `classes` = {classes} expects {} (the background counts as one class)",
        split.key(),
        coco.categories.len(),
        coco.categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
        classes - 1
    );
    // COCO images by file name, in file order.
    let mut by_file: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (k, objects) in coco.images.iter().enumerate() {
        by_file.entry(objects.image.file_name.as_str()).or_default().push(k);
    }
    let names: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
    let owned: Vec<Vec<usize>> = names
        .iter()
        .map(|name| {
            by_file
                .iter()
                .filter(|(file_name, _)| Path::new(name).ends_with(file_name) || name == *file_name)
                .flat_map(|(_, images)| images.iter().copied())
                .collect()
        })
        .collect();
    if let Some(i) = owned.iter().position(|images| images.is_empty()) {
        bail!(
            "[{}]: {} has no image in the boxes file `{file}` (no COCO `file_name` that its path ends with); make the file from the same data (`medssl data boxes-from-masks`)",
            split.key(),
            names[i]
        );
    }
    let per_sample = decode_all(dataset, workers, split, |i, volume| {
        let voxels = volume.voxels.to_kind(Kind::Float);
        let voxels = match voxels.dim() {
            2 => voxels.unsqueeze(0),
            3 => voxels,
            _ => bail!(
                "[{}]: {} decoded to shape {:?}; a detection set needs 2D images or volumes [D, H, W]",
                split.key(),
                names[i],
                voxels.size()
            ),
        };
        let (depth, height, width) = voxels.size3()?;
        owned[i]
            .iter()
            .map(|&k| {
                let objects = &coco.images[k];
                let image = &objects.image;
                let at = format!("image {} (`{}`) of `{file}`", image.id, image.file_name);
                if let (Some(axis), Some(reader_axis)) = (image.axis, slice_axis) {
                    ensure!(
                        axis == reader_axis,
                        "[{}]: {at} was cut along axis {axis}, but the reader's `slice_axis` is {reader_axis}",
                        split.key()
                    );
                }
                let slice = match image.slice {
                    Some(s) => s,
                    None if depth == 1 => 0,
                    None => bail!(
                        "[{}]: {at} has no `slice`, but {} is a volume of {depth} slices",
                        split.key(),
                        names[i]
                    ),
                };
                ensure!(
                    (0..depth).contains(&slice),
                    "[{}]: {at} is slice {slice}, but {} has {depth} slices",
                    split.key(),
                    names[i]
                );
                ensure!(
                    image.width == width && image.height == height,
                    "[{}]: {at} is {} x {} (width x height), but slice {slice} of {} is {width} x {height}",
                    split.key(),
                    image.width,
                    image.height,
                    names[i]
                );
                let target = coco.target(k);
                Ok(DetectionImage {
                    sample: i,
                    image_id: image.id,
                    pixels: voxels.get(slice).copy(),
                    boxes: boxes_of(&target.boxes),
                    labels: Vec::try_from(&target.labels)?,
                })
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let images: Vec<DetectionImage> = per_sample.into_iter().flatten().collect();
    let ids: std::collections::BTreeSet<i64> = images.iter().map(|i| i.image_id).collect();
    let ground_truth = coco
        .ground_truth()
        .into_iter()
        .filter(|g| ids.contains(&g.image_id))
        .collect();
    Ok(DetectionSet {
        names,
        images,
        ground_truth,
        categories: coco.category_names(),
    })
}

/// The objects of one training image: corner boxes in its pixels and labels 1..=C.
#[derive(Debug, Clone, PartialEq)]
pub struct Objects {
    pub boxes: Vec<[f64; 4]>,
    pub labels: Vec<i64>,
}

/// Images `[N, 1, S, S]` of `images`, bilinear.
pub fn resize_images(images: &[&DetectionImage], size: i64) -> Tensor {
    let pixels: Vec<Tensor> = images
        .iter()
        .map(|image| resize_slices(&image.pixels.unsqueeze(0), size))
        .collect();
    Tensor::cat(&pixels, 0)
}

/// The objects of `images` with their boxes scaled as [`resize_images`] scales the images.
pub fn scaled_objects(images: &[&DetectionImage], size: i64) -> Vec<Objects> {
    images
        .iter()
        .map(|image| {
            let (h, w) = image.pixels.size2().expect("images are [H, W]");
            let boxes = image
                .boxes
                .iter()
                .map(|b| scale(*b, size as f64 / w as f64, size as f64 / h as f64))
                .collect();
            Objects {
                boxes,
                labels: image.labels.clone(),
            }
        })
        .collect()
}

fn scale(b: [f64; 4], sx: f64, sy: f64) -> [f64; 4] {
    [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]
}

/// The training targets of a batch of `S x S` images, flipped as the images were
/// (`flips[b]` = (horizontal, vertical)).
pub fn flipped_targets(
    targets: &[&Objects],
    flips: &[(bool, bool)],
    size: i64,
    device: tch::Device,
) -> Vec<ImageTargets> {
    let s = size as f64;
    targets
        .iter()
        .zip(flips)
        .map(|(objects, &(horizontal, vertical))| {
            let boxes: Vec<[f64; 4]> = objects
                .boxes
                .iter()
                .map(|&[x1, y1, x2, y2]| {
                    let (x1, x2) = if horizontal { (s - x2, s - x1) } else { (x1, x2) };
                    let (y1, y2) = if vertical { (s - y2, s - y1) } else { (y1, y2) };
                    [x1, y1, x2, y2]
                })
                .collect();
            ImageTargets::new(&boxes, &objects.labels).to_device(device)
        })
        .collect()
}

/// AP detections of `image` from what the detector found on its `S x S` version.
pub fn scored(image: &DetectionImage, found: &Detections, size: i64, set: &DetectionSet) -> Result<Vec<Detection>> {
    let (h, w) = image.pixels.size2()?;
    let boxes = boxes_of(&found.boxes);
    let scores: Vec<f64> = Vec::try_from(found.scores.to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
    let labels: Vec<i64> = Vec::try_from(found.labels.to_kind(Kind::Int64).to_device(tch::Device::Cpu))?;
    ensure!(
        boxes.len() == scores.len() && scores.len() == labels.len(),
        "the detector gave {} boxes, {} scores and {} labels for one image",
        boxes.len(),
        scores.len(),
        labels.len()
    );
    boxes
        .into_iter()
        .zip(scores)
        .zip(labels)
        .map(|((b, score), label)| {
            let category_id = set.category_of(label).with_context(|| {
                format!(
                    "the detector predicted label {label}, outside 1..={}",
                    set.categories.len()
                )
            })?;
            Ok(Detection {
                image_id: image.image_id,
                category_id,
                score,
                bbox: scale(b, w as f64 / size as f64, h as f64 / size as f64),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(h: i64, w: i64, boxes: Vec<[f64; 4]>) -> DetectionImage {
        let labels = vec![1; boxes.len()];
        DetectionImage {
            sample: 0,
            image_id: 7,
            pixels: Tensor::zeros([h, w], (Kind::Float, tch::Device::Cpu)),
            boxes,
            labels,
        }
    }

    #[test]
    fn boxes_scale_with_their_image_and_back() {
        let original = image(20, 40, vec![[4.0, 2.0, 20.0, 10.0]]);
        let pixels = resize_images(&[&original], 10);
        let targets = scaled_objects(&[&original], 10);
        assert_eq!(pixels.size(), [1, 1, 10, 10]);
        assert_eq!(targets[0].boxes, vec![[1.0, 1.0, 5.0, 5.0]]);
        let set = DetectionSet {
            names: vec!["a".into()],
            images: Vec::new(),
            ground_truth: Vec::new(),
            categories: vec![(11, "thing".into())],
        };
        let found = Detections {
            boxes: crate::detection::tensor_of(&[[1.0, 1.0, 5.0, 5.0]]),
            scores: Tensor::from_slice(&[0.5f32]),
            labels: Tensor::from_slice(&[1i64]),
        };
        let back = scored(&original, &found, 10, &set).unwrap();
        assert_eq!(back[0].bbox, [4.0, 2.0, 20.0, 10.0]);
        assert_eq!((back[0].category_id, back[0].image_id), (11, 7));
        let bad = Detections {
            labels: Tensor::from_slice(&[2i64]),
            ..found
        };
        assert!(scored(&original, &bad, 10, &set).is_err());
    }

    #[test]
    fn flipped_boxes_cover_the_flipped_pixels() {
        let size = 8;
        let target = Objects {
            boxes: vec![[1.0, 2.0, 3.0, 7.0]],
            labels: vec![1],
        };
        let mask = Tensor::zeros([size, size], (Kind::Float, tch::Device::Cpu));
        let _ = mask.narrow(0, 2, 5).narrow(1, 1, 2).fill_(1.0);
        for flips in [(false, false), (true, false), (false, true), (true, true)] {
            let flipped = flipped_targets(&[&target], &[flips], size, tch::Device::Cpu);
            let b = boxes_of(&flipped[0].boxes)[0];
            let mut m = mask.shallow_clone();
            if flips.0 {
                m = m.flip([1]);
            }
            if flips.1 {
                m = m.flip([0]);
            }
            let inside = m
                .narrow(0, b[1] as i64, (b[3] - b[1]) as i64)
                .narrow(1, b[0] as i64, (b[2] - b[0]) as i64)
                .sum(Kind::Float)
                .double_value(&[]);
            assert_eq!(inside, 10.0, "{flips:?}: {b:?}");
        }
    }
}
