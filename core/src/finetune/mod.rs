//! `medssl finetune`: the downstream protocol by which the paper judges pre-training
//! (Nguyen et al., AAAI 2023, Sec. 4, Tables 3-7): fine-tune the pre-trained backbone with
//! a task head on labelled data, score it on a held-out set, repeat with several seeds, and
//! run the same protocol from a random initialisation beside it.
//!
//! - Segmentation (a [`Task::Segmentation`] head, e.g. `unet`): f_intra as a 2D encoder;
//!   trained on the slices of the training volumes; every slice of an evaluation volume is
//!   predicted, the logits are resized back to the slice's own size, and the slices merged
//!   into the volume give per-class 3D IoU and Dice per volume, averaged over volumes
//!   (`dice_3d` is the mean over the foreground classes), and 2D Dice over slices.
//! - Volume classification (a [`Task::VolumeClassification`] head, e.g.
//!   `volume-classifier`): f_intra + f_inter + the head on the volume embedding, both parts
//!   fine-tuned; AUC and accuracy.
//! - 3D segmentation (a [`Task::VolumeSegmentation`] head, e.g. `unetr`) on a 3D encoder:
//!   trained on random crops around the labels, scored on whole volumes predicted by sliding
//!   windows ([`volume_segmentation`]).
//! - Detection (a [`Task::Detection`] head, e.g. `faster-rcnn`): f_intra as the detector's
//!   backbone; trained on the images (slices) of the training samples with the boxes of a
//!   COCO file; every image of the evaluation samples is predicted, the detections scaled
//!   back to the image's size and scored by AP at IoU 0.5 per category and its mean
//!   ([`crate::detection::ap`]), with each row's precision-recall curves.
//!
//! The pre-trained and the scratch row of a repeat share everything but the backbone's
//! weights: the network (the run's architecture, from its resolved `config.toml`), the head's
//! initial weights, the labelled subset, the data order and the augmentations, all drawn
//! from the repeat's seed. Nothing is selected on the evaluation set: the scores are those
//! after the last epoch.

pub mod config;
pub mod data;
pub mod detection;
pub mod progress;
pub mod report;
pub mod volume_segmentation;

use crate::assemble::Backbone;
use crate::checkpoint;
use crate::config::{LoadedConfig, Section};
use crate::detection::ap::{self, ApReport};
use crate::encoder::{EncoderOutput, SpatialDims};
use crate::head::{Head, HeadInput, HeadShape, Prediction, Targets, Task};
use crate::loss_scaling::{self, LossScaler};
use crate::metrics::MetricsLog;
use crate::optim::{self, Optimizer};
use crate::precision::Precision;
use crate::probe::{metrics as class_metrics, split};
use crate::registry::{self, Registered};
use crate::rng::{self, domain};
use crate::run_dir::{self, CONFIG_FILE, METRICS_FILE, REPORT_FILE, WEIGHTS_DIR};
use crate::segmentation;
use anyhow::{bail, ensure, Context, Result};
use config::{FinetuneConfig, LoadedFinetune};
use data::{stream, MaskedVolume, OpenedSet, SequenceSet, Split};
use detection::DetectionSet;
use progress::{FinishedTrial, Progress, TrialProgress, MODEL_PREFIX, OPTIMIZER_PREFIX};
use rand::seq::SliceRandom;
use report::{Curve, Report, Setup, Trial};
use serde::Serialize;
use serde_json::{json, Map};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Files of a fine-tuning directory.
pub const RESULTS_FILE: &str = "results.json";
pub const CURVES_FILE: &str = "learning_curves.png";
pub const SEGMENTATION_FILE: &str = "segmentation.png";
/// `precision_recall_<init>.png`: a detection row's curves (first repeat).
pub const PRECISION_RECALL_PREFIX: &str = "precision_recall";

/// What `medssl finetune` was asked.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    pub config: PathBuf,
    /// `--set` overrides (the command's `--train`, `--runs`, ... come first as such).
    pub overrides: Vec<String>,
    /// A pre-training run directory, checkpoint folder or `tensors.safetensors`.
    pub pretrained: PathBuf,
    /// The pre-training run's config (default: found beside the checkpoint).
    pub run_config: Option<PathBuf>,
    /// The fine-tuning directory.
    pub out: PathBuf,
    pub force: bool,
    /// Continue the interrupted fine-tune in `out` (started with the same config and flags).
    pub resume: bool,
}

/// Where a row's backbone weights come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// (The default only so that a report read back can leave its curves out.)
    #[default]
    Pretrained,
    Scratch,
}

impl Init {
    pub fn name(self) -> &'static str {
        match self {
            Init::Pretrained => "pretrained",
            Init::Scratch => "scratch",
        }
    }
}

/// The decoded sets of a task.
enum Sets {
    Segmentation {
        train: Vec<MaskedVolume>,
        eval: Vec<MaskedVolume>,
        size: i64,
    },
    Classification {
        train: SequenceSet,
        eval: SequenceSet,
    },
    VolumeSegmentation {
        train: Vec<MaskedVolume>,
        eval: Vec<MaskedVolume>,
        sampling: volume_segmentation::CropSampling,
    },
    Detection {
        train: DetectionSet,
        eval: DetectionSet,
        size: i64,
    },
}

/// What the first repeat keeps of a row's last evaluation for the figures.
enum Example {
    /// The prediction of the first evaluation volume (segmentation).
    Segmentation(Tensor),
    /// The AP report with its precision-recall curves (detection).
    Detection(ApReport),
}

/// A backbone with a head: what one row of one repeat trains.
struct Network {
    backbone: Backbone,
    head: Box<dyn Head>,
    task: Task,
    /// The backbone's forward pass runs in this precision's autocast region.
    precision: Precision,
}

