//! The crops of VoCo's position prediction (Luffy03/Large-Scale-Medical,
//! `Self-supervised/utils/voco_trans.py`: `get_crop_transform`, `get_vanilla_transform`,
//! `get_position_label`): each region the data path delivers (192 x 192 x 64 voxels in x, y,
//! z there, `data.views.crop_size = [64, 192, 192]` in medssl's D, H, W) is cut into a grid of
//! base crops (3 x 3 of 64³), and random crops of the base crops' size are placed in it; a
//! random crop's label for base crop k is the area of their overlap divided by the crop's
//! area. Every crop spans the region's full depth, so the grid and the overlap are 2D, over
//! (H, W), as the reference's are (its z centre is fixed at half the depth).
//!
//! Each crop is then flipped along each axis with probability `flip` (`RandFlipd`, p = 0.2,
//! axes 0, 1, 2), turned by k·90° (k uniform in 1..=3) in the (H, W) plane with probability
//! `rotate90` (`RandRotate90d`, p = 0.2, max_k = 3) and shifted in intensity by an offset
//! uniform in (-`shift_intensity`, `shift_intensity`) with probability `shift_probability`
//! (`RandShiftIntensityd`, offsets 0.1, p = 0.5), each crop independently. The labels do not
//! change with the augmentation, as in the reference.
//!
//! Where medssl differs on purpose:
//! - every draw comes from a generator seeded by (seed, epoch, sample id, view, crop), where
//!   the reference draws from NumPy's and MONAI's global generators, so a resumed run cuts
//!   the crops the uninterrupted one would;
//! - base crops are numbered row-major over (H, W), k = h · grid_w + w; the reference's
//!   k = i · 3 + j runs over x (medssl's W) first. The loss is the same for any numbering.
//! - A random crop's start is uniform in [0, H - h) along H (likewise W), as the reference's
//!   centre `randint(half, 192 - half)`: the last start, flush with the far edge, is never
//!   drawn. Its label is the overlap of the box the crop really covers (the reference's box
//!   is one voxel short for odd sizes, which its 64 never is).

use anyhow::{ensure, Result};
use medssl_core::rng;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The per-crop augmentation of `voco_trans.py`, the same for base and random crops.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CropAugmentation {
    /// Probability of a flip along each of D, H and W.
    pub flip: f64,
    /// Probability of a turn by 90, 180 or 270 degrees in the (H, W) plane (needs square
    /// crops in H, W).
    pub rotate90: f64,
    /// Largest intensity offset (`RandShiftIntensityd`'s `offsets`).
    pub shift_intensity: f64,
    /// Probability of the intensity shift.
    pub shift_probability: f64,
}

impl Default for CropAugmentation {
    fn default() -> Self {
        CropAugmentation {
            flip: 0.2,
            rotate90: 0.2,
            shift_intensity: 0.1,
            shift_probability: 0.5,
        }
    }
}

impl CropAugmentation {
    /// No augmentation at all (the reference's `aug = False`).
    pub fn none() -> Self {
        CropAugmentation {
            flip: 0.0,
            rotate90: 0.0,
            shift_intensity: 0.0,
            shift_probability: 0.0,
        }
    }

    /// Checks the probabilities and the offset; `key` is the config key of this table.
    pub fn validate(&self, key: &str) -> Result<()> {
        for (name, p) in [
            ("flip", self.flip),
            ("rotate90", self.rotate90),
            ("shift_probability", self.shift_probability),
        ] {
            ensure!(
                (0.0..=1.0).contains(&p),
                "config key `{key}.{name}` is a probability, in [0, 1]; got {p}"
            );
        }
        ensure!(
            self.shift_intensity >= 0.0 && self.shift_intensity.is_finite(),
            "config key `{key}.shift_intensity` must be a finite offset >= 0, got {}",
            self.shift_intensity
        );
        Ok(())
    }

