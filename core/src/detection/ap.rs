//! Average precision at one IoU threshold (AP50 at 0.5, the paper's detection metric), per
//! class and their mean, with the precision-recall curves as a PNG.
//!
//! Per class: detections of every image are ranked by score (equal scores keep input order);
//! each in turn is a true positive when an unmatched ground-truth box of its image and class
//! overlaps it with IoU >= the threshold (the one with the highest IoU is taken and matched,
//! so a ground-truth box is matched at most once), else a false positive: a second detection
//! of an object already found is a false positive. Precision and recall follow each
//! detection; AP is the area under the precision envelope (precision at recall r is the best
//! precision at any recall >= r), summed at every recall step ("all-point" interpolation, as
//! PASCAL VOC since 2010). COCO's AP50 samples the same envelope at 101 recall points
//! instead, which differs from this by at most about 0.01.
//!
//! Crowd regions (`iscrowd = 1`) follow COCO: they are not objects to find (they do not count
//! toward recall), and a detection that matches no object but overlaps a crowd region with
//! IoU >= the threshold is ignored, neither true nor false positive. A class without any
//! ground-truth object has no AP (reported as none) and is left out of the mean.

use crate::detection::iou_xyxy;
use crate::metrics::{chart_builder, draw_legend, legend_mark};
use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// One detection: `bbox` in corner form `[x1, y1, x2, y2]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub image_id: i64,
    pub category_id: i64,
    pub score: f64,
    pub bbox: [f64; 4],
}

/// One ground-truth box, corner form.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroundTruth {
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    pub crowd: bool,
}

/// AP of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassAp {
    pub category_id: i64,
    pub name: String,
    /// None where the class has no ground-truth object.
    pub ap: Option<f64>,
    pub ground_truth: usize,
    pub detections: usize,
    pub true_positives: usize,
    /// (recall, precision) after each ranked detection that counted.
    pub curve: Vec<(f64, f64)>,
}

/// AP of every class and the mean over the classes that have one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApReport {
    pub iou_threshold: f64,
    pub classes: Vec<ClassAp>,
    pub mean: Option<f64>,
}

/// AP at `iou_threshold` of `detections` against `ground_truth`, for each of `categories`
/// (id and name).
pub fn average_precision(
    detections: &[Detection],
    ground_truth: &[GroundTruth],
    categories: &[(i64, String)],
    iou_threshold: f64,
) -> ApReport {
    let classes: Vec<ClassAp> = categories
        .iter()
        .map(|(id, name)| class_ap(detections, ground_truth, *id, name, iou_threshold))
        .collect();
    let defined: Vec<f64> = classes.iter().filter_map(|c| c.ap).collect();
    let mean = (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);
    ApReport {
        iou_threshold,
        classes,
        mean,
    }
}

fn class_ap(
    detections: &[Detection],
    ground_truth: &[GroundTruth],
    category: i64,
    name: &str,
    threshold: f64,
) -> ClassAp {
    // Per image: (box, crowd, matched).
    let mut objects: HashMap<i64, Vec<([f64; 4], bool, bool)>> = HashMap::new();
    let mut positives = 0;
    for gt in ground_truth.iter().filter(|g| g.category_id == category) {
        objects.entry(gt.image_id).or_default().push((gt.bbox, gt.crowd, false));
        positives += usize::from(!gt.crowd);
    }
    let mut ranked: Vec<&Detection> = detections.iter().filter(|d| d.category_id == category).collect();
    // Stable: equal scores keep input order. NaN scores rank last.
    ranked.sort_by(|a, b| match (a.score.is_nan(), b.score.is_nan()) {
        (false, false) => b.score.total_cmp(&a.score),
        (a_nan, b_nan) => a_nan.cmp(&b_nan),
    });
    let mut hits = Vec::with_capacity(ranked.len());
    for det in &ranked {
        let Some(candidates) = objects.get_mut(&det.image_id) else {
            hits.push(false);
            continue;
        };
        let mut best: Option<(usize, f64)> = None;
        for (i, (bbox, crowd, matched)) in candidates.iter().enumerate() {
            let overlap = iou_xyxy(det.bbox, *bbox);
            if !crowd && !matched && overlap >= threshold && best.is_none_or(|(_, b)| overlap > b) {
                best = Some((i, overlap));
            }
        }
        match best {
            Some((i, _)) => {
                candidates[i].2 = true;
                hits.push(true);
            }
            None => {
                let on_crowd = candidates
                    .iter()
                    .any(|(bbox, crowd, _)| *crowd && iou_xyxy(det.bbox, *bbox) >= threshold);
                if !on_crowd {
                    hits.push(false);
                }
            }
        }
    }
    let curve = precision_recall(&hits, positives);
    ClassAp {
        category_id: category,
        name: name.to_string(),
        ap: (positives > 0).then(|| area_under_envelope(&curve)),
        ground_truth: positives,
        detections: ranked.len(),
        true_positives: hits.iter().filter(|&&h| h).count(),
        curve,
    }
}

