//! The corruptions of MONAI's ViT reconstruction SSL (Project-MONAI/tutorials,
//! self_supervised_pretraining/vit_unetr_ssl, ssl_train.ipynb and multi_gpu/mgpu_ssl_train.py),
//! built on MONAI's `RandCoarseDropout` and `RandCoarseShuffle` (Project-MONAI/MONAI,
//! monai/transforms/intensity/array.py, with `get_random_patch` and `get_valid_patch_size` of
//! monai/data/utils.py). Each view of a crop gets, in this order:
//! - one of in-painting or out-painting, with equal probability (the tutorial's `OneOf`):
//!   in-painting fills 6 boxes of sides in [5, 32] with uniform noise in [min, max) of the
//!   crop; out-painting keeps 6 boxes of sides in [20, 64] and fills everything else so;
//! - with probability 0.8, local shuffling: 10 boxes of side 8 each have their voxels
//!   permuted, every channel by its own permutation.
//!
//! Box sides are clamped to the crop and boxes placed uniformly where they fit, as MONAI does;
//! boxes may overlap, and later ones are applied over earlier ones.
//!
//! Different from MONAI on purpose:
//! - Hole sizes. MONAI's `RandCoarseTransform.randomize` reuses one `size` variable across its
//!   loop over holes: each hole's side is drawn from [previous hole's side, max], so within a
//!   call sides never shrink and drift to the maximum (for six in-painting holes of [5, 32]
//!   the mean side is about 27 against 18.5 for independent draws, and the last hole is
//!   nearly always near 32). Its documentation describes `spatial_size` as the minimum for
//!   every region, and nothing in the tutorial relies on the drift, so medssl draws every
//!   hole's side, per axis, independently and uniformly in [min, max]; holes are then
//!   exchangeable and the corrupted fraction matches the configured ranges. Runs that must
//!   match MONAI's corruption statistics should raise the minimum sizes.
//! - Randomness. Every draw comes from the caller's generator (seeded per (seed, epoch,
//!   sample, view) as in `medssl_core::views`), and the noise is drawn on the host from a
//!   xoshiro stream seeded by it and then moved to the crop's device, so a view does not
//!   depend on libtorch's global generator nor on the device.
//! - A constant crop (min == max) gets the constant as its "noise", where NumPy's
//!   `uniform(a, a)` happens to give the same.
//! - The functions return what they did (the painting, its boxes, the noise range, the
//!   shuffled boxes), for tests and for objectives that weigh corrupted voxels.

use anyhow::{bail, ensure, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CorruptionConfig {
    /// Boxes filled with noise by in-painting.
    pub inpaint_holes: usize,
    /// Range of an in-painting box's side, per axis, inclusive.
    pub inpaint_size: [i64; 2],
    /// Boxes kept by out-painting (everything else becomes noise).
    pub outpaint_holes: usize,
    /// Range of an out-painting box's side, per axis, inclusive.
    pub outpaint_size: [i64; 2],
    /// Probability that a view is in-painted rather than out-painted.
    pub inpaint_probability: f64,
    /// Boxes whose voxels are shuffled.
    pub shuffle_holes: usize,
    /// Side of a shuffled box.
    pub shuffle_size: i64,
    /// Probability that a view is shuffled at all.
    pub shuffle_probability: f64,
}

impl Default for CorruptionConfig {
    fn default() -> Self {
        // The tutorial's settings.
        CorruptionConfig {
            inpaint_holes: 6,
            inpaint_size: [5, 32],
            outpaint_holes: 6,
            outpaint_size: [20, 64],
            inpaint_probability: 0.5,
            shuffle_holes: 10,
            shuffle_size: 8,
            shuffle_probability: 0.8,
        }
    }
}

impl CorruptionConfig {
    /// Checks the values; `prefix` is where this config sits, e.g.
    /// `objectives.recon.corruption`, so errors name the full key.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        for (key, holes) in [
            ("inpaint_holes", self.inpaint_holes),
            ("outpaint_holes", self.outpaint_holes),
            ("shuffle_holes", self.shuffle_holes),
        ] {
            // MONAI refuses zero holes too; shuffling is switched off by its probability.
            ensure!(holes >= 1, "config key `{prefix}.{key}` must be at least 1, got 0");
        }
        for (key, [lo, hi]) in [
            ("inpaint_size", self.inpaint_size),
            ("outpaint_size", self.outpaint_size),
        ] {
            ensure!(
                1 <= lo && lo <= hi,
                "config key `{prefix}.{key}` must be [min, max] with 1 <= min <= max, got [{lo}, {hi}]"
            );
        }
        ensure!(
            self.shuffle_size >= 1,
            "config key `{prefix}.shuffle_size` must be at least 1, got {}",
            self.shuffle_size
        );
        for (key, p) in [
            ("inpaint_probability", self.inpaint_probability),
            ("shuffle_probability", self.shuffle_probability),
        ] {
            ensure!(
                (0.0..=1.0).contains(&p),
                "config key `{prefix}.{key}` must be a probability in [0, 1], got {p}"
            );
        }
        Ok(())
    }
}