    /// One crop's augmentation, drawn in a fixed order: flips D, H, W, the turn, the shift.
    pub fn draw(&self, rng: &mut ChaCha8Rng) -> Augmentation {
        let mut flips = [false; 3];
        for flip in &mut flips {
            *flip = self.flip > 0.0 && rng.random_bool(self.flip);
        }
        let quarter_turns = if self.rotate90 > 0.0 && rng.random_bool(self.rotate90) {
            rng.random_range(1..=3)
        } else {
            0
        };
        let offset =
            if self.shift_probability > 0.0 && self.shift_intensity > 0.0 && rng.random_bool(self.shift_probability) {
                rng.random_range(-self.shift_intensity..self.shift_intensity)
            } else {
                0.0
            };
        Augmentation {
            flips,
            quarter_turns,
            offset,
        }
    }
}

/// What one crop's augmentation does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// Flip along D, H, W.
    pub flips: [bool; 3],
    /// Quarter turns in the (H, W) plane, 0..=3.
    pub quarter_turns: i64,
    /// Added to every voxel.
    pub offset: f64,
}

impl Augmentation {
    /// Applies it to a crop `[C, D, H, W]`.
    pub fn apply(&self, crop: &Tensor) -> Tensor {
        let axes: Vec<i64> = (0..3).filter(|&a| self.flips[a]).map(|a| a as i64 + 1).collect();
        let mut x = if axes.is_empty() {
            crop.shallow_clone()
        } else {
            crop.flip(axes.as_slice())
        };
        if self.quarter_turns != 0 {
            x = x.rot90(self.quarter_turns, [2, 3]);
        }
        // Not `+=`: without a flip or turn, `x` still shares its voxels with the region.
        if self.offset != 0.0 {
            x + self.offset
        } else {
            x
        }
    }
}

/// The grid of base crops over a region: `grid` cells along (H, W), each crop `base` =
/// `[D, H / grid_h, W / grid_w]` voxels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionGrid {
    pub grid: [i64; 2],
    pub base: [i64; 3],
}

impl RegionGrid {
    /// The grid over a region of `region` `[D, H, W]` voxels; an error, naming both keys,
    /// where the grid does not divide the region (the reference asserts `roi · num_crops ==
    /// max_roi`). `key` is the objective's config key.
    pub fn new(region: [i64; 3], grid: [i64; 2], key: &str) -> Result<RegionGrid> {
        let [d, h, w] = region;
        ensure!(
            h % grid[0] == 0 && w % grid[1] == 0 && h >= grid[0] && w >= grid[1],
            "objective `{key}` cuts its regions of {region:?} voxels (`data.views.crop_size`, D, H, W) into a grid of {grid:?} base crops (`objectives.{key}.grid`, along H, W): H and W must be multiples of the grid, e.g. crop_size = [{d}, {}, {}]",
            grid[0] * (h / grid[0]).max(1),
            grid[1] * (w / grid[1]).max(1)
        );
        Ok(RegionGrid {
            grid,
            base: [d, h / grid[0], w / grid[1]],
        })
    }

    /// Number of base crops.
    pub fn len(&self) -> usize {
        (self.grid[0] * self.grid[1]) as usize
    }

    /// Whether the grid has no cell (never, for a grid built by [`RegionGrid::new`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The region's extent in (H, W).
    pub fn region(&self) -> [i64; 2] {
        [self.grid[0] * self.base[1], self.grid[1] * self.base[2]]
    }

    /// The start (H, W) of base crop `k` (row-major over the grid).
    pub fn base_start(&self, k: usize) -> [i64; 2] {
        let k = k as i64;
        [(k / self.grid[1]) * self.base[1], (k % self.grid[1]) * self.base[2]]
    }

    /// A random crop's start (H, W): uniform in [0, H - h) per axis (0 where the crop is as
    /// long as the region).
    pub fn random_start(&self, rng: &mut ChaCha8Rng) -> [i64; 2] {
        let region = self.region();
        let mut start = [0; 2];
        for axis in 0..2 {
            let room = region[axis] - self.base[axis + 1];
            start[axis] = if room > 0 { rng.random_range(0..room) } else { 0 };
        }
        start
    }