impl Network {
    /// Builds the run's backbone and the configured head under one variable store
    /// (`encoder.*`, `aggregator.*`, `head.*`), each initialised from its own stream of
    /// `seed`.
    fn build(
        run_cfg: &LoadedConfig,
        head_section: &Section,
        classes: i64,
        device: Device,
        precision: Precision,
        seed: u64,
    ) -> Result<(Network, toml::Value)> {
        tch::manual_seed(rng::derive(seed, &[domain::FINETUNE, stream::INIT]) as i64);
        let backbone =
            Backbone::build(run_cfg, device).context("building the pre-training run's backbone from its config")?;
        let entry = registry::heads()
            .get(&head_section.name)
            .with_context(|| head_section.selector_context())?;
        tch::manual_seed(rng::derive(seed, &[domain::FINETUNE, stream::HEAD]) as i64);
        let dims = backbone.encoder.spatial_dims();
        let shape = HeadShape {
            in_channels: backbone.encoder.in_channels(),
            spatial_dims: dims,
            levels: backbone.encoder.levels().to_vec(),
            embedding_dim: backbone.encoder.embedding_dim(),
            volume_dim: match dims {
                SpatialDims::Two => backbone.aggregator.as_ref().map(|a| a.output_dim()),
                SpatialDims::Three => Some(backbone.encoder.embedding_dim()),
            },
            num_classes: classes,
        };
        let encoder = run_cfg.section("encoder", "name")?.name;
        let head = (entry.build)(head_section, backbone.vs.root() / "head", &shape).with_context(|| {
            format!(
                "building head `{}` from `[head]` on the pre-training run's encoder `{encoder}`",
                head_section.name
            )
        })?;
        let task = head.task();
        if let Some(wanted) = task.spatial_dims().filter(|&d| d != dims) {
            bail!(
                "head `{}` serves {task:?}, which reads the features of a {wanted} encoder, but the pre-training run's encoder `{encoder}` is {dims}",
                head_section.name
            );
        }
        if task.needs_aggregator() && dims == SpatialDims::Two && backbone.aggregator.is_none() {
            bail!(
                "head `{}` classifies volume embeddings, but the pre-training run has no `[aggregator]`: fine-tune a run that trained one",
                head_section.name
            );
        }
        let resolved = head_section.resolved("name", &entry.default_config())?;
        Ok((
            Network {
                backbone,
                head,
                task,
                precision,
            },
            resolved,
        ))
    }

    /// The prefixes of the backbone's variables this task trains.
    fn backbone_prefixes(&self) -> &'static [&'static str] {
        match self.task {
            Task::Segmentation | Task::Detection | Task::VolumeSegmentation => &["encoder."],
            Task::VolumeClassification => &["encoder.", "aggregator."],
        }
    }

    /// Every variable (parameters and batch-norm statistics) of the parts this task uses:
    /// the head and the backbone's used prefixes, sorted by name. What a trial saves.
    fn weights(&self) -> Vec<(String, Tensor)> {
        self.variables(true)
    }

    /// The parameters to optimise: the head's, and the backbone's unless it is frozen.
    fn parameters(&self, train_backbone: bool) -> Vec<(String, Tensor)> {
        self.variables(train_backbone)
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    /// The head's variables, with the backbone's (of this task) if `with_backbone`.
    fn variables(&self, with_backbone: bool) -> Vec<(String, Tensor)> {
        let mut prefixes = vec!["head."];
        if with_backbone {
            prefixes.extend_from_slice(self.backbone_prefixes());
        }
        let mut variables: Vec<(String, Tensor)> = self
            .backbone
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p)))
            .collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        variables
    }

    /// Runs the backbone on `x`, images `[N, 1, S, S]` or, with `valid` `[B, T]`, sequences
    /// `[B, 1, T, S, S]`, and hands the head's input to `then`. `train_backbone` false runs
    /// the backbone in eval mode without autograd.
    fn with_input<T>(
        &self,
        x: &Tensor,
        valid: Option<&Tensor>,
        train_backbone: bool,
        then: impl FnOnce(&HeadInput) -> Result<T>,
    ) -> Result<T> {
        let size = x.size();
        let image_size = [size[size.len() - 2], size[size.len() - 1]];
        // Volume tasks need the aggregator; `Network::build` refuses them without one.
        let features = |x: &Tensor| -> (EncoderOutput, Option<Tensor>) {
            match valid {
                None => (self.backbone.embed_images(x, train_backbone), None),
                Some(valid) => {
                    let (out, volume) = self.backbone.embed_volumes(x, valid, train_backbone, train_backbone);
                    (out, Some(volume))
                }
            }
        };
        // Under mixed precision the backbone runs in autocast and the head gets fp32
        // features, so that its loss (soft Dice, cross-entropy, box regression) is fp32.
        let region = self.precision.autocast(x.device())?;
        let (out, volume) = if train_backbone {
            features(x)
        } else {
            tch::no_grad(|| features(x))
        };
        let (out, volume) = match region {
            None => (out, volume),
            Some(region) => {
                drop(region);
                let fp32 = |t: &Tensor| t.to_kind(Kind::Float);
                let out = EncoderOutput {
                    levels: out.levels.iter().map(fp32).collect(),
                    pooled: fp32(&out.pooled),
                };
                (out, volume.as_ref().map(fp32))
            }
        };
        let three_d = self.backbone.encoder.spatial_dims() == SpatialDims::Three;
        then(&HeadInput {
            encoder: &out,
            volume: volume.as_ref(),
            image_size,
            images: three_d.then_some(x),
        })
    }

    /// The head's training loss on `batch`; `seed` fixes the head's own draws.
    fn loss(&self, batch: &Batch, train_backbone: bool, seed: u64) -> Result<Tensor> {
        self.with_input(&batch.x, batch.valid.as_ref(), train_backbone, |input| {
            self.head.loss(input, &batch.y, seed)
        })
    }

    /// The head's predictions of `x` (see [`Network::with_input`]), in eval mode.
    fn predict(&self, x: &Tensor, valid: Option<&Tensor>) -> Result<Prediction> {
        tch::no_grad(|| self.with_input(x, valid, false, |input| self.head.predict(input)))
    }

    /// Logits of `x` from a head that predicts logits.
    fn logits(&self, x: &Tensor, valid: Option<&Tensor>) -> Result<Tensor> {
        match self.predict(x, valid)? {
            Prediction::Logits(logits) => Ok(logits),
            Prediction::Detections(_) => bail!("the head predicted boxes, but its task {:?} scores logits", self.task),
        }
    }
}

/// Everything a fine-tune needs, checked before the output folder is touched.
struct Protocol {
    cfg: FinetuneConfig,
    run_cfg: LoadedConfig,
    checkpoint: Vec<(String, Tensor)>,
    checkpoint_path: PathBuf,
    head_section: Section,
    sets: Sets,
    device: Device,
    task: Task,
}