/// (recall, precision) after each ranked detection; `hits[k]` says whether detection k is a
/// true positive. Recall is 0 throughout when there is nothing to find.
fn precision_recall(hits: &[bool], positives: usize) -> Vec<(f64, f64)> {
    let mut tp = 0usize;
    hits.iter()
        .enumerate()
        .map(|(k, &hit)| {
            tp += usize::from(hit);
            let recall = if positives > 0 {
                tp as f64 / positives as f64
            } else {
                0.0
            };
            (recall, tp as f64 / (k + 1) as f64)
        })
        .collect()
}

/// All-point interpolated AP: the sum, over each step of recall, of the step times the
/// best precision at that recall or beyond.
fn area_under_envelope(curve: &[(f64, f64)]) -> f64 {
    let mut envelope: Vec<f64> = curve.iter().map(|p| p.1).collect();
    for k in (0..envelope.len().saturating_sub(1)).rev() {
        envelope[k] = envelope[k].max(envelope[k + 1]);
    }
    let mut previous_recall = 0.0;
    let mut ap = 0.0;
    for (k, &(recall, _)) in curve.iter().enumerate() {
        ap += (recall - previous_recall) * envelope[k];
        previous_recall = recall;
    }
    ap
}

/// Draws every class's precision-recall curve (precision envelope) into `out` (PNG).
pub fn plot_precision_recall(report: &ApReport, out: &Path) -> Result<()> {
    let with_text = crate::metrics::register_font();
    let root = BitMapBackend::new(out, (720, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!("precision-recall at IoU {}", report.iou_threshold);
    let mut chart = chart_builder(&root, &caption, 50, with_text).build_cartesian_2d(0f64..1.0, 0f64..1.05)?;
    if with_text {
        chart.configure_mesh().x_desc("recall").y_desc("precision").draw()?;
    }
    for (i, class) in report.classes.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        // The envelope, drawn as steps from recall 0.
        let mut envelope: Vec<(f64, f64)> = class.curve.clone();
        for k in (0..envelope.len().saturating_sub(1)).rev() {
            envelope[k].1 = envelope[k].1.max(envelope[k + 1].1);
        }
        let mut points = Vec::with_capacity(2 * envelope.len() + 1);
        let mut previous_recall = 0.0;
        for &(recall, precision) in &envelope {
            points.push((previous_recall, precision));
            points.push((recall, precision));
            previous_recall = recall;
        }
        let drawn = chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
        if with_text {
            let label = match class.ap {
                Some(ap) => format!("{} (AP {ap:.3})", class.name),
                None => format!("{} (no objects)", class.name),
            };
            drawn.label(label).legend(legend_mark(color));
        }
    }
    if with_text && !report.classes.is_empty() {
        draw_legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    }
    root.present()
        .with_context(|| format!("cannot write `{}`", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gt(image_id: i64, bbox: [f64; 4]) -> GroundTruth {
        GroundTruth {
            image_id,
            category_id: 1,
            bbox,
            crowd: false,
        }
    }

    fn det(image_id: i64, score: f64, bbox: [f64; 4]) -> Detection {
        Detection {
            image_id,
            category_id: 1,
            score,
            bbox,
        }
    }

    fn ap_of(dets: &[Detection], gts: &[GroundTruth]) -> Option<f64> {
        average_precision(dets, gts, &[(1, "c".into())], 0.5).classes[0].ap
    }

    const A: [f64; 4] = [0.0, 0.0, 10.0, 10.0];
    const B: [f64; 4] = [20.0, 20.0, 30.0, 30.0];
    const FAR: [f64; 4] = [50.0, 50.0, 60.0, 60.0];

    #[test]
    fn perfect_detections_give_one_and_none_give_zero() {
        let gts = [gt(1, A), gt(1, B), gt(2, A)];
        let perfect = [det(1, 0.9, A), det(1, 0.8, B), det(2, 0.7, A)];
        assert_eq!(ap_of(&perfect, &gts), Some(1.0));
        assert_eq!(ap_of(&[], &gts), Some(0.0));
        // Detections in the wrong place only.
        assert_eq!(ap_of(&[det(1, 0.9, FAR)], &gts), Some(0.0));
        // Nothing to find: no AP, and no mean.
        let report = average_precision(&perfect, &[], &[(1, "c".into())], 0.5);
        assert_eq!((report.classes[0].ap, report.mean), (None, None));
    }

    #[test]
    fn duplicates_count_as_false_positives() {
        // One object found twice, the duplicate ranked first among the rest:
        // ranks TP, FP, TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
        // Envelope: 1 up to recall 1/2, then 2/3: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
        let gts = [gt(1, A), gt(1, B)];
        let dets = [det(1, 0.9, A), det(1, 0.8, A), det(1, 0.7, B)];
        let ap = ap_of(&dets, &gts).unwrap();
        assert!((ap - 5.0 / 6.0).abs() < 1e-12, "{ap}");
        let class = &average_precision(&dets, &gts, &[(1, "c".into())], 0.5).classes[0];
        assert_eq!(class.true_positives, 2);
    }

    #[test]
    fn a_false_positive_ranked_first_lowers_the_envelope() {
        // FP, TP, TP on two objects -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1:
        // AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3.
        let gts = [gt(1, A), gt(2, B)];
        let dets = [det(1, 0.9, FAR), det(1, 0.8, A), det(2, 0.7, B)];
        assert!((ap_of(&dets, &gts).unwrap() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_detection_matches_objects_of_its_own_image_and_class_only() {
        let gts = [gt(1, A)];
        assert_eq!(ap_of(&[det(2, 0.9, A)], &gts), Some(0.0));
        let other_class = Detection {
            category_id: 2,
            ..det(1, 0.9, A)
        };
        assert_eq!(ap_of(&[other_class], &gts), Some(0.0));
    }

    #[test]
    fn crowd_regions_neither_count_nor_penalise() {
        let crowd = GroundTruth {
            crowd: true,
            ..gt(1, B)
        };
        let gts = [gt(1, A), crowd];
        // The detection on the crowd region is ignored; the object is found: AP 1.
        let dets = [det(1, 0.9, B), det(1, 0.8, A)];
        assert_eq!(ap_of(&dets, &gts), Some(1.0));
        let class = &average_precision(&dets, &gts, &[(1, "c".into())], 0.5).classes[0];
        assert_eq!(class.ground_truth, 1);
    }

    #[test]
    fn the_mean_skips_classes_without_objects() {
        let gts = [gt(1, A)];
        let report = average_precision(&[det(1, 0.9, A)], &gts, &[(1, "a".into()), (2, "b".into())], 0.5);
        assert_eq!(report.mean, Some(1.0));
        assert_eq!(report.classes[1].ap, None);
    }

    #[test]
    fn the_curve_plots_to_a_png() {
        let gts = [gt(1, A), gt(1, B)];
        let dets = [det(1, 0.9, A), det(1, 0.8, FAR), det(1, 0.7, B)];
        let report = average_precision(&dets, &gts, &[(1, "anterior".into())], 0.5);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pr.png");
        plot_precision_recall(&report, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }

    /// AP by its other definition: the mean, over the objects, of the best precision at
    /// any rank at or after the rank where each found object was found (unfound objects give
    /// 0).
    fn reference_ap(hits: &[bool], positives: usize) -> f64 {
        let mut tp = 0;
        let precisions: Vec<f64> = hits
            .iter()
            .enumerate()
            .map(|(k, &h)| {
                tp += usize::from(h);
                tp as f64 / (k + 1) as f64
            })
            .collect();
        let mut total = 0.0;
        for k in 0..hits.len() {
            if hits[k] {
                total += precisions[k..].iter().cloned().fold(0.0, f64::max);
            }
        }
        total / positives as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn ap_equals_the_per_object_definition(
            objects in prop::collection::vec((0i64..4, 0.0..80.0f64, 0.0..80.0f64, 4.0..20.0f64, 4.0..20.0f64), 1..10),
            noise in prop::collection::vec((0i64..4, 0.0..100.0f64, 0.0..100.0f64, 0.0..1.0f64), 0..10),
            detected in prop::collection::vec((any::<bool>(), 0.0..1.0f64, 0.0..3.0f64), 10),
        ) {
            let gts: Vec<GroundTruth> =
                objects.iter().map(|&(i, x, y, w, h)| gt(i, [x, y, x + w, y + h])).collect();
            let mut dets: Vec<Detection> = Vec::new();
            for (object, &(found, score, jitter)) in gts.iter().zip(&detected) {
                if found {
                    let b = object.bbox;
                    dets.push(det(object.image_id, score, [b[0] + jitter, b[1], b[2] + jitter, b[3]]));
                }
            }
            dets.extend(noise.iter().map(|&(i, x, y, s)| det(i, s, [x, y, x + 8.0, y + 8.0])));
            let report = average_precision(&dets, &gts, &[(1, "c".into())], 0.5);
            let class = &report.classes[0];
            let ap = class.ap.unwrap();
            prop_assert!((0.0..=1.0 + 1e-12).contains(&ap));
            // Rebuild the hit sequence from the curve's recall steps.
            let hits: Vec<bool> = class
                .curve
                .iter()
                .scan(0.0, |previous, &(recall, _)| {
                    let hit = recall > *previous;
                    *previous = recall;
                    Some(hit)
                })
                .collect();
            prop_assert!((ap - reference_ap(&hits, gts.len())).abs() < 1e-9);
            // Extra false positives ranked below everything leave AP unchanged.
            let mut more = dets.clone();
            more.push(det(0, -1.0, [200.0, 200.0, 210.0, 210.0]));
            let again = average_precision(&more, &gts, &[(1, "c".into())], 0.5).classes[0].ap.unwrap();
            prop_assert!((again - ap).abs() < 1e-12);
        }
    }
}
