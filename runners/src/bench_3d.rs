//! Benchmarks of native 3D pre-training and inference, each the twin of a PyTorch/MONAI
//! script under benchmarks/ (docs/benchmarks.md says how they are compared):
//! - `medssl bench reconstruction-step`: one training step of the `reconstruction` objective
//!   with the `vit3d` encoder (ViT-B/16 by default) on `batch` random crops of `size^3`: both
//!   corrupted copies, the encoder on the two as one batch, the decoder, the loss, backward and
//!   an Adam step (benchmarks/reconstruction_step.py does the same with MONAI's `ViTAutoEnc`).
//!   The corruptions are drawn inside the step (the objective owns them); the twin draws them
//!   before its timer, so medssl's times include work MONAI's exclude.
//! - `medssl bench sliding-window`: UNETR (`vit3d` + `unetr`, 14 classes) over a `volume^3`
//!   volume by windows of `window^3` (benchmarks/sliding_window.py: MONAI's UNETR and
//!   `sliding_window_inference`).
//! - `medssl bench voco-step`: one training step of the `voco` objective (its defaults: v2's
//!   loss, 2 random crops a region, 1024-wide student and EMA-teacher heads) with `swin3d`
//!   (MONAI's SwinUNETR encoder, `use_v2` as VoCo trains it, feature size 48 by default) on
//!   `batch` random regions of `size x grid·size x grid·size` (D, H, W): the crops cut and
//!   augmented, all of them through the encoder as one batch, both heads, intra + inter +
//!   regulariser, backward and an AdamW step with amsgrad (benchmarks/voco_step.py does the
//!   same with MONAI's `SwinUNETR(...).swinViT` and a PyTorch twin of the loss).

use anyhow::{Context, Result};
use medssl_core::bench::peak_rss_mib;
use medssl_core::config::{OptimizerConfig, Section};
use medssl_core::encoder::{Encoder, EncoderShape, SpatialDims};
use medssl_core::head::{HeadInput, HeadShape, Prediction};
use medssl_core::objective::{Objective, ObjectiveShape, Progress, StepInput};
use medssl_core::optim::Optimizer;
use medssl_core::registry;
use medssl_core::sliding_window::{sliding_window_inference, SlidingWindowConfig};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

use crate::bench_ssl::summarise;

/// What every benchmark here reports; each sets the fields of its own settings and leaves
/// the others out of the JSON.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub bench: &'static str,
    /// Median over the timed repetitions.
    pub ms_per_step: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// The process's peak resident memory in MiB (the name for the field).
    pub peak_rss_mb: Option<f64>,
    pub steps: usize,
    pub batch: i64,
    /// The crop side (the volume side for sliding-window).
    pub size: i64,
    /// The window side (sliding-window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<i64>,
    /// Base crops along H and along W of each region (voco-step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grid: Option<i64>,
    /// The encoder's width (voco-step: `swin3d`'s `feature_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_size: Option<i64>,
    /// Floating-point variables: parameters, and frozen ones such as an EMA teacher; integer
    /// buffers (`swin3d`'s `relative_position_index`) are not counted, as PyTorch's
    /// `parameters()` does not count buffers.
    pub parameters: i64,
    pub device: String,
    pub threads: i32,
}

impl Report {
    /// The report of `times` (ms, sorted here) with the settings every benchmark has.
    fn new(bench: &'static str, times: &mut [f64], batch: i64, size: i64, vs: &nn::VarStore) -> Report {
        let (median, min, max) = summarise(times);
        Report {
            bench,
            ms_per_step: median,
            min_ms: min,
            max_ms: max,
            peak_rss_mb: peak_rss_mib(),
            steps: times.len(),
            batch,
            size,
            window: None,
            grid: None,
            feature_size: None,
            parameters: vs
                .variables()
                .values()
                .filter(|t| t.is_floating_point())
                .map(|t| t.numel() as i64)
                .sum(),
            device: format!("{:?}", vs.device()),
            threads: tch::get_num_threads(),
        }
    }
}

