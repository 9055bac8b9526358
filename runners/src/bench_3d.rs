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

use anyhow::{Context, Result};
use medssl_core::bench::peak_rss_mib;
use medssl_core::config::{OptimizerConfig, Section};
use medssl_core::encoder::{Encoder, EncoderShape, SpatialDims};
use medssl_core::head::{HeadInput, HeadShape, Prediction};
use medssl_core::objective::{ObjectiveShape, Progress, StepInput, VolumeCrops};
use medssl_core::optim::Optimizer;
use medssl_core::registry;
use medssl_core::sliding_window::{sliding_window_inference, SlidingWindowConfig};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

use crate::bench_ssl::summarise;

/// What both benchmarks report.
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
    pub size: i64,
    /// The window side (sliding-window only).
    pub window: Option<i64>,
    pub parameters: i64,
    pub device: String,
    pub threads: i32,
}

/// The default `vit3d` (MONAI's ViT-B/16) on `size^3` inputs.
fn vit(root: &nn::Path, size: i64) -> Result<Box<dyn Encoder>> {
    let entry = registry::encoders().get("vit3d")?;
    let section = Section::inline("encoder", "vit3d", &format!("img_size = [{size}, {size}, {size}]"))?;
    (entry.build)(&section, root / "encoder", &EncoderShape { in_channels: 1 }).context("building vit3d")
}

fn parameters(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

pub fn reconstruction_step(batch: i64, size: i64, warmup: usize, steps: usize, device: Device) -> Result<Report> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let encoder = vit(&root, size)?;
    let level = encoder.levels().last().context("vit3d declares its levels")?;
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
    let entry = registry::objectives().get("reconstruction")?;
    let section = Section::inline("objectives.recon", "reconstruction", "")?;
    let mut objective = (entry.build)(&section, &root / "objectives" / "recon", &shape)?;
    let optimizer_cfg = OptimizerConfig {
        name: "adamw".into(),
        lr: 1e-4,
        weight_decay: 0.0,
        ..Default::default()
    };
    let trainable = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let mut optimizer = Optimizer::new(&optimizer_cfg, trainable)?;
    let crops = vec![Tensor::rand([batch, 1, size, size, size], (Kind::Float, device))];
    let ids = Tensor::arange(batch, (Kind::Int64, device));
    let encode = |x: &Tensor| Ok(encoder.forward(x, true));
    let mut times = Vec::new();
    for step in 0..warmup + steps {
        let started = Instant::now();
        let input = StepInput {
            ids: &ids,
            slice_views: None,
            global_slice_views: 0,
            volume_views: None,
            slice_sequence: None,
            volume_crops: Some(VolumeCrops {
                crops: &crops,
                encode: &encode,
            }),
        };
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
        let _ = loss.total.double_value(&[]);
        if step >= warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (median, min, max) = summarise(&mut times);
    Ok(Report {
        bench: "reconstruction-step",
        ms_per_step: median,
        min_ms: min,
        max_ms: max,
        peak_rss_mb: peak_rss_mib(),
        steps,
        batch,
        size,
        window: None,
        parameters: parameters(&vs),
        device: format!("{device:?}"),
        threads: tch::get_num_threads(),
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
    let (median, min, max) = summarise(&mut times);
    Ok(Report {
        bench: "sliding-window",
        ms_per_step: median,
        min_ms: min,
        max_ms: max,
        peak_rss_mb: peak_rss_mib(),
        steps: times.len(),
        batch: 1,
        size: volume,
        window: Some(window),
        parameters: parameters(&vs),
        device: format!("{device:?}"),
        threads: tch::get_num_threads(),
    })
}
