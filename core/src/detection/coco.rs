//! COCO detection JSON (Lin et al., ECCV 2014, "Microsoft COCO", the object-detection
//! annotation format): `images`, `annotations` with `bbox = [x, y, width, height]` in pixels
//! from the image's top-left corner, and `categories`. The reader validates the file and
//! turns it into per-image training targets and AP ground truth.
//!
//! Fields beyond those read here (`segmentation`, `license`, `info`, ...) are ignored, as
//! COCO tools do. Images may carry two optional extra fields that medssl writes for slices of
//! volumes (`data boxes-from-masks`): `slice` (the slice index) and `axis` (the volume axis
//! it was cut along); `file_name` then names the volume.
//!
//! Checks, each an error naming the file and the record: duplicate image, annotation or
//! category ids; an image with a non-positive width or height; an annotation whose image or
//! category does not exist; a box with a non-finite coordinate, zero or negative width or
//! height, or any part outside its image (boxes are not clipped silently: a box past the
//! border means the annotation and the image disagree). An image without annotations is
//! valid: it trains as background only. Crowd annotations (`iscrowd = 1`) are kept for AP,
//! which ignores detections on them, and are left out of training targets.

use crate::detection::ap::GroundTruth;
use crate::detection::ImageTargets;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// A COCO detection file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoFile {
    pub images: Vec<CocoImage>,
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    pub categories: Vec<CocoCategory>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoImage {
    pub id: i64,
    pub file_name: String,
    pub width: i64,
    pub height: i64,
    /// Slice index within the volume `file_name` (medssl's extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<i64>,
    /// Volume axis the slice was cut along (medssl's extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub axis: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoAnnotation {
    pub id: i64,
    pub image_id: i64,
    pub category_id: i64,
    /// `[x, y, width, height]`.
    pub bbox: [f64; 4],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<f64>,
    #[serde(default)]
    pub iscrowd: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoCategory {
    pub id: i64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
}

/// One image of a validated set with its objects, boxes in corner form.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageObjects {
    pub image: CocoImage,
    pub boxes: Vec<[f64; 4]>,
    pub category_ids: Vec<i64>,
    pub crowd: Vec<bool>,
}

/// A validated COCO set: images in file order, each with its objects.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionSet {
    pub images: Vec<ImageObjects>,
    /// Categories in file order; the model's label of category `k` here is `k + 1`
    /// (0 is background).
    pub categories: Vec<CocoCategory>,
}

impl DetectionSet {
    /// The model label (1..=C) of a category id.
    pub fn label_of(&self, category_id: i64) -> Option<i64> {
        self.categories
            .iter()
            .position(|c| c.id == category_id)
            .map(|k| k as i64 + 1)
    }

    /// The category id of a model label (1..=C).
    pub fn category_of(&self, label: i64) -> Option<i64> {
        usize::try_from(label - 1)
            .ok()
            .and_then(|k| self.categories.get(k))
            .map(|c| c.id)
    }

    /// (id, name) of every category, for AP.
    pub fn category_names(&self) -> Vec<(i64, String)> {
        self.categories.iter().map(|c| (c.id, c.name.clone())).collect()
    }

    /// The training target of image `index`: its non-crowd objects.
    pub fn target(&self, index: usize) -> ImageTargets {
        let objects = &self.images[index];
        let (mut boxes, mut labels) = (Vec::new(), Vec::new());
        for k in 0..objects.boxes.len() {
            if !objects.crowd[k] {
                boxes.push(objects.boxes[k]);
                labels.push(self.label_of(objects.category_ids[k]).unwrap_or(0));
            }
        }
        ImageTargets::new(&boxes, &labels)
    }

    /// Every object as AP ground truth.
    pub fn ground_truth(&self) -> Vec<GroundTruth> {
        self.images
            .iter()
            .flat_map(|objects| {
                (0..objects.boxes.len()).map(move |k| GroundTruth {
                    image_id: objects.image.id,
                    category_id: objects.category_ids[k],
                    bbox: objects.boxes[k],
                    crowd: objects.crowd[k],
                })
            })
            .collect()
    }
}

/// Reads and validates a COCO detection file.
pub fn read_coco(path: &Path) -> Result<DetectionSet> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read COCO file `{}`", path.display()))?;
    let file: CocoFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "cannot parse COCO file `{}`: expected a JSON object with `images`, `annotations` and `categories`",
            path.display()
        )
    })?;
    validate(file).with_context(|| format!("invalid COCO file `{}`", path.display()))
}

