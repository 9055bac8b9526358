//! `medssl eval linear|knn`: frozen-feature evaluation of a pre-training run.
//!
//! The run's backbone (encoder f_intra, aggregator f_inter and the slice features between
//! them) is rebuilt from the run's resolved `config.toml` and loaded from a checkpoint;
//! the objectives are not built (they need the pre-training data). A second backbone of
//! the same architecture, initialised as the run was before its first step (the run's
//! seed, no checkpoint), gives the random-init row of the same protocol in the same
//! command; `raw_pixels` adds a row for the probe on the flattened inputs.
//!
//! Features are computed once per set and backbone, in eval mode without autograd, from
//! un-augmented inputs: a 2D image is resized (bilinear) to `data.views.slice_size`; a
//! volume becomes the run's slice sequence (`views::sequence_view`: `volume_slices` x
//! `volume_size`^2, trilinear under `depth_mode = "resample"`). An image's feature is the
//! encoder's pooled embedding; a volume's is the aggregator's volume embedding over the
//! slices' (multi-level) features (Eq. 9-10), or, for a run without an aggregator, the mean
//! of its slices' pooled embeddings. Intensities are normalised by the reader's defaults.
//!
//! Each seed draws its own stratified label fraction (shared by the rows, so they are
//! compared on the same labels) and seeds the probe.
//!
//! With `folds = K` the two sets are pooled and each seed deals them into K stratified folds;
//! the probe is fitted K times, each on the label fraction of the other folds, and scored on
//! the held-out fold; a seed's score is the mean over its folds. Every sample is scored once
//! a seed, so a small validation set (AdrenalMNIST3D's has 22 positives: 0.06 standard error
//! on one AUC) no longer decides a ranking alone.

use crate::assemble::Backbone;
use crate::checkpoint::{self, Checkpoints};
use crate::config::{LoadedConfig, Section};
use crate::dataset::Dataset;
use crate::inspect;
use crate::probe::metrics::Scores;
use crate::probe::{split, Probe};
use crate::registry::{self, Registered};
use crate::rng::{self, domain};
use crate::train::{CHECKPOINT_DIR, CONFIG_FILE};
use crate::views::{self, ViewConfig};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Name of the tensors file of a checkpoint folder.
pub const TENSORS_FILE: &str = "tensors.safetensors";

/// A labelled set: a path and, for readers with splits, the split to read.
#[derive(Debug, Clone)]
pub struct DataSpec {
    pub path: PathBuf,
    /// The reader's `split` (`None`: `train` for the training set, `val` for the
    /// evaluation set).
    pub split: Option<String>,
}

/// What `medssl eval` was asked.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// A run directory, a checkpoint folder (`checkpoints/step-N/`) or its
    /// `tensors.safetensors`.
    pub checkpoint: PathBuf,
    /// The run's resolved config (default: the run directory's `config.toml`).
    pub config: Option<PathBuf>,
    pub train: DataSpec,
    pub eval: DataSpec,
    /// Reader of both sets (default: recognised from the path, `medmnist` for `.npz`).
    pub format: Option<String>,
    pub label_fraction: f64,
    /// Stratified K-fold cross-validation over the two sets pooled instead of training on
    /// one and scoring on the other.
    pub folds: Option<usize>,
    /// Seeds `seed, seed + 1, ...`: this many.
    pub seeds: usize,
    pub seed: u64,
    pub raw_pixels: bool,
    /// Ignore the run's aggregator: a volume's feature is the mean of its slices' pooled
    /// encoder embeddings (the "2D encoder + mean pooling" baseline of a joint run's
    /// encoder, e.g. its checkpoint at the end of stage 1).
    pub mean_pool: bool,
    /// Samples encoded at once.
    pub batch_size: usize,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    pub probe: Probe,
}

/// Where a run's checkpoint and config are.
#[derive(Debug, Clone)]
pub struct RunCheckpoint {
    pub config: PathBuf,
    pub tensors: PathBuf,
    /// The checkpoint's global step, where its `state.json` says.
    pub step: Option<usize>,
}

