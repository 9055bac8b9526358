//! Augmented views of slices and volumes.
//!
//! A 2D view is a random resized crop of one slice (or image) with flips, intensity jitter
//! and noise, as in SimCLR / SwAV multi-crop. A 3D view crops a window along the slice axis
//! and one in-plane region applied to every slice of the window, so the geometric and
//! intensity transforms are consistent across the slices of a view (the paper's volume
//! views, Sec. 3.3). Every parameter is drawn from a generator seeded by
//! (seed, epoch, sample id, view): nothing is cached, so no two epochs repeat a view.

use crate::resize::resize_linear;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ViewConfig {
    /// Number of global 2D views of a slice per sample (for slice-level objectives).
    pub slice_views: usize,
    /// Side of a global 2D view, in pixels.
    pub slice_size: i64,
    /// Number of local (small) 2D views per sample: SwAV's multi-crop (Caron et al. 2020,
    /// Sec. 3.2). They follow the global views in every batch.
    pub local_views: usize,
    /// Side of a local view.
    pub local_size: i64,
    /// Area range of a local view's crop.
    pub local_crop_scale: [f64; 2],
    /// Number of 3D views per volume (for volume-level objectives).
    pub volume_views: usize,
    /// Slices in a 3D view and in the un-augmented slice sequence.
    pub volume_slices: i64,
    /// In-plane side of a 3D view.
    pub volume_size: i64,
    /// Range of the crop's area as a fraction of the slice (random resized crop).
    pub crop_scale: [f64; 2],
    /// Range of the fraction of the slice axis a 3D view's window covers.
    pub depth_scale: [f64; 2],
    /// How a window of slices becomes `volume_slices`: `resample` (trilinear along the
    /// slice axis) or `crop_or_pad` (keep slices as they are: windows longer than
    /// `volume_slices` are cropped, shorter ones padded with zero slices that the validity
    /// mask marks, so the aggregator ignores them).
    pub depth_mode: DepthMode,
    /// Probability of each flip (horizontal, vertical).
    pub flip: f64,
    /// Contrast jitter: intensities are multiplied by a factor in [1 - c, 1 + c].
    pub contrast: f64,
    /// Brightness jitter: a shift in [-b, b] (intensities are roughly unit-scaled).
    pub brightness: f64,
    /// Standard deviation of added Gaussian noise.
    pub noise: f64,
    /// Gamma jitter: intensities, rescaled to [0, 1] within the view, are raised to a power
    /// in [1 / (1 + g), 1 + g] and mapped back (0: off).
    pub gamma: f64,
    /// Probability of a Gaussian blur of a 2D view (sigma uniform in `blur_sigma`), as in
    /// SimCLR and SwAV.
    pub blur: f64,
    pub blur_sigma: [f64; 2],
    /// Largest in-plane rotation, in degrees; a 3D view rotates all its slices alike.
    pub rotation: f64,
    /// Side (D, H, W) of a 3D crop, the view a 3D encoder sees: `volume_views` crops per
    /// volume ([`crate::volume_crops`]). Must equal a fixed-size encoder's input (a ViT's
    /// `img_size`).
    pub crop_size: [i64; 3],
    /// Voxel spacing in mm (D, H, W) that every volume is resampled to, from its file's header
    /// (MONAI's `Spacing`): the default `target_spacing` of each `[data.sources.*]`.
    pub spacing_mm: Option<[f64; 3]>,
    /// Intensity window `[lo, hi]` mapped onto [0, 1] before cropping (MONAI's
    /// `ScaleIntensityRange` with clipping), e.g. Hounsfield units of CT: pair it with the
    /// reader's `normalize = "none"`, so that the window sees raw values.
    pub clip: Option<[f64; 2]>,
    /// Cut each volume to the bounding box of its voxels above this value before cropping
    /// (MONAI's `CropForeground`, whose default keeps voxels > 0).
    pub foreground_threshold: Option<f64>,
    /// Probability of a 3D crop's flip along each axis.
    pub crop_flip: f64,
    /// Probability of a 3D crop's rotation by 90, 180 or 270 degrees in the (H, W) plane
    /// (needs `crop_size` H = W).
    pub crop_rotate90: f64,
    /// `"swav"` sets SwAV's multi-crop (2 x 224 px global crops of scale [0.14, 1], 6 x 96 px
    /// local crops of scale [0.05, 0.14], blur 0.5); keys given beside it are ignored in
    /// favour of the preset's.
    pub preset: Option<String>,
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig {
            slice_views: 2,
            slice_size: 64,
            local_views: 0,
            local_size: 32,
            local_crop_scale: [0.05, 0.4],
            volume_views: 2,
            volume_slices: 16,
            volume_size: 64,
            crop_scale: [0.4, 1.0],
            depth_scale: [0.6, 1.0],
            depth_mode: DepthMode::Resample,
            flip: 0.5,
            contrast: 0.2,
            brightness: 0.1,
            noise: 0.02,
            gamma: 0.0,
            blur: 0.0,
            blur_sigma: [0.1, 2.0],
            rotation: 0.0,
            crop_size: [96, 96, 96],
            spacing_mm: None,
            clip: None,
            foreground_threshold: None,
            crop_flip: 0.0,
            crop_rotate90: 0.0,
            preset: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DepthMode {
    Resample,
    CropOrPad,
}

/// A 3D view or sequence `[1, T, S, S]` and which of its T slices are real `[T]` (bool).
pub struct SliceStack {
    pub voxels: Tensor,
    pub valid: Tensor,
}

impl ViewConfig {
    /// The config with its preset, if any, applied.
    pub fn resolved(&self) -> anyhow::Result<ViewConfig> {
        match self.preset.as_deref() {
            None => Ok(self.clone()),
            Some("swav") => Ok(ViewConfig {
                slice_views: 2,
                slice_size: 224,
                crop_scale: [0.14, 1.0],
                local_views: 6,
                local_size: 96,
                local_crop_scale: [0.05, 0.14],
                blur: 0.5,
                preset: None,
                ..self.clone()
            }),
            Some(other) => anyhow::bail!("config key `data.views.preset`: unknown preset `{other}`; known: swav"),
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let in_unit = |r: [f64; 2]| 0.0 < r[0] && r[0] <= r[1] && r[1] <= 1.0;
        anyhow::ensure!(
            in_unit(self.crop_scale),
            "data.views.crop_scale must satisfy 0 < min <= max <= 1, got {:?}",
            self.crop_scale
        );
        anyhow::ensure!(
            in_unit(self.depth_scale),
            "data.views.depth_scale must satisfy 0 < min <= max <= 1, got {:?}",
            self.depth_scale
        );
        anyhow::ensure!(
            in_unit(self.local_crop_scale),
            "data.views.local_crop_scale must satisfy 0 < min <= max <= 1, got {:?}",
            self.local_crop_scale
        );
        anyhow::ensure!(
            self.local_views == 0 || self.local_size >= 8,
            "data.views.local_size must be at least 8"
        );
        anyhow::ensure!(
            self.slice_size >= 8 && self.volume_size >= 8,
            "data.views.slice_size and volume_size must be at least 8"
        );
        anyhow::ensure!(self.volume_slices >= 1, "data.views.volume_slices must be at least 1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.blur) && self.blur_sigma[0] > 0.0 && self.blur_sigma[0] <= self.blur_sigma[1],
            "data.views.blur must be a probability and blur_sigma a positive range, got {} and {:?}",
            self.blur,
            self.blur_sigma
        );
        anyhow::ensure!(
            self.gamma >= 0.0 && self.rotation >= 0.0,
            "data.views.gamma and rotation must be >= 0"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.flip),
            "data.views.flip is a probability, got {}",
            self.flip
        );
        anyhow::ensure!(
            self.crop_size.iter().all(|&s| s >= 1),
            "config key `data.views.crop_size` must be at least 1 voxel along each axis, got {:?}",
            self.crop_size
        );
        if let Some(s) = self.spacing_mm {
            anyhow::ensure!(
                s.iter().all(|v| v.is_finite() && *v > 0.0),
                "config key `data.views.spacing_mm` must be positive, got {s:?}"
            );
        }
        if let Some([lo, hi]) = self.clip {
            anyhow::ensure!(
                lo.is_finite() && hi.is_finite() && lo < hi,
                "config key `data.views.clip` must be [lo, hi] with lo < hi, got [{lo}, {hi}]"
            );
        }
        for (key, p) in [("crop_flip", self.crop_flip), ("crop_rotate90", self.crop_rotate90)] {
            anyhow::ensure!(
                (0.0..=1.0).contains(&p),
                "config key `data.views.{key}` is a probability, got {p}"
            );
        }
        anyhow::ensure!(
            self.crop_rotate90 == 0.0 || self.crop_size[1] == self.crop_size[2],
            "config key `data.views.crop_rotate90` rotates crops in the (H, W) plane, which needs a square crop, but `data.views.crop_size` is {:?}",
            self.crop_size
        );
        Ok(())
    }

    /// The settings of 3D crops.
    pub fn crop_settings(&self) -> crate::volume_crops::CropSettings {
        crate::volume_crops::CropSettings {
            size: self.crop_size,
            clip: self.clip,
            foreground_threshold: self.foreground_threshold,
            flip: self.crop_flip,
            rotate90: self.crop_rotate90,
        }
    }
}

/// An in-plane crop box (top, left, height, width), drawn like torchvision's
/// RandomResizedCrop: area fraction from `scale`, aspect ratio log-uniform in [3/4, 4/3].
fn crop_box(rng: &mut ChaCha8Rng, h: i64, w: i64, scale: [f64; 2]) -> (i64, i64, i64, i64) {
    let area = (h * w) as f64;
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let ratio = rng.random_range((0.75f64).ln()..=(4.0f64 / 3.0).ln()).exp();
        let cw = (target * ratio).sqrt().round() as i64;
        let ch = (target / ratio).sqrt().round() as i64;
        if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
            return (rng.random_range(0..=h - ch), rng.random_range(0..=w - cw), ch, cw);
        }
    }
    (0, 0, h, w)
}