/// Writes `file` as pretty JSON.
pub fn write_coco(path: &Path, file: &CocoFile) -> Result<()> {
    let text = serde_json::to_string_pretty(file)?;
    std::fs::write(path, text).with_context(|| format!("cannot write COCO file `{}`", path.display()))
}

/// Checks `file` (the module doc lists the checks) and groups annotations by image.
pub fn validate(file: CocoFile) -> Result<DetectionSet> {
    ensure!(
        !file.categories.is_empty(),
        "`categories` is empty: expected at least one category"
    );
    let mut category_ids = HashSet::new();
    for category in &file.categories {
        ensure!(
            category_ids.insert(category.id),
            "category id {} (`{}`) appears twice in `categories`",
            category.id,
            category.name
        );
    }
    let mut index_of_image: HashMap<i64, usize> = HashMap::new();
    for (index, image) in file.images.iter().enumerate() {
        ensure!(
            index_of_image.insert(image.id, index).is_none(),
            "image id {} (`{}`) appears twice in `images`",
            image.id,
            image.file_name
        );
        ensure!(
            image.width > 0 && image.height > 0,
            "image id {} (`{}`): width and height must be positive, found {} x {}",
            image.id,
            image.file_name,
            image.width,
            image.height
        );
    }
    let mut images: Vec<ImageObjects> = file
        .images
        .iter()
        .map(|image| ImageObjects {
            image: image.clone(),
            boxes: Vec::new(),
            category_ids: Vec::new(),
            crowd: Vec::new(),
        })
        .collect();
    let mut annotation_ids = HashSet::new();
    for annotation in &file.annotations {
        let id = annotation.id;
        ensure!(
            annotation_ids.insert(id),
            "annotation id {id} appears twice in `annotations`"
        );
        let Some(&index) = index_of_image.get(&annotation.image_id) else {
            bail!(
                "annotation id {id}: image_id {} is not the id of any image in `images`",
                annotation.image_id
            );
        };
        if !category_ids.contains(&annotation.category_id) {
            let known: BTreeMap<i64, &str> = file.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
            bail!(
                "annotation id {id}: category_id {} is not among the categories {known:?}",
                annotation.category_id
            );
        }
        let image = &images[index].image;
        let [x, y, w, h] = annotation.bbox;
        let describe = || {
            format!(
                "annotation id {id} (image id {}, `{}`): bbox [x, y, width, height] = {:?}",
                image.id, image.file_name, annotation.bbox
            )
        };
        ensure!(
            annotation.bbox.iter().all(|v| v.is_finite()),
            "{}: every value must be a finite number",
            describe()
        );
        ensure!(
            w > 0.0 && h > 0.0,
            "{}: the box has zero area (width and height must be positive)",
            describe()
        );
        // A box may touch the border; float rounding of a converted file may overshoot it by
        // a hair.
        const SLACK: f64 = 1e-6;
        ensure!(
            x >= -SLACK && y >= -SLACK && x + w <= image.width as f64 + SLACK && y + h <= image.height as f64 + SLACK,
            "{}: the box lies partly outside the {} x {} image",
            describe(),
            image.width,
            image.height
        );
        let objects = &mut images[index];
        objects.boxes.push([x, y, x + w, y + h]);
        objects.category_ids.push(annotation.category_id);
        objects.crowd.push(annotation.iscrowd != 0);
    }
    Ok(DetectionSet {
        images,
        categories: file.categories,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CocoFile {
        CocoFile {
            images: vec![
                CocoImage {
                    id: 1,
                    file_name: "a.nii.gz".into(),
                    width: 50,
                    height: 40,
                    slice: Some(3),
                    axis: Some(2),
                },
                CocoImage {
                    id: 2,
                    file_name: "b.png".into(),
                    width: 20,
                    height: 20,
                    slice: None,
                    axis: None,
                },
            ],
            annotations: vec![
                CocoAnnotation {
                    id: 10,
                    image_id: 1,
                    category_id: 7,
                    bbox: [2.0, 3.0, 10.0, 5.0],
                    area: Some(30.0),
                    iscrowd: 0,
                },
                CocoAnnotation {
                    id: 11,
                    image_id: 1,
                    category_id: 9,
                    bbox: [0.0, 0.0, 50.0, 40.0],
                    area: None,
                    iscrowd: 1,
                },
            ],
            categories: vec![
                CocoCategory {
                    id: 7,
                    name: "anterior".into(),
                    supercategory: None,
                },
                CocoCategory {
                    id: 9,
                    name: "posterior".into(),
                    supercategory: None,
                },
            ],
        }
    }

    fn error_of(file: CocoFile) -> String {
        format!("{:#}", validate(file).unwrap_err())
    }

    #[test]
    fn a_written_file_reads_back_into_targets_and_ground_truth() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boxes.json");
        write_coco(&path, &sample()).unwrap();
        let set = read_coco(&path).unwrap();
        assert_eq!(set.images.len(), 2);
        assert_eq!(set.images[0].boxes[0], [2.0, 3.0, 12.0, 8.0]);
        assert_eq!(
            (set.label_of(7), set.label_of(9), set.label_of(8)),
            (Some(1), Some(2), None)
        );
        assert_eq!(set.category_of(2), Some(9));
        // The crowd region is not a training target; the image without annotations is valid.
        let target = set.target(0);
        assert_eq!(target.boxes.size(), vec![1, 4]);
        assert_eq!(Vec::<i64>::try_from(&target.labels).unwrap(), vec![1]);
        assert_eq!(set.target(1).boxes.size(), vec![0, 4]);
        let gt = set.ground_truth();
        assert_eq!(gt.len(), 2);
        assert!(gt[1].crowd);
    }

    #[test]
    fn extra_coco_fields_are_ignored() {
        let text = r#"{"info": {"year": 2024}, "licenses": [],
            "images": [{"id": 1, "file_name": "x.png", "width": 8, "height": 8, "license": 3}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "segmentation": []}],
            "categories": [{"id": 1, "name": "lesion", "supercategory": "finding"}]}"#;
        let set = validate(serde_json::from_str(text).unwrap()).unwrap();
        assert_eq!(set.images[0].boxes, vec![[1.0, 1.0, 3.0, 3.0]]);
    }

    #[test]
    fn bad_records_are_errors_naming_them() {
        let mut missing_image = sample();
        missing_image.annotations[0].image_id = 5;
        let e = error_of(missing_image);
        assert!(e.contains("annotation id 10") && e.contains("image_id 5"), "{e}");

        let mut unknown_category = sample();
        unknown_category.annotations[1].category_id = 3;
        let e = error_of(unknown_category);
        assert!(e.contains("annotation id 11") && e.contains("category_id 3"), "{e}");

        let mut empty_box = sample();
        empty_box.annotations[0].bbox = [2.0, 3.0, 0.0, 5.0];
        let e = error_of(empty_box);
        assert!(e.contains("annotation id 10") && e.contains("zero area"), "{e}");

        let mut outside = sample();
        outside.annotations[0].bbox = [45.0, 3.0, 10.0, 5.0];
        let e = error_of(outside);
        assert!(e.contains("annotation id 10") && e.contains("outside"), "{e}");

        let mut negative = sample();
        negative.annotations[0].bbox = [-1.0, 3.0, 4.0, 5.0];
        assert!(error_of(negative).contains("outside"));

        let mut nan = sample();
        nan.annotations[0].bbox = [f64::NAN, 3.0, 4.0, 5.0];
        assert!(error_of(nan).contains("finite"));

        let mut twice = sample();
        twice.annotations[1].id = 10;
        assert!(error_of(twice).contains("annotation id 10 appears twice"));

        let mut twice = sample();
        twice.images[1].id = 1;
        assert!(error_of(twice).contains("image id 1"));

        let mut flat = sample();
        flat.images[1].height = 0;
        assert!(error_of(flat).contains("image id 2"));

        let mut none = sample();
        none.categories.clear();
        assert!(error_of(none).contains("categories"));
    }

    #[test]
    fn a_file_that_does_not_parse_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.json");
        std::fs::write(&path, r#"{"images": [{"id": 1}]"#).unwrap();
        let e = format!("{:#}", read_coco(&path).unwrap_err());
        assert!(e.contains("broken.json") && e.contains("cannot parse"), "{e}");
        let e = format!("{:#}", read_coco(&dir.path().join("absent.json")).unwrap_err());
        assert!(e.contains("absent.json"), "{e}");
    }
}