/// Finds the tensors and the config of `path`: a run directory (its latest checkpoint), a
/// checkpoint folder, or a `tensors.safetensors` file.
pub fn locate(path: &Path, config: Option<&Path>) -> Result<RunCheckpoint> {
    let (folder, tensors) = if path.is_file() {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        )
    } else if path.join(CHECKPOINT_DIR).is_dir() {
        let latest = Checkpoints::new(path.join(CHECKPOINT_DIR), 1)
            .latest()?
            .ok_or_else(|| anyhow!("run directory `{}` has no checkpoint yet", path.display()))?;
        let tensors = latest.join(TENSORS_FILE);
        (latest, tensors)
    } else if path.join(TENSORS_FILE).is_file() {
        (path.to_path_buf(), path.join(TENSORS_FILE))
    } else if !path.exists() {
        bail!("`{}` does not exist", path.display());
    } else {
        bail!(
            "`{}` is neither a run directory (with `{CONFIG_FILE}` and `{CHECKPOINT_DIR}/`), a checkpoint folder (`{CHECKPOINT_DIR}/step-N/` with `{TENSORS_FILE}`) nor a `.safetensors` file",
            path.display()
        );
    };
    let config = match config {
        Some(config) => config.to_path_buf(),
        None if path.join(CHECKPOINT_DIR).is_dir() => path.join(CONFIG_FILE),
        // checkpoints/step-N/ lies two folders below the run directory.
        None => folder
            .parent()
            .and_then(Path::parent)
            .map(|run| run.join(CONFIG_FILE))
            .filter(|c| c.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "cannot find the run's `{CONFIG_FILE}` for checkpoint `{}` (looked two folders up); pass --config",
                    path.display()
                )
            })?,
    };
    let step = std::fs::read_to_string(folder.join("state.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|state| state.get("global_step")?.as_u64())
        .map(|s| s as usize);
    Ok(RunCheckpoint { config, tensors, step })
}

/// Copies the checkpoint's `model.encoder.*` and `model.aggregator.*` tensors into
/// `backbone`'s `encoder.*` and `aggregator.*` variables. Every backbone variable must be
/// there with its shape, and every such checkpoint tensor must be a backbone variable; the
/// first that is not is the error.
pub fn load_backbone(backbone: &Backbone, tensors: &[(String, Tensor)], source: &Path) -> Result<()> {
    let stored: HashMap<&str, &Tensor> = tensors
        .iter()
        .filter_map(|(name, t)| {
            let name = name.strip_prefix("model.")?;
            (name.starts_with("encoder.") || name.starts_with("aggregator.")).then_some((name, t))
        })
        .collect();
    // The store may hold more than the backbone (a fine-tune's head): only the backbone's
    // variables come from the checkpoint.
    let mut variables: Vec<(String, Tensor)> = backbone
        .vs
        .variables()
        .into_iter()
        .filter(|(name, _)| name.starts_with("encoder.") || name.starts_with("aggregator."))
        .collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, variable) in &variables {
        let Some(found) = stored.get(name.as_str()) else {
            bail!(
                "checkpoint `{}` has no tensor `model.{name}` (shape {:?}), which the run's config builds: is the checkpoint from another architecture?",
                source.display(),
                variable.size()
            );
        };
        ensure!(
            found.size() == variable.size(),
            "checkpoint tensor `model.{name}` in `{}` has shape {:?}, but the backbone built from the run's config has {:?}: the checkpoint is from another architecture",
            source.display(),
            found.size(),
            variable.size()
        );
    }
    let known: BTreeMap<&str, ()> = variables.iter().map(|(n, _)| (n.as_str(), ())).collect();
    let mut extra: Vec<&&str> = stored.keys().filter(|n| !known.contains_key(**n)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        bail!(
            "checkpoint tensor `model.{name}` (shape {:?}) in `{}` has no counterpart in the backbone built from the run's config: the checkpoint is from another architecture",
            stored[**name].size(),
            source.display()
        );
    }
    tch::no_grad(|| {
        for (name, variable) in &variables {
            let source = stored[name.as_str()];
            let mut target = variable.shallow_clone();
            target.copy_(&source.to_kind(variable.kind()).to_device(variable.device()));
        }
    });
    Ok(())
}