/// Intensity jitter and noise, drawn from `rng` (never from libtorch's global generator,
/// which loader threads share).
fn jitter(x: Tensor, rng: &mut ChaCha8Rng, cfg: &ViewConfig) -> Tensor {
    let x = if cfg.gamma > 0.0 {
        let power = rng.random_range((1.0 / (1.0 + cfg.gamma))..=(1.0 + cfg.gamma));
        let (lo, hi) = (x.min().double_value(&[]), x.max().double_value(&[]));
        if hi > lo {
            ((&x - lo) / (hi - lo)).pow_tensor_scalar(power) * (hi - lo) + lo
        } else {
            x
        }
    } else {
        x
    };
    let contrast = 1.0 + rng.random_range(-cfg.contrast..=cfg.contrast);
    let brightness = rng.random_range(-cfg.brightness..=cfg.brightness);
    let mut x = x * contrast + brightness;
    if cfg.noise > 0.0 {
        let n = x.numel();
        // Ziggurat sampling (Box-Muller's log and cos per voxel were half of the loader's
        // time), from a xoshiro stream seeded by the view's generator: ChaCha's refills
        // were a fifth of the noise's cost (perf, `medssl bench loader`), and a noise field
        // needs no cryptographic strength.
        let sigma = cfg.noise as f32;
        let mut stream = Xoshiro256PlusPlus::seed_from_u64(rng.random());
        let noise: Vec<f32> = (0..n)
            .map(|_| stream.sample::<f32, _>(StandardNormal) * sigma)
            .collect();
        // Drawn on the host (a seeded Rust stream, so views do not depend on libtorch's
        // generator) and handed to `x`'s device: the loader's CPU, or wherever a caller runs.
        x += Tensor::from_slice(&noise)
            .view(x.size().as_slice())
            .to_device(x.device());
    }
    x
}

