//! `medssl embed`: a run's frozen features of any readable set, as `medssl eval` computes
//! them (VISSL's `extract_features`): the same reader, the same resizing, the same backbone
//! loaded the same way, and the same encoding (`features::encode`); only the probe is left
//! out, and labels are optional.

use super::features::{encode, open_set, Encoding, Input};
use super::{load_run, pretrained_backbone, DataSpec, SetInfo};
use crate::precision::Precision;
use anyhow::{ensure, Result};
use serde::Serialize;
use std::path::PathBuf;
use tch::Tensor;

/// What a row of the embeddings is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The encoder's pooled embedding of each 2D image, or of each real slice of a volume.
    Slice,
    /// What `medssl eval` uses for a volume: the aggregator's volume embedding (the mean of
    /// the slices' without one), or a 3D encoder's pooled embedding.
    Volume,
}

/// What `medssl embed` was asked.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// A run directory, a checkpoint folder or its `tensors.safetensors`.
    pub checkpoint: PathBuf,
    /// The run's resolved config (default: the run directory's `config.toml`).
    pub config: Option<PathBuf>,
    /// The set (`split`: default `train`, for readers with splits).
    pub data: DataSpec,
    /// Its reader (default: recognised from the path).
    pub format: Option<String>,
    /// Default: `slice` for a set of 2D images, `volume` for volumes (what eval uses).
    pub level: Option<Level>,
    pub batch_size: usize,
    pub device: String,
    pub precision: Precision,
}

/// The embeddings of a set and what each row is.
pub struct Embeddings {
    /// `[N, E]` f32 on the CPU.
    pub features: Tensor,
    /// Each row's sample, as its reader describes it (with ` slice T` at slice level for a
    /// volume set: T counts the run's resized slice sequence).
    pub ids: Vec<String>,
    /// Each row's class label, where every sample of the set has one.
    pub labels: Option<Vec<i64>>,
    pub level: Level,
    pub set: SetInfo,
    /// The tensors file and its global step.
    pub checkpoint: String,
    pub step: Option<usize>,
}

/// Computes the embeddings `options` describes.
pub fn embed(options: &EmbedOptions) -> Result<Embeddings> {
    ensure!(options.batch_size >= 1, "--batch-size must be at least 1");
    let (cfg, located, device) = load_run(
        &options.checkpoint,
        options.config.as_deref(),
        &options.device,
        options.precision,
        false,
    )?;
    let views = cfg.run.data.views.resolved()?;
    let (dataset, set) = open_set(&options.data, options.format.as_deref(), "data", "train")?;
    let backbone = pretrained_backbone(&cfg, &located, device, false)?;
    let settings = Encoding {
        views: &views,
        batch_size: options.batch_size,
        workers: cfg.run.data.loader.workers.max(1),
        device,
        precision: options.precision,
        raw: false,
        labelled: false,
        per_slice: options.level == Some(Level::Slice),
    };
    let mut encoded = encode(dataset.as_ref(), "--data", &[&backbone], &settings)?;
    let level = match (options.level, encoded.input) {
        (Some(Level::Volume), Input::Image) => anyhow::bail!(
            "--level volume: `{}` holds 2D images; their embeddings are slice-level (--level slice)",
            set.path
        ),
        (Some(level), _) => level,
        (None, Input::Image) => Level::Slice,
        (None, Input::Volume) => Level::Volume,
    };
    let mut set = set;
    if encoded.labels.iter().all(|&l| l >= 0) {
        let classes = encoded.labels.iter().copied().max().map_or(0, |m| m + 1);
        set.class_counts = super::class_counts(&encoded.labels, classes);
    }
    let ids = encoded
        .rows
        .iter()
        .map(|&(index, slice)| match slice {
            Some(t) => format!("{} slice {t}", dataset.describe(index)),
            None => dataset.describe(index),
        })
        .collect();
    let labels = encoded
        .labels
        .iter()
        .all(|&l| l >= 0)
        .then(|| encoded.rows.iter().map(|&(index, _)| encoded.labels[index]).collect());
    Ok(Embeddings {
        features: encoded.features.swap_remove(0),
        ids,
        labels,
        level,
        set,
        checkpoint: located.tensors.display().to_string(),
        step: located.step,
    })
}
