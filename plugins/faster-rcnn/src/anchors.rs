//! Anchors (Ren et al., NeurIPS 2015, Sec. 3.1.1; one scale set per pyramid level as in Lin
//! et al., FPN, CVPR 2017, Sec. 4.1): at every cell of a feature level, one box per
//! (size, aspect ratio) of that level, centred on the cell's centre.
//!
//! A size `s` and aspect ratio `r = height / width` give the box of area `s^2` with
//! `w = s / sqrt(r)`, `h = s * sqrt(r)` (torchvision's convention). Cell `(i, j)` of a level
//! with stride `t` is centred at `((j + 0.5) t, (i + 0.5) t)`: the centres tile the image
//! evenly (torchvision puts them at the cells' top-left corners, `(j t, i t)`, which shifts
//! every anchor up and left by half a stride). Anchors are not rounded and not clipped: the
//! RPN's targets and proposals handle boxes that cross the border.
//!
//! Order within a level: row, then column, then the anchor's index (sizes outer, ratios
//! inner), which is the order of the RPN head's outputs `[N, A, H, W]` permuted to
//! `[N, H, W, A]`.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Keys of `[head.anchors]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnchorConfig {
    /// Anchor sizes (square root of the area, in input pixels), one list per pyramid level,
    /// shallow to deep (the extra pooled level last, when the FPN has it).
    pub sizes: Vec<Vec<f64>>,
    /// Aspect ratios (height / width): one list for every level, or one list per level.
    pub aspect_ratios: Vec<Vec<f64>>,
}

impl Default for AnchorConfig {
    /// torchvision's `fasterrcnn_resnet50_fpn`: 32 to 512 on five levels, ratios 0.5, 1, 2.
    fn default() -> Self {
        AnchorConfig {
            sizes: vec![vec![32.0], vec![64.0], vec![128.0], vec![256.0], vec![512.0]],
            aspect_ratios: vec![vec![0.5, 1.0, 2.0]],
        }
    }
}

/// Anchors of every pyramid level.
#[derive(Debug, Clone)]
pub struct AnchorGenerator {
    /// Per level, the anchors centred at the origin, `[x1, y1, x2, y2]`.
    cells: Vec<Vec<[f64; 4]>>,
}

