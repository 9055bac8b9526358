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
//!
//! The folder splits the job: `features.rs` encodes the sets, `protocol.rs` deals the
//! labels into fits and scores them, `report.rs` is the report table.

mod embed;
mod features;
mod protocol;
mod report;

pub use embed::{embed, EmbedOptions, Embeddings, Level};
pub use protocol::{FoldScores, Row, SeedScores};
pub use report::{Report, SetInfo, Setup};

use crate::assemble::Backbone;
use crate::checkpoint;
use crate::config::LoadedConfig;
use crate::metrics::mean;
use crate::precision::Precision;
use crate::probe::metrics::Scores;
use crate::probe::{split, Probe};
use crate::rng::{self, domain};
use crate::run_dir;
use anyhow::{ensure, Context, Result};
use features::{encode, open_set, Encoding, Input};
use protocol::probe_fits;
use std::path::PathBuf;
use std::time::Instant;
use tch::Tensor;

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
    /// The encoder's forward pass in `bf16` or `fp16` (CUDA) autocast, as in training; the
    /// features, and the probes fitted on them, stay fp32.
    pub precision: Precision,
    pub probe: Probe,
}

fn class_counts(labels: &[i64], classes: i64) -> Vec<usize> {
    let mut counts = vec![0; classes as usize];
    for &l in labels {
        counts[l as usize] += 1;
    }
    counts
}

/// The pre-trained backbone's features of `options.train` and `options.eval` (`[N, E]`
/// each): exactly what [`evaluate`] fits and scores its probes on.
pub fn features(options: &EvalOptions) -> Result<(Tensor, Tensor)> {
    let mut sets = encode_sets(options)?;
    Ok((sets.train.features.swap_remove(0), sets.eval.features.swap_remove(0)))
}

/// Both sets of an evaluation encoded by the pre-trained and the random-init backbone (in
/// that order), and what the report says about them.
struct EncodedSets {
    cfg: LoadedConfig,
    views: crate::views::ViewConfig,
    device: tch::Device,
    located: run_dir::RunCheckpoint,
    pretrained: Backbone,
    train: features::Encoded,
    eval: features::Encoded,
    train_info: SetInfo,
    eval_info: SetInfo,
}

/// The run's config and checkpoint loaded as `options` names them, on the device it asks
/// for, and the sets' readers: shared by [`evaluate`] and [`embed`].
pub(crate) fn load_run(
    checkpoint: &std::path::Path,
    config: Option<&std::path::Path>,
    device: &str,
    precision: Precision,
    mean_pool: bool,
) -> Result<(LoadedConfig, run_dir::RunCheckpoint, tch::Device)> {
    let located = run_dir::locate(checkpoint, config)?;
    let mut cfg = LoadedConfig::load_resolved(&located.config)
        .with_context(|| format!("the run's config `{}`", located.config.display()))?;
    if mean_pool {
        cfg.run.aggregator = None;
    }
    let device = crate::device::resolve(device).context("--device")?;
    precision.check_device(device, "--precision")?;
    ensure!(
        precision != Precision::Fp64,
        "--precision fp64 is for pre-training's numerical checks: evaluate in fp32, bf16 or fp16"
    );
    if cfg.run.options.threads > 0 {
        tch::set_num_threads(cfg.run.options.threads);
    }
    Ok((cfg, located, device))
}

/// The run's trained backbone: built from `cfg` and loaded from `located` (without the
/// aggregator's tensors under `mean_pool`).
pub(crate) fn pretrained_backbone(
    cfg: &LoadedConfig,
    located: &run_dir::RunCheckpoint,
    device: tch::Device,
    mean_pool: bool,
) -> Result<Backbone> {
    let pretrained = Backbone::build(cfg, device).context("building the run's backbone from its config")?;
    let mut tensors = checkpoint::read_safetensors(&located.tensors)?;
    if mean_pool {
        tensors.retain(|(name, _)| !name.starts_with("model.aggregator."));
    }
    pretrained.load(&tensors, &located.tensors)?;
    Ok(pretrained)
}

fn encode_sets(options: &EvalOptions) -> Result<EncodedSets> {
    let (cfg, located, device) = load_run(
        &options.checkpoint,
        options.config.as_deref(),
        &options.device,
        options.precision,
        options.mean_pool,
    )?;
    let views = cfg.run.data.views.resolved()?;
    let (train_set, train_info) = open_set(&options.train, options.format.as_deref(), "train", "train")?;
    let (eval_set, eval_info) = open_set(&options.eval, options.format.as_deref(), "eval", "val")?;

    // The random-init backbone is the run's own initialisation: the same seed, drawn in
    // the same order, as `Run::prepare` builds the model with.
    tch::manual_seed(rng::derive(cfg.run.seed, &[domain::INIT]) as i64);
    let random = Backbone::build(&cfg, device).context("building the run's backbone from its config")?;
    let pretrained = pretrained_backbone(&cfg, &located, device, options.mean_pool)?;

    let settings = Encoding {
        views: &views,
        batch_size: options.batch_size,
        workers: cfg.run.data.loader.workers.max(1),
        device,
        precision: options.precision,
        raw: options.raw_pixels,
        labelled: true,
        per_slice: false,
    };
    let backbones = [&pretrained, &random];
    let train = encode(train_set.as_ref(), "--train", &backbones, &settings)?;
    let eval = encode(eval_set.as_ref(), "--eval", &backbones, &settings)?;
    Ok(EncodedSets {
        cfg,
        views,
        device,
        located,
        pretrained,
        train,
        eval,
        train_info,
        eval_info,
    })
}

/// Runs the evaluation `options` describes.
pub fn evaluate(options: &EvalOptions) -> Result<Report> {
    let started = Instant::now();
    split::check_fraction(options.label_fraction)?;
    ensure!(options.seeds >= 1, "--seeds {}: expected at least 1", options.seeds);
    ensure!(options.batch_size >= 1, "--batch-size must be at least 1");
    options.probe.check()?;
    let EncodedSets {
        cfg,
        views,
        device,
        located,
        pretrained,
        train,
        eval,
        mut train_info,
        mut eval_info,
    } = encode_sets(options)?;
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
}
