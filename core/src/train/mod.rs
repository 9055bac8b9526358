//! The training loop: stages, each with its trainable modules, objectives and weights; the
//! optimizer and schedule; metrics, checkpoints and exact resume.
//!
//! Exact resume needs no generator state: libtorch's generator is reseeded from
//! (seed, stage, step) before every step, and data order and views are pure functions of
//! (seed, epoch, sample id, view). A checkpoint records where the run is (stage, steps done
//! in it), the variables, the optimizer buffers and each objective's state.
//!
//! The folder splits the job: this file assembles and validates a run ([`Run::prepare`]);
//! `stages.rs` is the stage loop (steps, memory passes, checkpoints, resume); `health.rs`
//! the diagnostics (collapse indicators, `medssl check`'s probe step); `bench.rs` the
//! throughput bench; `report.rs` the run's report.md.

mod bench;
mod health;
mod report;
mod stages;

pub use bench::Bench;
pub use health::{GroupGradient, StepProbe};

use crate::assemble::{self, Backbone, Model};
use crate::config::{describe_error, LoadedConfig, OptimizerConfig, StageConfig};
use crate::loader::{DataPipeline, Needs};
use crate::objective::Consumes;
use crate::rng::{self, domain};
use crate::run_dir::{self, RunLock, CHECKPOINT_DIR};
use anyhow::{bail, Context, Result};
use figment::providers::Serialized;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Everything a run needs, validated before anything is written.
pub struct Run {
    cfg: LoadedConfig,
    device: Device,
    /// Every source of the run (the global id space).
    data: DataPipeline,
    /// Each stage's pipeline over the sources it draws from.
    stage_data: Vec<DataPipeline>,
    model: Model,
    resolved_config: String,
    /// Modules with parameters that no stage trains, each with the reason (report.md).
    untrained: Vec<String>,
    /// Resume even where `config.toml` was edited since the checkpoint (with a warning).
    allow_config_change: bool,
}

/// Named scalars of one step (loss terms, health indicators).
type Terms = Vec<(String, f64)>;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: usize,
    /// Each stage's name with the mean loss over its first and last tenth of logged steps;
    /// `None` for a stage that logged none (`epochs = 0`).
    pub stages: Vec<(String, Option<(f64, f64)>)>,
    pub seconds: f64,
}

impl Run {
    /// Builds the data pipeline and every component, and checks the stages against them.
    pub fn prepare(cfg: LoadedConfig) -> Result<Run> {
        let device = crate::device::resolve(&cfg.run.device)?;
        cfg.run.options.precision.check_device(device, "run.precision")?;
        crate::device::apply_determinism(cfg.run.options.deterministic, cfg.run.options.cudnn_benchmark)?;
        if cfg.run.options.threads > 0 {
            tch::set_num_threads(cfg.run.options.threads);
        }
        // The encoder and aggregator first: their config errors (levels the encoder lacks,
        // widths that do not fit, fewer slices than a layer needs) come before any data is
        // opened.
        tch::manual_seed(rng::derive(cfg.run.seed, &[domain::INIT]) as i64);
        let backbone = Backbone::build(&cfg, device)?;
        let (data, mut resolved) = assemble::data_pipeline(&cfg)?;
        for (key, value) in [
            ("log_every", cfg.run.options.log_every),
            ("checkpoint_every", cfg.run.options.checkpoint_every),
            ("keep_checkpoints", cfg.run.options.keep_checkpoints),
        ] {
            anyhow::ensure!(
                value >= 1,
                "config key `run.{key}` is 0; expected at least 1 (checkpoints are also written at the end of every stage)"
            );
        }
        let mut stage_data = Vec::new();
        for (i, stage) in cfg.run.stages.iter().enumerate() {
            let mut pipeline = data
                .restricted_to(stage.sources.as_deref())
                .with_context(|| format!("config stages[{i}] (`{}`): `sources`", stage.name))?;
            if let Some(batch_size) = stage.batch_size {
                anyhow::ensure!(
                    batch_size >= 1,
                    "config stages[{i}] (`{}`): `batch_size` must be at least 1",
                    stage.name
                );
                pipeline.loader.batch_size = batch_size;
            }
            // Batch norm (in every encoder and projector here) cannot normalise one sample:
            // its variance is 0/0, and the run would end at the first checkpoint with NaN
            // running statistics.
            anyhow::ensure!(
                pipeline.batch_size() >= 2,
                "config stages[{i}] (`{}`): a batch of {} sample cannot train: batch norm needs at least 2 samples a batch; raise `data.loader.batch_size` (or the stage's `batch_size`)",
                stage.name,
                pipeline.batch_size()
            );
            anyhow::ensure!(
                pipeline.steps_per_epoch() > 0,
                "config stages[{i}] (`{}`): its sources give {} samples an epoch: too few for one batch",
                stage.name,
                pipeline.epoch_len()
            );
            pipeline.pin_memory = device.is_cuda();
            stage_data.push(pipeline);
        }
        let model = Model::build(&cfg, backbone, data.num_samples())?;
        // After every component has drawn its initialisation, so that a partial
        // (`init_strict = false`) load leaves the rest as a run without one would start; a
        // resumed run's checkpoint then replaces it all.
        model.backbone.apply_init()?;
        resolved.extend(model.resolved.iter().cloned());
        let resolved_config = cfg.resolved_toml(&resolved)?;
        let run = Run {
            cfg,
            device,
            data,
            stage_data,
            model,
            resolved_config,
            untrained: Vec::new(),
            allow_config_change: false,
        };
        let mut run = run;
        run.check_stages()?;
        run.untrained = run.untrained_modules();
        for module in &run.untrained {
            anyhow::ensure!(
                !run.cfg.run.options.strict_training,
                "config: {module}; `run.strict_training = true` refuses such a run: list the module in a stage's `train`, or set `run.strict_training = false`"
            );
            tracing::warn!("{module}");
        }
        // A zero weight switches an objective off (ablations): it is neither computed nor
        // optimised, and its state is left as it is.
        for stage in &mut run.cfg.run.stages {
            stage.objectives.retain(|_, weight| *weight != 0.0);
        }
        Ok(run)
    }

