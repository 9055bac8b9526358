//! The config of `medssl finetune`, layered like a pre-training config: built-in defaults <
//! the file < `MEDSSL_` environment variables < `--set` (and the command's own flags, which
//! are `--set`s of the keys they name).
//!
//! The backbone's architecture is not here: it is the pre-training run's (its resolved
//! `config.toml`), so the pre-trained and the scratch rows fine-tune the same network.

use crate::config::{describe_error, layered, resolved_toml_of, section_of, OptimizerConfig, Section};
use anyhow::{ensure, Result};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The top level of a fine-tuning config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Seed of the first repeat; repeat `i` uses `seed + i` for its label fraction, its
    /// initialisation of the head, its data order and its augmentations.
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// CPU threads for libtorch (0: libtorch's default).
    pub threads: i32,
    /// `fp32`, `bf16` or `fp16` (CUDA): the backbone's forward pass in autocast, as in
    /// pre-training (`run.precision`); the head, its loss and the weights in fp32.
    #[serde(default)]
    pub precision: crate::precision::Precision,
    /// `auto` (dynamic loss scaling under fp16), `dynamic` or `off`.
    #[serde(default)]
    pub loss_scaling: crate::loss_scaling::LossScaling,
    /// Repeats of the whole protocol (`--runs`).
    pub runs: usize,
    /// Fraction of the training set that is trained on (`--label-fraction`): of the volumes
    /// for segmentation (drawn by volume, never by slice), class-stratified for
    /// classification.
    pub label_fraction: f64,
    /// Classes to predict, background included for segmentation (Task04: 3).
    pub classes: i64,
    pub data: FinetuneData,
    pub input: InputConfig,
    /// The head: `name` picks a registered head, the rest is its config.
    pub head: Dict,
    pub train: TrainConfig,
    pub optimizer: OptimizerConfig,
}

/// The training and the evaluation set, each a dataset section with a `format` (as under
/// `[data.sources]` of a pre-training config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneData {
    pub train: Dict,
    pub eval: Dict,
}

/// How samples enter the backbone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// Side the slices of a segmentation task are resized to (predictions are resized back
    /// to each volume's own size before scoring). Default: the pre-training run's
    /// `data.views.slice_size`. Volumes of a classification task always take the run's
    /// `volume_slices` x `volume_size`^2, the shape its aggregator was built for.
    pub image_size: Option<i64>,
    /// Probability of each in-plane flip (horizontal, vertical) of a training sample; the
    /// same flip for an image and its mask, and for every slice of a volume.
    pub flip: f64,
    /// Threads that decode the sets (once, before training).
    pub workers: usize,
    /// 3D segmentation: crops cut from each training volume a step (`RandCropByPosNegLabel`'s
    /// `num_samples`).
    pub crops_per_volume: usize,
    /// 3D segmentation: probability that a crop is centred on a foreground voxel (MONAI's
    /// `pos / (pos + neg)`).
    pub positive_fraction: f64,
    /// 3D segmentation: probability of a crop's turn by 90, 180 or 270 degrees in the (H, W)
    /// plane (`flip` is then the probability of a flip along each of the three axes).
    pub rotate90: f64,
    /// 3D segmentation: how whole evaluation volumes are predicted from crop-sized windows.
    pub sliding_window: crate::sliding_window::SlidingWindowConfig,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            image_size: None,
            flip: 0.5,
            workers: 2,
            crops_per_volume: 4,
            positive_fraction: 0.5,
            rotate90: 0.0,
            sliding_window: Default::default(),
        }
    }
}

/// The training schedule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Slices (segmentation) or volumes (classification) a step.
    pub batch_size: usize,
    /// Learning-rate multiplier of the pre-trained part (encoder, and aggregator for volume
    /// tasks) relative to the head: 1 fine-tunes everything alike, 0.1 is a partial
    /// fine-tune, 0 freezes the backbone (not optimised, batch norm in eval mode: a linear
    /// or decoder-only probe).
    pub backbone_lr_scale: f64,
    /// Evaluate every this many epochs (and always after the last): the learning curves.
    pub eval_every: usize,
    /// Also write the learning curves as TensorBoard event files (`OUT/tensorboard/`), each
    /// trial's per-epoch metrics tagged `<init>/run<N>/<metric>`.
    pub tensorboard: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 16,
            backbone_lr_scale: 1.0,
            eval_every: 1,
            tensorboard: false,
        }
    }
}