/// How the samples of a set enter the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// One slice a sample, `[1, S, S]`.
    Image,
    /// The slice sequence `[1, T, S, S]` and which slices are real `[T]`.
    Volume,
}

/// A loaded, resized sample.
struct Prepared {
    input: Tensor,
    valid: Option<Tensor>,
    label: i64,
}

/// A labelled set's features under every backbone (and its flattened inputs).
struct Encoded {
    features: Vec<Tensor>,
    raw: Option<Tensor>,
    labels: Vec<i64>,
    input: Input,
}

/// What one set is, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct SetInfo {
    pub path: String,
    pub format: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    pub samples: usize,
    /// Samples of each class id `0..classes`.
    pub class_counts: Vec<usize>,
}

/// How the evaluation was done.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub protocol: String,
    pub probe: serde_json::Value,
    pub checkpoint: String,
    pub step: Option<usize>,
    pub config: String,
    pub train: SetInfo,
    pub eval: SetInfo,
    /// What a sample enters the encoder as.
    pub input: String,
    /// What the feature of a sample is.
    pub embedding: String,
    pub feature_dim: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_dim: Option<i64>,
    pub label_fraction: f64,
    /// Folds of the cross-validation over the pooled sets (absent: train -> eval).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folds: Option<usize>,
    pub seeds: Vec<u64>,
    pub device: String,
    pub seconds: f64,
}

/// One seed's scores: under cross-validation the mean over its folds, each kept.
#[derive(Debug, Clone, Serialize)]
pub struct SeedScores {
    pub seed: u64,
    /// Training samples the probe saw (under cross-validation, the mean over the folds).
    pub train_labels: usize,
    pub acc: f64,
    pub auc: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub folds: Vec<FoldScores>,
}

/// One fold's scores.
#[derive(Debug, Clone, Serialize)]
pub struct FoldScores {
    pub train_labels: usize,
    pub eval_samples: usize,
    pub acc: f64,
    pub auc: f64,
}

/// The (training, scored) sample indices of each probe fit of one seed, into the pooled
/// samples `train ++ eval` (`train_len` of them from the training set): one fit on the
/// label fraction of the training set scored on the evaluation set, or, with `folds`, one
/// fit per fold.
fn probe_fits(
    labels: &[i64],
    train_len: usize,
    fraction: f64,
    folds: Option<usize>,
    seed: u64,
) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
    let draw = |candidates: Vec<usize>| -> Result<Vec<usize>> {
        let candidate_labels: Vec<i64> = candidates.iter().map(|&i| labels[i]).collect();
        Ok(split::stratified_fraction(&candidate_labels, fraction, seed)?
            .into_iter()
            .map(|i| candidates[i])
            .collect())
    };
    match folds {
        None => Ok(vec![(
            draw((0..train_len).collect())?,
            (train_len..labels.len()).collect(),
        )]),
        Some(k) => {
            let fold = split::stratified_folds(labels, k, seed)?;
            (0..k)
                .map(|f| {
                    let (held, rest): (Vec<usize>, Vec<usize>) = (0..labels.len()).partition(|&i| fold[i] == f);
                    Ok((draw(rest)?, held))
                })
                .collect()
        }
    }
}

/// One row of the report: mean over seeds, with the std and the per-seed values when there
/// are several seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub acc: f64,
    pub auc: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_std: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auc_std: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<SeedScores>>,
}

impl Row {
    fn from_runs(runs: Vec<SeedScores>) -> Row {
        let acc: Vec<f64> = runs.iter().map(|r| r.acc).collect();
        let auc: Vec<f64> = runs.iter().map(|r| r.auc).collect();
        let several = runs.len() > 1;
        Row {
            acc: mean(&acc),
            auc: mean(&auc),
            acc_std: several.then(|| sample_std(&acc)),
            auc_std: several.then(|| sample_std(&auc)),
            runs: several.then_some(runs),
        }
    }
}

/// Arithmetic mean (0 for no values).
pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Standard deviation with Bessel's correction (n - 1); 0 for one value.
pub fn sample_std(values: &[f64]) -> f64 {
    let m = mean(values);
    (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (values.len().max(2) - 1) as f64).sqrt()
}