    pub(super) fn check_stages(&self) -> Result<()> {
        let stages = &self.cfg.run.stages;
        anyhow::ensure!(
            !stages.is_empty(),
            "config has no `[[stages]]`: add at least one stage naming its objectives"
        );
        for (i, stage) in stages.iter().enumerate() {
            let at = format!("stages[{i}] (`{}`)", stage.name);
            anyhow::ensure!(
                !stage.objectives.is_empty(),
                "config {at}: `objectives` names no objective"
            );
            for (key, weight) in &stage.objectives {
                anyhow::ensure!(
                    weight.is_finite() && *weight >= 0.0,
                    "config {at}: objective `{key}` has weight {weight}; expected a finite weight >= 0 (0 switches it off)"
                );
            }
            anyhow::ensure!(
                stage.epochs == 0 || stage.objectives.values().any(|w| *w > 0.0),
                "config {at}: every objective has weight 0; set `epochs = 0` to skip the stage"
            );
            for key in stage.objectives.keys() {
                if !self.model.objectives.contains_key(key) {
                    let known: Vec<&str> = self.model.objectives.keys().map(String::as_str).collect();
                    bail!(
                        "config {at}: objective `{key}` is not defined; defined under [objectives]: {}",
                        known.join(", ")
                    );
                }
            }
            for module in &stage.train {
                match module.as_str() {
                    "encoder" => {}
                    "aggregator" if self.model.backbone.aggregator.is_some() => {}
                    "aggregator" => bail!("config {at}: `train` lists `aggregator` but the config has no [aggregator]"),
                    other => bail!("config {at}: `train` lists `{other}`; expected `encoder` or `aggregator`"),
                }
            }
            if self.trained_modules(stage).len() < stage.train.len() {
                tracing::warn!("stage `{}` lists `aggregator` in `train`, but none of its objectives uses the aggregator: it stays as it is", stage.name);
            }
            self.stage_optimizer(i)?;
        }
        Ok(())
    }

    /// Each module with parameters that no stage trains (a module listed only by skipped
    /// stages, or by stages whose objectives never run it), described for a warning: it
    /// would stay at its random initialisation, silently (a transformer aggregator under a
    /// config whose stages all say `train = ["encoder"]`).
    pub(super) fn untrained_modules(&self) -> Vec<String> {
        let modules = ["encoder", "aggregator"];
        let mut untrained = Vec::new();
        for module in modules {
            let prefix = format!("{module}.");
            let parameters = self
                .model
                .backbone
                .vs
                .variables()
                .into_iter()
                .filter(|(name, t)| t.requires_grad() && name.starts_with(&prefix))
                .count();
            if parameters == 0 {
                continue;
            }
            let trained = self.cfg.run.stages.iter().any(|stage| {
                stage.epochs > 0
                    && stage.objectives.values().any(|w| *w > 0.0)
                    && self.trained_modules(stage).contains(&module)
            });
            if !trained {
                let name = self.cfg.section(module, "name").map(|s| s.name).unwrap_or_default();
                untrained.push(format!(
                    "the {module} (`{name}`, {parameters} parameter tensors) is trained by no stage: it stays at its random initialisation"
                ));
            }
        }
        untrained
    }