    /// The label vector of a crop of the base crops' size at `start` (H, W; anywhere, also
    /// partly outside the region): for each base crop, the area of their overlap over the
    /// crop's area.
    pub fn overlap_labels(&self, start: [i64; 2]) -> Vec<f64> {
        let [h, w] = [self.base[1], self.base[2]];
        let overlap = |a: i64, b: i64, len: i64| ((a + len).min(b + len) - a.max(b)).max(0);
        (0..self.len())
            .map(|k| {
                let base = self.base_start(k);
                (overlap(start[0], base[0], h) * overlap(start[1], base[1], w)) as f64 / (h * w) as f64
            })
            .collect()
    }

    /// The expected label of each base crop over the random crop's placement (exact: the
    /// mean over every start [`RegionGrid::random_start`] can draw), the prediction of a
    /// model that knows where base crops lie but nothing of a crop's content.
    pub fn expected_labels(&self) -> Vec<f64> {
        let region = self.region();
        let starts = |axis: usize| {
            let room = region[axis] - self.base[axis + 1];
            0..room.max(1)
        };
        let mut sum = vec![0.0; self.len()];
        let mut count = 0.0;
        for sh in starts(0) {
            for sw in starts(1) {
                for (s, l) in sum.iter_mut().zip(self.overlap_labels([sh, sw])) {
                    *s += l;
                }
                count += 1.0;
            }
        }
        sum.iter().map(|s| s / count).collect()
    }
}

/// One step's crops: the random crops and the base crops of every region, and the labels.
pub struct Cut {
    /// `[R · n, C, D, h, w]`, region-major (region r's crops at rows r·n .. r·n + n).
    pub random: Tensor,
    /// `[R · K, C, D, h, w]`, region-major, base crops row-major over the grid.
    pub bases: Tensor,
    /// `[R, n, K]` overlap labels (f64, on the CPU).
    pub labels: Tensor,
}

/// Where a region comes from, for its generators.
#[derive(Debug, Clone, Copy)]
pub struct RegionCoordinates {
    pub id: u64,
    pub view: u64,
}

/// The objective's stream of draws, beside the data path's ([`rng::domain`]).
pub const CROP_STREAM: u64 = 0x564f_434f;

/// The generator of crop `crop` of a region (base crops 0..K, random crops K..K + n).
pub fn crop_generator(seed: u64, epoch: usize, region: RegionCoordinates, crop: usize) -> ChaCha8Rng {
    rng::generator(seed, &[CROP_STREAM, epoch as u64, region.id, region.view, crop as u64])
}