/// What `medssl eval` reports; `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pretrained: Row,
    pub random_init: Row,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_pixels: Option<Row>,
    pub setup: Setup,
}

impl Report {
    /// The report as a short human-readable table.
    pub fn table(&self) -> String {
        let s = &self.setup;
        let split = |info: &SetInfo| info.split.as_ref().map(|s| format!(" ({s})")).unwrap_or_default();
        let mut out = format!(
            "{} probe of `{}`{}\n  train: {}{}, {} samples {:?}; {} of the labels\n  eval:  {}{}, {} samples {:?}\n  features: {} -> {} ({} dims); {} seed(s) from {}\n\n",
            s.protocol,
            s.checkpoint,
            s.step.map(|n| format!(" (step {n})")).unwrap_or_default(),
            s.train.path,
            split(&s.train),
            s.train.samples,
            s.train.class_counts,
            s.label_fraction,
            s.eval.path,
            split(&s.eval),
            s.eval.samples,
            s.eval.class_counts,
            s.input,
            s.embedding,
            s.feature_dim,
            s.seeds.len(),
            s.seeds.first().copied().unwrap_or_default()
        );
        if let Some(k) = s.folds {
            out.push_str(&format!(
                "  scored by {k}-fold stratified cross-validation over train and eval pooled ({} samples): each fold's probe fits fraction {} of the other folds' labels; a seed's score is the mean over its folds\n\n",
                s.train.samples + s.eval.samples,
                s.label_fraction
            ));
        }
        let cell = |value: f64, std: Option<f64>| match std {
            Some(std) => format!("{value:.4} ± {std:.4}"),
            None => format!("{value:.4}"),
        };
        out.push_str(&format!("{:<12} {:>17} {:>17}\n", "encoder", "ACC", "AUC"));
        let mut rows = vec![("pretrained", &self.pretrained), ("random init", &self.random_init)];
        if let Some(raw) = &self.raw_pixels {
            rows.push(("raw pixels", raw));
        }
        for (name, row) in &rows {
            out.push_str(&format!(
                "{:<12} {:>17} {:>17}\n",
                name,
                cell(row.acc, row.acc_std),
                cell(row.auc, row.auc_std)
            ));
        }
        if s.seeds.len() > 1 {
            out.push_str("\nper seed (ACC / AUC):\n");
            for (name, row) in &rows {
                let values: Vec<String> = row
                    .runs
                    .iter()
                    .flatten()
                    .map(|r| format!("{}: {:.4} / {:.4}", r.seed, r.acc, r.auc))
                    .collect();
                out.push_str(&format!("  {:<12} {}\n", name, values.join(", ")));
            }
        }
        out
    }
}

/// Builds the reader of one set: `format` with the path and, where the reader has one,
/// the split.
fn open_set(
    spec: &DataSpec,
    format: Option<&str>,
    role: &str,
    default_split: &str,
) -> Result<(Box<dyn Dataset>, SetInfo)> {
    let flag = if role == "train" { "--train" } else { "--eval" };
    let format = match format {
        Some(f) => f,
        None => inspect::guess_format(&spec.path)
            .with_context(|| format!("{flag}: pass --format naming a reader (see `medssl list`)"))?,
    };
    let entry = registry::datasets().get(format).context("--format")?;
    let defaults: toml::Table = toml::from_str(&entry.default_config()).unwrap_or_default();
    let path = std::path::absolute(&spec.path).unwrap_or_else(|_| spec.path.clone());
    let mut body = format!("path = {}\n", toml::Value::String(path.display().to_string()));
    let split = if defaults.contains_key("split") {
        let split = spec.split.clone().unwrap_or_else(|| default_split.to_string());
        body.push_str(&format!("split = {}\n", toml::Value::String(split.clone())));
        Some(split)
    } else {
        if let Some(split) = &spec.split {
            tracing::warn!("{flag}-split `{split}` is ignored: the `{format}` reader has no splits");
        }
        None
    };
    let section = Section::inline(role, format, &body)?;
    let dataset = (entry.build)(&section).with_context(|| {
        format!(
            "{flag} `{}`{}",
            spec.path.display(),
            split
                .as_ref()
                .map(|s| format!(" ({flag}-split {s})"))
                .unwrap_or_default()
        )
    })?;
    ensure!(
        !dataset.is_empty(),
        "{flag} `{}`: the set has no samples",
        spec.path.display()
    );
    let info = SetInfo {
        path: spec.path.display().to_string(),
        format: format.to_string(),
        split,
        samples: dataset.len(),
        class_counts: Vec::new(),
    };
    Ok((dataset, info))
}

