//! 3D crops of whole volumes, the input of 3D encoders: MONAI's pre-training pipeline for
//! the ViT reconstruction method (tutorials, `self_supervised_pretraining/vit_unetr_ssl`:
//! `Spacingd`, `ScaleIntensityRanged`, `CropForegroundd`, `SpatialPadd`,
//! `RandSpatialCropSamplesd`) and the fine-tuning crops of UNETR (`RandCropByPosNegLabeld`,
//! `RandFlipd`, `RandRotate90d`).
//!
//! A volume is first *prepared*, deterministically: its intensities windowed (`clip`), cut to
//! the bounding box of its foreground (`foreground_threshold`) and padded to at least the crop
//! size, centred, with zeros (SpatialPad's symmetric constant padding). Its spacing is set
//! earlier, by the sources ([`crate::sources::resample_to_spacing`], with `data.views.spacing_mm`
//! as every source's default `target_spacing`), so the resampled volume is what the cache keeps.
//! Each crop is then drawn from a generator seeded by (seed, epoch, sample id, view), as every
//! view is ([`crate::views`]): a uniformly placed box of `crop_size` (RandSpatialCrop with a
//! random centre), flipped along each axis with probability `crop_flip` and rotated by k·90°
//! in the (H, W) plane with probability `crop_rotate90` (k uniform in 1..=3). A volume smaller
//! than the crop is padded, never an error.
//!
//! Where medssl differs on purpose: MONAI draws the flips and rotations of a dictionary
//! pipeline once per transform call, with one global generator; here every crop draws its own
//! from its coordinates, so a crop is the same whatever the loader's thread count or the order
//! in which samples are decoded, and a resumed run sees the crops it would have seen.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// The settings of the crops ([`crate::views::ViewConfig`]'s 3D keys), checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropSettings {
    pub size: [i64; 3],
    pub clip: Option<[f64; 2]>,
    pub foreground_threshold: Option<f64>,
    pub flip: f64,
    pub rotate90: f64,
}

/// Maps `[lo, hi]` linearly onto [0, 1], clipping outside (MONAI's `ScaleIntensityRange` with
/// `b_min = 0`, `b_max = 1`, `clip = True`): a CT window in Hounsfield units.
pub fn window(volume: &Tensor, [lo, hi]: [f64; 2]) -> Tensor {
    (volume.clamp(lo, hi) - lo) / (hi - lo)
}

/// The bounding box `[start, end)` per axis of the voxels above `threshold` (MONAI's
/// `CropForeground` with `select_fn = x > threshold`, no margin); `None` when none is.
pub fn foreground_box(volume: &Tensor, threshold: f64) -> Option<[(i64, i64); 3]> {
    let mask = volume.gt(threshold);
    let mut bounds = [(0, 0); 3];
    for (axis, bound) in bounds.iter_mut().enumerate() {
        let others: Vec<i64> = (0..3).filter(|&a| a != axis as i64).collect();
        let any = mask.any_dims(others.as_slice(), false);
        let hits = Vec::<bool>::try_from(&any).ok()?;
        let first = hits.iter().position(|&h| h)? as i64;
        let last = hits.iter().rposition(|&h| h)? as i64;
        *bound = (first, last + 1);
    }
    Some(bounds)
}

/// `volume` `[D, H, W]` cut to `bounds`.
pub fn crop_to(volume: &Tensor, bounds: [(i64, i64); 3]) -> Tensor {
    let mut out = volume.shallow_clone();
    for (axis, (start, end)) in bounds.iter().enumerate() {
        out = out.narrow(axis as i64, *start, end - start);
    }
    out
}

/// The zero padding `(before, after)` per axis that brings `shape` to at least `size`,
/// centred (SpatialPad's `method = "symmetric"`: the odd voxel goes after).
pub fn padding_to(shape: &[i64], size: [i64; 3]) -> [(i64, i64); 3] {
    let mut pads = [(0, 0); 3];
    for axis in 0..3 {
        let missing = (size[axis] - shape[axis]).max(0);
        pads[axis] = (missing / 2, missing - missing / 2);
    }
    pads
}