/// The default `vit3d` (MONAI's ViT-B/16) on `size^3` inputs.
fn vit(root: &nn::Path, size: i64) -> Result<Box<dyn Encoder>> {
    let entry = registry::encoders().get("vit3d")?;
    let section = Section::inline("encoder", "vit3d", &format!("img_size = [{size}, {size}, {size}]"))?;
    (entry.build)(&section, root / "encoder", &EncoderShape { in_channels: 1 }).context("building vit3d")
}

/// Objective `name` (its defaults, then `config`) over `encoder`, for a step of `batch`
/// one-channel volumes with one crop each.
fn objective(
    root: &nn::Path,
    name: &str,
    config: &str,
    encoder: &dyn Encoder,
    batch: i64,
) -> Result<Box<dyn Objective>> {
    let level = encoder.levels().last().context("the encoder declares its levels")?;
    let shape = ObjectiveShape {
        spatial_dims: SpatialDims::Three,
        in_channels: 1,
        deepest_level: (level.channels, level.stride),
        levels: encoder.levels().to_vec(),
        input_size: encoder.input_size(),
        slice_dim: encoder.embedding_dim(),
        volume_dim: Some(encoder.embedding_dim()),
        sequence_dim: None,
        num_samples: batch as usize,
        global_slice_views: 0,
        local_slice_views: 0,
        volume_views: 1,
        seed: 0,
    };
    let entry = registry::objectives().get(name)?;
    let section = Section::inline(&format!("objectives.{name}"), name, config)?;
    (entry.build)(&section, root / "objectives" / name, &shape).with_context(|| format!("building {name}"))
}

