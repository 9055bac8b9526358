//! RoIAlign (He et al., Mask R-CNN, ICCV 2017, Sec. 3) as torchvision's `roi_align` defines
//! it, built from gathers so that autograd gives its backward pass.
//!
//! For a region `[x1, y1, x2, y2]` (input pixels) and a feature map of scale `spatial_scale`
//! (1 / stride): with `aligned`, the region is `x1 * scale - 0.5 .. x2 * scale - 0.5` (pixel
//! centres sit at half-integers, so the shift makes a region's samples line up with the
//! pixels it covers); without, it is `x1 * scale .. x2 * scale` with width and height raised
//! to at least 1. The region is cut into `output` bins; each bin averages
//! `sampling_ratio x sampling_ratio` bilinear samples at the centres of an even sub-grid. A
//! sample at `(y, x)` is 0 when `y < -1`, `y > H`, `x < -1` or `x > W`; otherwise coordinates
//! below 0 are raised to 0, and a coordinate at or past the last row / column reads that
//! row / column.
//!
//! torchvision's adaptive sampling (`sampling_ratio <= 0`: `ceil(size / bins)` samples per
//! bin, different for every region) is not offered: a fixed count keeps the computation a
//! few dense gathers.
//!
//! [`MultiScaleRoiAlign`] picks each region's pyramid level by FPN's Eq. 1 (Lin et al., CVPR
//! 2017): `k = floor(k0 + log2(sqrt(w h) / 224))`, clamped to the pyramid.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// RoIAlign of `rois` `[K, 5]` (batch index, x1, y1, x2, y2 in input pixels) on `features`
/// `[N, C, H, W]`; returns `[K, C, output.0, output.1]`.
pub fn roi_align(
    features: &Tensor,
    rois: &Tensor,
    output: (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let (n, c, h, w) = features.size4().expect("roi_align: features must be [N, C, H, W]");
    let k = rois.size()[0];
    let (ph, pw) = output;
    let device = features.device();
    if k == 0 {
        return Tensor::zeros([0, c, ph, pw], (features.kind(), device));
    }
    let g = sampling_ratio.max(1);
    let rois = rois.to_kind(Kind::Float).to_device(device);
    let offset = if aligned { 0.5 } else { 0.0 };
    let batch = rois.select(1, 0).to_kind(Kind::Int64).clamp(0, n - 1);
    let start_x = rois.select(1, 1) * spatial_scale - offset;
    let start_y = rois.select(1, 2) * spatial_scale - offset;
    let mut roi_w = rois.select(1, 3) * spatial_scale - offset - &start_x;
    let mut roi_h = rois.select(1, 4) * spatial_scale - offset - &start_y;
    if !aligned {
        roi_w = roi_w.clamp_min(1.0);
        roi_h = roi_h.clamp_min(1.0);
    }
    let bin_w = roi_w / pw as f64;
    let bin_h = roi_h / ph as f64;
    // Rows of the channels-last map [N * H * W, C], gathered by flat pixel index.
    let rows = features.permute([0, 2, 3, 1]).reshape([n * h * w, c]);
    let mut sum = Tensor::zeros([k * ph * pw, c], (features.kind(), device));
    for sy in 0..g {
        // Sample row of bin i: start + bin * (i + (sy + 0.5) / g), [K, ph].
        let fy = Tensor::arange(ph, (Kind::Float, device)) + (sy as f64 + 0.5) / g as f64;
        let ys = start_y.unsqueeze(1) + bin_h.unsqueeze(1) * fy.unsqueeze(0);
        let y = axis_weights(&ys, h);
        for sx in 0..g {
            let fx = Tensor::arange(pw, (Kind::Float, device)) + (sx as f64 + 0.5) / g as f64;
            let xs = start_x.unsqueeze(1) + bin_w.unsqueeze(1) * fx.unsqueeze(0);
            let x = axis_weights(&xs, w);
            let valid = (y.valid.unsqueeze(2) * x.valid.unsqueeze(1)).to_kind(features.kind());
            let base = (&batch * (h * w)).view([k, 1, 1]);
            for (y_index, y_weight) in [(&y.low, &y.low_weight), (&y.high, &y.high_weight)] {
                for (x_index, x_weight) in [(&x.low, &x.low_weight), (&x.high, &x.high_weight)] {
                    let index = &base + y_index.unsqueeze(2) * w + x_index.unsqueeze(1);
                    let weight = y_weight.unsqueeze(2) * x_weight.unsqueeze(1) * &valid;
                    let values = rows.index_select(0, &index.view([-1]));
                    sum += values * weight.view([-1, 1]).to_kind(features.kind());
                }
            }
        }
    }
    (sum / (g * g) as f64)
        .view([k, ph, pw, c])
        .permute([0, 3, 1, 2])
        .contiguous()
}

/// Bilinear indices and weights of sample coordinates along one axis of length `len`.
struct AxisWeights {
    low: Tensor,
    high: Tensor,
    low_weight: Tensor,
    high_weight: Tensor,
    /// 1 where the coordinate lies in `[-1, len]`, else 0.
    valid: Tensor,
}

fn axis_weights(coords: &Tensor, len: i64) -> AxisWeights {
    let valid = coords.ge(-1.0).logical_and(&coords.le(len as f64)).to_kind(Kind::Float);
    let c = coords.clamp_min(0.0);
    let floor = c.floor();
    let past_end = floor.ge((len - 1) as f64);
    let last = (len - 1) as f64;
    let low = floor.clamp_max(last);
    let high = (&low + 1.0).clamp_max(last);
    // At or past the last index the sample reads that index alone.
    let c = c.where_self(&past_end.logical_not(), &low);
    let high_weight = &c - &low;
    let low_weight = 1.0 - &high_weight;
    AxisWeights {
        low: low.to_kind(Kind::Int64),
        high: high.to_kind(Kind::Int64),
        low_weight,
        high_weight,
        valid,
    }
}

/// RoIAlign over several pyramid levels: each region is pooled from one level, chosen by its
/// size (FPN Eq. 1).
#[derive(Debug, Clone)]
pub struct MultiScaleRoiAlign {
    /// log2 of each level's stride.
    level_logs: Vec<f64>,
    strides: Vec<f64>,
    pub output: (i64, i64),
    pub sampling_ratio: i64,
    pub aligned: bool,
    pub canonical_scale: f64,
    pub canonical_level: f64,
}

impl MultiScaleRoiAlign {
    /// `strides`: the pooled levels' strides (positive, increasing).
    pub fn new(strides: &[i64], output: (i64, i64), sampling_ratio: i64, aligned: bool) -> Result<Self> {
        ensure!(!strides.is_empty(), "RoIAlign needs at least one feature level");
        ensure!(
            strides.iter().all(|&s| s > 0) && strides.windows(2).all(|s| s[0] < s[1]),
            "RoIAlign levels must have positive, increasing strides, found {strides:?}"
        );
        ensure!(
            sampling_ratio >= 1,
            "config key `head.roi.sampling_ratio` must be at least 1 (adaptive sampling is not supported), found {sampling_ratio}"
        );
        ensure!(
            output.0 >= 1 && output.1 >= 1,
            "config key `head.roi.output_size` must be at least 1, found {}",
            output.0
        );
        Ok(MultiScaleRoiAlign {
            level_logs: strides.iter().map(|&s| (s as f64).log2()).collect(),
            strides: strides.iter().map(|&s| s as f64).collect(),
            output,
            sampling_ratio,
            aligned,
            canonical_scale: 224.0,
            canonical_level: 4.0,
        })
    }

    /// The level index of each box `[K, 4]`: FPN's `k` mapped to the level whose log2
    /// stride is nearest (levels need not be consecutive powers of two), clamped to the
    /// pyramid.
    pub fn assign_levels(&self, boxes: &Tensor) -> Vec<usize> {
        let areas = crate::boxes::boxes_of(boxes);
        areas
            .iter()
            .map(|b| {
                let size = ((b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)).sqrt();
                let k = (self.canonical_level + (size / self.canonical_scale).log2() + 1e-6).floor();
                let k = if k.is_finite() { k } else { self.level_logs[0] };
                let mut best = 0;
                for (i, &level) in self.level_logs.iter().enumerate() {
                    if (level - k).abs() < (self.level_logs[best] - k).abs() {
                        best = i;
                    }
                }
                best
            })
            .collect()
    }

    /// Pools `rois` `[K, 5]` from `features` (one map per level, in the order of `strides`);
    /// returns `[K, C, output.0, output.1]` in the order of `rois`.
    pub fn forward(&self, features: &[Tensor], rois: &Tensor) -> Tensor {
        let k = rois.size()[0];
        let c = features[0].size()[1];
        let device = features[0].device();
        let levels = self.assign_levels(&rois.narrow(1, 1, 4));
        let mut out = Tensor::zeros([k, c, self.output.0, self.output.1], (features[0].kind(), device));
        for (level, feature) in features.iter().enumerate() {
            let members: Vec<i64> = (0..k as usize)
                .filter(|&i| levels[i] == level)
                .map(|i| i as i64)
                .collect();
            if members.is_empty() {
                continue;
            }
            let members = Tensor::from_slice(&members).to_device(device);
            let pooled = roi_align(
                feature,
                &rois.index_select(0, &members),
                self.output,
                1.0 / self.strides[level],
                self.sampling_ratio,
                self.aligned,
            );
            out = out.index_copy(0, &members, &pooled);
        }
        out
    }
}

/// The rois tensor `[K, 5]` from per-image boxes.
pub fn rois_of(boxes: &[Tensor], device: Device) -> Tensor {
    let parts: Vec<Tensor> = boxes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let b = b.to_kind(Kind::Float).to_device(device);
            let index = Tensor::full([b.size()[0], 1], i as f64, (Kind::Float, device));
            Tensor::cat(&[index, b], 1)
        })
        .collect();
    if parts.is_empty() {
        Tensor::zeros([0, 5], (Kind::Float, device))
    } else {
        Tensor::cat(&parts, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// torchvision's bilinear sample, point by point.
    fn bilinear(map: &[f64], h: usize, w: usize, y: f64, x: f64) -> f64 {
        if y < -1.0 || y > h as f64 || x < -1.0 || x > w as f64 {
            return 0.0;
        }
        let (mut y, mut x) = (y.max(0.0), x.max(0.0));
        let mut y_low = y.floor() as usize;
        let mut x_low = x.floor() as usize;
        let y_high;
        let x_high;
        if y_low >= h - 1 {
            y_low = h - 1;
            y_high = h - 1;
            y = y_low as f64;
        } else {
            y_high = y_low + 1;
        }
        if x_low >= w - 1 {
            x_low = w - 1;
            x_high = w - 1;
            x = x_low as f64;
        } else {
            x_high = x_low + 1;
        }
        let (ly, lx) = (y - y_low as f64, x - x_low as f64);
        let (hy, hx) = (1.0 - ly, 1.0 - lx);
        let at = |r: usize, c: usize| map[r * w + c];
        hy * hx * at(y_low, x_low)
            + hy * lx * at(y_low, x_high)
            + ly * hx * at(y_high, x_low)
            + ly * lx * at(y_high, x_high)
    }

    /// RoIAlign of one region on one channel, loop by loop.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        map: &[f64],
        h: usize,
        w: usize,
        roi: [f64; 4],
        ph: usize,
        pw: usize,
        scale: f64,
        g: usize,
        aligned: bool,
    ) -> Vec<f64> {
        let offset = if aligned { 0.5 } else { 0.0 };
        let (sx, sy) = (roi[0] * scale - offset, roi[1] * scale - offset);
        let (mut rw, mut rh) = (roi[2] * scale - offset - sx, roi[3] * scale - offset - sy);
        if !aligned {
            rw = rw.max(1.0);
            rh = rh.max(1.0);
        }
        let (bw, bh) = (rw / pw as f64, rh / ph as f64);
        let mut out = Vec::new();
        for i in 0..ph {
            for j in 0..pw {
                let mut total = 0.0;
                for iy in 0..g {
                    let y = sy + i as f64 * bh + (iy as f64 + 0.5) * bh / g as f64;
                    for ix in 0..g {
                        let x = sx + j as f64 * bw + (ix as f64 + 0.5) * bw / g as f64;
                        total += bilinear(map, h, w, y, x);
                    }
                }
                out.push(total / (g * g) as f64);
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn roi_align_equals_a_direct_bilinear_computation(
            (n, c, h, w) in (1i64..3, 1i64..3, 1i64..9, 1i64..9),
            raw_rois in prop::collection::vec((0usize..3, -6.0..20.0f64, -6.0..20.0f64, 0.0..14.0f64, 0.0..14.0f64), 1..5),
            (ph, pw) in (1i64..4, 1i64..4),
            scale in prop::sample::select(vec![1.0, 0.5, 0.25]),
            g in 1i64..4,
            aligned in any::<bool>(),
            seed in 0i64..1000,
        ) {
            tch::manual_seed(seed);
            let features = Tensor::randn([n, c, h, w], (Kind::Double, Device::Cpu));
            let rois: Vec<[f64; 5]> = raw_rois
                .iter()
                .map(|&(b, x, y, rw, rh)| [(b as i64 % n) as f64, x, y, x + rw, y + rh])
                .collect();
            let flat: Vec<f64> = rois.iter().flatten().copied().collect();
            let roi_tensor = Tensor::from_slice(&flat).view([rois.len() as i64, 5]);
            let got = roi_align(&features, &roi_tensor, (ph, pw), scale, g, aligned);
            prop_assert_eq!(got.size(), vec![rois.len() as i64, c, ph, pw]);
            let maps: Vec<f64> = Vec::try_from(features.view([-1])).unwrap();
            let got: Vec<f64> = Vec::try_from(got.to_kind(Kind::Double).view([-1])).unwrap();
            let (hu, wu) = (h as usize, w as usize);
            let mut at = 0;
            for roi in &rois {
                // roi_align works in float32 coordinates; the reference uses the same values.
                let coords = [roi[1] as f32 as f64, roi[2] as f32 as f64, roi[3] as f32 as f64, roi[4] as f32 as f64];
                for channel in 0..c as usize {
                    let offset = (roi[0] as usize * c as usize + channel) * hu * wu;
                    let want = reference(&maps[offset..offset + hu * wu], hu, wu, coords, ph as usize, pw as usize, scale, g as usize, aligned);
                    for value in want {
                        prop_assert!((got[at] - value).abs() < 1e-4, "{} vs {}", got[at], value);
                        at += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn gradients_reach_the_sampled_pixels_only() {
        let features = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let rois = Tensor::from_slice(&[0.0f32, 1.0, 1.0, 3.0, 3.0]).view([1, 5]);
        roi_align(&features, &rois, (2, 2), 1.0, 2, true)
            .sum(Kind::Float)
            .backward();
        let grad = features.grad();
        assert!((grad.sum(Kind::Float).double_value(&[]) - 4.0).abs() < 1e-5);
        assert_eq!(grad.narrow(2, 4, 4).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn regions_go_to_the_level_of_their_size() {
        let pooler = MultiScaleRoiAlign::new(&[4, 8, 16, 32], (7, 7), 2, true).unwrap();
        let boxes = crate::boxes::tensor_of(&[
            [0.0, 0.0, 224.0, 224.0],
            [0.0, 0.0, 112.0, 112.0],
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 900.0, 900.0],
        ]);
        // 224 -> k = 4 (stride 16), 112 -> 3 (stride 8), tiny -> the finest, huge -> the coarsest.
        assert_eq!(pooler.assign_levels(&boxes), vec![2, 1, 0, 3]);
        assert!(MultiScaleRoiAlign::new(&[8, 4], (7, 7), 2, true).is_err());
        assert!(MultiScaleRoiAlign::new(&[4], (7, 7), 0, true).is_err());
    }
}