/// `volume` `[D, H, W]` padded with `value` by `pads`.
pub fn pad(volume: &Tensor, pads: [(i64, i64); 3], value: f64) -> Tensor {
    if pads.iter().all(|&(a, b)| a == 0 && b == 0) {
        return volume.shallow_clone();
    }
    // constant_pad_nd lists the last axis first.
    let widths = [pads[2].0, pads[2].1, pads[1].0, pads[1].1, pads[0].0, pads[0].1];
    volume.pad(widths, "constant", value)
}

/// The deterministic part: window, foreground crop and padding to the crop size. A mask
/// `[D, H, W]`, where given, is cut and padded alike (padding is background, class 0).
pub fn prepare(volume: &Tensor, mask: Option<&Tensor>, settings: &CropSettings) -> (Tensor, Option<Tensor>) {
    let mut volume = match settings.clip {
        Some(range) => window(volume, range),
        None => volume.shallow_clone(),
    };
    let mut mask = mask.map(Tensor::shallow_clone);
    if let Some(threshold) = settings.foreground_threshold {
        if let Some(bounds) = foreground_box(&volume, threshold) {
            volume = crop_to(&volume, bounds);
            mask = mask.map(|m| crop_to(&m, bounds));
        }
    }
    let pads = padding_to(&volume.size(), settings.size);
    (pad(&volume, pads, 0.0), mask.map(|m| pad(&m, pads, 0.0)))
}

/// A uniformly placed box of `size` in `shape` (each axis at least as long): its start.
pub fn random_start(rng: &mut ChaCha8Rng, shape: &[i64], size: [i64; 3]) -> [i64; 3] {
    let mut start = [0; 3];
    for axis in 0..3 {
        start[axis] = rng.random_range(0..=shape[axis] - size[axis]);
    }
    start
}

/// The start of a box of `size` centred on a voxel drawn from the foreground of `mask`
/// (label > 0) with probability `positive`, else from its background, shifted to lie inside
/// `shape` (MONAI's `RandCropByPosNegLabel` with `pos / (pos + neg) = positive`). Falls back
/// to the other kind of voxel where one is missing, and to a uniform box where both are.
pub fn pos_neg_start(rng: &mut ChaCha8Rng, mask: &Tensor, size: [i64; 3], positive: f64) -> [i64; 3] {
    let shape = mask.size();
    let want_positive = rng.random_bool(positive.clamp(0.0, 1.0));
    let flat = mask.reshape([-1]);
    let candidates = |foreground: bool| {
        if foreground {
            flat.gt(0).nonzero()
        } else {
            flat.eq(0).nonzero()
        }
    };
    let wanted = candidates(want_positive);
    let candidates = if wanted.size()[0] > 0 {
        wanted
    } else {
        candidates(!want_positive)
    };
    let n = candidates.size()[0];
    if n == 0 {
        return random_start(rng, &shape, size);
    }
    let index = candidates.int64_value(&[rng.random_range(0..n), 0]);
    let centre = [
        index / (shape[1] * shape[2]),
        (index / shape[2]) % shape[1],
        index % shape[2],
    ];
    let mut start = [0; 3];
    for axis in 0..3 {
        start[axis] = (centre[axis] - size[axis] / 2).clamp(0, shape[axis] - size[axis]);
    }
    start
}

/// `volume` `[D, H, W]` cut to the box of `size` at `start`.
pub fn crop_at(volume: &Tensor, start: [i64; 3], size: [i64; 3]) -> Tensor {
    crop_to(
        volume,
        [
            (start[0], start[0] + size[0]),
            (start[1], start[1] + size[1]),
            (start[2], start[2] + size[2]),
        ],
    )
}

