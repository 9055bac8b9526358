//! Whole-volume inference by sliding windows, as MONAI's `sliding_window_inference`
//! (Project-MONAI/MONAI, monai/inferers/utils.py: `sliding_window_inference`,
//! `_get_scan_interval`; monai/data/utils.py: `dense_patch_slices`, `compute_importance_map`),
//! read at MONAI d388d1c6f (2025-06-13).
//!
//! Same as MONAI: the scan positions (the stride `int(roi * (1 - overlap))`, at least 1, or the
//! whole axis when the window equals it; the last window pushed back to end flush with the
//! image), the window order (first spatial axis slowest, then across the batch: window `i` of
//! the flattened list is sample `i / windows`, window `i % windows`), windows handed to the
//! model `batch_size` at a time across sample boundaries, inputs smaller than the window
//! padded symmetrically with zeros (the extra voxel, if odd, after) and the output cropped
//! back, and the Gaussian importance map: a separable Gaussian of sigma `sigma_scale * roi`
//! per axis centred on the window's middle, clamped from below at `max(min, 1e-3)`. That map
//! is not renormalised to a peak of 1 (MONAI stopped doing so in 1.1, PR #5302, so for even
//! windows the peak is a little below 1); a constant factor cancels in the weighted average
//! anyway, only the 1e-3 floor shapes the result (a 3D window's corners reach 4e-11
//! unclamped).
//!
//! Different on purpose: the output is always accumulated and returned in fp32 (MONAI
//! accumulates in the input's dtype, which under bf16 or fp16 loses overlapping sums); the
//! model's output is cast to fp32 and moved to the input's device; the whole call runs
//! without autograd (it is an inference path, and the accumulators would otherwise hold every
//! window's graph); non-positive window sides are an error rather than MONAI's "use the whole
//! axis"; one overlap for every axis; one output per model call (no tuples or dicts, no
//! zoomed outputs, no buffered mode).

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How overlapping windows' predictions are averaged.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Blend {
    /// Every voxel of every window weighs 1.
    Constant,
    /// Voxels near a window's border weigh less (a Gaussian of sigma `sigma_scale * roi`).
    Gaussian,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SlidingWindowConfig {
    /// Fraction of a window shared with its neighbour along each axis, in [0, 1).
    pub overlap: f64,
    /// `constant` or `gaussian`.
    pub blend: Blend,
    /// Windows per model call (MONAI's `sw_batch_size`).
    pub batch_size: usize,
    /// Gaussian sigma as a fraction of the window's side (used by `gaussian` only).
    pub sigma_scale: f64,
}

impl Default for SlidingWindowConfig {
    fn default() -> Self {
        // MONAI's defaults (overlap 0.25, constant, sigma_scale 0.125); batch 4 as the UNETR
        // fine-tuning tutorial calls it.
        SlidingWindowConfig {
            overlap: 0.25,
            blend: Blend::Constant,
            batch_size: 4,
            sigma_scale: 0.125,
        }
    }
}

impl SlidingWindowConfig {
    /// Checks the values; `prefix` is where the config sits, e.g. `finetune.sliding_window`.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        ensure!(
            (0.0..1.0).contains(&self.overlap),
            "config key `{prefix}.overlap` must be in [0, 1), got {}",
            self.overlap
        );
        ensure!(
            self.batch_size >= 1,
            "config key `{prefix}.batch_size` must be at least 1, got 0"
        );
        ensure!(
            self.sigma_scale > 0.0 && self.sigma_scale.is_finite(),
            "config key `{prefix}.sigma_scale` must be positive, got {}",
            self.sigma_scale
        );
        Ok(())
    }
}

/// Start of every window along one axis of length `image` (already padded to at least
/// `roi`), MONAI's `_get_scan_interval` and `dense_patch_slices` for that axis.
pub fn axis_starts(image: i64, roi: i64, overlap: f64) -> Vec<i64> {
    debug_assert!(image >= roi && roi >= 1);
    let interval = if roi == image {
        roi
    } else {
        // Same f64 arithmetic and truncation as Python's `int(roi * (1 - overlap))`, so strides
        // agree with MONAI's even where `1 - overlap` is inexact (0.3, 0.7, ...).
        ((roi as f64 * (1.0 - overlap)) as i64).max(1)
    };
    // The first window index whose end reaches the image end is the last one.
    let count = (0..).find(|d| d * interval + roi >= image).unwrap_or(0) + 1;
    (0..count)
        .map(|d| {
            let start = d * interval;
            start - (start + roi - image).max(0)
        })
        .collect()
}