/// Built-in defaults of the top level. The optimizer defaults to the paper's fine-tuning
/// (SGD with momentum, Sec. 4), not to pre-training's AdamW.
fn builtin_defaults() -> Value {
    let table: toml::Table = toml::from_str(
        r#"
        seed = 0
        device = "cpu"
        threads = 0
        runs = 3
        label_fraction = 1.0
        [input]
        [train]
        [optimizer]
        name = "sgd"
        lr = 0.01
        momentum = 0.9
        weight_decay = 1e-4
        "#,
    )
    .expect("built-in defaults are valid TOML");
    Value::serialize(table).expect("built-in defaults serialise")
}

/// A loaded fine-tuning config: its layers and the typed top level.
#[derive(Clone)]
pub struct LoadedFinetune {
    pub figment: Figment,
    pub cfg: FinetuneConfig,
}

impl LoadedFinetune {
    /// Loads `path` with the environment and `overrides` on top, and checks the values that
    /// need no data.
    pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedFinetune> {
        let figment = layered(path, builtin_defaults(), overrides)?;
        let cfg: FinetuneConfig = figment.extract().map_err(|e| describe_error(&figment, e, ""))?;
        let loaded = LoadedFinetune { figment, cfg };
        loaded.validate()?;
        Ok(loaded)
    }

    fn validate(&self) -> Result<()> {
        let c = &self.cfg;
        ensure!(
            c.runs >= 1,
            "config key `runs` (or --runs) must be at least 1, found {}",
            c.runs
        );
        ensure!(
            c.label_fraction.is_finite() && c.label_fraction > 0.0 && c.label_fraction <= 1.0,
            "config key `label_fraction` (or --label-fraction) must be in (0, 1], found {}",
            c.label_fraction
        );
        ensure!(
            c.classes >= 2,
            "config key `classes` must be at least 2 (background included for segmentation), found {}",
            c.classes
        );
        ensure!(c.train.epochs >= 1, "config key `train.epochs` must be at least 1");
        ensure!(
            c.train.batch_size >= 1,
            "config key `train.batch_size` must be at least 1"
        );
        ensure!(
            c.train.eval_every >= 1,
            "config key `train.eval_every` must be at least 1"
        );
        ensure!(
            c.train.backbone_lr_scale.is_finite() && c.train.backbone_lr_scale >= 0.0,
            "config key `train.backbone_lr_scale` must be >= 0 (0 freezes the backbone), found {}",
            c.train.backbone_lr_scale
        );
        ensure!(
            (0.0..=1.0).contains(&c.input.flip),
            "config key `input.flip` is a probability in [0, 1], found {}",
            c.input.flip
        );
        if let Some(size) = c.input.image_size {
            ensure!(
                size >= 8,
                "config key `input.image_size` must be at least 8 pixels, found {size}"
            );
        }
        for (key, p) in [
            ("input.positive_fraction", c.input.positive_fraction),
            ("input.rotate90", c.input.rotate90),
        ] {
            ensure!(
                (0.0..=1.0).contains(&p),
                "config key `{key}` is a probability in [0, 1], found {p}"
            );
        }
        ensure!(
            c.input.crops_per_volume >= 1,
            "config key `input.crops_per_volume` must be at least 1"
        );
        c.input.sliding_window.validate("input.sliding_window")?;
        Ok(())
    }

    /// The section `[data.train]` or `[data.eval]` (selected by `format`).
    pub fn data_section(&self, which: &str) -> Result<Section> {
        section_of(&self.figment, &format!("data.{which}"), "format")
    }

    /// The `[head]` section.
    pub fn head_section(&self) -> Result<Section> {
        section_of(&self.figment, "head", "name")
    }

    /// The whole config with the components' defaults filled in, as TOML.
    pub fn resolved_toml(&self, filled: &[(String, toml::Value)]) -> Result<String> {
        resolved_toml_of(&self.figment, filled)
    }
}
