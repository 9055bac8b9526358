//! Detection boxes from segmentation masks: every slice of a labelled volume becomes a COCO
//! image, and every connected component of a class in it one box. With the Decathlon
//! hippocampus masks (1 anterior, 2 posterior hippocampus) this gives a real 2D detection set
//! standing in for the paper's VinDr-CXR (Nguyen et al., AAAI 2023, Sec. 4).
//!
//! Components are found per slice and per class. Connectivity is 8 by default (pixels
//! touching at a corner belong to one component: a thin oblique structure cut by the slice
//! stays one object) or 4. A component smaller than `min_pixels` is dropped as annotation
//! noise. Its box is the tightest box covering its pixels in the continuous convention of
//! [`crate::boxes`] (pixel `(i, j)` spans `[j, j + 1] x [i, i + 1]`), so a one-pixel
//! component has a 1 x 1 box. Slices with no box are kept as background-only images unless
//! `skip_empty` asks otherwise.

use anyhow::{ensure, Result};
use medssl_core::detection::coco::{CocoAnnotation, CocoCategory, CocoFile, CocoImage};
use serde::{Deserialize, Serialize};

/// Which neighbours join a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connectivity {
    /// Edge neighbours only.
    Four,
    /// Edge and corner neighbours.
    Eight,
}

impl Connectivity {
    pub fn parse(value: u8) -> Result<Connectivity> {
        match value {
            4 => Ok(Connectivity::Four),
            8 => Ok(Connectivity::Eight),
            other => anyhow::bail!("connectivity must be 4 or 8, found {other}"),
        }
    }

    fn offsets(self) -> &'static [(isize, isize)] {
        match self {
            Connectivity::Four => &[(-1, 0), (1, 0), (0, -1), (0, 1)],
            Connectivity::Eight => &[(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)],
        }
    }
}

/// How masks become boxes.
#[derive(Debug, Clone, PartialEq)]
pub struct BoxesFromMasks {
    /// Mask value and category name of each class to box; other values are background.
    pub classes: Vec<(i64, String)>,
    pub connectivity: Connectivity,
    /// Components with fewer pixels are dropped.
    pub min_pixels: usize,
    /// Leave out slices without any box.
    pub skip_empty: bool,
}

/// One connected component of a slice.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub value: i64,
    /// `[x1, y1, x2, y2]`, covering every pixel of the component.
    pub bbox: [f64; 4],
    pub pixels: usize,
}

/// The components of `value` in one `height` x `width` slice (row-major), in the order of
/// their first pixel in raster order.
pub fn components(
    slice: &[i64],
    height: usize,
    width: usize,
    value: i64,
    connectivity: Connectivity,
) -> Vec<Component> {
    let mut seen = vec![false; slice.len()];
    let mut found = Vec::new();
    let mut stack = Vec::new();
    for start in 0..slice.len() {
        if seen[start] || slice[start] != value {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut x1, mut y1, mut x2, mut y2, mut pixels) = (usize::MAX, usize::MAX, 0, 0, 0);
        while let Some(at) = stack.pop() {
            let (row, col) = (at / width, at % width);
            (x1, y1, x2, y2) = (x1.min(col), y1.min(row), x2.max(col), y2.max(row));
            pixels += 1;
            for &(dr, dc) in connectivity.offsets() {
                let (r, c) = (row as isize + dr, col as isize + dc);
                if r < 0 || c < 0 || r >= height as isize || c >= width as isize {
                    continue;
                }
                let next = r as usize * width + c as usize;
                if !seen[next] && slice[next] == value {
                    seen[next] = true;
                    stack.push(next);
                }
            }
        }
        found.push(Component {
            value,
            bbox: [x1 as f64, y1 as f64, x2 as f64 + 1.0, y2 as f64 + 1.0],
            pixels,
        });
    }
    found
}

/// What one volume contributed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeSummary {
    pub images: usize,
    pub boxes: usize,
    /// Components dropped for being smaller than `min_pixels`.
    pub dropped: usize,
}

/// Accumulates the COCO file volume by volume; image and annotation ids count from 1.
pub struct CocoBuilder {
    options: BoxesFromMasks,
    file: CocoFile,
}

