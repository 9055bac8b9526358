//! Intensity handling shared by the readers of this crate: the `normalize` option, the
//! optional `window` clip, and RGB to grey.
//!
//! Raw intensities differ by orders of magnitude between formats and scanners (8-bit PNGs,
//! CT in Hounsfield units, MRI up to about 1e6), so every sample is normalised on its own.
//! The default follows nnU-Net (Isensee et al., Nature Methods 2021): clip to the 0.5 and
//! 99.5 percentiles, then zero mean and unit variance, which keeps a few extreme voxels from
//! squashing the contrast of the rest.

use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

/// How intensities are rescaled, per sample.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Normalization {
    /// Clip to the 0.5 and 99.5 percentiles, then zero mean and unit variance.
    #[serde(rename = "zscore")]
    ZScore,
    /// Linear map of the minimum to 0 and the maximum to 1.
    #[serde(rename = "minmax")]
    MinMax,
    /// The stored values (after the format's rescale, where it has one), as float32.
    #[serde(rename = "none")]
    Raw,
}

/// Percentiles that `zscore` clips to.
const CLIP_PERCENTILES: [f64; 2] = [0.005, 0.995];

/// An intensity window `[low, high]` (config: a two-number array with low < high), to clip
/// to before normalising; e.g. `[-1000, 1000]` Hounsfield units keeps air to bone in CT.
///
/// Parsed from a list and checked in one place, so `[1, 2, 3]` is an error rather than a
/// window silently cut to `[1, 2]` (serde's fixed-size arrays ignore extra elements).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "Vec<f64>", into = "Vec<f64>")]
pub struct Window {
    pub low: f64,
    pub high: f64,
}

impl TryFrom<Vec<f64>> for Window {
    type Error = String;
    fn try_from(values: Vec<f64>) -> std::result::Result<Window, String> {
        match values[..] {
            [low, high] if low.is_finite() && high.is_finite() && low < high => Ok(Window { low, high }),
            _ => Err(format!(
                "expected a window [low, high] with low < high (e.g. [-1000, 1000] HU for CT), found {values:?}"
            )),
        }
    }
}

impl From<Window> for Vec<f64> {
    fn from(window: Window) -> Vec<f64> {
        vec![window.low, window.high]
    }
}

/// Clips to `window` (when given), then rescales as `normalization` says, in float32.
/// NaN and infinite voxels become 0 first, with a warning naming `source` (the file or
/// series) and their count, once per source and process.
pub fn normalize(voxels: &Tensor, window: Option<Window>, normalization: Normalization, source: &str) -> Tensor {
    // NaN marks "no data" in some float files; one of them would turn the whole sample's
    // statistics into NaN.
    warn_non_finite(voxels, source);
    let mut voxels = voxels.to_kind(Kind::Float).nan_to_num(0.0, 0.0, 0.0);
    if voxels.numel() == 0 {
        // Nothing to rescale (the data source refuses such a sample by its shape).
        return voxels;
    }
    if let Some(Window { low, high }) = window {
        voxels = voxels.clamp(low, high);
    }
    match normalization {
        Normalization::Raw => voxels,
        Normalization::MinMax => {
            let low = voxels.min().double_value(&[]);
            let high = voxels.max().double_value(&[]);
            if high > low {
                (voxels - low) / (high - low)
            } else {
                voxels.zeros_like()
            }
        }
        Normalization::ZScore => {
            let [low, high] = percentiles(&voxels, CLIP_PERCENTILES);
            let clipped = voxels.clamp(low, high);
            // Statistics in float64: volumes of millions of voxels at values near 1e6 lose
            // digits in a float32 sum.
            let mean = clipped.mean(Kind::Double).double_value(&[]);
            let std = clipped.to_kind(Kind::Double).std(false).double_value(&[]);
            if std > 0.0 {
                (clipped - mean) / std
            } else {
                clipped.zeros_like()
            }
        }
    }
}

/// Counts the NaN and infinite voxels of a floating-point `voxels` (integers have none) and,
/// the first time `source` has any in this process, warns with the counts: they are read
/// as 0, which a user whose mask of "no data" is NaN expects, and one whose file is damaged
/// must hear about.
fn warn_non_finite(voxels: &Tensor, source: &str) -> usize {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    if !voxels.is_floating_point() {
        return 0;
    }
    let nan = voxels.isnan().sum(Kind::Int64).int64_value(&[]) as usize;
    let infinite = voxels.isinf().sum(Kind::Int64).int64_value(&[]) as usize;
    if nan + infinite == 0 {
        return 0;
    }
    let first = WARNED
        .lock()
        .map_or(true, |mut warned| warned.insert(source.to_string()));
    if first {
        tracing::warn!(
            "`{source}`: {} of {} voxels are not finite ({nan} NaN, {infinite} infinite); they are read as 0",
            nan + infinite,
            voxels.numel()
        );
    }
    nan + infinite
}

/// The `fractions` percentiles (ascending) of all voxels, by nearest rank: the values
/// libtorch's `kthvalue` gives, found with two selections on one copy (two `kthvalue`
/// calls were 8% of the volume loader's time). NaN has been replaced before this.
fn percentiles(voxels: &Tensor, fractions: [f64; 2]) -> [f64; 2] {
    let mut values = Vec::<f32>::try_from(voxels.to_kind(Kind::Float).contiguous().flatten(0, -1))
        .expect("a float32 CPU tensor converts to Vec<f32>");
    if values.is_empty() {
        return [0.0; 2];
    }
    let count = values.len();
    let index = |fraction: f64| ((fraction * (count - 1) as f64).round() as usize).min(count - 1);
    let (low, high) = (index(fractions[0]), index(fractions[1]));
    debug_assert!(low <= high);
    let (_, &mut low_value, above) = values.select_nth_unstable_by(low, f32::total_cmp);
    // Everything above the low rank is now in `above`, so the high rank is a selection there.
    let high_value = if high == low {
        low_value
    } else {
        *above.select_nth_unstable_by(high - low - 1, f32::total_cmp).1
    };
    [low_value as f64, high_value as f64]
}