impl AnchorGenerator {
    /// Checks `config` against the number of pyramid levels; every level must have the same
    /// number of anchors per cell, since one RPN head serves all levels.
    pub fn new(config: &AnchorConfig, num_levels: usize) -> Result<AnchorGenerator> {
        ensure!(
            config.sizes.len() == num_levels,
            "config key `head.anchors.sizes` has {} lists, expected one per pyramid level ({num_levels})",
            config.sizes.len()
        );
        ensure!(
            config.aspect_ratios.len() == 1 || config.aspect_ratios.len() == num_levels,
            "config key `head.anchors.aspect_ratios` has {} lists, expected 1 (shared) or one per pyramid level ({num_levels})",
            config.aspect_ratios.len()
        );
        let mut cells = Vec::with_capacity(num_levels);
        for (level, sizes) in config.sizes.iter().enumerate() {
            let ratios = &config.aspect_ratios[level.min(config.aspect_ratios.len() - 1)];
            ensure!(
                !sizes.is_empty() && sizes.iter().all(|s| s.is_finite() && *s > 0.0),
                "config key `head.anchors.sizes[{level}]` must be a non-empty list of positive sizes, found {sizes:?}"
            );
            ensure!(
                !ratios.is_empty() && ratios.iter().all(|r| r.is_finite() && *r > 0.0),
                "config key `head.anchors.aspect_ratios` must hold non-empty lists of positive ratios, found {ratios:?}"
            );
            cells.push(cell_anchors(sizes, ratios));
        }
        if let Some(first) = cells.first() {
            let per_cell = first.len();
            ensure!(
                cells.iter().all(|c| c.len() == per_cell),
                "config keys `head.anchors.sizes` and `aspect_ratios` give {:?} anchors per cell on the levels; \
                 the shared RPN head needs the same number on every level",
                cells.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
        Ok(AnchorGenerator { cells })
    }

    /// Anchors per cell (the same on every level).
    pub fn per_cell(&self) -> i64 {
        self.cells.first().map_or(0, |c| c.len() as i64)
    }

    /// Anchors of `level` on a `height` x `width` feature map of stride `stride`:
    /// `[height * width * A, 4]` float32.
    pub fn level_anchors(&self, level: usize, height: i64, width: i64, stride: f64, device: Device) -> Tensor {
        let cell: Vec<f32> = self.cells[level]
            .iter()
            .flat_map(|b| b.iter().map(|&v| v as f32))
            .collect();
        let cell = Tensor::from_slice(&cell).view([1, -1, 4]).to_device(device);
        let options = (Kind::Float, device);
        let xs = (Tensor::arange(width, options) + 0.5) * stride;
        let ys = (Tensor::arange(height, options) + 0.5) * stride;
        let grid = Tensor::meshgrid_indexing(&[&ys, &xs], "ij");
        let (cy, cx) = (grid[0].reshape([-1]), grid[1].reshape([-1]));
        let shifts = Tensor::stack(&[&cx, &cy, &cx, &cy], 1).unsqueeze(1);
        (shifts + cell).reshape([-1, 4])
    }
}

/// Anchors centred at the origin for every (size, ratio), sizes outer.
pub fn cell_anchors(sizes: &[f64], ratios: &[f64]) -> Vec<[f64; 4]> {
    let mut out = Vec::with_capacity(sizes.len() * ratios.len());
    for &size in sizes {
        for &ratio in ratios {
            let (w, h) = (size / ratio.sqrt(), size * ratio.sqrt());
            out.push([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::boxes_of;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn anchors_cover_the_image_with_the_configured_sizes_and_ratios(
            sizes in prop::collection::vec(prop::collection::vec(4.0..64.0f64, 1..3), 1..4),
            ratios in prop::collection::vec(0.25..4.0f64, 1..4),
            (height, width) in (1i64..7, 1i64..7),
        ) {
            // Every level gets the same number of sizes, so the per-cell counts agree.
            let n_sizes = sizes[0].len();
            let sizes: Vec<Vec<f64>> = sizes.iter().map(|s| s.iter().cycle().take(n_sizes).copied().collect()).collect();
            let config = AnchorConfig { sizes: sizes.clone(), aspect_ratios: vec![ratios.clone()] };
            let generator = AnchorGenerator::new(&config, sizes.len()).unwrap();
            prop_assert_eq!(generator.per_cell(), (n_sizes * ratios.len()) as i64);
            for (level, level_sizes) in sizes.iter().enumerate() {
                let stride = (1i64 << (level + 2)) as f64;
                let (h, w) = (height << (sizes.len() - level - 1), width << (sizes.len() - level - 1));
                let anchors = boxes_of(&generator.level_anchors(level, h, w, stride, Device::Cpu));
                let a = generator.per_cell() as usize;
                prop_assert_eq!(anchors.len(), (h * w) as usize * a);
                for (k, anchor) in anchors.iter().enumerate() {
                    let (cell, index) = (k / a, k % a);
                    let (row, col) = ((cell as i64) / w, (cell as i64) % w);
                    let (bw, bh) = (anchor[2] - anchor[0], anchor[3] - anchor[1]);
                    let size = level_sizes[index / ratios.len()];
                    let ratio = ratios[index % ratios.len()];
                    prop_assert!(((bw * bh).sqrt() - size).abs() < 1e-3 * size, "area of {anchor:?}");
                    prop_assert!((bh / bw - ratio).abs() < 1e-3 * ratio, "ratio of {anchor:?}");
                    let centre = ((anchor[0] + anchor[2]) / 2.0, (anchor[1] + anchor[3]) / 2.0);
                    prop_assert!((centre.0 - (col as f64 + 0.5) * stride).abs() < 1e-3);
                    prop_assert!((centre.1 - (row as f64 + 0.5) * stride).abs() < 1e-3);
                }
                // The centres tile the image: half a stride around each covers it without gaps.
                // Anchors are float32, and a centre read back from two corners of a large
                // anchor is off by a few ulps of the corners (1.9e-6 for a 110 px anchor
                // centred at 24), so these checks use the same 1e-3 pixel tolerance as the
                // centre checks above.
                let tolerance = 1e-3;
                for (axis, extent) in [(0usize, w as f64 * stride), (1, h as f64 * stride)] {
                    let mut centres: Vec<f64> = anchors.iter().map(|b| (b[axis] + b[axis + 2]) / 2.0).collect();
                    centres.sort_by(f64::total_cmp);
                    centres.dedup_by(|a, b| (*a - *b).abs() < tolerance);
                    prop_assert!(centres[0] - stride / 2.0 <= tolerance);
                    prop_assert!(centres[centres.len() - 1] + stride / 2.0 >= extent - tolerance);
                    prop_assert!(centres.windows(2).all(|c| c[1] - c[0] <= stride + tolerance));
                }
            }
        }
    }

    #[test]
    fn mismatched_level_counts_are_errors_naming_the_key() {
        let config = AnchorConfig::default();
        let error = AnchorGenerator::new(&config, 4).unwrap_err().to_string();
        assert!(error.contains("head.anchors.sizes"), "{error}");
        let uneven = AnchorConfig {
            sizes: vec![vec![8.0], vec![16.0, 32.0]],
            aspect_ratios: vec![vec![1.0]],
        };
        let error = AnchorGenerator::new(&uneven, 2).unwrap_err().to_string();
        assert!(error.contains("same number"), "{error}");
        let negative = AnchorConfig {
            sizes: vec![vec![-8.0]],
            aspect_ratios: vec![vec![1.0]],
        };
        assert!(AnchorGenerator::new(&negative, 1).is_err());
    }
}