/// An axis-aligned box over a crop's spatial axes (D, H, W for a volume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoleBox {
    pub start: Vec<i64>,
    pub size: Vec<i64>,
}

impl HoleBox {
    pub fn contains(&self, coord: &[i64]) -> bool {
        coord
            .iter()
            .zip(self.start.iter().zip(&self.size))
            .all(|(&c, (&s, &n))| s <= c && c < s + n)
    }

    /// The box's region of `t` `[C, *spatial]`, as a view (writes go through to `t`).
    fn region(&self, t: &Tensor) -> Tensor {
        self.start
            .iter()
            .zip(&self.size)
            .enumerate()
            .fold(t.shallow_clone(), |r, (axis, (&s, &n))| r.narrow(1 + axis as i64, s, n))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Painting {
    /// Noise inside the boxes.
    Inpaint,
    /// Noise outside the boxes.
    Outpaint,
}

/// What `corrupt` did to one crop.
#[derive(Debug, Clone, PartialEq)]
pub struct Corruption {
    pub painting: Painting,
    pub paint_boxes: Vec<HoleBox>,
    /// The crop's [min, max] before corruption; noise lies in [min, max), or is min when the
    /// two are equal.
    pub noise_range: (f32, f32),
    /// Boxes shuffled, in order; empty when the view was not shuffled.
    pub shuffle_boxes: Vec<HoleBox>,
}

/// `holes` boxes inside `spatial`, each side drawn independently in `size` (inclusive) and
/// clamped to the crop, each placed uniformly where it fits (MONAI's `get_random_patch`).
pub fn random_boxes(rng: &mut ChaCha8Rng, spatial: &[i64], holes: usize, size: [i64; 2]) -> Vec<HoleBox> {
    (0..holes)
        .map(|_| {
            let size: Vec<i64> = spatial
                .iter()
                .map(|&extent| rng.random_range(size[0]..=size[1]).min(extent))
                .collect();
            let start = spatial
                .iter()
                .zip(&size)
                .map(|(&e, &s)| rng.random_range(0..=e - s))
                .collect();
            HoleBox { start, size }
        })
        .collect()
}

fn check_crop(crop: &Tensor) -> Result<Vec<i64>> {
    let shape = crop.size();
    ensure!(
        shape.len() >= 2 && shape.iter().all(|&s| s >= 1),
        "corruption: a crop must be [C, *spatial] with no empty axis, got {shape:?}"
    );
    // f64 under `run.precision = "fp64"`, whose noise is the f32 draw widened.
    ensure!(
        matches!(crop.kind(), Kind::Float | Kind::Double),
        "corruption: a crop must be float32 or float64, got {:?}",
        crop.kind()
    );
    Ok(shape)
}

/// The crop's [min, max], over every channel as MONAI's `(img.min(), img.max())`.
fn value_range(crop: &Tensor) -> Result<(f32, f32)> {
    // The extremes of an fp32 tensor are fp32 values: the casts are exact.
    let lo = crop.min().double_value(&[]) as f32;
    let hi = crop.max().double_value(&[]) as f32;
    ensure!(
        lo.is_finite() && hi.is_finite(),
        "corruption: the crop has non-finite values (min {lo}, max {hi})"
    );
    Ok((lo, hi))
}

/// Uniform noise in [lo, hi) from a host stream. Sums are taken in f64 so a range as wide as
/// fp32 allows does not overflow, and a value that rounds up to `hi` on the way back to fp32
/// is moved one step below it, keeping the interval half-open as MONAI documents it.
fn noise(stream: &mut Xoshiro256PlusPlus, n: usize, (lo, hi): (f32, f32)) -> Vec<f32> {
    if lo >= hi {
        return vec![lo; n];
    }
    let (l, width) = (lo as f64, hi as f64 - lo as f64);
    (0..n)
        .map(|_| {
            let v = (l + width * stream.random::<f64>()) as f32;
            if v >= hi {
                hi.next_down()
            } else {
                v
            }
        })
        .collect()
}

fn noise_tensor(stream: &mut Xoshiro256PlusPlus, shape: &[i64], range: (f32, f32), like: &Tensor) -> Tensor {
    let n: i64 = shape.iter().product();
    Tensor::from_slice(&noise(stream, n as usize, range))
        .view(shape)
        .to_device(like.device())
        .to_kind(like.kind())
}

fn region_shape(channels: i64, b: &HoleBox) -> Vec<i64> {
    std::iter::once(channels).chain(b.size.iter().copied()).collect()
}

/// In-painting (MONAI's `RandCoarseDropout`, `dropout_holes=True`, `fill_value=None`): `holes`
/// boxes of `crop` `[C, *spatial]` filled with uniform noise in [min, max) of the crop.
pub fn inpaint(crop: &Tensor, holes: usize, size: [i64; 2], rng: &mut ChaCha8Rng) -> Result<(Tensor, Vec<HoleBox>)> {
    let shape = check_crop(crop)?;
    let range = value_range(crop)?;
    let boxes = random_boxes(rng, &shape[1..], holes, size);
    let mut stream = Xoshiro256PlusPlus::seed_from_u64(rng.random());
    let out = crop.copy();
    for b in &boxes {
        let fill = noise_tensor(&mut stream, &region_shape(shape[0], b), range, crop);
        b.region(&out).copy_(&fill);
    }
    Ok((out, boxes))
}

/// Out-painting (`dropout_holes=False`): `holes` boxes of `crop` are kept and every other
/// voxel becomes uniform noise in [min, max) of the crop.
pub fn outpaint(crop: &Tensor, holes: usize, size: [i64; 2], rng: &mut ChaCha8Rng) -> Result<(Tensor, Vec<HoleBox>)> {
    let shape = check_crop(crop)?;
    let range = value_range(crop)?;
    let boxes = random_boxes(rng, &shape[1..], holes, size);
    let mut stream = Xoshiro256PlusPlus::seed_from_u64(rng.random());
    let out = noise_tensor(&mut stream, &shape, range, crop);
    for b in &boxes {
        b.region(&out).copy_(&b.region(crop));
    }
    Ok((out, boxes))
}

/// Local shuffling (MONAI's `RandCoarseShuffle`, always applied): `holes` boxes of side
/// `side` (clamped to the crop), in turn, each have their voxels permuted, every channel by
/// its own permutation.
pub fn shuffle(crop: &Tensor, holes: usize, side: i64, rng: &mut ChaCha8Rng) -> Result<(Tensor, Vec<HoleBox>)> {
    let shape = check_crop(crop)?;
    let boxes = random_boxes(rng, &shape[1..], holes, [side, side]);
    let out = crop.copy();
    let channels = shape[0];
    for b in &boxes {
        let voxels: i64 = b.size.iter().product();
        let mut index = Vec::with_capacity((channels * voxels) as usize);
        for _ in 0..channels {
            let mut perm: Vec<i64> = (0..voxels).collect();
            perm.shuffle(rng);
            index.extend(perm);
        }
        let index = Tensor::from_slice(&index)
            .view([channels, voxels])
            .to_device(crop.device());
        let mut region = b.region(&out);
        let shuffled = region.reshape([channels, voxels]).gather(1, &index, false);
        region.copy_(&shuffled.view(region_shape(channels, b).as_slice()));
    }
    Ok((out, boxes))
}

/// One view of one crop `[C, *spatial]` (a volume `[C, D, H, W]` in the tutorial): in- or
/// out-painting, then shuffling with its probability. All randomness comes from `rng`.
pub fn corrupt(crop: &Tensor, cfg: &CorruptionConfig, rng: &mut ChaCha8Rng) -> Result<(Tensor, Corruption)> {
    cfg.validate("corruption")?;
    check_crop(crop)?;
    let noise_range = value_range(&crop.detach())?;
    let (painting, (painted, paint_boxes)) = if rng.random_bool(cfg.inpaint_probability) {
        (
            Painting::Inpaint,
            inpaint(crop, cfg.inpaint_holes, cfg.inpaint_size, rng)?,
        )
    } else {
        (
            Painting::Outpaint,
            outpaint(crop, cfg.outpaint_holes, cfg.outpaint_size, rng)?,
        )
    };
    let (out, shuffle_boxes) = if rng.random_bool(cfg.shuffle_probability) {
        shuffle(&painted, cfg.shuffle_holes, cfg.shuffle_size, rng)?
    } else {
        (painted, Vec::new())
    };
    Ok((
        out,
        Corruption {
            painting,
            paint_boxes,
            noise_range,
            shuffle_boxes,
        },
    ))
}

/// `corrupt` over a batch `[N, C, *spatial]`, sample `i` drawing from `rngs[i]` (one
/// generator per sample and view, so a sample's corruption does not depend on its batch).
pub fn corrupt_batch(
    batch: &Tensor,
    cfg: &CorruptionConfig,
    rngs: &mut [ChaCha8Rng],
) -> Result<(Tensor, Vec<Corruption>)> {
    let shape = batch.size();
    ensure!(
        shape.len() >= 3,
        "corruption: a batch must be [N, C, *spatial], got {shape:?}"
    );
    if rngs.len() as i64 != shape[0] {
        bail!(
            "corruption: {} generators for a batch of {} samples; pass one per sample",
            rngs.len(),
            shape[0]
        );
    }
    let mut outs = Vec::with_capacity(rngs.len());
    let mut records = Vec::with_capacity(rngs.len());
    for (i, rng) in rngs.iter_mut().enumerate() {
        let (out, record) = corrupt(&batch.get(i as i64), cfg, rng)?;
        outs.push(out);
        records.push(record);
    }
    Ok((Tensor::stack(&outs, 0), records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng;
    use tch::Device;

    fn crop(shape: &[i64], seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..5.0)).collect();
        Tensor::from_slice(&v).view(shape)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::try_from(&t.flatten(0, -1)).unwrap()
    }

    /// Spatial coordinates of each voxel, in flat (C-order) index order.
    fn coords(spatial: &[i64]) -> Vec<Vec<i64>> {
        let n: i64 = spatial.iter().product();
        (0..n)
            .map(|mut flat| {
                let mut c = vec![0; spatial.len()];
                for a in (0..spatial.len()).rev() {
                    c[a] = flat % spatial[a];
                    flat /= spatial[a];
                }
                c
            })
            .collect()
    }

    fn inside_any(boxes: &[HoleBox], spatial: &[i64]) -> Vec<bool> {
        coords(spatial)
            .iter()
            .map(|c| boxes.iter().any(|b| b.contains(c)))
            .collect()
    }

    fn sorted(mut v: Vec<f32>) -> Vec<f32> {
        v.sort_by(f32::total_cmp);
        v
    }

    fn crop_strategy() -> impl Strategy<Value = Vec<i64>> {
        // [C, D, H, W] with 1..=2 channels and sides 1..=14 (some below the hole sizes).
        (1i64..=2, prop::collection::vec(1i64..=14, 3)).prop_map(|(c, s)| std::iter::once(c).chain(s).collect())
    }

    fn size_strategy() -> impl Strategy<Value = [i64; 2]> {
        (1i64..=10, 0i64..=10).prop_map(|(lo, extra)| [lo, lo + extra])
    }

    #[test]
    fn config_defaults_parse_and_errors_name_the_key() {
        let c: CorruptionConfig = toml::from_str("").unwrap();
        assert_eq!(c, CorruptionConfig::default());
        assert_eq!(
            (
                c.inpaint_holes,
                c.inpaint_size,
                c.outpaint_size,
                c.shuffle_holes,
                c.shuffle_size
            ),
            (6, [5, 32], [20, 64], 10, 8)
        );
        assert!(toml::from_str::<CorruptionConfig>("inpaint_hole = 3").is_err());
        c.validate("objectives.recon.corruption").unwrap();
        let bad = CorruptionConfig {
            inpaint_size: [32, 5],
            ..c.clone()
        };
        let err = bad.validate("objectives.recon.corruption").unwrap_err().to_string();
        assert!(err.contains("`objectives.recon.corruption.inpaint_size`"), "{err}");
        let bad = CorruptionConfig {
            shuffle_probability: 1.5,
            ..c.clone()
        };
        let err = bad.validate("p").unwrap_err().to_string();
        assert!(err.contains("`p.shuffle_probability`"), "{err}");
        let bad = CorruptionConfig { outpaint_holes: 0, ..c };
        let err = bad.validate("p").unwrap_err().to_string();
        assert!(err.contains("`p.outpaint_holes`"), "{err}");
    }

    #[test]
    fn bad_crops_and_generator_counts_are_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let cfg = CorruptionConfig::default();
        let ints = Tensor::zeros([1, 4, 4, 4], (Kind::Int64, Device::Cpu));
        assert!(corrupt(&ints, &cfg, &mut rng)
            .unwrap_err()
            .to_string()
            .contains("float32"));
        let nan = Tensor::full([1, 2, 2, 2], f64::NAN, (Kind::Float, Device::Cpu));
        assert!(corrupt(&nan, &cfg, &mut rng)
            .unwrap_err()
            .to_string()
            .contains("non-finite"));
        let batch = crop(&[3, 1, 4, 4, 4], 1);
        let mut rngs = vec![ChaCha8Rng::seed_from_u64(1); 2];
        let err = corrupt_batch(&batch, &cfg, &mut rngs).unwrap_err().to_string();
        assert!(err.contains("2 generators for a batch of 3"), "{err}");
    }

    #[test]
    fn branches_follow_their_probabilities() {
        let cfg = CorruptionConfig::default();
        let x = crop(&[1, 6, 6, 6], 3);
        let (mut inpainted, mut shuffled) = (0, 0);
        let trials = 400;
        for seed in 0..trials {
            let (_, r) = corrupt(&x, &cfg, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            inpainted += (r.painting == Painting::Inpaint) as usize;
            shuffled += !r.shuffle_boxes.is_empty() as usize;
            let holes = match r.painting {
                Painting::Inpaint => cfg.inpaint_holes,
                Painting::Outpaint => cfg.outpaint_holes,
            };
            assert_eq!(r.paint_boxes.len(), holes);
            assert!(r.shuffle_boxes.is_empty() || r.shuffle_boxes.len() == cfg.shuffle_holes);
        }
        // Binomial(400, 0.5) and (400, 0.8): five standard deviations are 50 and 40.
        assert!(
            (inpainted as i64 - 200).abs() < 50,
            "{inpainted} in-painted of {trials}"
        );
        assert!((shuffled as i64 - 320).abs() < 40, "{shuffled} shuffled of {trials}");
    }

    #[test]
    fn constant_crop_stays_constant() {
        let x = Tensor::full([2, 5, 5, 5], 0.25, (Kind::Float, Device::Cpu));
        let cfg = CorruptionConfig {
            inpaint_size: [2, 4],
            outpaint_size: [2, 3],
            ..CorruptionConfig::default()
        };
        for seed in 0..20 {
            let (out, r) = corrupt(&x, &cfg, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            assert_eq!(r.noise_range, (0.25, 0.25));
            assert!(out.equal(&x), "seed {seed}: {r:?}");
        }
        let (out, _) = outpaint(&x, 1, [1, 1], &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        assert!(out.equal(&x));
    }

    #[test]
    fn noise_stays_below_max_even_when_rounding_would_reach_it() {
        // A range one fp32 step wide: most f64 draws round to one end or the other.
        let hi = 1.0f32;
        let lo = hi.next_down();
        let v = noise(&mut Xoshiro256PlusPlus::seed_from_u64(5), 10_000, (lo, hi));
        assert!(v.iter().all(|&x| x == lo));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn boxes_have_their_count_and_sizes(
            spatial in prop::collection::vec(1i64..=40, 1..=3),
            holes in 1usize..12,
            size in size_strategy(),
            seed in any::<u64>(),
        ) {
            let boxes = random_boxes(&mut ChaCha8Rng::seed_from_u64(seed), &spatial, holes, size);
            prop_assert_eq!(boxes.len(), holes);
            for b in &boxes {
                for (a, &side) in spatial.iter().enumerate() {
                    prop_assert!(b.size[a] >= size[0].min(side) && b.size[a] <= size[1].min(side));
                    prop_assert!(b.start[a] >= 0 && b.start[a] + b.size[a] <= side);
                }
            }
        }

        #[test]
        fn inpainting_puts_noise_in_boxes_only(
            shape in crop_strategy(),
            holes in 1usize..8,
            size in size_strategy(),
            seed in any::<u64>(),
        ) {
            let x = crop(&shape, seed);
            let (lo, hi) = (values(&x.min()).remove(0), values(&x.max()).remove(0));
            let (out, boxes) = inpaint(&x, holes, size, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            prop_assert_eq!(out.size(), shape.clone());
            prop_assert_eq!(boxes.len(), holes);
            let inside = inside_any(&boxes, &shape[1..]);
            let (before, after) = (values(&x), values(&out));
            for (i, (&b, &a)) in before.iter().zip(&after).enumerate() {
                if inside[i % inside.len()] {
                    prop_assert!(lo <= a && a < hi, "in-painted {} outside [{}, {})", a, lo, hi);
                } else {
                    prop_assert_eq!(b.to_bits(), a.to_bits());
                }
            }
        }

        #[test]
        fn outpainting_keeps_boxes_and_puts_noise_elsewhere(
            shape in crop_strategy(),
            holes in 1usize..8,
            size in size_strategy(),
            seed in any::<u64>(),
        ) {
            let x = crop(&shape, seed);
            let (lo, hi) = (values(&x.min()).remove(0), values(&x.max()).remove(0));
            let (out, boxes) = outpaint(&x, holes, size, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            let inside = inside_any(&boxes, &shape[1..]);
            let (before, after) = (values(&x), values(&out));
            for (i, (&b, &a)) in before.iter().zip(&after).enumerate() {
                if inside[i % inside.len()] {
                    prop_assert_eq!(b.to_bits(), a.to_bits());
                } else {
                    prop_assert!(lo <= a && a < hi, "out-painted {} outside [{}, {})", a, lo, hi);
                }
            }
        }

        #[test]
        fn shuffling_permutes_within_boxes_per_channel(
            shape in crop_strategy(),
            holes in 1usize..6,
            side in 1i64..6,
            seed in any::<u64>(),
        ) {
            let x = crop(&shape, seed);
            let (out, boxes) = shuffle(&x, holes, side, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            prop_assert_eq!(boxes.len(), holes);
            let spatial = &shape[1..];
            let n = spatial.iter().product::<i64>() as usize;
            let inside = inside_any(&boxes, spatial);
            let (before, after) = (values(&x), values(&out));
            let all = coords(spatial);
            // Overlapping boxes move values between each other, so what holds for any boxes
            // is: each channel's union of boxes keeps its multiset. Disjoint boxes keep
            // theirs one by one.
            let disjoint = boxes.iter().enumerate().all(|(i, a)| {
                boxes[..i].iter().all(|b| (0..spatial.len()).any(|d| {
                    a.start[d] + a.size[d] <= b.start[d] || b.start[d] + b.size[d] <= a.start[d]
                }))
            });
            for c in 0..shape[0] as usize {
                let (b, a) = (&before[c * n..(c + 1) * n], &after[c * n..(c + 1) * n]);
                for v in 0..n {
                    if !inside[v] {
                        prop_assert_eq!(b[v].to_bits(), a[v].to_bits());
                    }
                }
                let pick = |vals: &[f32], keep: &dyn Fn(usize) -> bool| {
                    sorted((0..n).filter(|&v| keep(v)).map(|v| vals[v]).collect())
                };
                prop_assert_eq!(pick(b, &|v| inside[v]), pick(a, &|v| inside[v]));
                if disjoint {
                    for bx in &boxes {
                        let keep = |v: usize| bx.contains(&all[v]);
                        prop_assert_eq!(pick(b, &keep), pick(a, &keep));
                    }
                }
            }
        }

        #[test]
        fn same_seed_same_corruption(
            shape in crop_strategy(),
            seed in any::<u64>(),
            samples in 1i64..3,
        ) {
            let cfg = CorruptionConfig {
                inpaint_size: [1, 6],
                outpaint_size: [2, 9],
                shuffle_size: 3,
                ..CorruptionConfig::default()
            };
            let x = crop(&shape, seed);
            let (a, ra) = corrupt(&x, &cfg, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            let (b, rb) = corrupt(&x, &cfg, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            prop_assert!(a.equal(&b));
            prop_assert_eq!(&ra, &rb);

            // The batch helper gives each sample what `corrupt` gives it with that generator.
            let mut batch_shape = vec![samples];
            batch_shape.extend_from_slice(&shape);
            let batch = crop(&batch_shape, seed ^ 1);
            let mut rngs: Vec<ChaCha8Rng> = (0..samples as u64).map(|i| ChaCha8Rng::seed_from_u64(seed ^ i)).collect();
            let (out, records) = corrupt_batch(&batch, &cfg, &mut rngs).unwrap();
            prop_assert_eq!(out.size(), batch_shape);
            for i in 0..samples {
                let (one, r) = corrupt(&batch.get(i), &cfg, &mut ChaCha8Rng::seed_from_u64(seed ^ i as u64)).unwrap();
                prop_assert!(out.get(i).equal(&one));
                prop_assert_eq!(&records[i as usize], &r);
            }
        }
    }
}