fn flips(x: Tensor, rng: &mut ChaCha8Rng, p: f64) -> Tensor {
    let dims = x.dim() as i64;
    let mut x = x;
    if rng.random_bool(p) {
        x = x.flip([dims - 1]);
    }
    if rng.random_bool(p) {
        x = x.flip([dims - 2]);
    }
    x
}

/// Rotates every slice of `x` `[1, T, S, S]` by the same random angle in
/// [-rotation, rotation] degrees (bilinear, reflected borders).
fn rotate(x: Tensor, rng: &mut ChaCha8Rng, max_degrees: f64) -> Tensor {
    if max_degrees <= 0.0 {
        return x;
    }
    let angle = rng.random_range(-max_degrees..=max_degrees).to_radians();
    let size = x.size();
    let (t, h, w) = (size[1], size[2], size[3]);
    let (c, s) = (angle.cos() as f32, angle.sin() as f32);
    let theta = Tensor::from_slice(&[c, -s, 0.0, s, c, 0.0])
        .to_device(x.device())
        .view([1, 2, 3])
        .repeat([t, 1, 1]);
    let grid = Tensor::affine_grid_generator(&theta, [t, 1, h, w], false);
    x.view([t, 1, h, w])
        .grid_sampler_2d(&grid, 0, 2, false)
        .view([1, t, h, w])
}