/// Loads and resizes sample `index`.
fn prepare(dataset: &dyn Dataset, index: usize, input: Input, views: &ViewConfig, flag: &str) -> Result<Prepared> {
    let volume = dataset
        .load(index)
        .with_context(|| format!("{flag}: cannot read {}", dataset.describe(index)))?;
    let Some(label) = volume.label else {
        bail!(
            "{flag}: {} has no class label; `medssl eval` needs a labelled set (e.g. a MedMNIST .npz with its `<split>_labels`)",
            dataset.describe(index)
        );
    };
    ensure!(
        label >= 0,
        "{flag}: {} has label {label}; expected a class id >= 0",
        dataset.describe(index)
    );
    let voxels = volume.voxels.to_kind(Kind::Float);
    let (d, h, w) = voxels.size3().map_err(|_| {
        anyhow!(
            "{flag}: {} decoded to shape {:?}, expected [D, H, W]",
            dataset.describe(index),
            volume.voxels.size()
        )
    })?;
    Ok(match input {
        Input::Image => {
            ensure!(
                d == 1,
                "{flag}: {} is a volume of {d} slices, but the set's first sample is a 2D image; a set is all images or all volumes",
                dataset.describe(index)
            );
            let s = views.slice_size;
            Prepared {
                input: voxels
                    .view([1, 1, h, w])
                    .upsample_bilinear2d([s, s], false, None, None)
                    .view([1, s, s]),
                valid: None,
                label,
            }
        }
        Input::Volume => {
            let stack = views::sequence_view(&voxels, views);
            Prepared {
                input: stack.voxels,
                valid: Some(stack.valid),
                label,
            }
        }
    })
}

/// The features of `x` (`[B, 1, S, S]`, or `[B, 1, T, S, S]` with `valid` `[B, T]`) under
/// `backbone`, as described in the module's doc.
fn embed(backbone: &Backbone, x: &Tensor, valid: Option<&Tensor>) -> Tensor {
    tch::no_grad(|| match valid {
        None => backbone.encoder.forward(x, false).pooled,
        Some(valid) => {
            let size = x.size();
            let (b, t) = (size[0], size[2]);
            let slices = x.transpose(1, 2).reshape([b * t, size[1], size[3], size[4]]);
            let out = backbone.encoder.forward(&slices, false);
            match &backbone.aggregator {
                Some(aggregator) => {
                    let sequence = backbone.slice_features.compute(&out).view([b, t, -1]);
                    aggregator.forward(&sequence, Some(valid), false).volume
                }
                None => {
                    let weights = valid.to_kind(Kind::Float).unsqueeze(-1);
                    let pooled = out.pooled.view([b, t, -1]);
                    (pooled * &weights).sum_dim_intlist(1, false, Kind::Float)
                        / weights.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0)
                }
            }
        }
    })
}