/// The random flips and rotation of one crop, drawn once and applied alike to the crop and
/// its mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orientation {
    /// Flip along D, H, W.
    pub flips: [bool; 3],
    /// Quarter turns in the (H, W) plane, 0..=3.
    pub quarter_turns: i64,
}

impl Orientation {
    pub fn draw(rng: &mut ChaCha8Rng, settings: &CropSettings) -> Orientation {
        let mut flips = [false; 3];
        for flip in &mut flips {
            *flip = settings.flip > 0.0 && rng.random_bool(settings.flip);
        }
        let quarter_turns = if settings.rotate90 > 0.0 && rng.random_bool(settings.rotate90) {
            rng.random_range(1..=3)
        } else {
            0
        };
        Orientation { flips, quarter_turns }
    }

    /// Applies it to `[D, H, W]`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let axes: Vec<i64> = (0..3).filter(|&a| self.flips[a as usize]).collect();
        let x = if axes.is_empty() {
            x.shallow_clone()
        } else {
            x.flip(axes.as_slice())
        };
        if self.quarter_turns == 0 {
            x
        } else {
            x.rot90(self.quarter_turns, [1, 2])
        }
    }
}

/// One random crop `[1, D, H, W]` (fp32, contiguous) of a prepared volume.
pub fn random_crop(prepared: &Tensor, rng: &mut ChaCha8Rng, settings: &CropSettings) -> Tensor {
    let start = random_start(rng, &prepared.size(), settings.size);
    let crop = crop_at(prepared, start, settings.size);
    Orientation::draw(rng, settings)
        .apply(&crop)
        .to_kind(Kind::Float)
        .contiguous()
        .unsqueeze(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;
    use proptest::prelude::*;
    use tch::Device;

    fn settings(size: [i64; 3]) -> CropSettings {
        CropSettings {
            size,
            clip: None,
            foreground_threshold: None,
            flip: 0.0,
            rotate90: 0.0,
        }
    }

    fn sum(t: &Tensor) -> f64 {
        t.sum(Kind::Double).double_value(&[])
    }

    #[test]
    fn window_maps_the_range_onto_the_unit_interval() {
        let hu = Tensor::from_slice(&[-1000.0f32, -57.0, 53.5, 164.0, 3000.0]);
        let w = Vec::<f32>::try_from(window(&hu, [-57.0, 164.0])).unwrap();
        assert_eq!(w, [0.0, 0.0, 0.5, 1.0, 1.0]);
    }

    #[test]
    fn the_foreground_box_is_tight_and_an_empty_volume_has_none() {
        let v = Tensor::zeros([6, 7, 8], (Kind::Float, Device::Cpu));
        assert_eq!(foreground_box(&v, 0.0), None);
        let _ = v.get(1).get(2).get(3).fill_(1.0);
        let _ = v.get(4).get(5).get(6).fill_(2.0);
        assert_eq!(foreground_box(&v, 0.0), Some([(1, 5), (2, 6), (3, 7)]));
        assert_eq!(foreground_box(&v, 1.5), Some([(4, 5), (5, 6), (6, 7)]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any volume, smaller or larger than the crop in any axis, gives crops of exactly the
        /// crop size, the same ones for the same coordinates; without flips or rotation a crop
        /// is a box of the prepared volume.
        #[test]
        fn crops_have_the_crop_size_and_repeat_for_the_same_coordinates(
            d in 1i64..12, h in 1i64..12, w in 1i64..12,
            cd in 1i64..9, ch in 1i64..9, cw in 1i64..9,
            id in 0u64..100, flip in 0.0f64..1.0, rotate in proptest::bool::ANY,
        ) {
            let volume = Tensor::arange(d * h * w, (Kind::Float, Device::Cpu)).view([d, h, w]) + 1.0;
            let mut s = settings([cd, ch, cw]);
            let (prepared, _) = prepare(&volume, None, &s);
            let shape = prepared.size();
            prop_assert!(shape[0] >= cd && shape[1] >= ch && shape[2] >= cw);
            prop_assert_eq!(sum(&prepared), sum(&volume), "padding adds only zeros");
            let plain = random_crop(&prepared, &mut rng::generator(3, &[id]), &s);
            prop_assert_eq!(plain.size(), vec![1, cd, ch, cw]);
            let start = random_start(&mut rng::generator(3, &[id]), &shape, s.size);
            prop_assert!(plain.squeeze_dim(0).equal(&crop_at(&prepared, start, s.size)));
            s.flip = flip;
            if rotate && ch == cw {
                s.rotate90 = 0.5;
            }
            let a = random_crop(&prepared, &mut rng::generator(3, &[id, 1]), &s);
            let b = random_crop(&prepared, &mut rng::generator(3, &[id, 1]), &s);
            prop_assert_eq!(a.size(), vec![1, cd, ch, cw]);
            prop_assert!(a.equal(&b));
        }

        /// With `positive = 1` the crop holds a foreground voxel whenever the mask has one,
        /// with `positive = 0` a background voxel whenever it has one; the box lies inside.
        #[test]
        fn positive_and_negative_crops_hold_what_they_were_drawn_for(
            d in 2i64..10, h in 2i64..10, w in 2i64..10, at in 0i64..1000, seed in 0u64..50,
            size in 1i64..3,
        ) {
            let mask = Tensor::zeros([d, h, w], (Kind::Int64, Device::Cpu));
            let flat = mask.view([-1]);
            let _ = flat.get(at % (d * h * w)).fill_(2);
            let size = [size.min(d), size.min(h), size.min(w)];
            for (positive, class_in_crop) in [(1.0, true), (0.0, false)] {
                let start = pos_neg_start(&mut rng::generator(seed, &[0]), &mask, size, positive);
                for axis in 0..3 {
                    prop_assert!(start[axis] >= 0 && start[axis] + size[axis] <= mask.size()[axis]);
                }
                let crop = crop_at(&mask, start, size);
                let has = |c: i64| bool::try_from(crop.eq(c).any()).unwrap();
                if class_in_crop {
                    prop_assert!(has(2), "a positive crop misses the foreground");
                } else if d * h * w > 1 {
                    prop_assert!(has(0), "a negative crop misses the background");
                }
            }
        }
    }

    #[test]
    fn preparing_cuts_to_the_foreground_and_pads_the_mask_alike() {
        let v = Tensor::zeros([10, 10, 10], (Kind::Float, Device::Cpu));
        let _ = v.narrow(0, 2, 3).narrow(1, 4, 2).narrow(2, 1, 6).fill_(5.0);
        let mask = v.gt(0.0).to_kind(Kind::Int64);
        let s = CropSettings {
            size: [4, 4, 4],
            clip: Some([0.0, 10.0]),
            foreground_threshold: Some(0.0),
            ..settings([4, 4, 4])
        };
        let (prepared, mask) = prepare(&v, Some(&mask), &s);
        let mask = mask.unwrap();
        assert_eq!(prepared.size(), [4, 4, 6]);
        assert_eq!(mask.size(), [4, 4, 6]);
        // 3 x 2 x 6 foreground voxels at 0.5 after the window; the padding is background.
        assert_eq!(sum(&prepared), 3.0 * 2.0 * 6.0 * 0.5);
        assert_eq!(sum(&mask), 36.0);
    }

    #[test]
    fn orientation_applies_alike_to_a_crop_and_its_mask() {
        let x = Tensor::arange(2 * 3 * 3, (Kind::Float, Device::Cpu)).view([2, 3, 3]);
        let turn = Orientation {
            flips: [true, false, false],
            quarter_turns: 1,
        };
        let y = turn.apply(&x);
        assert!(y.equal(&x.flip([0]).rot90(1, [1, 2])));
        assert!(turn.apply(&x.to_kind(Kind::Int64)).equal(&y.to_kind(Kind::Int64)));
    }
}