/// Gaussian blur of `x` `[1, S, S]` with a random sigma, with probability `cfg.blur`.
fn blur(x: Tensor, rng: &mut ChaCha8Rng, cfg: &ViewConfig) -> Tensor {
    if cfg.blur <= 0.0 || !rng.random_bool(cfg.blur) {
        return x;
    }
    let sigma = rng.random_range(cfg.blur_sigma[0]..=cfg.blur_sigma[1]);
    let radius = (3.0 * sigma).ceil().max(1.0) as i64;
    let taps: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let total: f32 = taps.iter().sum();
    let kernel = Tensor::from_slice(&taps.iter().map(|v| v / total).collect::<Vec<_>>()).to_device(x.device());
    let k = 2 * radius + 1;
    let size = x.size();
    let (h, w) = (size[1], size[2]);
    // Separable: rows then columns, reflected borders.
    let padded = x.view([1, 1, h, w]).reflection_pad2d([radius, radius, radius, radius]);
    let rows = padded.conv2d(&kernel.view([1, 1, 1, k]), None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
    let both = rows.conv2d(&kernel.view([1, 1, k, 1]), None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
    both.view([1, h, w])
}

/// The size and crop scale of 2D view `view`: global views first, then local ones.
pub fn slice_view_geometry(cfg: &ViewConfig, view: usize) -> (i64, [f64; 2]) {
    if view < cfg.slice_views {
        (cfg.slice_size, cfg.crop_scale)
    } else {
        (cfg.local_size, cfg.local_crop_scale)
    }
}

/// 2D view number `view` `[1, S, S]` of slice `index` of `volume` `[D, H, W]`: a global
/// view for `view < slice_views`, else a local one.
pub fn slice_view(volume: &Tensor, index: i64, view: usize, rng: &mut ChaCha8Rng, cfg: &ViewConfig) -> Tensor {
    let (_, h, w) = volume.size3().expect("volume is [D, H, W]");
    let (size, scale) = slice_view_geometry(cfg, view);
    let (top, left, ch, cw) = crop_box(rng, h, w, scale);
    let crop = volume.get(index).narrow(0, top, ch).narrow(1, left, cw);
    let resized = resize_linear(&crop.unsqueeze(0), [1, size, size]);
    let x = flips(resized, rng, cfg.flip);
    let x = rotate(x.unsqueeze(0), rng, cfg.rotation).squeeze_dim(0);
    let x = blur(x, rng, cfg);
    jitter(x, rng, cfg).to_kind(Kind::Float)
}

/// A 3D view of `volume` `[D, H, W]`: one window along the slice axis, one in-plane crop,
/// one flip and one intensity jitter for all its slices.
pub fn volume_view(volume: &Tensor, rng: &mut ChaCha8Rng, cfg: &ViewConfig) -> SliceStack {
    let (d, h, w) = volume.size3().expect("volume is [D, H, W]");
    let depth = ((d as f64 * rng.random_range(cfg.depth_scale[0]..=cfg.depth_scale[1])).round() as i64).clamp(1, d);
    let depth = match cfg.depth_mode {
        DepthMode::Resample => depth,
        DepthMode::CropOrPad => depth.min(cfg.volume_slices),
    };
    let start = rng.random_range(0..=d - depth);
    let (top, left, ch, cw) = crop_box(rng, h, w, cfg.crop_scale);
    let crop = volume.narrow(0, start, depth).narrow(1, top, ch).narrow(2, left, cw);
    let stack = fit_depth(&crop, cfg);
    let x = flips(stack.voxels, rng, cfg.flip);
    let x = rotate(x, rng, cfg.rotation);
    // Padding slices stay zero: jitter only the real ones.
    let x = jitter(x, rng, cfg) * stack.valid.view([1, -1, 1, 1]).to_kind(Kind::Float);
    SliceStack {
        voxels: x.to_kind(Kind::Float),
        valid: stack.valid,
    }
}

/// The whole volume as `volume_slices` slices (the centre ones under `crop_or_pad`),
/// without augmentation: the sequence that slice-sequence objectives (masked prediction)
/// read.
pub fn sequence_view(volume: &Tensor, cfg: &ViewConfig) -> SliceStack {
    let d = volume.size()[0];
    let window = match cfg.depth_mode {
        DepthMode::Resample => volume.shallow_clone(),
        DepthMode::CropOrPad => {
            let depth = d.min(cfg.volume_slices);
            volume.narrow(0, (d - depth) / 2, depth)
        }
    };
    fit_depth(&window, cfg)
}

/// A whole volume `[D, H, W]` as a backbone with an encoder of `dims` reads it, without
/// augmentation (evaluation, volume classification): the run's slice sequence
/// ([`sequence_view`]) for a 2D encoder; for a 3D one the volume windowed and cut to its
/// foreground as the run's crops are ([`crate::volume_crops::prepare`]) and resized to
/// `crop_size` (trilinear), every slice real.
pub fn whole_volume(volume: &Tensor, cfg: &ViewConfig, dims: crate::encoder::SpatialDims) -> SliceStack {
    match dims {
        crate::encoder::SpatialDims::Two => sequence_view(volume, cfg),
        crate::encoder::SpatialDims::Three => {
            let settings = crate::volume_crops::CropSettings {
                size: [1, 1, 1],
                ..cfg.crop_settings()
            };
            let (whole, _) = crate::volume_crops::prepare(volume, None, &settings);
            let [d, h, w] = cfg.crop_size;
            SliceStack {
                voxels: resize_linear(&whole, [d, h, w]).unsqueeze(0),
                valid: Tensor::ones([d], (Kind::Bool, volume.device())),
            }
        }
    }
}

/// `[D, H, W]` to `[1, T, S, S]`: in-plane always resized to S; along the slice axis
/// resampled to T, or (crop_or_pad, with D <= T) zero-padded at the end.
fn fit_depth(window: &Tensor, cfg: &ViewConfig) -> SliceStack {
    let (d, _, _) = window.size3().expect("volume is [D, H, W]");
    let (t, s) = (cfg.volume_slices, cfg.volume_size);
    let options = (Kind::Bool, window.device());
    match cfg.depth_mode {
        DepthMode::Resample => SliceStack {
            voxels: resize_linear(window, [t, s, s]).unsqueeze(0),
            valid: Tensor::ones([t], options),
        },
        DepthMode::CropOrPad => {
            let resized = resize_linear(window, [d, s, s]).unsqueeze(0);
            let voxels = resized.constant_pad_nd([0, 0, 0, 0, 0, t - d]);
            let valid = Tensor::cat(&[Tensor::ones([d], options), Tensor::zeros([t - d], options)], 0);
            SliceStack { voxels, valid }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;

    fn phantom() -> Tensor {
        Tensor::arange(6 * 20 * 24, (Kind::Float, tch::Device::Cpu)).view([6, 20, 24]) / 100.0
    }

    #[test]
    fn views_have_configured_shapes_and_are_reproducible() {
        let cfg = ViewConfig {
            slice_size: 16,
            volume_size: 12,
            volume_slices: 4,
            ..Default::default()
        };
        let v = phantom();
        let a = slice_view(&v, 2, 0, &mut rng::generator(1, &[0, 5, 0]), &cfg);
        let b = slice_view(&v, 2, 0, &mut rng::generator(1, &[0, 5, 0]), &cfg);
        let c = slice_view(&v, 2, 0, &mut rng::generator(1, &[1, 5, 0]), &cfg);
        assert_eq!(a.size(), vec![1, 16, 16]);
        let cfg_local = ViewConfig {
            local_views: 2,
            local_size: 8,
            ..cfg.clone()
        };
        let local = slice_view(&v, 2, 3, &mut rng::generator(1, &[0, 5, 3]), &cfg_local);
        assert_eq!(local.size(), vec![1, 8, 8], "views past slice_views are local");
        assert!(a.equal(&b), "same (seed, epoch, id, view) must give identical views");
        assert!(!a.equal(&c), "another epoch must give another view");
        let vol = volume_view(&v, &mut rng::generator(1, &[0, 5, 1]), &cfg);
        assert_eq!(vol.voxels.size(), vec![1, 4, 12, 12]);
        assert_eq!(sequence_view(&v, &cfg).voxels.size(), vec![1, 4, 12, 12]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn views_keep_their_shapes_stay_finite_and_repeat_for_the_same_coordinates(
            d in 1i64..6, h in 8i64..30, w in 8i64..30, epoch in 0u64..3, id in 0u64..50,
            size in 8i64..20, slices in 1i64..6, rotation in 0.0f64..30.0, blur in 0.0f64..1.0,
            gamma in 0.0f64..1.0, crop in proptest::bool::ANY,
        ) {
            let volume = Tensor::randn([d, h, w], (Kind::Float, tch::Device::Cpu));
            let cfg = ViewConfig {
                slice_size: size, local_views: 1, local_size: 8, volume_size: size, volume_slices: slices,
                rotation, blur, gamma,
                depth_mode: if crop { DepthMode::CropOrPad } else { DepthMode::Resample },
                ..Default::default()
            };
            for view in 0..3usize {
                let a = slice_view(&volume, d - 1, view, &mut rng::generator(5, &[epoch, id, view as u64]), &cfg);
                let b = slice_view(&volume, d - 1, view, &mut rng::generator(5, &[epoch, id, view as u64]), &cfg);
                let side = if view < 2 { size } else { 8 };
                proptest::prop_assert_eq!(a.size(), vec![1, side, side]);
                proptest::prop_assert!(a.equal(&b));
                proptest::prop_assert!(bool::try_from(a.isfinite().all()).unwrap());
            }
            let v = volume_view(&volume, &mut rng::generator(5, &[epoch, id, 1000]), &cfg);
            let again = volume_view(&volume, &mut rng::generator(5, &[epoch, id, 1000]), &cfg);
            proptest::prop_assert_eq!(v.voxels.size(), vec![1, slices, size, size]);
            proptest::prop_assert_eq!(v.valid.size(), vec![slices]);
            proptest::prop_assert!(v.voxels.equal(&again.voxels));
            proptest::prop_assert!(bool::try_from(v.voxels.isfinite().all()).unwrap());
            let real = i64::try_from(v.valid.sum(Kind::Int64)).unwrap();
            proptest::prop_assert!(real >= 1 && real <= slices);
        }
    }

    #[test]
    fn the_swav_preset_sets_its_multi_crop() {
        let cfg = ViewConfig {
            preset: Some("swav".into()),
            ..Default::default()
        }
        .resolved()
        .unwrap();
        assert_eq!(
            (cfg.slice_views, cfg.slice_size, cfg.local_views, cfg.local_size),
            (2, 224, 6, 96)
        );
        let err = ViewConfig {
            preset: Some("dino".into()),
            ..Default::default()
        }
        .resolved()
        .unwrap_err()
        .to_string();
        assert!(err.contains("data.views.preset") && err.contains("dino"), "{err}");
    }

    #[test]
    fn blur_smooths_and_rotation_by_zero_is_the_identity() {
        let x = Tensor::randn([1, 16, 16], (Kind::Float, tch::Device::Cpu));
        let cfg = ViewConfig {
            blur: 1.0,
            blur_sigma: [1.5, 1.5],
            ..Default::default()
        };
        let blurred = blur(x.shallow_clone(), &mut rng::generator(0, &[0]), &cfg);
        let roughness = |t: &Tensor| {
            (t.narrow(2, 1, 15) - t.narrow(2, 0, 15))
                .abs()
                .mean(Kind::Float)
                .double_value(&[])
        };
        assert!(roughness(&blurred) < 0.5 * roughness(&x));
        let y = x.unsqueeze(0);
        assert!(rotate(y.shallow_clone(), &mut rng::generator(0, &[0]), 0.0).equal(&y));
    }

    #[test]
    fn crop_or_pad_keeps_slices_and_marks_padding() {
        let v = phantom(); // 6 slices
        let cfg = ViewConfig {
            volume_size: 12,
            volume_slices: 8,
            depth_mode: DepthMode::CropOrPad,
            depth_scale: [1.0, 1.0],
            ..Default::default()
        };
        let seq = sequence_view(&v, &cfg);
        assert_eq!(seq.voxels.size(), vec![1, 8, 12, 12]);
        assert_eq!(
            Vec::<bool>::try_from(&seq.valid).unwrap(),
            [true, true, true, true, true, true, false, false]
        );
        assert_eq!(seq.voxels.narrow(1, 6, 2).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let view = volume_view(&v, &mut rng::generator(1, &[0, 5, 1]), &cfg);
        assert_eq!(
            view.voxels.narrow(1, 6, 2).abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "padding stays zero after jitter"
        );
        // A longer volume is cropped to T real slices.
        let cfg = ViewConfig {
            volume_slices: 4,
            ..cfg
        };
        let seq = sequence_view(&v, &cfg);
        assert!(bool::try_from(seq.valid.all()).unwrap());
        assert_eq!(seq.voxels.size(), vec![1, 4, 12, 12]);
    }
}