/// Runs the protocol `options` describe and writes the fine-tuning directory.
pub fn finetune(options: &FinetuneOptions) -> Result<Report> {
    let started = Instant::now();
    let loaded = LoadedFinetune::load(&options.config, &options.overrides)?;
    let cfg = loaded.cfg.clone();
    let located = run_dir::locate(&options.pretrained, options.run_config.as_deref()).context("--pretrained")?;
    let run_cfg = LoadedConfig::load_resolved(&located.config)
        .with_context(|| format!("the pre-training run's config `{}`", located.config.display()))?;
    let device = crate::device::resolve(&cfg.device).context("config key `device`")?;
    cfg.precision.check_device(device, "precision")?;
    ensure!(
        cfg.precision != Precision::Fp64,
        "config key `precision` is \"fp64\", which is for pre-training's numerical checks: fine-tune in \"fp32\", \"bf16\" or \"fp16\""
    );
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }

    // The network first: head config errors and a checkpoint from another architecture
    // are reported before any data is read.
    let head_section = loaded.head_section()?;
    let (network, head_resolved) =
        Network::build(&run_cfg, &head_section, cfg.classes, device, cfg.precision, cfg.seed)?;
    let task = network.task;
    let checkpoint = checkpoint::read_safetensors(&located.tensors)?;
    network.backbone.load(&checkpoint, &located.tensors)?;
    let dims = network.backbone.encoder.spatial_dims();
    let views = run_cfg.run.data.views.resolved()?;
    if dims == SpatialDims::Three {
        network
            .backbone
            .encoder
            .check_input_size(&views.crop_size)
            .with_context(|| {
                format!(
                    "the pre-training run's `data.views.crop_size` {:?} does not suit its encoder",
                    views.crop_size
                )
            })?;
    }
    if task == Task::VolumeSegmentation {
        // Training crops and sliding windows both have the run's crop size.
        network.head.check_input_size(&views.crop_size).with_context(|| {
            format!(
                "the pre-training run's `data.views.crop_size` {:?} does not suit head `{}`",
                views.crop_size, head_section.name
            )
        })?;
    }
    drop(network);

    let train_section = loaded.data_section("train")?;
    let eval_section = loaded.data_section("eval")?;
    let train_set = data::open(&train_section)?;
    let eval_set = data::open(&eval_section)?;
    let workers = cfg.input.workers;
    let sets = match task {
        Task::Segmentation => {
            let size = cfg.input.image_size.unwrap_or(views.slice_size);
            let train = data::masked_volumes(train_set.dataset.as_ref(), cfg.classes, workers, Split::Train)?;
            let eval = data::masked_volumes(eval_set.dataset.as_ref(), cfg.classes, workers, Split::Eval)?;
            let names = |v: &[MaskedVolume]| v.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
            data::check_disjoint(&names(&train), &names(&eval))?;
            Sets::Segmentation { train, eval, size }
        }
        Task::VolumeClassification => {
            let train = data::sequences(
                train_set.dataset.as_ref(),
                cfg.classes,
                &views,
                dims,
                workers,
                Split::Train,
            )?;
            let eval = data::sequences(
                eval_set.dataset.as_ref(),
                cfg.classes,
                &views,
                dims,
                workers,
                Split::Eval,
            )?;
            data::check_disjoint(&train.names, &eval.names)?;
            let eval_classes: std::collections::BTreeSet<i64> = eval.labels.iter().copied().collect();
            ensure!(
                eval_classes.len() >= 2,
                "[data.eval] holds one class only ({eval_classes:?}): AUC is undefined; evaluate on a set with at least two classes"
            );
            Sets::Classification { train, eval }
        }
        Task::VolumeSegmentation => {
            let prepare = |set: &OpenedSet, split| {
                volume_segmentation::prepared_volumes(set.dataset.as_ref(), cfg.classes, &views, workers, split)
            };
            let train = prepare(&train_set, Split::Train)?;
            let eval = prepare(&eval_set, Split::Eval)?;
            let names = |v: &[MaskedVolume]| v.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
            data::check_disjoint(&names(&train), &names(&eval))?;
            let settings = crate::volume_crops::CropSettings {
                flip: cfg.input.flip,
                rotate90: cfg.input.rotate90,
                ..views.crop_settings()
            };
            ensure!(
                settings.rotate90 == 0.0 || settings.size[1] == settings.size[2],
                "config key `input.rotate90` turns crops in the (H, W) plane, which needs a square crop, but the run's `data.views.crop_size` is {:?}",
                settings.size
            );
            let sampling = volume_segmentation::CropSampling {
                settings,
                crops_per_volume: cfg.input.crops_per_volume,
                positive: cfg.input.positive_fraction,
            };
            Sets::VolumeSegmentation { train, eval, sampling }
        }
        Task::Detection => {
            let size = cfg.input.image_size.unwrap_or(views.slice_size);
            let mut coco_files: BTreeMap<PathBuf, crate::detection::coco::DetectionSet> = BTreeMap::new();
            let mut boxes_of = |set: &OpenedSet, split: Split| -> Result<DetectionSet> {
                let Some(path) = &set.boxes else {
                    bail!(
                        "config key `{}.boxes` is missing: a detection head needs the set's boxes as COCO JSON (e.g. from `medssl data boxes-from-masks`)",
                        split.key()
                    );
                };
                if !coco_files.contains_key(path) {
                    let coco = crate::detection::coco::read_coco(path)
                        .with_context(|| format!("config key `{}.boxes`", split.key()))?;
                    coco_files.insert(path.clone(), coco);
                }
                detection::detection_set(
                    set.dataset.as_ref(),
                    &coco_files[path],
                    path,
                    cfg.classes,
                    set.slice_axis,
                    workers,
                    split,
                )
            };
            let train = boxes_of(&train_set, Split::Train)?;
            let eval = boxes_of(&eval_set, Split::Eval)?;
            data::check_disjoint(&train.names, &eval.names)?;
            ensure!(
                !eval.ground_truth.iter().all(|g| g.crowd),
                "[data.eval] has no object to find (every image is background only): AP is undefined"
            );
            Sets::Detection { train, eval, size }
        }
    };

    let protocol = Protocol {
        cfg,
        run_cfg,
        checkpoint,
        checkpoint_path: located.tensors.clone(),
        head_section,
        sets,
        device,
        task,
    };
    // Check the first repeat's subset before anything is written.
    protocol.subset(0)?;

    let filled = [
        ("head".to_string(), head_resolved),
        ("data.train".to_string(), train_set.resolved.clone()),
        ("data.eval".to_string(), eval_set.resolved.clone()),
        (
            "pretrained".to_string(),
            toml::Value::String(located.tensors.display().to_string()),
        ),
    ];
    let resolved = loaded.resolved_toml(&filled)?;
    let out = options.out.as_path();
    let trial_count = protocol.cfg.runs * 2;
    // Held until the fine-tune ends: one process a fine-tuning directory.
    let (_lock, mut progress, mut tensors, mut log) = if options.resume {
        let (lock, progress::Checkpoint { progress, tensors }) =
            open_for_resume(out, &resolved, protocol.cfg.train.epochs, trial_count)?;
        let log = MetricsLog::open_keeping(&out.join(METRICS_FILE), progress.records)?;
        (lock, progress, tensors, log)
    } else {
        // `--force` replaces only a folder medssl wrote.
        let lock = crate::run_dir::create(out, options.force, "pass --resume to continue it, --out another folder")?;
        checkpoint::write_atomic(&out.join(CONFIG_FILE), resolved.as_bytes())?;
        let log = MetricsLog::open(&out.join(METRICS_FILE), None)?;
        (lock, Progress::new(resolved), Vec::new(), log)
    };
    if protocol.cfg.train.tensorboard {
        let dir = out.join(crate::tensorboard::TENSORBOARD_DIR);
        let layout = crate::tensorboard::RecordLayout::Trials;
        log = log.with_tensorboard(crate::tensorboard::EventWriter::create(&dir, layout, None)?);
    }
    std::fs::create_dir_all(out.join(WEIGHTS_DIR))
        .with_context(|| format!("cannot create `{}`", out.join(WEIGHTS_DIR).display()))?;

    let mut trials = Vec::new();
    let mut examples: BTreeMap<&'static str, Example> = BTreeMap::new();
    for run in 0..protocol.cfg.runs {
        // Both rows of a repeat train on the same subset, prepared once.
        let subset = protocol.subset(run)?;
        let mut data = None;
        for (row, init) in [Init::Pretrained, Init::Scratch].into_iter().enumerate() {
            if let Some(done) = progress.finished.get(run * 2 + row) {
                // Finished before an interruption: its weights are on disk, and the first
                // repeat's figures are drawn again from them.
                if run == 0 {
                    if let Some(example) = protocol.example_of(init, run, out)? {
                        examples.insert(init.name(), example);
                    }
                }
                let mut trial = done.trial.clone();
                trial.curve = done.curve.clone();
                trials.push(trial);
                continue;
            }
            let data = match &data {
                Some(data) => data,
                None => data.insert(protocol.training_data(&subset)?),
            };
            let resumed = progress.current.take().map(|c| (c, std::mem::take(&mut tensors)));
            let (trial, example) =
                protocol.train_one(init, run, &subset, data, &mut log, out, &mut progress, resumed)?;
            if let Some(example) = example {
                examples.insert(init.name(), example);
            }
            trials.push(trial);
        }
    }

    let setup = Setup {
        task,
        head: protocol.head_section.name.clone(),
        pretrained: located.tensors.display().to_string(),
        pretrained_step: located.step,
        run_config: located.config.display().to_string(),
        train: protocol.describe_set(Split::Train, &train_section),
        eval: protocol.describe_set(Split::Eval, &eval_section),
        label_fraction: protocol.cfg.label_fraction,
        runs: protocol.cfg.runs,
        seeds: (0..protocol.cfg.runs as u64).map(|i| protocol.cfg.seed + i).collect(),
        epochs: protocol.cfg.train.epochs,
        batch_size: protocol.cfg.train.batch_size,
        optimizer: protocol.cfg.optimizer.name.clone(),
        lr: protocol.cfg.optimizer.lr,
        backbone_lr_scale: protocol.cfg.train.backbone_lr_scale,
        input: protocol.describe_input(),
        device: format!("{device:?}"),
        seconds: started.elapsed().as_secs_f64(),
        out: out.display().to_string(),
    };
    let report = Report::new(task, &trials, setup);
    let curves: Vec<&Curve> = trials.iter().map(|t| &t.curve).collect();
    report::plot_curves(&curves, report.metric.as_str(), &out.join(CURVES_FILE))?;
    let mut figures = vec![(format!("learning curves ({})", report.metric), CURVES_FILE.to_string())];
    let predictions: BTreeMap<&str, Tensor> = examples
        .iter()
        .filter_map(|(init, e)| match e {
            Example::Segmentation(p) => Some((*init, p.shallow_clone())),
            Example::Detection(_) => None,
        })
        .collect();
    if let (Sets::Segmentation { eval, .. } | Sets::VolumeSegmentation { eval, .. }, false) =
        (&protocol.sets, predictions.is_empty())
    {
        if let Some(first) = eval.first() {
            report::plot_segmentation(first, &predictions, &out.join(SEGMENTATION_FILE))?;
            figures.push((
                "the first evaluation volume: its slices with the most foreground, truth and predictions".into(),
                SEGMENTATION_FILE.into(),
            ));
        }
    }
    for (init, example) in &examples {
        if let Example::Detection(ap_report) = example {
            let file = format!("{PRECISION_RECALL_PREFIX}_{init}.png");
            ap::plot_precision_recall(ap_report, &out.join(&file))?;
            figures.push((format!("precision-recall, {init} (first repeat)"), file));
        }
    }
    checkpoint::write_atomic(&out.join(REPORT_FILE), report.markdown(&figures).as_bytes())?;
    checkpoint::write_atomic(
        &out.join(RESULTS_FILE),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// Locks the fine-tuning directory `out` to continue it, after checking that it is one and
/// that the command resolves to the config it was started with (only `threads` may change):
/// a changed key would silently make a different fine-tune. Returns its latest progress and
/// checkpoint tensors, or a fresh start where it was interrupted before its first checkpoint.
fn open_for_resume(
    out: &Path,
    resolved: &str,
    epochs: usize,
    trials: usize,
) -> Result<(run_dir::RunLock, progress::Checkpoint)> {
    let config_file = out.join(CONFIG_FILE);
    ensure!(
        out.is_dir() && config_file.is_file(),
        "--resume: `{}` is not a fine-tuning directory (no `{CONFIG_FILE}`): run without --resume to start one",
        out.display()
    );
    let lock = run_dir::RunLock::acquire(out)?;
    let written =
        std::fs::read_to_string(&config_file).with_context(|| format!("cannot read `{}`", config_file.display()))?;
    let changes = crate::config::changed_keys(&written, resolved, &["threads"])?;
    ensure!(
        changes.is_empty(),
        "--resume: this command resolves to another config than `{}` was fine-tuned with: {}; resume with the config and flags it was started with, or start over with --force",
        config_file.display(),
        changes.join("; ")
    );
    match progress::latest(out, epochs, trials)? {
        Some(progress::Checkpoint { mut progress, tensors }) => {
            let changes = crate::config::changed_keys(&progress.config, resolved, &["threads"])?;
            ensure!(
                changes.is_empty(),
                "--resume: the checkpoint in `{}` was trained under another config than `{}` says ({}): the folder was edited; start over with --force",
                out.display(),
                config_file.display(),
                changes.join("; ")
            );
            progress.config = resolved.to_string();
            tracing::info!(
                "resuming `{}`: {} of {trials} trials finished{}",
                out.display(),
                progress.finished.len(),
                progress
                    .current
                    .as_ref()
                    .map(|c| format!(", repeat {} {} after epoch {}", c.run, c.init.name(), c.epochs_done))
                    .unwrap_or_default()
            );
            Ok((lock, progress::Checkpoint { progress, tensors }))
        }
        None => {
            tracing::info!(
                "resuming `{}`: no checkpoint yet, starting from the first trial",
                out.display()
            );
            let progress = Progress::new(resolved.to_string());
            Ok((
                lock,
                progress::Checkpoint {
                    progress,
                    tensors: Vec::new(),
                },
            ))
        }
    }
}

/// Builds the network `loaded` describes on the backbone of `run_cfg` and opens its two
/// sets, without decoding or training: how the shipped configs are checked.
pub fn check(loaded: &LoadedFinetune, run_cfg: &LoadedConfig) -> Result<Task> {
    let (network, _) = Network::build(
        run_cfg,
        &loaded.head_section()?,
        loaded.cfg.classes,
        Device::Cpu,
        loaded.cfg.precision,
        loaded.cfg.seed,
    )?;
    data::open(&loaded.data_section("train")?)?;
    data::open(&loaded.data_section("eval")?)?;
    Ok(network.task)
}

/// One training batch: inputs, their validity masks (volumes) and targets.
struct Batch {
    x: Tensor,
    valid: Option<Tensor>,
    y: Targets,
}

/// The training samples of one repeat.
enum TrainingData {
    Slices {
        images: Tensor,
        masks: Tensor,
    },
    Volumes {
        inputs: Tensor,
        valid: Tensor,
        labels: Tensor,
    },
    /// 3D segmentation: the prepared volumes (and their indices in the training set, which
    /// seed their crops), cut into crops batch by batch.
    Crops {
        volumes: Vec<(usize, MaskedVolume)>,
        sampling: volume_segmentation::CropSampling,
    },
    /// Detection: `S x S` images and each one's boxes (pixels of the resized image) and
    /// labels.
    Images {
        images: Tensor,
        targets: Vec<detection::Objects>,
    },
}

impl TrainingData {
    fn len(&self) -> usize {
        match self {
            TrainingData::Slices { images, .. } => images.size()[0] as usize,
            TrainingData::Volumes { inputs, .. } => inputs.size()[0] as usize,
            TrainingData::Images { images, .. } => images.size()[0] as usize,
            TrainingData::Crops { volumes, .. } => volumes.len(),
        }
    }

    /// Samples `indices`, flipped as (seed, epoch, index) say, on `device`.
    fn batch(&self, indices: &[usize], flip: f64, seed: u64, epoch: usize, device: Device) -> Batch {
        let index = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let flips = data::flips(indices, flip, seed, epoch);
        match self {
            TrainingData::Slices { images, masks } => {
                let (x, y) = (images.index_select(0, &index), masks.index_select(0, &index));
                let flipped = data::flip_batch(&[&x, &y], &flips);
                Batch {
                    x: flipped[0].to_device(device),
                    valid: None,
                    y: Targets::Classes(flipped[1].to_device(device)),
                }
            }
            TrainingData::Volumes { inputs, valid, labels } => {
                let x = inputs.index_select(0, &index);
                let flipped = data::flip_batch(&[&x], &flips);
                Batch {
                    x: flipped[0].to_device(device),
                    valid: Some(valid.index_select(0, &index).to_device(device)),
                    y: Targets::Classes(labels.index_select(0, &index).to_device(device)),
                }
            }
            TrainingData::Crops { volumes, sampling } => {
                let chosen: Vec<(usize, &MaskedVolume)> =
                    indices.iter().map(|&i| (volumes[i].0, &volumes[i].1)).collect();
                let (x, y) = volume_segmentation::training_crops(&chosen, sampling, seed, epoch);
                Batch {
                    x: x.to_device(device),
                    valid: None,
                    y: Targets::Classes(y.to_device(device)),
                }
            }
            TrainingData::Images { images, targets } => {
                let x = images.index_select(0, &index);
                let size = x.size()[3];
                let chosen: Vec<_> = indices.iter().map(|&i| &targets[i]).collect();
                Batch {
                    x: data::flip_batch(&[&x], &flips)[0].to_device(device),
                    valid: None,
                    y: Targets::Boxes(detection::flipped_targets(&chosen, &flips, size, device)),
                }
            }
        }
    }
}

impl Protocol {
    /// The seed of repeat `run`.
    fn seed(&self, run: usize) -> u64 {
        self.cfg.seed + run as u64
    }

    /// Indices of the training volumes (segmentation) or samples (classification) repeat
    /// `run` trains on.
    fn subset(&self, run: usize) -> Result<Vec<usize>> {
        let seed = self.seed(run);
        let fraction = self.cfg.label_fraction;
        let subset = match &self.sets {
            Sets::Segmentation { train, .. } | Sets::VolumeSegmentation { train, .. } => {
                data::volume_fraction(train.len(), fraction, seed)
            }
            Sets::Detection { train, .. } => data::volume_fraction(train.names.len(), fraction, seed),
            Sets::Classification { train, .. } => split::stratified_fraction(
                &train.labels,
                fraction,
                rng::derive(seed, &[domain::FINETUNE, stream::FRACTION]),
            )?,
        };
        ensure!(
            !subset.is_empty(),
            "label fraction {fraction} leaves no training sample (the training set has {})",
            self.train_len()
        );
        Ok(subset)
    }

    fn train_len(&self) -> usize {
        match &self.sets {
            Sets::Segmentation { train, .. } | Sets::VolumeSegmentation { train, .. } => train.len(),
            Sets::Classification { train, .. } => train.labels.len(),
            Sets::Detection { train, .. } => train.names.len(),
        }
    }

    fn training_data(&self, subset: &[usize]) -> Result<TrainingData> {
        Ok(match &self.sets {
            Sets::Segmentation { train, size, .. } => {
                let volumes: Vec<&MaskedVolume> = subset.iter().map(|&i| &train[i]).collect();
                let (images, masks) = data::training_slices(&volumes, *size);
                TrainingData::Slices { images, masks }
            }
            Sets::VolumeSegmentation { train, sampling, .. } => TrainingData::Crops {
                volumes: subset
                    .iter()
                    .map(|&i| {
                        let v = &train[i];
                        let copy = MaskedVolume {
                            name: v.name.clone(),
                            voxels: v.voxels.shallow_clone(),
                            mask: v.mask.shallow_clone(),
                        };
                        (i, copy)
                    })
                    .collect(),
                sampling: *sampling,
            },
            Sets::Classification { train, .. } => {
                let index = Tensor::from_slice(&subset.iter().map(|&i| i as i64).collect::<Vec<_>>());
                let labels: Vec<i64> = subset.iter().map(|&i| train.labels[i]).collect();
                let present: std::collections::BTreeSet<i64> = labels.iter().copied().collect();
                ensure!(
                    present.len() >= 2,
                    "the training subset holds one class only ({present:?}); raise --label-fraction"
                );
                TrainingData::Volumes {
                    inputs: train.inputs.index_select(0, &index),
                    valid: train.valid.index_select(0, &index),
                    labels: Tensor::from_slice(&labels),
                }
            }
            Sets::Detection { train, size, .. } => {
                let chosen: std::collections::BTreeSet<usize> = subset.iter().copied().collect();
                let images: Vec<_> = train.images.iter().filter(|i| chosen.contains(&i.sample)).collect();
                ensure!(
                    images.iter().any(|i| !i.boxes.is_empty()),
                    "the training subset's {} images hold no object; raise --label-fraction",
                    images.len()
                );
                TrainingData::Images {
                    images: detection::resize_images(&images, *size),
                    targets: detection::scaled_objects(&images, *size),
                }
            }
        })
    }

    /// The protocol's network, initialised from `seed`.
    fn network(&self, seed: u64) -> Result<Network> {
        let (network, _) = Network::build(
            &self.run_cfg,
            &self.head_section,
            self.cfg.classes,
            self.device,
            self.cfg.precision,
            seed,
        )?;
        Ok(network)
    }

    /// The first repeat's figure material of a row that finished before an interruption:
    /// its saved weights scored again (evaluation is deterministic, so this is what the
    /// uninterrupted fine-tune kept).
    fn example_of(&self, init: Init, run: usize, out: &Path) -> Result<Option<Example>> {
        if matches!(self.sets, Sets::Classification { .. }) {
            return Ok(None);
        }
        let network = self.network(self.seed(run))?;
        let file = weights_file(out, init, run);
        let stored = checkpoint::read_safetensors(&file)?;
        run_dir::load_variables(&network.weights(), &stored, "", &[], &file)?;
        Ok(self.evaluate(&network, true)?.1)
    }

    /// Trains one row of repeat `run` and scores it; returns the trial and, for the first
    /// repeat, what its figures need. With `resumed`, the row continues from the checkpoint
    /// of an interrupted fine-tune (its progress and tensors). After every epoch but the last
    /// the row is checkpointed; at its end its weights are written and it joins `progress`'s
    /// finished trials.
    #[allow(clippy::too_many_arguments)]
    fn train_one(
        &self,
        init: Init,
        run: usize,
        subset: &[usize],
        data: &TrainingData,
        log: &mut MetricsLog,
        out: &Path,
        progress: &mut Progress,
        resumed: Option<(TrialProgress, Vec<(String, Tensor)>)>,
    ) -> Result<(Trial, Option<Example>)> {
        let started = Instant::now();
        let seed = self.seed(run);
        let network = self.network(seed)?;
        if init == Init::Pretrained {
            network.backbone.load(&self.checkpoint, &self.checkpoint_path)?;
        }
        let scale = self.cfg.train.backbone_lr_scale;
        let train_backbone = scale > 0.0;
        let mut optimizer = Optimizer::new(&self.cfg.optimizer, network.parameters(train_backbone))?;
        for prefix in network.backbone_prefixes() {
            optimizer.scale_lr(prefix, scale);
        }

        let n = data.len();
        let batch_size = self.cfg.train.batch_size.min(n);
        // A last batch of one sample is dropped: batch norm cannot train on it.
        let steps_per_epoch = match n % batch_size {
            1 if n > 1 => n / batch_size,
            _ => n.div_ceil(batch_size),
        };
        let epochs = self.cfg.train.epochs;
        let total_steps = steps_per_epoch * epochs;
        let mut curve = Curve {
            init,
            run,
            seed,
            points: Vec::new(),
        };
        let mut step = 0;
        let mut first_epoch = 0;
        let mut earlier_seconds = 0.0;
        let mut scores = BTreeMap::new();
        let mut loss_scaler = self
            .cfg
            .loss_scaling
            .enabled(self.cfg.precision)
            .then(LossScaler::default);
        if let Some((position, tensors)) = resumed {
            let source = out.join(run_dir::CHECKPOINT_DIR);
            run_dir::load_variables(&network.weights(), &tensors, MODEL_PREFIX, &[], &source)?;
            let state = tensors
                .into_iter()
                .filter_map(|(name, t)| Some((name.strip_prefix(OPTIMIZER_PREFIX)?.to_string(), t)))
                .collect();
            optimizer.load_state(state, position.optimizer_steps)?;
            step = position.step;
            first_epoch = position.epochs_done;
            earlier_seconds = position.seconds;
            scores = position.scores;
            curve = position.curve;
            if loss_scaler.is_some() {
                loss_scaler = Some(position.loss_scaler.unwrap_or_default());
            }
        }
        let seconds = |started: &Instant| earlier_seconds + started.elapsed().as_secs_f64();
        let mut example = None;
        let primary = report::primary_metric(self.task);
        for epoch in first_epoch..epochs {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng::generator(
                seed,
                &[domain::FINETUNE, stream::ORDER, epoch as u64],
            ));
            let mut losses = Vec::with_capacity(steps_per_epoch);
            for chunk in order.chunks(batch_size).take(steps_per_epoch) {
                let step_seed = rng::derive(seed, &[domain::FINETUNE, stream::STEP, step as u64]);
                tch::manual_seed(step_seed as i64);
                let batch = data.batch(chunk, self.cfg.input.flip, seed, epoch, self.device);
                let loss = network
                    .loss(&batch, train_backbone, step_seed)
                    .with_context(|| format!("the {} row of repeat {run}, epoch {epoch}, step {step}", init.name()))?;
                let value = loss.double_value(&[]);
                ensure!(
                    value.is_finite(),
                    "the {} row of repeat {run} (seed {seed}) diverged: loss {value} at epoch {epoch}, step {step}; lower `optimizer.lr` or set `optimizer.clip_grad_norm`",
                    init.name()
                );
                optimizer.zero_grad();
                loss_scaling::loss_for_backward(loss_scaler.as_ref(), &loss).backward();
                let lr = optim::learning_rate(&self.cfg.optimizer, step, total_steps, steps_per_epoch);
                loss_scaling::finish_step(
                    loss_scaler.as_mut(),
                    &mut optimizer,
                    self.cfg.optimizer.clip_grad_norm,
                    lr,
                    progress.global_step + 1,
                    || format!("the {} row of repeat {run}, epoch {epoch}, step {step}", init.name()),
                );
                losses.push(value);
                step += 1;
                progress.global_step += 1;
                checkpoint::abort_if_asked("step", progress.global_step);
            }
            let loss = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
            let last = epoch + 1 == epochs;
            let evaluated = if last || (epoch + 1) % self.cfg.train.eval_every == 0 {
                let (s, e) = self.evaluate(&network, last && run == 0)?;
                scores = s;
                if e.is_some() {
                    example = e;
                }
                Some(scores.clone())
            } else {
                None
            };
            let mut record = Map::new();
            record.insert("init".into(), json!(init.name()));
            record.insert("run".into(), json!(run));
            record.insert("seed".into(), json!(seed));
            record.insert("epoch".into(), json!(epoch + 1));
            record.insert("step".into(), json!(step));
            record.insert("loss".into(), json!(loss));
            record.insert("seconds".into(), json!(seconds(&started)));
            if let Some(evaluated) = &evaluated {
                for (k, v) in evaluated {
                    record.insert(format!("eval/{k}"), json!(v));
                }
            }
            log.write(&record)?;
            progress.records += 1;
            tracing::info!(
                "{} repeat {}/{} epoch {}/{epochs}: loss {loss:.4}{}",
                init.name(),
                run + 1,
                self.cfg.runs,
                epoch + 1,
                evaluated
                    .as_ref()
                    .and_then(|e| e.get(primary))
                    .map(|v| format!(", {primary} {v:.4}"))
                    .unwrap_or_default()
            );
            curve.points.push(report::CurvePoint {
                epoch: epoch + 1,
                loss,
                metric: evaluated.as_ref().and_then(|e| e.get(primary)).copied(),
            });
            if !last {
                let mut tensors: Vec<(String, Tensor)> = network
                    .weights()
                    .into_iter()
                    .map(|(name, t)| (format!("{MODEL_PREFIX}{name}"), t))
                    .collect();
                let (state, optimizer_steps) = optimizer.state();
                tensors.extend(
                    state
                        .into_iter()
                        .map(|(name, t)| (format!("{OPTIMIZER_PREFIX}{name}"), t)),
                );
                progress.current = Some(TrialProgress {
                    init,
                    run,
                    epochs_done: epoch + 1,
                    step,
                    optimizer_steps,
                    loss_scaler: loss_scaler.clone(),
                    scores: scores.clone(),
                    curve: curve.clone(),
                    seconds: seconds(&started),
                });
                progress::checkpoints(out).save_at(progress.global_step, &tensors, &*progress)?;
            }
        }
        checkpoint::write_safetensors_atomic(&weights_file(out, init, run), &network.weights())?;
        let trial = Trial {
            init,
            run,
            seed,
            train_samples: n,
            train_units: subset.len(),
            steps: step,
            metrics: scores,
            seconds: seconds(&started),
            curve,
        };
        progress.current = None;
        progress.finished.push(FinishedTrial {
            trial: trial.clone(),
            curve: trial.curve.clone(),
        });
        progress::checkpoints(out).save_at(progress.global_step, &[], &*progress)?;
        Ok((trial, example))
    }

    /// Scores `network` on the evaluation set; with `keep`, also returns what the figures
    /// need (the first volume's prediction, or the AP report).
    fn evaluate(&self, network: &Network, keep: bool) -> Result<(BTreeMap<String, f64>, Option<Example>)> {
        let classes = self.cfg.classes;
        let batch = self.cfg.train.batch_size as i64;
        match &self.sets {
            Sets::Segmentation { eval, size, .. } => {
                let mut per_volume = Vec::with_capacity(eval.len());
                let mut first = None;
                for (i, volume) in eval.iter().enumerate() {
                    let (d, h, w) = volume.voxels.size3()?;
                    let x = data::resize_slices(&volume.voxels, *size);
                    let predicted: Vec<Tensor> = (0..d)
                        .step_by(batch as usize)
                        .map(|start| {
                            let x = x.narrow(0, start, batch.min(d - start)).to_device(self.device);
                            tch::no_grad(|| {
                                network.logits(&x, None).map(|l| {
                                    l.upsample_bilinear2d([h, w], false, None, None)
                                        .argmax(1, false)
                                        .to_device(Device::Cpu)
                                })
                            })
                        })
                        .collect::<Result<_>>()?;
                    let prediction = Tensor::cat(&predicted, 0);
                    per_volume.push(
                        segmentation::volume_scores(&prediction, &volume.mask, classes)
                            .with_context(|| format!("scoring {}", volume.name))?,
                    );
                    if keep && i == 0 {
                        first = Some(Example::Segmentation(prediction));
                    }
                }
                Ok((report::segmentation_scores(&per_volume, classes), first))
            }
            Sets::VolumeSegmentation { eval, sampling, .. } => {
                let mut per_volume = Vec::with_capacity(eval.len());
                let mut first = None;
                for (i, volume) in eval.iter().enumerate() {
                    let prediction = volume_segmentation::predict_volume(
                        &volume.voxels,
                        sampling.settings.size,
                        &self.cfg.input.sliding_window,
                        self.device,
                        |window| tch::no_grad(|| network.logits(window, None)),
                    )
                    .with_context(|| format!("predicting {}", volume.name))?;
                    per_volume.push(
                        segmentation::volume_scores(&prediction, &volume.mask, classes)
                            .with_context(|| format!("scoring {}", volume.name))?,
                    );
                    if keep && i == 0 {
                        first = Some(Example::Segmentation(prediction));
                    }
                }
                Ok((report::segmentation_scores(&per_volume, classes), first))
            }
            Sets::Classification { eval, .. } => {
                let n = eval.labels.len() as i64;
                let probabilities: Vec<Tensor> = (0..n)
                    .step_by(batch as usize)
                    .map(|start| {
                        let len = batch.min(n - start);
                        let x = eval.inputs.narrow(0, start, len).to_device(self.device);
                        let valid = eval.valid.narrow(0, start, len).to_device(self.device);
                        network
                            .logits(&x, Some(&valid))
                            .map(|l| l.softmax(-1, Kind::Float).to_device(Device::Cpu))
                    })
                    .collect::<Result<_>>()?;
                let probabilities: Vec<f64> =
                    Vec::<f64>::try_from(Tensor::cat(&probabilities, 0).to_kind(Kind::Double).flatten(0, -1))?;
                let s = class_metrics::scores(&probabilities, classes as usize, &eval.labels)?;
                Ok((
                    BTreeMap::from([("auc".to_string(), s.auc), ("acc".to_string(), s.acc)]),
                    None,
                ))
            }
            Sets::Detection { eval, size, .. } => {
                let mut found = Vec::new();
                for chunk in eval.images.chunks(batch as usize) {
                    let images: Vec<_> = chunk.iter().collect();
                    let x = detection::resize_images(&images, *size);
                    let Prediction::Detections(detections) = network.predict(&x.to_device(self.device), None)? else {
                        bail!(
                            "head `{}` serves detection but predicted logits",
                            self.head_section.name
                        );
                    };
                    ensure!(
                        detections.len() == chunk.len(),
                        "head `{}` gave {} detection lists for {} images",
                        self.head_section.name,
                        detections.len(),
                        chunk.len()
                    );
                    for (image, d) in chunk.iter().zip(&detections) {
                        found.extend(detection::scored(image, d, *size, eval)?);
                    }
                }
                let ap_report = ap::average_precision(&found, &eval.ground_truth, &eval.categories, 0.5);
                let mut scores = BTreeMap::new();
                if let Some(mean) = ap_report.mean {
                    scores.insert("ap50".to_string(), mean);
                }
                for class in &ap_report.classes {
                    if let Some(value) = class.ap {
                        scores.insert(format!("ap50/{}", class.name), value);
                    }
                }
                Ok((scores, keep.then_some(Example::Detection(ap_report))))
            }
        }
    }

    fn describe_set(&self, split: Split, section: &Section) -> report::SetInfo {
        let (samples, units) = match (&self.sets, split) {
            (Sets::Segmentation { train, .. }, Split::Train) => (train.len(), slices(train)),
            (Sets::Segmentation { eval, .. }, Split::Eval) => (eval.len(), slices(eval)),
            (Sets::VolumeSegmentation { train, .. }, Split::Train) => (train.len(), None),
            (Sets::VolumeSegmentation { eval, .. }, Split::Eval) => (eval.len(), None),
            (Sets::Classification { train, .. }, Split::Train) => (train.labels.len(), None),
            (Sets::Classification { eval, .. }, Split::Eval) => (eval.labels.len(), None),
            (Sets::Detection { train, .. }, Split::Train) => (train.names.len(), Some(train.images.len())),
            (Sets::Detection { eval, .. }, Split::Eval) => (eval.names.len(), Some(eval.images.len())),
        };
        report::SetInfo {
            format: section.name.clone(),
            volumes: samples,
            slices: units,
        }
    }

    fn describe_input(&self) -> String {
        match &self.sets {
            Sets::Segmentation { size, .. } => {
                format!("slices resized to {size} x {size}; predictions resized back to each slice's size")
            }
            Sets::VolumeSegmentation { sampling, .. } => {
                let [d, h, w] = sampling.settings.size;
                format!(
                    "{} crops of {d} x {h} x {w} a training volume ({:.0}% centred on the foreground); whole volumes predicted by sliding windows ({:?})",
                    sampling.crops_per_volume,
                    100.0 * sampling.positive,
                    self.cfg.input.sliding_window
                )
            }
            Sets::Detection { size, .. } => format!(
                "images resized to {size} x {size} with their boxes; detections scaled back to each image's size"
            ),
            Sets::Classification { .. } => {
                let v = self.run_cfg.run.data.views.resolved().unwrap_or_default();
                format!(
                    "volumes as {} x {} x {} slice sequences ({:?})",
                    v.volume_slices, v.volume_size, v.volume_size, v.depth_mode
                )
            }
        }
    }
}

fn slices(volumes: &[MaskedVolume]) -> Option<usize> {
    Some(volumes.iter().map(|v| v.voxels.size()[0] as usize).sum())
}

/// Where a finished row's weights are written: `weights/<init>-run<run>.safetensors`.
fn weights_file(out: &Path, init: Init, run: usize) -> PathBuf {
    out.join(WEIGHTS_DIR)
        .join(format!("{}-run{run}.safetensors", init.name()))
}