impl CocoBuilder {
    /// Categories take ids 1..=C in the order of `options.classes`.
    pub fn new(options: BoxesFromMasks) -> Result<CocoBuilder> {
        ensure!(
            !options.classes.is_empty(),
            "boxes-from-masks needs at least one class to box"
        );
        for (k, (value, _)) in options.classes.iter().enumerate() {
            ensure!(
                *value != 0,
                "class {k}: mask value 0 is background and cannot be a class"
            );
            ensure!(
                options.classes[..k].iter().all(|(v, _)| v != value),
                "mask value {value} is listed twice among the classes"
            );
        }
        let categories = options
            .classes
            .iter()
            .enumerate()
            .map(|(k, (_, name))| CocoCategory {
                id: k as i64 + 1,
                name: name.clone(),
                supercategory: None,
            })
            .collect();
        Ok(CocoBuilder {
            options,
            file: CocoFile {
                images: Vec::new(),
                annotations: Vec::new(),
                categories,
            },
        })
    }

    /// Adds the slices of one mask volume `[depth, height, width]` (row-major, slices first),
    /// recorded as slices of `file_name` cut along `axis`.
    pub fn add_volume(
        &mut self,
        file_name: &str,
        axis: usize,
        mask: &[i64],
        shape: [usize; 3],
    ) -> Result<VolumeSummary> {
        let [depth, height, width] = shape;
        ensure!(
            mask.len() == depth * height * width,
            "mask of `{file_name}` has {} values, expected {depth} x {height} x {width}",
            mask.len()
        );
        let mut summary = VolumeSummary::default();
        for index in 0..depth {
            let slice = &mask[index * height * width..(index + 1) * height * width];
            let mut kept = Vec::new();
            for (k, (value, _)) in self.options.classes.iter().enumerate() {
                for component in components(slice, height, width, *value, self.options.connectivity) {
                    if component.pixels >= self.options.min_pixels {
                        kept.push((k as i64 + 1, component));
                    } else {
                        summary.dropped += 1;
                    }
                }
            }
            if kept.is_empty() && self.options.skip_empty {
                continue;
            }
            let image_id = self.file.images.len() as i64 + 1;
            self.file.images.push(CocoImage {
                id: image_id,
                file_name: file_name.to_string(),
                width: width as i64,
                height: height as i64,
                slice: Some(index as i64),
                axis: Some(axis),
            });
            summary.images += 1;
            for (category_id, component) in kept {
                let [x1, y1, x2, y2] = component.bbox;
                self.file.annotations.push(CocoAnnotation {
                    id: self.file.annotations.len() as i64 + 1,
                    image_id,
                    category_id,
                    bbox: [x1, y1, x2 - x1, y2 - y1],
                    area: Some(component.pixels as f64),
                    iscrowd: 0,
                });
                summary.boxes += 1;
            }
        }
        Ok(summary)
    }

    pub fn finish(self) -> CocoFile {
        self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Components by union-find over every pair of pixels that are neighbours.
    fn reference(slice: &[i64], height: usize, width: usize, value: i64, eight: bool) -> Vec<([f64; 4], usize)> {
        let mut parent: Vec<usize> = (0..slice.len()).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                i = parent[i];
            }
            i
        }
        let members: Vec<usize> = (0..slice.len()).filter(|&i| slice[i] == value).collect();
        for &a in &members {
            for &b in &members {
                let (ra, ca) = ((a / width) as i64, (a % width) as i64);
                let (rb, cb) = ((b / width) as i64, (b % width) as i64);
                let (dr, dc) = ((ra - rb).abs(), (ca - cb).abs());
                let touching = if eight { dr <= 1 && dc <= 1 } else { dr + dc == 1 };
                if touching {
                    let (x, y) = (root(&mut parent, a), root(&mut parent, b));
                    parent[x] = y;
                }
            }
        }
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for &m in &members {
            let r = root(&mut parent, m);
            groups.entry(r).or_default().push(m);
        }
        let mut out: Vec<([f64; 4], usize)> = groups
            .values()
            .map(|pixels| {
                let rows = pixels.iter().map(|p| p / width);
                let cols = pixels.iter().map(|p| p % width);
                let bbox = [
                    cols.clone().min().unwrap() as f64,
                    rows.clone().min().unwrap() as f64,
                    cols.max().unwrap() as f64 + 1.0,
                    rows.max().unwrap() as f64 + 1.0,
                ];
                (bbox, pixels.len())
            })
            .collect();
        out.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let _ = height;
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn components_equal_a_union_find_reference(
            (height, width, cells) in (1usize..9, 1usize..9).prop_flat_map(|(h, w)| {
                (Just(h), Just(w), prop::collection::vec(prop::sample::select(vec![0i64, 0, 1, 2]), h * w))
            }),
            eight in any::<bool>(),
        ) {
            let connectivity = if eight { Connectivity::Eight } else { Connectivity::Four };
            for value in [1, 2] {
                let mut got: Vec<([f64; 4], usize)> =
                    components(&cells, height, width, value, connectivity).into_iter().map(|c| (c.bbox, c.pixels)).collect();
                got.sort_by(|a, b| a.partial_cmp(b).unwrap());
                prop_assert_eq!(got, reference(&cells, height, width, value, eight));
            }
        }