/// Every window's start, in MONAI's order (the first axis varies slowest), for an image of
/// `image` voxels per axis (already padded to at least `roi`).
pub fn window_starts(image: &[i64], roi: &[i64], overlap: f64) -> Vec<Vec<i64>> {
    let per_axis: Vec<Vec<i64>> = image
        .iter()
        .zip(roi)
        .map(|(&i, &r)| axis_starts(i, r, overlap))
        .collect();
    per_axis.iter().fold(vec![Vec::new()], |acc, starts| {
        acc.iter()
            .flat_map(|prefix| {
                starts.iter().map(move |&s| {
                    let mut next = prefix.clone();
                    next.push(s);
                    next
                })
            })
            .collect()
    })
}

/// The per-voxel weight of a window `[*roi]` (fp32, on `device`), as MONAI's
/// `compute_importance_map`.
pub fn importance_map(roi: &[i64], blend: Blend, sigma_scale: f64, device: tch::Device) -> Tensor {
    let map = match blend {
        Blend::Constant => Tensor::ones(roi, (Kind::Float, device)),
        Blend::Gaussian => roi
            .iter()
            .enumerate()
            .fold(Tensor::ones([], (Kind::Float, device)), |map, (axis, &p)| {
                // Offsets from the window's centre are exact half-integers; the exponent is
                // evaluated by libtorch in fp32 as MONAI's is, so the weights match it.
                let offsets: Vec<f32> = (0..p).map(|i| i as f32 - (p - 1) as f32 / 2.0).collect();
                let sigma = p as f64 * sigma_scale;
                let x = Tensor::from_slice(&offsets).to_device(device);
                let g = (&x * &x / (-2.0 * sigma * sigma)).exp();
                let mut shape = vec![1i64; roi.len()];
                shape[axis] = p;
                map * g.view(shape.as_slice())
            }),
    };
    let floor = map.min().double_value(&[]).max(1e-3);
    map.clamp_min(floor)
}