/// Rec. 709 luma weights of R, G and B: the ones the `image` crate and most toolkits use.
pub const LUMA_WEIGHTS: [f32; 3] = [0.2126, 0.7152, 0.0722];

/// Grey values of colour samples `[..., 3]` (channels last): the Rec. 709 weighted sum of
/// the stored R, G and B values, in float32 and without gamma linearisation, so a grey
/// pixel (R = G = B) keeps its value. Returns `[...]`.
pub fn luminance(rgb: &Tensor) -> Tensor {
    rgb.to_kind(Kind::Float).matmul(&Tensor::from_slice(&LUMA_WEIGHTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> Tensor {
        Tensor::arange(1000, (Kind::Float, Device::Cpu)).view([10, 10, 10])
    }

    #[test]
    fn zscore_gives_zero_mean_unit_variance_and_minmax_the_unit_range() {
        let zscore = normalize(&ramp(), None, Normalization::ZScore, "test");
        assert!(zscore.mean(Kind::Double).double_value(&[]).abs() < 1e-5);
        assert!((zscore.to_kind(Kind::Double).std(false).double_value(&[]) - 1.0).abs() < 1e-4);
        let minmax = normalize(&ramp(), None, Normalization::MinMax, "test");
        assert_eq!(minmax.min().double_value(&[]), 0.0);
        assert_eq!(minmax.max().double_value(&[]), 1.0);
        let raw = normalize(&ramp().to_kind(Kind::Int16), None, Normalization::Raw, "test");
        assert_eq!(raw.kind(), Kind::Float);
        assert_eq!(raw.double_value(&[9, 9, 9]), 999.0);
    }

    #[test]
    fn zscore_clips_outliers_and_constant_samples_become_zero() {
        let spiky = ramp().fmod(7.0);
        let _ = spiky.get(3).get(3).get(3).fill_(1e6);
        assert!(
            normalize(&spiky, None, Normalization::ZScore, "test")
                .max()
                .double_value(&[])
                < 3.0
        );
        let flat = Tensor::full([2, 3, 4], 5.0, (Kind::Float, Device::Cpu));
        for normalization in [Normalization::ZScore, Normalization::MinMax] {
            let out = normalize(&flat, None, normalization, "test");
            assert_eq!(out.abs().max().double_value(&[]), 0.0);
        }
    }

    #[test]
    fn percentiles_are_the_nearest_rank_values_kthvalue_gives() {
        tch::manual_seed(3);
        for count in [1, 2, 7, 200, 1001] {
            let voxels = Tensor::randn([count], (Kind::Float, Device::Cpu)).round();
            for fractions in [CLIP_PERCENTILES, [0.0, 1.0], [0.3, 0.3], [0.25, 0.75]] {
                let ours = percentiles(&voxels, fractions);
                for (value, fraction) in ours.iter().zip(fractions) {
                    let rank = (fraction * (count - 1) as f64).round() as i64 + 1;
                    let reference = voxels.kthvalue(rank, 0, false).0.double_value(&[]);
                    assert_eq!(*value, reference, "count {count}, fraction {fraction}");
                }
            }
        }
    }

    #[test]
    fn window_clips_before_normalising_and_nan_becomes_zero() {
        let values = Tensor::from_slice(&[-3000.0f32, -1000.0, 0.0, 500.0, 3000.0, f32::NAN]);
        let window = Some(Window {
            low: -1000.0,
            high: 1000.0,
        });
        let clipped = normalize(&values, window, Normalization::Raw, "test");
        assert_eq!(
            Vec::<f32>::try_from(&clipped).unwrap(),
            [-1000.0, -1000.0, 0.0, 500.0, 1000.0, 0.0]
        );
        let unit = normalize(&values, window, Normalization::MinMax, "test");
        let damaged = Tensor::from_slice(&[1.0f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        assert_eq!(warn_non_finite(&damaged, "a damaged file"), 3);
        assert_eq!(
            warn_non_finite(&damaged.to_kind(Kind::Int16).zeros_like(), "integers"),
            0
        );
        assert_eq!(unit.double_value(&[0]), 0.0);
        assert_eq!(unit.double_value(&[4]), 1.0);
    }

    #[test]
    fn windows_parse_from_two_increasing_numbers_only() {
        assert_eq!(
            Window::try_from(vec![-1000.0, 1000.0]),
            Ok(Window {
                low: -1000.0,
                high: 1000.0
            })
        );
        for bad in [
            vec![1.0, 1.0],
            vec![5.0, -5.0],
            vec![f64::NAN, 1.0],
            vec![1.0, 2.0, 3.0],
            vec![1.0],
        ] {
            assert!(Window::try_from(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn luminance_weights_channels_and_keeps_grey() {
        let rgb = Tensor::from_slice(&[255.0f32, 0.0, 0.0, 0.0, 255.0, 0.0, 0.0, 0.0, 255.0, 90.0, 90.0, 90.0])
            .view([2, 2, 3]);
        let grey = luminance(&rgb);
        assert_eq!(grey.size(), [2, 2]);
        let values = Vec::<f32>::try_from(&grey.flatten(0, -1)).unwrap();
        for (value, expected) in values
            .iter()
            .zip([255.0 * 0.2126, 255.0 * 0.7152, 255.0 * 0.0722, 90.0])
        {
            assert!((value - expected).abs() < 1e-3, "{values:?}");
        }
    }
}