        #[test]
        fn every_box_is_a_valid_coco_annotation_inside_its_slice(
            (depth, height, width, cells) in (1usize..4, 1usize..8, 1usize..8).prop_flat_map(|(d, h, w)| {
                (Just(d), Just(h), Just(w), prop::collection::vec(prop::sample::select(vec![0i64, 0, 1, 2, 3]), d * h * w))
            }),
            min_pixels in 1usize..4,
            skip_empty in any::<bool>(),
        ) {
            let options = BoxesFromMasks {
                classes: vec![(1, "anterior".into()), (2, "posterior".into())],
                connectivity: Connectivity::Eight,
                min_pixels,
                skip_empty,
            };
            let mut builder = CocoBuilder::new(options).unwrap();
            let summary = builder.add_volume("v.nii.gz", 2, &cells, [depth, height, width]).unwrap();
            let file = builder.finish();
            prop_assert_eq!(file.annotations.len(), summary.boxes);
            if !skip_empty {
                prop_assert_eq!(file.images.len(), depth);
            }
            let set = medssl_core::detection::coco::validate(file.clone()).unwrap();
            for objects in &set.images {
                let slice = objects.image.slice.unwrap() as usize;
                let pixels = &cells[slice * height * width..(slice + 1) * height * width];
                for (bbox, category) in objects.boxes.iter().zip(&objects.category_ids) {
                    // The mask value of the category has a pixel in each edge row / column.
                    let value = *category;
                    let inside = |r: usize, c: usize| pixels[r * width + c] == value;
                    let (x1, y1, x2, y2) = (bbox[0] as usize, bbox[1] as usize, bbox[2] as usize, bbox[3] as usize);
                    prop_assert!((y1..y2).any(|r| inside(r, x1)) && (y1..y2).any(|r| inside(r, x2 - 1)));
                    prop_assert!((x1..x2).any(|c| inside(y1, c)) && (x1..x2).any(|c| inside(y2 - 1, c)));
                }
            }
            for annotation in &file.annotations {
                prop_assert!(annotation.area.unwrap() >= min_pixels as f64);
            }
        }
    }

    #[test]
    fn diagonal_pixels_join_under_eight_connectivity_only() {
        #[rustfmt::skip]
        let slice = [
            1, 0, 0,
            0, 1, 0,
            0, 0, 0,
        ];
        assert_eq!(components(&slice, 3, 3, 1, Connectivity::Eight).len(), 1);
        let four = components(&slice, 3, 3, 1, Connectivity::Four);
        assert_eq!(four.len(), 2);
        assert_eq!(four[1].bbox, [1.0, 1.0, 2.0, 2.0]);
        assert!(Connectivity::parse(6).is_err());
    }

    #[test]
    fn small_components_are_dropped_and_counted() {
        #[rustfmt::skip]
        let slice = [
            1, 1, 0, 0,
            1, 1, 0, 2,
        ];
        let options = BoxesFromMasks {
            classes: vec![(1, "a".into()), (2, "b".into())],
            connectivity: Connectivity::Four,
            min_pixels: 2,
            skip_empty: false,
        };
        let mut builder = CocoBuilder::new(options).unwrap();
        let summary = builder.add_volume("v", 0, &slice, [1, 2, 4]).unwrap();
        assert_eq!(
            summary,
            VolumeSummary {
                images: 1,
                boxes: 1,
                dropped: 1
            }
        );
        let file = builder.finish();
        assert_eq!(file.annotations[0].bbox, [0.0, 0.0, 2.0, 2.0]);
        assert!(builder_error(vec![(0, "bg".into())]).contains("background"));
        assert!(builder_error(vec![(1, "a".into()), (1, "b".into())]).contains("twice"));
    }

    fn builder_error(classes: Vec<(i64, String)>) -> String {
        let options = BoxesFromMasks {
            classes,
            connectivity: Connectivity::Eight,
            min_pixels: 1,
            skip_empty: false,
        };
        CocoBuilder::new(options).err().unwrap().to_string()
    }
}