    /// The optimizer config of stage `i`: `[optimizer]` with the stage's overrides on top.
    pub(super) fn stage_optimizer(&self, i: usize) -> Result<OptimizerConfig> {
        let base = &self.cfg.run.optimizer;
        match &self.cfg.run.stages[i].optimizer {
            None => Ok(base.clone()),
            Some(overrides) => {
                let figment = figment::Figment::from(Serialized::defaults(base)).merge(Serialized::defaults(overrides));
                figment
                    .extract()
                    .map_err(|e| describe_error(&figment, e, &format!("stages[{i}].optimizer")))
            }
        }
    }

    /// Parameters optimised in `stage`: those of its trainable modules and of its objectives.
    pub(super) fn stage_parameters(&self, stage: &StageConfig) -> Vec<(String, Tensor)> {
        let mut prefixes: Vec<String> = self
            .trained_modules(stage)
            .into_iter()
            .map(|m| format!("{m}."))
            .collect();
        prefixes.extend(stage.objectives.keys().map(|k| format!("objectives.{k}.")));
        self.model
            .backbone
            .vs
            .variables()
            .into_iter()
            .filter(|(name, t)| t.requires_grad() && prefixes.iter().any(|p| name.starts_with(p)))
            .collect()
    }

    /// The modules of `train` that the stage's objectives actually run: an aggregator
    /// under slice-only objectives gets no gradient, so it is not optimised.
    pub(super) fn trained_modules<'s>(&self, stage: &'s StageConfig) -> Vec<&'s str> {
        let needs = self.needs(stage);
        let uses_aggregator = needs.contains(Consumes::VolumeViews) || needs.contains(Consumes::SliceSequence);
        stage
            .train
            .iter()
            .map(String::as_str)
            .filter(|m| *m != "aggregator" || uses_aggregator)
            .collect()
    }

    pub(super) fn needs(&self, stage: &StageConfig) -> Needs {
        Needs::of_run(
            stage.objectives.keys().map(|key| self.model.objectives[key].consumes()),
            self.model.backbone.encoder.spatial_dims(),
        )
    }

    /// Steps of each stage (0 for a skipped one).
    pub(super) fn stage_steps(&self) -> Vec<usize> {
        self.stage_steps_at(self.data.shard.world)
    }

    /// Each stage's steps as `world` processes take them (a checkpoint's, written at
    /// another world size).
    pub(super) fn stage_steps_at(&self, world: usize) -> Vec<usize> {
        self.cfg
            .run
            .stages
            .iter()
            .zip(&self.stage_data)
            .map(|(s, data)| s.epochs * data.as_rank_zero_of(world).steps_per_epoch())
            .collect()
    }

    /// A copy of every model variable (parameters and buffers such as batch-norm
    /// statistics), by name as checkpoints store them without the `model.` prefix.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self
            .model
            .backbone
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Epochs of stage `i` (0: the stage is skipped).
    pub fn stage_epochs(&self, i: usize) -> usize {
        self.cfg.run.stages[i].epochs
    }

    /// Resume even where the run's `config.toml` was edited since its checkpoint, with a
    /// warning that the resume is no longer exact (`medssl resume --allow-config-change`).
    pub fn allow_config_change(&mut self) {
        self.allow_config_change = true;
    }

    /// Number of stages.
    pub fn stage_count(&self) -> usize {
        self.cfg.run.stages.len()
    }

    /// The resolved config that the run directory keeps.
    pub fn resolved_config(&self) -> &str {
        &self.resolved_config
    }
}

/// Creates a fresh run directory and locks it for this process. An existing non-empty one
/// is refused unless `force`, which replaces it only if it is a run directory no process
/// holds ([`run_dir::create`]).
pub fn create_run_dir(dir: &Path, force: bool) -> Result<RunLock> {
    let lock = run_dir::create(
        dir,
        force,
        &format!("use `medssl resume {}` to continue it", dir.display()),
    )?;
    std::fs::create_dir_all(dir.join(CHECKPOINT_DIR))
        .with_context(|| format!("cannot create run directory `{}`", dir.display()))?;
    Ok(lock)
}