/// Encodes every sample of `dataset` under each backbone, `batch_size` at a time; samples
/// are read and resized on `workers` threads.
#[allow(clippy::too_many_arguments)]
fn encode(
    dataset: &dyn Dataset,
    flag: &str,
    backbones: &[&Backbone],
    raw: bool,
    views: &ViewConfig,
    batch_size: usize,
    workers: usize,
    device: Device,
) -> Result<Encoded> {
    let first = dataset
        .load(0)
        .with_context(|| format!("{flag}: cannot read {}", dataset.describe(0)))?;
    let input = if first.voxels.size().first() == Some(&1) {
        Input::Image
    } else {
        Input::Volume
    };
    drop(first);
    let n = dataset.len();
    let mut features: Vec<Vec<Tensor>> = backbones.iter().map(|_| Vec::new()).collect();
    let mut raw_parts = Vec::new();
    let mut labels = Vec::with_capacity(n);
    for start in (0..n).step_by(batch_size.max(1)) {
        let indices: Vec<usize> = (start..(start + batch_size.max(1)).min(n)).collect();
        let threads = workers.clamp(1, indices.len());
        let mut prepared: Vec<Option<Result<Prepared>>> = (0..indices.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|w| {
                    let indices = &indices;
                    scope.spawn(move || {
                        indices
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| i % threads == w)
                            .map(|(i, &index)| (i, prepare(dataset, index, input, views, flag)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for handle in handles {
                for (i, result) in handle.join().unwrap_or_else(|_| vec![]) {
                    prepared[i] = Some(result);
                }
            }
        });
        let prepared: Vec<Prepared> = prepared
            .into_iter()
            .map(|p| p.unwrap_or_else(|| Err(anyhow!("{flag}: a loader thread failed"))))
            .collect::<Result<_>>()?;
        let x =
            Tensor::stack(&prepared.iter().map(|p| p.input.shallow_clone()).collect::<Vec<_>>(), 0).to_device(device);
        let valid = match input {
            Input::Image => None,
            Input::Volume => Some(
                Tensor::stack(
                    &prepared
                        .iter()
                        .map(|p| p.valid.as_ref().expect("volumes have a mask").shallow_clone())
                        .collect::<Vec<_>>(),
                    0,
                )
                .to_device(device),
            ),
        };
        for (backbone, out) in backbones.iter().zip(&mut features) {
            out.push(embed(backbone, &x, valid.as_ref()).to_device(Device::Cpu));
        }
        if raw {
            raw_parts.push(x.flatten(1, -1).to_device(Device::Cpu));
        }
        labels.extend(prepared.iter().map(|p| p.label));
    }
    Ok(Encoded {
        features: features.into_iter().map(|parts| Tensor::cat(&parts, 0)).collect(),
        raw: raw.then(|| Tensor::cat(&raw_parts, 0)),
        labels,
        input,
    })
}

fn class_counts(labels: &[i64], classes: i64) -> Vec<usize> {
    let mut counts = vec![0; classes as usize];
    for &l in labels {
        counts[l as usize] += 1;
    }
    counts
}

/// Runs the evaluation `options` describes.
pub fn evaluate(options: &EvalOptions) -> Result<Report> {
    let started = Instant::now();
    split::check_fraction(options.label_fraction)?;
    ensure!(options.seeds >= 1, "--seeds {}: expected at least 1", options.seeds);
    ensure!(options.batch_size >= 1, "--batch-size must be at least 1");
    options.probe.check()?;
    let located = locate(&options.checkpoint, options.config.as_deref())?;
    let mut cfg = LoadedConfig::load_resolved(&located.config)
        .with_context(|| format!("the run's config `{}`", located.config.display()))?;
    if options.mean_pool {
        cfg.run.aggregator = None;
    }
    let views = cfg.run.data.views.resolved()?;
    let device = crate::device::resolve(&options.device).context("--device")?;
    if cfg.run.run.threads > 0 {
        tch::set_num_threads(cfg.run.run.threads);
    }

    let (train_set, mut train_info) = open_set(&options.train, options.format.as_deref(), "train", "train")?;
    let (eval_set, mut eval_info) = open_set(&options.eval, options.format.as_deref(), "eval", "val")?;

    // The random-init backbone is the run's own initialisation: the same seed, drawn in
    // the same order, as `Run::prepare` builds the model with.
    tch::manual_seed(rng::derive(cfg.run.seed, &[domain::INIT]) as i64);
    let random = Backbone::build(&cfg, device).context("building the run's backbone from its config")?;
    let pretrained = Backbone::build(&cfg, device)?;
    let mut tensors = checkpoint::read_safetensors(&located.tensors)?;
    if options.mean_pool {
        tensors.retain(|(name, _)| !name.starts_with("model.aggregator."));
    }
    load_backbone(&pretrained, &tensors, &located.tensors)?;
    drop(tensors);

    let workers = cfg.run.data.loader.workers.max(1);
    let backbones = [&pretrained, &random];
    let encode_set = |set: &dyn Dataset, flag: &str| {
        encode(
            set,
            flag,
            &backbones,
            options.raw_pixels,
            &views,
            options.batch_size,
            workers,
            device,
        )
    };
    let train = encode_set(train_set.as_ref(), "--train")?;
    let eval = encode_set(eval_set.as_ref(), "--eval")?;
    ensure!(
        train.input == eval.input,
        "the training set holds {} and the evaluation set {}: evaluate like with like",
        if train.input == Input::Image {
            "2D images"
        } else {
            "volumes"
        },
        if eval.input == Input::Image {
            "2D images"
        } else {
            "volumes"
        },
    );
    let classes = train.labels.iter().chain(&eval.labels).copied().max().unwrap_or(0) + 1;
    train_info.class_counts = class_counts(&train.labels, classes);
    eval_info.class_counts = class_counts(&eval.labels, classes);
    ensure!(
        train_info.class_counts.iter().filter(|&&c| c > 0).count() >= 2,
        "--train: the training set holds one class only ({:?} samples per class); a probe needs at least two",
        train_info.class_counts
    );

    if options.folds.is_some() {
        ensure!(
            (&train_info.path, &train_info.split) != (&eval_info.path, &eval_info.split),
            "--folds pools --train and --eval, but both are `{}`{}: pass two different sets or splits (e.g. --train-split train --eval-split val)",
            train_info.path,
            train_info.split.as_ref().map(|s| format!(" ({s})")).unwrap_or_default()
        );
    }

    let seeds: Vec<u64> = (0..options.seeds as u64).map(|i| options.seed + i).collect();
    let on_device = |t: &Tensor| t.to_device(device);
    // Every row's samples pooled, training set first: a fit's indices select from it.
    let pooled: Vec<Tensor> = train
        .features
        .iter()
        .zip(&eval.features)
        .chain(train.raw.iter().zip(&eval.raw))
        .map(|(a, b)| on_device(&Tensor::cat(&[a, b], 0)))
        .collect();
    let labels: Vec<i64> = train.labels.iter().chain(&eval.labels).copied().collect();
    let mut runs: Vec<Vec<SeedScores>> = vec![Vec::new(); pooled.len()];
    for &seed in &seeds {
        let fits = probe_fits(&labels, train.labels.len(), options.label_fraction, options.folds, seed)?;
        let mut per_row: Vec<Vec<FoldScores>> = vec![Vec::new(); pooled.len()];
        let index = |indices: &[usize]| {
            Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(device)
        };
        for (fit, scored) in &fits {
            // One index tensor a side, shared by every row (backbones and raw pixels).
            let (fit_index, scored_index) = (index(fit), index(scored));
            let fit_labels: Vec<i64> = fit.iter().map(|&i| labels[i]).collect();
            let scored_labels: Vec<i64> = scored.iter().map(|&i| labels[i]).collect();
            for (x, out) in pooled.iter().zip(&mut per_row) {
                let Scores { acc, auc } = options.probe.evaluate(
                    &x.index_select(0, &fit_index),
                    &fit_labels,
                    &x.index_select(0, &scored_index),
                    &scored_labels,
                    classes,
                    seed,
                )?;
                out.push(FoldScores {
                    train_labels: fit.len(),
                    eval_samples: scored.len(),
                    acc,
                    auc,
                });
            }
        }
        for (folds, out) in per_row.into_iter().zip(&mut runs) {
            let of = |f: fn(&FoldScores) -> f64| mean(&folds.iter().map(f).collect::<Vec<_>>());
            out.push(SeedScores {
                seed,
                train_labels: of(|f| f.train_labels as f64).round() as usize,
                acc: of(|f| f.acc),
                auc: of(|f| f.auc),
                folds: if options.folds.is_some() { folds } else { Vec::new() },
            });
        }
    }
    let mut rows = runs.into_iter().map(Row::from_runs);
    let (pretrained_row, random_row) = (rows.next().expect("two rows"), rows.next().expect("two rows"));
    let raw_row = rows.next();

    let (input, embedding) = match (train.input, &pretrained.aggregator) {
        (Input::Image, _) => (
            format!("2D images {0} x {0}", views.slice_size),
            "encoder pooled embedding".to_string(),
        ),
        (Input::Volume, aggregator) => (
            format!(
                "volumes {} x {} x {} ({:?})",
                views.volume_slices, views.volume_size, views.volume_size, views.depth_mode
            ),
            match aggregator {
                Some(_) => format!(
                    "aggregator `{}` volume embedding over {} slice features",
                    cfg.section("aggregator", "name").map(|s| s.name).unwrap_or_default(),
                    if pretrained.slice_features.multi_level() {
                        "multi-level"
                    } else {
                        "pooled"
                    }
                ),
                None => "mean of the slices' pooled embeddings (no aggregator)".to_string(),
            },
        ),
    };
    Ok(Report {
        pretrained: pretrained_row,
        random_init: random_row,
        raw_pixels: raw_row,
        setup: Setup {
            protocol: options.probe.name().to_string(),
            probe: options.probe.settings(),
            checkpoint: located.tensors.display().to_string(),
            step: located.step,
            config: located.config.display().to_string(),
            train: train_info,
            eval: eval_info,
            input,
            embedding,
            feature_dim: train.features[0].size()[1],
            raw_dim: train.raw.as_ref().map(|r| r.size()[1]),
            label_fraction: options.label_fraction,
            folds: options.folds,
            seeds,
            device: format!("{device:?}"),
            seconds: started.elapsed().as_secs_f64(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_report_the_sample_std_only_for_several_seeds() {
        let run = |seed, acc, auc| SeedScores {
            seed,
            train_labels: 10,
            acc,
            auc,
            folds: Vec::new(),
        };
        let one = Row::from_runs(vec![run(0, 0.5, 0.75)]);
        assert_eq!(
            (one.acc, one.auc, one.acc_std, one.runs.is_none()),
            (0.5, 0.75, None, true)
        );
        let three = Row::from_runs(vec![run(0, 0.5, 0.6), run(1, 0.7, 0.6), run(2, 0.6, 0.6)]);
        assert!((three.acc - 0.6).abs() < 1e-12);
        assert!((three.acc_std.unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(three.auc_std, Some(0.0));
        let json = serde_json::to_value(&three).unwrap();
        assert_eq!(json["runs"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn probe_fits_train_on_the_fraction_and_score_each_sample_once_a_seed() {
        // 20 training samples then 10 evaluation samples, classes alternating.
        let labels: Vec<i64> = (0..30).map(|i| i % 2).collect();
        let holdout = probe_fits(&labels, 20, 0.5, None, 3).unwrap();
        assert_eq!(holdout.len(), 1);
        let (fit, scored) = &holdout[0];
        assert_eq!(fit.len(), 10);
        assert!(fit.iter().all(|&i| i < 20), "fits only on the training set");
        assert_eq!(scored, &(20..30).collect::<Vec<_>>());

        let folds = probe_fits(&labels, 20, 0.5, Some(5), 3).unwrap();
        assert_eq!(folds.len(), 5);
        let mut seen = vec![0; 30];
        for (fit, scored) in &folds {
            assert_eq!((fit.len(), scored.len()), (12, 6));
            assert!(
                fit.iter().all(|i| !scored.contains(i)),
                "a fit never sees its scored fold"
            );
            for &i in scored {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        assert_ne!(folds, probe_fits(&labels, 20, 0.5, Some(5), 4).unwrap());
    }

    #[test]
    fn locate_names_what_it_expected() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("neither a run directory"), "{err}");
        let err = locate(&dir.path().join("absent"), None).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::create_dir_all(dir.path().join("run/checkpoints")).unwrap();
        let err = locate(&dir.path().join("run"), None).unwrap_err().to_string();
        assert!(err.contains("no checkpoint yet"), "{err}");
        let tensors = dir.path().join("loose.safetensors");
        std::fs::write(&tensors, b"").unwrap();
        let err = locate(&tensors, None).unwrap_err().to_string();
        assert!(err.contains("--config"), "{err}");
    }
}