/// Runs `model` over `input` `[N, C, *spatial]` in windows of `roi` and stitches the
/// predictions into `[N, K, *spatial]` (fp32, on the input's device). `model` receives
/// `[n, C, *roi]` with `n <= cfg.batch_size` and must return `[n, K, *roi]`.
pub fn sliding_window_inference<F>(
    input: &Tensor,
    roi: &[i64],
    cfg: &SlidingWindowConfig,
    mut model: F,
) -> Result<Tensor>
where
    F: FnMut(&Tensor) -> Result<Tensor>,
{
    let _no_grad = tch::no_grad_guard();
    ensure!(
        (0.0..1.0).contains(&cfg.overlap),
        "sliding window: overlap must be in [0, 1), got {}",
        cfg.overlap
    );
    ensure!(cfg.batch_size >= 1, "sliding window: batch_size must be at least 1");
    let shape = input.size();
    ensure!(
        shape.len() >= 3,
        "sliding window: input must be [N, C, *spatial], got shape {shape:?}"
    );
    let spatial = &shape[2..];
    ensure!(
        roi.len() == spatial.len(),
        "sliding window: window {roi:?} has {} axes but the input {shape:?} has {} spatial axes",
        roi.len(),
        spatial.len()
    );
    ensure!(
        roi.iter().all(|&r| r >= 1),
        "sliding window: every window side must be at least 1, got {roi:?}"
    );
    ensure!(
        spatial.iter().all(|&s| s >= 1) && shape[0] >= 1 && shape[1] >= 1,
        "sliding window: input {shape:?} is empty"
    );
    let (batch, device) = (shape[0], input.device());

    // Pad an axis shorter than the window: half before, the rest after (libtorch's pad list
    // runs from the last axis to the first).
    let before: Vec<i64> = spatial.iter().zip(roi).map(|(&s, &r)| (r - s).max(0) / 2).collect();
    let padded: Vec<i64> = spatial.iter().zip(roi).map(|(&s, &r)| s.max(r)).collect();
    let padded_input = if padded.as_slice() != spatial {
        let pads: Vec<i64> = (0..spatial.len())
            .rev()
            .flat_map(|a| {
                let total = padded[a] - spatial[a];
                [before[a], total - before[a]]
            })
            .collect();
        input.constant_pad_nd(pads.as_slice())
    } else {
        input.shallow_clone()
    };

    let starts = window_starts(&padded, roi, cfg.overlap);
    let weight = importance_map(roi, cfg.blend, cfg.sigma_scale, device);
    let mut weight_shape = vec![1i64, 1];
    weight_shape.extend_from_slice(roi);
    let weight = weight.view(weight_shape.as_slice());

    let window_of = |t: &Tensor, sample: i64, start: &[i64]| {
        start
            .iter()
            .zip(roi)
            .enumerate()
            .fold(t.narrow(0, sample, 1), |w, (axis, (&s, &r))| {
                w.narrow(2 + axis as i64, s, r)
            })
    };

    let mut count_shape = vec![1i64, 1];
    count_shape.extend_from_slice(&padded);
    let count = Tensor::zeros(count_shape.as_slice(), (Kind::Float, device));
    for start in &starts {
        let mut region = window_of(&count, 0, start);
        region += &weight;
    }

    let windows = starts.len() as i64;
    let total = windows * batch;
    let mut output: Option<Tensor> = None;
    let mut first = 0;
    while first < total {
        let last = (first + cfg.batch_size as i64).min(total);
        let pieces: Vec<Tensor> = (first..last)
            .map(|i| window_of(&padded_input, i / windows, &starts[(i % windows) as usize]))
            .collect();
        let windows_in = Tensor::cat(&pieces, 0);
        let n = last - first;
        let prediction =
            model(&windows_in).with_context(|| format!("sliding window: model call on windows {first}..{last}"))?;
        let got = prediction.size();
        let known_k = output.as_ref().map(|o| o.size()[1]);
        let shape_ok = got.len() == 2 + roi.len()
            && got[0] == n
            && got[1] >= 1
            && known_k.is_none_or(|k| k == got[1])
            && &got[2..] == roi;
        if !shape_ok {
            let k = known_k.map_or("K".to_string(), |k| k.to_string());
            let sides: Vec<String> = roi.iter().map(|r| r.to_string()).collect();
            bail!(
                "sliding window: the model returned shape {got:?} for windows {:?}; expected [{n}, {k}, {}]",
                windows_in.size(),
                sides.join(", ")
            );
        }
        let mut prediction = prediction.to_device(device).to_kind(Kind::Float);
        let out = output.get_or_insert_with(|| {
            let mut out_shape = vec![batch, got[1]];
            out_shape.extend_from_slice(&padded);
            Tensor::zeros(out_shape.as_slice(), (Kind::Float, device))
        });
        // Weighted in place, once a call: a product per window would be a fresh tensor of
        // the window's size each time (the model's output is this function's to change). The
        // constant map is all ones, so its product is skipped, which changes no bit.
        if cfg.blend != Blend::Constant {
            prediction *= &weight;
        }
        for (j, i) in (first..last).enumerate() {
            let mut region = window_of(out, i / windows, &starts[(i % windows) as usize]);
            region += prediction.narrow(0, j as i64, 1);
        }
        first = last;
    }
    let Some(output) = output else {
        bail!("sliding window: no windows ran");
    };
    let output = output / count;
    Ok(before
        .iter()
        .zip(spatial)
        .enumerate()
        .fold(output, |o, (axis, (&b, &s))| o.narrow(2 + axis as i64, b, s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Device;

    fn cfg(overlap: f64, blend: Blend, batch_size: usize) -> SlidingWindowConfig {
        SlidingWindowConfig {
            overlap,
            blend,
            batch_size,
            ..SlidingWindowConfig::default()
        }
    }

    /// A volume of small integers, so a sum of a few copies and its division by the count
    /// are exact in fp32 (an arbitrary float times 3, divided by 3, need not round back).
    fn integer_volume(shape: &[i64], seed: i64) -> Tensor {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((i * 7 + seed * 13) % 17 - 8) as f32).collect();
        Tensor::from_slice(&values).view(shape)
    }

    /// Which windows cover each voxel of a padded image, as flat voxel index -> window ids.
    fn covering(image: &[i64], roi: &[i64], starts: &[Vec<i64>]) -> Vec<Vec<usize>> {
        let n: i64 = image.iter().product();
        (0..n)
            .map(|flat| {
                let mut rest = flat;
                let mut coord = vec![0i64; image.len()];
                for a in (0..image.len()).rev() {
                    coord[a] = rest % image[a];
                    rest /= image[a];
                }
                starts
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| (0..image.len()).all(|a| s[a] <= coord[a] && coord[a] < s[a] + roi[a]))
                    .map(|(w, _)| w)
                    .collect()
            })
            .collect()
    }

    fn shape_strategy() -> impl Strategy<Value = (Vec<i64>, Vec<i64>)> {
        // 2 or 3 spatial axes; sides from 1 to 13, windows from 1 to 8, so some axes are
        // shorter than the window and get padded.
        (2usize..=3).prop_flat_map(|dims| {
            (
                prop::collection::vec(1i64..=13, dims),
                prop::collection::vec(1i64..=8, dims),
            )
        })
    }

    #[test]
    fn window_starts_match_monai_by_hand() {
        // stride int(96 * 0.75) = 72; first d with d*72 + 96 >= 100 is 1: two windows, the
        // second at 72 - (72 + 96 - 100) = 4.
        assert_eq!(axis_starts(100, 96, 0.25), vec![0, 4]);
        // 0, 72, 144, then 216 pushed back by 216 + 96 - 250 = 62 to 154.
        assert_eq!(axis_starts(250, 96, 0.25), vec![0, 72, 144, 154]);
        // stride 2, d = 3 is the first with d*2 + 4 >= 10.
        assert_eq!(axis_starts(10, 4, 0.5), vec![0, 2, 4, 6]);
        // stride 4: 0, 4, then 8 pushed back by 2 to 6.
        assert_eq!(axis_starts(10, 4, 0.0), vec![0, 4, 6]);
        // window == image: stride is the whole axis, one window.
        assert_eq!(axis_starts(96, 96, 0.25), vec![0]);
        // int(5 * 0.1) = 0 becomes 1.
        assert_eq!(axis_starts(8, 5, 0.9), vec![0, 1, 2, 3]);
        // 1 - 0.7 is 0.30000000000000004: int(10 * that) = 3; 0, 3, 6, then 9 -> 8.
        assert_eq!(axis_starts(18, 10, 0.7), vec![0, 3, 6, 8]);
        // 1 - 0.3 = 0.7 (a hair below), 10 * 0.7 rounds to 7.0 exactly: stride 7.
        assert_eq!(axis_starts(20, 10, 0.3), vec![0, 7, 10]);
        // BTCV-like: 226 with 96 at 0.25: 0, 72, then 144 -> 130.
        assert_eq!(axis_starts(226, 96, 0.25), vec![0, 72, 130]);
        // Product order as MONAI's meshgrid(indexing="ij"): the first axis slowest.
        assert_eq!(
            window_starts(&[10, 100], &[4, 96], 0.0),
            vec![vec![0, 0], vec![0, 4], vec![4, 0], vec![4, 4], vec![6, 0], vec![6, 4]]
        );
    }

    #[test]
    fn short_axes_are_padded_symmetrically_and_cropped_back() {
        // The model answers each voxel's position inside its window along the first spatial
        // axis, so the output shows where the crop sat in the padded window. Side 5 in a
        // window of 8: MONAI pads 3 // 2 = 1 before and 2 after, so voxel i reads i + 1.
        // Side 4 in 8 (second case): 2 before.
        for (side, before) in [(5i64, 1i64), (4, 2), (7, 0), (8, 0)] {
            let x = Tensor::zeros([1, 1, side, 6, 2], (Kind::Float, Device::Cpu));
            let ramp = Tensor::arange(8, (Kind::Float, Device::Cpu)).view([1, 1, 8, 1, 1]);
            let out = sliding_window_inference(&x, &[8, 3, 2], &cfg(0.25, Blend::Constant, 2), |t: &Tensor| {
                Ok(t.zeros_like() + &ramp)
            })
            .unwrap();
            assert_eq!(out.size(), vec![1, 1, side, 6, 2]);
            let first: Vec<f32> = Vec::try_from(&out.select(3, 0).select(3, 0).flatten(0, -1)).unwrap();
            let want: Vec<f32> = (0..side).map(|i| (i + before) as f32).collect();
            assert_eq!(first, want, "side {side}");
        }
    }

    #[test]
    fn gaussian_map_is_monai_s() {
        // roi 5, sigma 0.625: exp(-x^2 / 0.78125) at x = -2..2; the ends are above the floor.
        let m = importance_map(&[5], Blend::Gaussian, 0.125, Device::Cpu);
        let got: Vec<f32> = Vec::try_from(&m).unwrap();
        let want: Vec<f32> = [-2.0f32, -1.0, 0.0, 1.0, 2.0]
            .iter()
            .map(|x| (-(x * x) / 0.78125f32).exp())
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // A 3D window's corners fall far below 1e-3 and are clamped there; even sides peak
        // below 1 (no renormalisation).
        let m = importance_map(&[8, 8, 8], Blend::Gaussian, 0.125, Device::Cpu);
        assert!((m.min().double_value(&[]) - 1e-3).abs() < 1e-9);
        let peak = m.max().double_value(&[]);
        assert!(peak < 1.0 && peak > 0.6, "peak {peak}");
    }

    #[test]
    fn config_defaults_and_errors() {
        let c: SlidingWindowConfig = toml::from_str("").unwrap();
        assert_eq!(c, SlidingWindowConfig::default());
        let c: SlidingWindowConfig = toml::from_str("blend = \"gaussian\"\noverlap = 0.5").unwrap();
        assert_eq!((c.blend, c.overlap), (Blend::Gaussian, 0.5));
        assert!(toml::from_str::<SlidingWindowConfig>("overlapp = 0.5").is_err());
        let err = cfg(1.0, Blend::Constant, 1)
            .validate("finetune.sliding_window")
            .unwrap_err();
        assert!(err.to_string().contains("finetune.sliding_window.overlap"), "{err}");

        let x = Tensor::zeros([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        let id = |t: &Tensor| -> Result<Tensor> { Ok(t.shallow_clone()) };
        let err = sliding_window_inference(&x, &[2, 2], &cfg(-0.1, Blend::Constant, 1), id).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        let err = sliding_window_inference(&x, &[2, 0], &cfg(0.25, Blend::Constant, 1), id).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
        let err = sliding_window_inference(&x, &[2, 2, 2], &cfg(0.25, Blend::Constant, 1), id).unwrap_err();
        assert!(err.to_string().contains("2 spatial axes"), "{err}");
        let err = sliding_window_inference(&x, &[2, 2], &cfg(0.25, Blend::Constant, 1), |t: &Tensor| {
            Ok(t.narrow(2, 0, 1))
        })
        .unwrap_err();
        assert!(err.to_string().contains("expected [1, K, 2, 2]"), "{err}");
        // A model that changes its channel count between calls is named with the first count.
        let mut calls = 0;
        let err = sliding_window_inference(&x, &[2, 2], &cfg(0.0, Blend::Constant, 1), |t: &Tensor| {
            calls += 1;
            Ok(if calls == 1 {
                t.repeat([1, 3, 1, 1])
            } else {
                t.shallow_clone()
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("expected [1, 3, 2, 2]"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn identity_is_exact_under_constant_and_close_under_gaussian(
            (image, roi) in shape_strategy(),
            overlap in 0.0f64..0.95,
            batch_size in 1usize..5,
            samples in 1i64..3,
            seed in 0i64..100,
        ) {
            let mut shape = vec![samples, 2];
            shape.extend_from_slice(&image);
            let x = integer_volume(&shape, seed);
            let mut calls = 0usize;
            let mut seen = 0i64;
            let out = sliding_window_inference(&x, &roi, &cfg(overlap, Blend::Constant, batch_size), |t: &Tensor| {
                calls += 1;
                seen += t.size()[0];
                assert!(t.size()[0] as usize <= batch_size);
                Ok(t.shallow_clone())
            }).unwrap();
            prop_assert_eq!(out.size(), shape.clone());
            prop_assert!(out.equal(&x), "constant blend changed the input");
            let padded: Vec<i64> = image.iter().zip(&roi).map(|(&s, &r)| s.max(r)).collect();
            let windows = window_starts(&padded, &roi, overlap).len() as i64;
            prop_assert_eq!(seen, windows * samples);
            prop_assert_eq!(calls as i64, (windows * samples + batch_size as i64 - 1) / batch_size as i64);

            let out = sliding_window_inference(&x, &roi, &cfg(overlap, Blend::Gaussian, batch_size), |t: &Tensor| {
                Ok(t.shallow_clone())
            }).unwrap();
            let err = (&out - &x).abs().max().double_value(&[]);
            // Each output voxel is a weighted mean of the same value over the windows that
            // cover it, summed in fp32: the rounding grows with that count (up to 8^3 at
            // stride 1), about one ulp of |x| <= 8 per summand, in the numerator and the
            // denominator alike.
            let covering: usize = padded
                .iter()
                .zip(&roi)
                .map(|(&p, &r)| {
                    let starts = axis_starts(p, r, overlap);
                    (0..p).map(|v| starts.iter().filter(|&&s| s <= v && v < s + r).count()).max().unwrap_or(1)
                })
                .product();
            let bound = 2.0 * 8.0 * f64::from(f32::EPSILON) * (covering as f64 + 1.0);
            prop_assert!(err <= bound, "gaussian identity off by {} (bound {} for {} covering windows)", err, bound, covering);
        }

        #[test]
        fn windows_cover_every_voxel_and_stay_inside(
            (image, roi) in shape_strategy(),
            overlap in 0.0f64..0.95,
        ) {
            let padded: Vec<i64> = image.iter().zip(&roi).map(|(&s, &r)| s.max(r)).collect();
            let starts = window_starts(&padded, &roi, overlap);
            for s in &starts {
                for a in 0..padded.len() {
                    prop_assert!(s[a] >= 0 && s[a] + roi[a] <= padded[a]);
                }
            }
            prop_assert!(covering(&padded, &roi, &starts).iter().all(|c| !c.is_empty()));
            // And through the stitching: a model of ones gives ones (an uncovered voxel
            // would be 0 / 0).
            let mut shape = vec![1, 1];
            shape.extend_from_slice(&image);
            let x = Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu));
            for blend in [Blend::Constant, Blend::Gaussian] {
                let out = sliding_window_inference(&x, &roi, &cfg(overlap, blend, 3), |t: &Tensor| {
                    Ok(t.ones_like())
                }).unwrap();
                prop_assert!(out.equal(&x.ones_like()) || (&out - 1.0).abs().max().double_value(&[]) < 1e-6);
            }
        }

        #[test]
        fn per_window_constants_blend_between_the_covering_windows(
            (image, roi) in shape_strategy(),
            overlap in 0.0f64..0.95,
            batch_size in 1usize..4,
            gaussian in proptest::bool::ANY,
        ) {
            let blend = if gaussian { Blend::Gaussian } else { Blend::Constant };
            let mut shape = vec![1, 1];
            shape.extend_from_slice(&image);
            let x = Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu));
            let mut next = 0.0f32;
            let out = sliding_window_inference(&x, &roi, &cfg(overlap, blend, batch_size), |t: &Tensor| {
                // Window j (in MONAI's order) predicts the constant j.
                let n = t.size()[0];
                let ids: Vec<f32> = (0..n).map(|i| next + i as f32).collect();
                next += n as f32;
                let mut view = vec![n, 1];
                view.extend(std::iter::repeat_n(1, roi.len()));
                Ok(t + Tensor::from_slice(&ids).view(view.as_slice()))
            }).unwrap();
            let padded: Vec<i64> = image.iter().zip(&roi).map(|(&s, &r)| s.max(r)).collect();
            let before: Vec<i64> = image.iter().zip(&roi).map(|(&s, &r)| (r - s).max(0) / 2).collect();
            let starts = window_starts(&padded, &roi, overlap);
            let cover = covering(&padded, &roi, &starts);
            let values: Vec<f32> = Vec::try_from(&out.flatten(0, -1)).unwrap();
            let n: i64 = image.iter().product();
            for flat in 0..n {
                // The voxel's index in the padded image.
                let mut rest = flat;
                let mut coord = vec![0i64; image.len()];
                for a in (0..image.len()).rev() {
                    coord[a] = rest % image[a] + before[a];
                    rest /= image[a];
                }
                let padded_flat = coord.iter().zip(&padded).fold(0i64, |acc, (&c, &p)| acc * p + c);
                let ids = &cover[padded_flat as usize];
                let (lo, hi) = ids.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &w| (lo.min(w as f32), hi.max(w as f32)));
                let v = values[flat as usize];
                prop_assert!(v >= lo - 1e-4 && v <= hi + 1e-4, "voxel {:?}: {} outside [{}, {}]", coord, v, lo, hi);
                if blend == Blend::Constant {
                    let mean = ids.iter().map(|&w| w as f64).sum::<f64>() / ids.len() as f64;
                    prop_assert!((v as f64 - mean).abs() < 1e-4, "voxel {:?}: {} vs mean {}", coord, v, mean);
                }
            }
        }
    }
}