/// The times (ms) of `steps` training steps after `warmup` untimed ones, each the
/// objective's loss on `crops` (it cuts or corrupts them itself), backward and an `optimizer`
/// step at lr 1e-4 over every trainable variable of `vs`. Each step is its own epoch, so an
/// objective that draws per epoch draws afresh every step.
fn training_steps(
    vs: &nn::VarStore,
    encoder: &dyn Encoder,
    objective: &mut dyn Objective,
    optimizer: &OptimizerConfig,
    crops: &[Tensor],
    warmup: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    let trainable = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let mut optimizer = Optimizer::new(optimizer, trainable)?;
    let batch = crops.first().context("a step needs crops")?.size()[0];
    let ids = Tensor::arange(batch, (Kind::Int64, vs.device()));
    let encode = |x: &Tensor| Ok(encoder.forward(x, true));
    let mut times = Vec::new();
    for step in 0..warmup + steps {
        let started = Instant::now();
        let input = StepInput::volume_crops(&ids, crops, &encode);
        let progress = Progress {
            epoch: step,
            step,
            steps_per_epoch: 1,
        };
        let loss = objective.loss(&input, &progress)?;
        optimizer.zero_grad();
        loss.total.backward();
        optimizer.step(1e-4);
        // The step is done when its last update is.
        let value = loss.total.double_value(&[]);
        anyhow::ensure!(value.is_finite(), "the loss is {value} at step {step}");
        if step >= warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

pub fn reconstruction_step(batch: i64, size: i64, warmup: usize, steps: usize, device: Device) -> Result<Report> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let encoder = vit(&root, size)?;
    let mut objective = objective(&root, "reconstruction", "", encoder.as_ref(), batch)?;
    let adam = OptimizerConfig {
        name: "adamw".into(),
        lr: 1e-4,
        weight_decay: 0.0,
        ..Default::default()
    };
    let crops = vec![Tensor::rand([batch, 1, size, size, size], (Kind::Float, device))];
    let mut times = training_steps(&vs, encoder.as_ref(), objective.as_mut(), &adam, &crops, warmup, steps)?;
    Ok(Report::new("reconstruction-step", &mut times, batch, size, &vs))
}

/// What `medssl bench voco-step` varies; its defaults are the objective's and the encoder's
/// (configs/paper/voco.toml): 2 volumes, 3 x 3 base crops of 64^3, feature size 48.
#[derive(Debug, Clone, Copy)]
pub struct VocoStepSettings {
    /// Volumes a step, one region each.
    pub batch: i64,
    /// Side of a base crop, and the region's depth.
    pub crop: i64,
    /// Base crops along H and along W.
    pub grid: i64,
    /// `swin3d`'s `feature_size`.
    pub feature_size: i64,
}

pub fn voco_step(settings: VocoStepSettings, warmup: usize, steps: usize, device: Device) -> Result<Report> {
    let VocoStepSettings {
        batch,
        crop,
        grid,
        feature_size,
    } = settings;
    anyhow::ensure!(
        batch >= 1 && crop >= 1 && grid >= 1 && grid * grid >= 2 && feature_size >= 1,
        "bench voco-step: --batch, --crop and --feature-size must be at least 1 and --grid at least 2, got {settings:?}"
    );
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let entry = registry::encoders().get("swin3d")?;
    let section = Section::inline(
        "encoder",
        "swin3d",
        &format!("feature_size = {feature_size}\nuse_v2 = true"),
    )?;
    let encoder =
        (entry.build)(&section, &root / "encoder", &EncoderShape { in_channels: 1 }).context("building swin3d")?;
    let mut objective = objective(
        &root,
        "voco",
        &format!("grid = [{grid}, {grid}]"),
        encoder.as_ref(),
        batch,
    )?;
    // The repository's optimizer (configs/paper/voco.toml).
    let adamw = OptimizerConfig {
        name: "adamw".into(),
        lr: 1e-4,
        amsgrad: true,
        weight_decay: 0.01,
        ..Default::default()
    };
    let side = grid * crop;
    let base = objective.encoder_input_size(&[crop, side, side])?;
    encoder
        .check_input_size(&base)
        .with_context(|| format!("bench voco-step: --crop {crop} gives base crops of {base:?} voxels"))?;
    let crops = vec![Tensor::rand([batch, 1, crop, side, side], (Kind::Float, device))];
    let mut times = training_steps(&vs, encoder.as_ref(), objective.as_mut(), &adamw, &crops, warmup, steps)?;
    Ok(Report {
        grid: Some(grid),
        feature_size: Some(feature_size),
        ..Report::new("voco-step", &mut times, batch, crop, &vs)
    })
}

pub fn sliding_window(volume: i64, window: i64, overlap: f64, repeats: usize, device: Device) -> Result<Report> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let encoder = vit(&root, window)?;
    let shape = HeadShape {
        in_channels: 1,
        spatial_dims: SpatialDims::Three,
        levels: encoder.levels().to_vec(),
        embedding_dim: encoder.embedding_dim(),
        volume_dim: Some(encoder.embedding_dim()),
        num_classes: 14,
    };
    let entry = registry::heads().get("unetr")?;
    let head = (entry.build)(&Section::inline("head", "unetr", "")?, &root / "head", &shape)?;
    let x = Tensor::rand([1, 1, volume, volume, volume], (Kind::Float, device));
    let config = SlidingWindowConfig {
        overlap,
        ..Default::default()
    };
    let mut times = Vec::new();
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        let out = tch::no_grad(|| {
            sliding_window_inference(&x, &[window; 3], &config, |w| {
                let features = encoder.forward(w, false);
                let input = HeadInput {
                    encoder: &features,
                    volume: None,
                    image_size: [window, window],
                    images: Some(w),
                };
                match head.predict(&input)? {
                    Prediction::Logits(logits) => Ok(logits),
                    Prediction::Detections(_) => anyhow::bail!("unetr predicted boxes"),
                }
            })
        })?;
        let _ = out.sum(Kind::Double).double_value(&[]);
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Report {
        window: Some(window),
        ..Report::new("sliding-window", &mut times, 1, volume, &vs)
    })
}