/// Cuts the base crops and `random_crops` random crops of each region `[R, C, D, H, W]`,
/// augmented, with the random crops' labels.
pub fn cut(
    regions: &Tensor,
    coordinates: &[RegionCoordinates],
    grid: &RegionGrid,
    random_crops: usize,
    augmentation: &CropAugmentation,
    seed: u64,
    epoch: usize,
) -> Cut {
    let [_, h, w] = grid.base;
    let box_at = |region: &Tensor, start: [i64; 2]| region.narrow(2, start[0], h).narrow(3, start[1], w);
    let (mut random, mut bases, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (r, &coords) in coordinates.iter().enumerate() {
        let region = regions.get(r as i64);
        for k in 0..grid.len() {
            let mut rng = crop_generator(seed, epoch, coords, k);
            bases.push(augmentation.draw(&mut rng).apply(&box_at(&region, grid.base_start(k))));
        }
        for j in 0..random_crops {
            let mut rng = crop_generator(seed, epoch, coords, grid.len() + j);
            let start = grid.random_start(&mut rng);
            random.push(augmentation.draw(&mut rng).apply(&box_at(&region, start)));
            labels.extend(grid.overlap_labels(start));
        }
    }
    Cut {
        random: Tensor::stack(&random, 0),
        bases: Tensor::stack(&bases, 0),
        labels: Tensor::from_slice(&labels).view([coordinates.len() as i64, random_crops as i64, grid.len() as i64]),
    }
}

/// `crops` `[N, C, D, H, W]` resized to `size` (trilinear, `align_corners = False`), or as
/// they are where they have that size already.
pub fn resize(crops: &Tensor, size: [i64; 3]) -> Tensor {
    if crops.size()[2..] == size {
        return crops.shallow_clone();
    }
    let kind = crops.kind();
    let x = if kind == Kind::Double {
        crops.shallow_clone()
    } else {
        crops.to_kind(Kind::Float)
    };
    x.upsample_trilinear3d(size, false, None, None, None).to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Device;

    fn v2() -> RegionGrid {
        RegionGrid::new([64, 192, 192], [3, 3], "voco").unwrap()
    }

    #[test]
    fn the_default_grid_is_three_by_three_cubes_of_64() {
        let g = v2();
        assert_eq!(g.base, [64, 64, 64]);
        assert_eq!(g.len(), 9);
        assert_eq!(g.base_start(5), [64, 128]);
        let err = RegionGrid::new([64, 190, 192], [3, 3], "vo").unwrap_err().to_string();
        assert!(
            err.contains("data.views.crop_size") && err.contains("objectives.vo.grid"),
            "{err}"
        );
        assert!(err.contains("[64, 189, 192]"), "{err}");
    }

    #[test]
    fn hand_placed_crops_get_their_exact_overlaps() {
        let g = v2();
        let one_hot = |k: usize| (0..9).map(|i| if i == k { 1.0 } else { 0.0 }).collect::<Vec<_>>();
        // On base crop 4 (the centre), and on base crop 2 (top right).
        assert_eq!(g.overlap_labels([64, 64]), one_hot(4));
        assert_eq!(g.overlap_labels([0, 128]), one_hot(2));
        // Beside the region: no overlap with anything.
        assert_eq!(g.overlap_labels([0, 192]), vec![0.0; 9]);
        // Half over base crops 0 and 1 (shifted by 32 along W).
        let mut half = vec![0.0; 9];
        half[0] = 0.5;
        half[1] = 0.5;
        assert_eq!(g.overlap_labels([0, 32]), half);
        // A quarter over each of 0, 1, 3 and 4.
        let mut quarter = vec![0.0; 9];
        for k in [0, 1, 3, 4] {
            quarter[k] = 0.25;
        }
        assert_eq!(g.overlap_labels([32, 32]), quarter);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Labels lie in [0, 1] and sum to the fraction of the crop's area that the region
        /// (the grid's union) covers: 1 for a crop inside it.
        #[test]
        fn labels_are_fractions_that_sum_to_the_covered_area(
            gh in 1i64..5, gw in 1i64..5, bh in 1i64..9, bw in 1i64..9,
            sh in -12i64..40, sw in -12i64..40, seed in 0u64..1000,
        ) {
            let g = RegionGrid::new([3, gh * bh, gw * bw], [gh, gw], "voco").unwrap();
            let labels = g.overlap_labels([sh, sw]);
            prop_assert!(labels.iter().all(|&l| (0.0..=1.0).contains(&l)), "{labels:?}");
            let inside = |s: i64, len: i64, region: i64| ((s + len).min(region) - s.max(0)).max(0);
            let covered = (inside(sh, bh, gh * bh) * inside(sw, bw, gw * bw)) as f64 / (bh * bw) as f64;
            let sum: f64 = labels.iter().sum();
            prop_assert!((sum - covered).abs() < 1e-12, "{sum} vs {covered}");
            let start = g.random_start(&mut rng::generator(seed, &[1]));
            let sum: f64 = g.overlap_labels(start).iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-12, "a random crop lies inside the region: {start:?}");
        }
    }

    #[test]
    fn expected_labels_average_the_placements_and_favour_the_centre() {
        let g = RegionGrid::new([2, 6, 6], [3, 3], "voco").unwrap();
        let e = g.expected_labels();
        assert!((e.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(e[4] > e[0] && (e[0] - e[8]).abs() > 0.0, "{e:?}");
        // Starts 0..4 along each axis, by hand for base crop 0 (cells [0, 2) x [0, 2)):
        // overlaps along one axis 2, 1, 0, 0 over 2.
        let axis = (1.0 + 0.5 + 0.0 + 0.0) / 4.0;
        assert!((e[0] - axis * axis).abs() < 1e-12, "{e:?}");
    }

    fn regions(n: i64) -> Tensor {
        Tensor::arange(n * 2 * 4 * 4, (Kind::Float, Device::Cpu)).view([n, 1, 2, 4, 4])
    }

    #[test]
    fn crops_repeat_for_the_same_coordinates_and_change_with_the_epoch() {
        let g = RegionGrid::new([2, 4, 4], [2, 2], "voco").unwrap();
        let coords = [
            RegionCoordinates { id: 3, view: 0 },
            RegionCoordinates { id: 3, view: 1 },
        ];
        let aug = CropAugmentation::default();
        let a = cut(&regions(2), &coords, &g, 4, &aug, 7, 0);
        let b = cut(&regions(2), &coords, &g, 4, &aug, 7, 0);
        assert!(a.random.equal(&b.random) && a.bases.equal(&b.bases) && a.labels.equal(&b.labels));
        assert_eq!(a.random.size(), [8, 1, 2, 2, 2]);
        assert_eq!(a.bases.size(), [8, 1, 2, 2, 2]);
        assert_eq!(a.labels.size(), [2, 4, 4]);
        let later: Vec<bool> = (1..6)
            .map(|epoch| {
                let c = cut(&regions(2), &coords, &g, 4, &aug, 7, epoch);
                c.random.equal(&a.random) && c.labels.equal(&a.labels)
            })
            .collect();
        assert!(later.iter().any(|same| !same), "the crops never change with the epoch");
        let other_seed = cut(&regions(2), &coords, &g, 4, &aug, 8, 0);
        assert!(!(other_seed.random.equal(&a.random) && other_seed.bases.equal(&a.bases)));
    }

    #[test]
    fn without_augmentation_crops_are_boxes_of_their_region_with_their_labels() {
        let g = RegionGrid::new([2, 4, 4], [2, 2], "voco").unwrap();
        let coords = [RegionCoordinates { id: 1, view: 0 }];
        let regions = regions(1);
        let c = cut(&regions, &coords, &g, 3, &CropAugmentation::none(), 0, 0);
        let region = regions.get(0);
        for k in 0..4 {
            let s = g.base_start(k);
            assert!(c
                .bases
                .get(k as i64)
                .equal(&region.narrow(2, s[0], 2).narrow(3, s[1], 2)));
        }
        for j in 0..3 {
            let mut rng = crop_generator(0, 0, coords[0], 4 + j);
            let s = g.random_start(&mut rng);
            assert!(c
                .random
                .get(j as i64)
                .equal(&region.narrow(2, s[0], 2).narrow(3, s[1], 2)));
            let labels = Vec::<f64>::try_from(c.labels.get(0).get(j as i64)).unwrap();
            assert_eq!(labels, g.overlap_labels(s));
        }
    }

    #[test]
    fn the_augmentation_flips_turns_and_shifts() {
        let x = Tensor::arange(2 * 2 * 3 * 3, (Kind::Float, Device::Cpu)).view([2, 2, 3, 3]);
        let a = Augmentation {
            flips: [true, false, true],
            quarter_turns: 3,
            offset: 0.25,
        };
        assert!(a.apply(&x).equal(&(x.flip([1, 3]).rot90(3, [2, 3]) + 0.25)));
        let mut rng = rng::generator(0, &[0]);
        let none = CropAugmentation::none().draw(&mut rng);
        assert!(none.apply(&x).equal(&x));
        let bad = CropAugmentation {
            flip: 1.5,
            ..CropAugmentation::default()
        };
        let err = bad.validate("objectives.v.augmentation").unwrap_err().to_string();
        assert!(err.contains("objectives.v.augmentation.flip"), "{err}");
        // Offsets stay within the bound.
        let aug = CropAugmentation {
            shift_probability: 1.0,
            ..CropAugmentation::default()
        };
        for i in 0..50 {
            let o = aug.draw(&mut rng::generator(0, &[i])).offset;
            assert!(o.abs() < 0.1 && o != 0.0, "{o}");
        }
    }
}
