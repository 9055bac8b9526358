//! The training loop: stages, each with its trainable modules, objectives and weights; the
//! optimizer and schedule; metrics, checkpoints and exact resume.
//!
//! Exact resume needs no generator state: libtorch's generator is reseeded from
//! (seed, stage, step) before every step, and data order and views are pure functions of
//! (seed, epoch, sample id, view). A checkpoint records where the run is (stage, steps done
//! in it), the variables, the optimizer buffers and each objective's state.

use crate::assemble::{self, Backbone, Model};
use crate::checkpoint::{self, Checkpoints, TrainingState, FORMAT};
use crate::config::{describe_error, LoadedConfig, OptimizerConfig, StageConfig};
use crate::loader::{Batch, DataPipeline, Needs};
use crate::metrics::{self, MetricsLog};
use crate::objective::{Consumes, Progress, SliceSequence, StepInput};
use crate::optim::{self, Optimizer};
use crate::rng::{self, domain};
use crate::run_dir::{self, RunLock};
use anyhow::{bail, Context, Result};
use figment::providers::Serialized;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

/// Files of a run directory.
pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.png";
pub const REPORT_FILE: &str = "report.md";
pub const CHECKPOINT_DIR: &str = "checkpoints";

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
}

/// Named scalars of one step (loss terms, health indicators).
type Terms = Vec<(String, f64)>;

/// A batch's embeddings, computed once per step and shared by every objective.
struct Embedded {
    ids: Tensor,
    slice_views: Vec<Tensor>,
    global_slice_views: usize,
    volume_views: Vec<Tensor>,
    sequence: Option<Tensor>,
    valid: Option<Tensor>,
    train_aggregator: bool,
}

impl Embedded {
    /// Collapse indicators (Jing et al., ICLR 2022, Sec. 3): the mean over dimensions of the
    /// per-dimension std, across the batch, of the L2-normalised embeddings of the first
    /// view at each level. Collapse shows as it falling towards 0; for embeddings spread
    /// uniformly on the sphere of dimension d it is about 1/sqrt(d).
    fn health(&self) -> Vec<(String, f64)> {
        let std = |x: &Tensor| -> f64 {
            let x = x.detach();
            let x = &x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
            x.std_dim(0, true, false).mean(x.kind()).double_value(&[])
        };
        let mut health = Vec::new();
        if let Some(first) = self.slice_views.first().filter(|v| v.size()[0] > 1) {
            health.push(("slice_embedding_std".to_string(), std(first)));
        }
        if let Some(first) = self.volume_views.first().filter(|v| v.size()[0] > 1) {
            health.push(("volume_embedding_std".to_string(), std(first)));
        }
        health
    }

    fn input<'a>(&'a self, aggregator: Option<&'a dyn crate::aggregator::Aggregator>) -> StepInput<'a> {
        StepInput {
            ids: &self.ids,
            slice_views: (!self.slice_views.is_empty()).then_some(self.slice_views.as_slice()),
            global_slice_views: self.global_slice_views,
            volume_views: (!self.volume_views.is_empty()).then_some(self.volume_views.as_slice()),
            slice_sequence: match (&self.sequence, &self.valid, aggregator) {
                (Some(embeddings), Some(valid), Some(aggregator)) => Some(SliceSequence {
                    embeddings,
                    valid,
                    aggregator,
                    train: self.train_aggregator,
                }),
                _ => None,
            },
        }
    }
}

/// What [`Run::probe_step`] measured.
#[derive(Debug, Clone)]
pub struct StepProbe {
    pub loss: f64,
    pub terms: Vec<(String, f64)>,
    pub groups: Vec<GroupGradient>,
}

/// Gradient of one trainable group (`encoder`, `aggregator`, `objectives.KEY`).
#[derive(Debug, Clone)]
pub struct GroupGradient {
    pub group: String,
    /// L2 norm over the group's gradients.
    pub norm: f64,
    pub parameters: usize,
    /// Parameters whose gradient is non-zero.
    pub with_gradient: usize,
}

/// What [`Run::bench`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bench {
    pub stage: String,
    pub batch_size: usize,
    /// Timed training steps.
    pub steps: usize,
    /// Loader throughput alone: decoding and augmentation on the worker threads.
    pub data_samples_per_s: f64,
    /// Forward, backward and optimizer step on in-memory batches.
    pub train_steps_per_s: f64,
    pub train_samples_per_s: f64,
    /// Peak resident memory of the process (Linux `VmHWM`), if known.
    pub peak_rss_mib: Option<f64>,
    pub device: String,
    pub threads: i32,
    pub loader_workers: usize,
}

/// Peak resident set size of this process, from /proc (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

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
        if cfg.run.run.threads > 0 {
            tch::set_num_threads(cfg.run.run.threads);
        }
        // The encoder and aggregator first: their config errors (levels the encoder lacks,
        // widths that do not fit, fewer slices than a layer needs) come before any data is
        // opened.
        tch::manual_seed(rng::derive(cfg.run.seed, &[domain::INIT]) as i64);
        let backbone = Backbone::build(&cfg, device)?;
        let (data, mut resolved) = assemble::data_pipeline(&cfg)?;
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
            anyhow::ensure!(
                pipeline.steps_per_epoch() > 0,
                "config stages[{i}] (`{}`): its sources give {} samples an epoch: too few for one batch",
                stage.name,
                pipeline.epoch_len()
            );
            stage_data.push(pipeline);
        }
        let model = Model::build(&cfg, backbone, data.num_samples())?;
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
        };
        let mut run = run;
        run.check_stages()?;
        run.untrained = run.untrained_modules();
        for module in &run.untrained {
            anyhow::ensure!(
                !run.cfg.run.run.strict_training,
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

    fn check_stages(&self) -> Result<()> {
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
                    "aggregator" if self.model.aggregator.is_some() => {}
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
    fn untrained_modules(&self) -> Vec<String> {
        let modules = ["encoder", "aggregator"];
        let mut untrained = Vec::new();
        for module in modules {
            let prefix = format!("{module}.");
            let parameters = self
                .model
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
    fn stage_optimizer(&self, i: usize) -> Result<OptimizerConfig> {
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

    /// One forward and backward pass of stage `stage_index` on its first batch, without an
    /// optimizer step: the loss and each trainable group's gradient norm. `medssl check`
    /// and the composition test use it to prove a config trains before committing to a run.
    pub fn probe_step(&mut self, stage_index: usize) -> Result<StepProbe> {
        let stage = self.cfg.run.stages.get(stage_index).context("no such stage")?.clone();
        let needs = self.needs(&stage);
        let data = self.stage_data[stage_index].clone();
        let batch = data
            .epoch(0, 0, needs)
            .next()
            .context("the data pipeline produced no batch")??;
        let progress = Progress {
            epoch: 0,
            step: 0,
            steps_per_epoch: data.steps_per_epoch(),
        };
        self.start_epoch(stage_index, &progress)?;
        tch::manual_seed(rng::derive(self.cfg.run.seed, &[domain::STEP, stage_index as u64, 0]) as i64);
        let mut optimizer = Optimizer::new(&self.stage_optimizer(stage_index)?, self.stage_parameters(&stage))?;
        optimizer.zero_grad();
        let (loss, terms, _) = self.loss(&stage, &batch, &progress)?;
        let value = loss.double_value(&[]);
        loss.backward();
        let mut grad_norms: BTreeMap<String, (f64, usize, usize)> = BTreeMap::new();
        for (name, p) in optimizer.parameters() {
            let group = match name.split('.').collect::<Vec<_>>().as_slice() {
                ["objectives", key, ..] => format!("objectives.{key}"),
                [module, ..] => module.to_string(),
                [] => continue,
            };
            let g = p.grad();
            let norm = if g.defined() { g.norm().double_value(&[]) } else { 0.0 };
            let entry = grad_norms.entry(group).or_insert((0.0, 0, 0));
            entry.0 += norm * norm;
            entry.1 += 1;
            entry.2 += usize::from(norm > 0.0);
        }
        optimizer.zero_grad();
        Ok(StepProbe {
            loss: value,
            terms,
            groups: grad_norms
                .into_iter()
                .map(|(k, (sq, n, nonzero))| GroupGradient {
                    group: k,
                    norm: sq.sqrt(),
                    parameters: n,
                    with_gradient: nonzero,
                })
                .collect(),
        })
    }

    /// Throughput of stage `stage_index`: the loader alone over `steps` batches, then
    /// `steps` optimizer steps on batches already in memory (after one warm-up step), so
    /// each number measures one thing. The model trains; nothing is written.
    pub fn bench(&mut self, stage_index: usize, steps: usize) -> Result<Bench> {
        let stage = self.cfg.run.stages.get(stage_index).context("no such stage")?.clone();
        let needs = self.needs(&stage);
        let data = self.stage_data[stage_index].clone();
        let steps = steps.clamp(1, data.steps_per_epoch());
        let started = Instant::now();
        let batches: Vec<Batch> = data.epoch(0, 0, needs).take(steps + 1).collect::<Result<_>>()?;
        let data_seconds = started.elapsed().as_secs_f64();
        let opt_cfg = self.stage_optimizer(stage_index)?;
        let mut optimizer = Optimizer::new(&opt_cfg, self.stage_parameters(&stage))?;
        let progress = Progress {
            epoch: 0,
            step: 0,
            steps_per_epoch: data.steps_per_epoch(),
        };
        self.start_epoch(stage_index, &progress)?;
        let mut train_seconds = 0.0;
        for (i, batch) in batches.iter().enumerate() {
            let tick = Instant::now();
            let (loss, _, _) = self.loss(&stage, batch, &progress)?;
            optimizer.zero_grad();
            loss.backward();
            optimizer.step(opt_cfg.lr);
            if let Device::Cuda(_) = self.device {
                tch::Cuda::synchronize(0);
            }
            // The first step pays one-off allocations; it is not counted.
            if i > 0 {
                train_seconds += tick.elapsed().as_secs_f64();
            }
        }
        let batch_size = data.batch_size() as f64;
        let measured = batches.len().saturating_sub(1).max(1) as f64;
        Ok(Bench {
            stage: stage.name,
            batch_size: data.batch_size(),
            steps: batches.len().saturating_sub(1),
            data_samples_per_s: batches.len() as f64 * batch_size / data_seconds.max(1e-9),
            train_steps_per_s: measured / train_seconds.max(1e-9),
            train_samples_per_s: measured * batch_size / train_seconds.max(1e-9),
            peak_rss_mib: peak_rss_mib(),
            device: format!("{:?}", self.device),
            threads: tch::get_num_threads(),
            loader_workers: data.loader.workers,
        })
    }

    /// Number of stages.
    /// A copy of every model variable (parameters and buffers such as batch-norm
    /// statistics), by name as checkpoints store them without the `model.` prefix.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self
            .model
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

    pub fn stages(&self) -> usize {
        self.cfg.run.stages.len()
    }

    /// The resolved config that the run directory keeps.
    pub fn resolved_config(&self) -> &str {
        &self.resolved_config
    }

    /// Trains in `run_dir`: from the start, or from its latest checkpoint when `resume`.
    pub fn train(mut self, run_dir: &Path, resume: bool) -> Result<Summary> {
        let started = Instant::now();
        let store = Checkpoints::new(run_dir.join(CHECKPOINT_DIR), self.cfg.run.run.keep_checkpoints);
        let fingerprint = self.model.fingerprint();
        let mut position = TrainingState {
            format: FORMAT,
            stage: 0,
            stage_step: 0,
            global_step: 0,
            optimizer_steps: 0,
            objectives: BTreeMap::new(),
            model_fingerprint: fingerprint.clone(),
        };
        let mut optimizer_state = Vec::new();
        if resume {
            if let Some(latest) = store.latest()? {
                let (tensors, state) = checkpoint::load(&latest)?;
                if state.model_fingerprint != fingerprint {
                    bail!(
                        "checkpoint `{}` was written for another model (fingerprint {}, this config gives {}): its config is incompatible",
                        latest.display(),
                        state.model_fingerprint,
                        fingerprint
                    );
                }
                self.check_position(&state)
                    .with_context(|| format!("checkpoint state `{}`", latest.join("state.json").display()))?;
                optimizer_state = self.restore(&latest, tensors)?;
                for (key, value) in &state.objectives {
                    if let Some(objective) = self.model.objectives.get_mut(key) {
                        objective
                            .load_state(value.clone())
                            .with_context(|| format!("checkpoint `{}`: objective `{key}`", latest.display()))?;
                    }
                }
                tracing::info!("resuming from {} (global step {})", latest.display(), state.global_step);
                position = state;
            } else {
                tracing::info!("no checkpoint in {}: starting from the beginning", run_dir.display());
            }
        }
        let mut log = MetricsLog::open(&run_dir.join(METRICS_FILE), resume.then_some(position.global_step))?;
        let total_steps: usize = self
            .cfg
            .run
            .stages
            .iter()
            .zip(&self.stage_data)
            .map(|(s, data)| s.epochs * data.steps_per_epoch())
            .sum();
        let bar = progress_bar(total_steps, position.global_step);

        for stage_index in position.stage..self.cfg.run.stages.len() {
            let stage = self.cfg.run.stages[stage_index].clone();
            if stage.epochs == 0 {
                tracing::info!("stage `{}` has epochs = 0: skipped", stage.name);
                continue;
            }
            let opt_cfg = self.stage_optimizer(stage_index)?;
            let mut optimizer = Optimizer::new(&opt_cfg, self.stage_parameters(&stage))?;
            if stage_index == position.stage && position.stage_step > 0 {
                optimizer.load_state(std::mem::take(&mut optimizer_state), position.optimizer_steps)?;
            }
            let start = if stage_index == position.stage {
                position.stage_step
            } else {
                0
            };
            self.train_stage(
                stage_index,
                &stage,
                &opt_cfg,
                &mut optimizer,
                start,
                &mut position,
                &store,
                &mut log,
                &bar,
            )?;
            // Stage done: the next one starts with fresh optimizer state.
            position.stage = stage_index + 1;
            position.stage_step = 0;
            position.optimizer_steps = 0;
            self.save(&store, &mut position, None)?;
        }
        bar.finish_and_clear();
        let summary = self.finish(run_dir, started.elapsed().as_secs_f64(), position.global_step)?;
        Ok(summary)
    }

    /// Refuses a checkpoint position that this config cannot have produced: a stage index
    /// past the last stage, more steps in a stage than it has, or a global step that is not
    /// the sum of the stages before plus the steps into this one.
    fn check_position(&self, state: &TrainingState) -> Result<()> {
        let steps: Vec<usize> = self
            .cfg
            .run
            .stages
            .iter()
            .zip(&self.stage_data)
            .map(|(s, data)| s.epochs * data.steps_per_epoch())
            .collect();
        let stages = steps.len();
        anyhow::ensure!(
            state.stage <= stages,
            "stage index {} but the config has {stages} stages: the file is corrupt or from another config",
            state.stage
        );
        let in_stage = steps.get(state.stage).copied().unwrap_or(0);
        anyhow::ensure!(
            state.stage_step <= in_stage,
            "{} steps into stage {} but that stage has {in_stage} steps: the file is corrupt or from another config",
            state.stage_step,
            state.stage
        );
        let expected = steps[..state.stage].iter().sum::<usize>() + state.stage_step;
        anyhow::ensure!(
            state.global_step == expected,
            "global step {} but stage {} at step {} means global step {expected}: the file is corrupt or from another config",
            state.global_step,
            state.stage,
            state.stage_step
        );
        Ok(())
    }

    /// Copies checkpoint tensors into the model; returns the optimizer's part.
    fn restore(&mut self, from: &Path, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let mut vars = self.model.vs.variables();
        let mut optimizer = Vec::new();
        let mut seen = 0;
        for (name, tensor) in tensors {
            if let Some(var_name) = name.strip_prefix("model.") {
                let Some(var) = vars.get_mut(var_name) else {
                    bail!("checkpoint `{}` holds `{var_name}`, which this config's model does not have: incompatible config", from.display());
                };
                if var.size() != tensor.size() {
                    bail!(
                        "checkpoint `{}`: `{var_name}` has shape {:?}, this config's model expects {:?}: incompatible config",
                        from.display(),
                        tensor.size(),
                        var.size()
                    );
                }
                tch::no_grad(|| var.copy_(&tensor));
                seen += 1;
            } else if let Some(opt_name) = name.strip_prefix("optim.") {
                optimizer.push((opt_name.to_string(), tensor));
            }
        }
        if seen != vars.len() {
            bail!(
                "checkpoint `{}` holds {seen} of the model's {} variables: incompatible config",
                from.display(),
                vars.len()
            );
        }
        Ok(optimizer)
    }

    /// Parameters optimised in `stage`: those of its trainable modules and of its objectives.
    fn stage_parameters(&self, stage: &StageConfig) -> Vec<(String, Tensor)> {
        let mut prefixes: Vec<String> = self
            .trained_modules(stage)
            .into_iter()
            .map(|m| format!("{m}."))
            .collect();
        prefixes.extend(stage.objectives.keys().map(|k| format!("objectives.{k}.")));
        self.model
            .vs
            .variables()
            .into_iter()
            .filter(|(name, t)| t.requires_grad() && prefixes.iter().any(|p| name.starts_with(p)))
            .collect()
    }

    /// The modules of `train` that the stage's objectives actually run: an aggregator
    /// under slice-only objectives gets no gradient, so it is not optimised.
    fn trained_modules<'s>(&self, stage: &'s StageConfig) -> Vec<&'s str> {
        let needs = self.needs(stage);
        let uses_aggregator = needs.volume_views || needs.sequence;
        stage
            .train
            .iter()
            .map(String::as_str)
            .filter(|m| *m != "aggregator" || uses_aggregator)
            .collect()
    }

    /// Runs the memory pass that objectives ask for (one pass over the epoch's batches
    /// without gradients, every module in eval mode), then each objective's epoch-start hook.
    fn start_epoch(&mut self, stage_index: usize, progress: &Progress) -> Result<()> {
        let stage = self.cfg.run.stages[stage_index].clone();
        let stage = &stage;
        let wanting: Vec<String> = stage
            .objectives
            .keys()
            .filter(|k| self.model.objectives[k.as_str()].needs_memory_pass(progress))
            .cloned()
            .collect();
        if !wanting.is_empty() {
            tracing::info!("memory pass over epoch {} for {}", progress.epoch, wanting.join(", "));
            let data = self.stage_data[stage_index].clone();
            for batch in data.epoch(progress.epoch, 0, self.needs(stage)) {
                let batch = batch.with_context(|| format!("memory pass of stage `{}`", stage.name))?;
                let embedded = tch::no_grad(|| self.embed(stage, &batch, true));
                let aggregator = self.model.aggregator.as_deref();
                for key in &wanting {
                    let objective = self.model.objectives.get_mut(key).expect("checked");
                    tch::no_grad(|| objective.observe(&embedded.input(aggregator), progress))
                        .with_context(|| format!("objective `{key}` in its memory pass"))?;
                }
            }
        }
        for key in stage.objectives.keys() {
            let objective = self
                .model
                .objectives
                .get_mut(key)
                .expect("stages are checked against objectives");
            objective
                .on_epoch_start(progress)
                .with_context(|| format!("objective `{key}` at epoch start"))?;
        }
        Ok(())
    }

    fn needs(&self, stage: &StageConfig) -> Needs {
        let mut needs = Needs::default();
        for key in stage.objectives.keys() {
            match self.model.objectives[key].consumes() {
                Consumes::SliceViews => needs.slice_views = true,
                Consumes::VolumeViews => needs.volume_views = true,
                Consumes::SliceSequence => needs.sequence = true,
            }
        }
        needs
    }

    #[allow(clippy::too_many_arguments)]
    fn train_stage(
        &mut self,
        stage_index: usize,
        stage: &StageConfig,
        opt_cfg: &OptimizerConfig,
        optimizer: &mut Optimizer,
        start: usize,
        position: &mut TrainingState,
        store: &Checkpoints,
        log: &mut MetricsLog,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let data = self.stage_data[stage_index].clone();
        let steps_per_epoch = data.steps_per_epoch();
        let total = stage.epochs * steps_per_epoch;
        let total_run_steps: usize = self
            .cfg
            .run
            .stages
            .iter()
            .zip(&self.stage_data)
            .map(|(s, d)| s.epochs * d.steps_per_epoch())
            .sum();
        let needs = self.needs(stage);
        let run = self.cfg.run.run.clone();
        let mut step = start;
        let mut last_step_end = Instant::now();
        while step < total {
            let epoch = step / steps_per_epoch;
            let batches = data.epoch(epoch, step % steps_per_epoch, needs);
            for batch in batches {
                let batch = batch.with_context(|| format!("stage `{}`, epoch {epoch}", stage.name))?;
                let progress = Progress {
                    epoch,
                    step,
                    steps_per_epoch,
                };
                if step.is_multiple_of(steps_per_epoch) {
                    self.start_epoch(stage_index, &progress)?;
                }
                tch::manual_seed(
                    rng::derive(self.cfg.run.seed, &[domain::STEP, stage_index as u64, step as u64]) as i64,
                );
                let lr = optim::learning_rate(opt_cfg, step, total, steps_per_epoch);
                let (loss, terms, health) = self.loss(stage, &batch, &progress)?;
                let value = loss.double_value(&[]);
                if !value.is_finite() {
                    bail!(
                        "loss became {value} in stage `{}` at step {} (terms: {terms:?}); stopping, the last good checkpoint is kept",
                        stage.name,
                        position.global_step + 1
                    );
                }
                optimizer.zero_grad();
                loss.backward();
                let grad_norm = optimizer.clip_grad_norm(opt_cfg.clip_grad_norm);
                optimizer.step(lr);
                for key in stage.objectives.keys() {
                    self.model
                        .objectives
                        .get_mut(key)
                        .expect("checked")
                        .on_step_end(&progress)?;
                }
                step += 1;
                position.stage = stage_index;
                position.stage_step = step;
                position.global_step += 1;
                let batch_size = batch.ids.size()[0] as f64;
                if position.global_step.is_multiple_of(run.log_every.max(1)) || step == total {
                    let mut record = Map::new();
                    record.insert("stage".into(), json!(stage.name));
                    record.insert("stage_index".into(), json!(stage_index));
                    record.insert("epoch".into(), json!(epoch));
                    record.insert("step".into(), json!(position.global_step));
                    record.insert("loss".into(), json!(value));
                    for (name, v) in &terms {
                        record.insert(format!("loss/{name}"), json!(v));
                    }
                    for (name, v) in &health {
                        record.insert(format!("health/{name}"), json!(v));
                    }
                    record.insert("lr".into(), json!(lr));
                    record.insert("grad_norm".into(), json!(grad_norm));
                    // Wall time since the previous step ended: data waiting included.
                    record.insert(
                        "samples_per_s".into(),
                        json!(batch_size / last_step_end.elapsed().as_secs_f64().max(1e-9)),
                    );
                    log.write(&record)?;
                    if bar.is_hidden() {
                        tracing::info!(
                            "stage {} epoch {epoch} step {}/{total_run_steps}: loss {value:.4} lr {lr:.2e}",
                            stage.name,
                            position.global_step,
                        );
                    } else {
                        bar.set_message(format!("{} loss {value:.4}", stage.name));
                    }
                }
                bar.inc(1);
                last_step_end = Instant::now();
                if position.global_step.is_multiple_of(run.checkpoint_every.max(1)) && step < total {
                    self.save(store, position, Some(optimizer))?;
                }
                if step >= total {
                    break;
                }
            }
        }
        Ok(())
    }

    /// The batch's embeddings that the stage's objectives consume, each computed once.
    /// With `observe`, every module runs in eval mode (the caller disables autograd).
    fn embed(&self, stage: &StageConfig, batch: &Batch, observe: bool) -> Embedded {
        let device = self.device;
        let train_encoder = !observe && stage.train.iter().any(|m| m == "encoder");
        let train_aggregator = !observe && stage.train.iter().any(|m| m == "aggregator");
        let encoder = &self.model.encoder;
        let features = &self.model.slice_features;
        // A frozen encoder runs without autograd and with batch norm in eval mode.
        let encode = |images: &Tensor| -> crate::encoder::EncoderOutput {
            if train_encoder {
                encoder.forward(images, true)
            } else {
                tch::no_grad(|| encoder.forward(images, false))
            }
        };
        // Slices of a sequence enter the aggregator as their (multi-level) features, Eq. 9.
        let embed_volume = |volume: &Tensor| -> Tensor {
            let size = volume.size();
            let (b, t) = (size[0], size[2]);
            let slices = volume
                .to_device(device)
                .transpose(1, 2)
                .reshape([b * t, size[1], size[3], size[4]]);
            features.compute(&encode(&slices)).view([b, t, -1])
        };
        let slice_views = batch
            .slice_views
            .iter()
            .map(|v| encode(&v.to_device(device)).pooled)
            .collect();
        let volume_views = match &self.model.aggregator {
            Some(aggregator) => batch
                .volume_views
                .iter()
                .zip(&batch.volume_valid)
                .map(|(v, valid)| {
                    aggregator
                        .forward(&embed_volume(v), Some(&valid.to_device(device)), train_aggregator)
                        .volume
                })
                .collect(),
            None => Vec::new(),
        };
        let sequence = batch.sequence.as_ref().map(|(voxels, _)| embed_volume(voxels));
        let valid = batch.sequence.as_ref().map(|(_, valid)| valid.to_device(device));
        Embedded {
            ids: batch.ids.to_device(device),
            slice_views,
            global_slice_views: self.data.views.slice_views,
            volume_views,
            sequence,
            valid,
            train_aggregator,
        }
    }

    /// The weighted sum of the stage's objectives over one batch, each term, and the
    /// embeddings' health.
    fn loss(&mut self, stage: &StageConfig, batch: &Batch, progress: &Progress) -> Result<(Tensor, Terms, Terms)> {
        let embedded = self.embed(stage, batch, false);
        let aggregator = self.model.aggregator.as_deref();
        let mut total: Option<Tensor> = None;
        let mut terms = Vec::new();
        for (key, weight) in &stage.objectives {
            let objective = self.model.objectives.get_mut(key).expect("checked");
            let loss = objective
                .loss(&embedded.input(aggregator), progress)
                .with_context(|| format!("objective `{key}`"))?;
            terms.push((key.clone(), loss.total.double_value(&[])));
            for (name, v) in loss.terms {
                terms.push((format!("{key}/{name}"), v));
            }
            let weighted = loss.total * *weight;
            total = Some(match total {
                Some(t) => t + weighted,
                None => weighted,
            });
        }
        Ok((
            total.expect("a stage has at least one objective"),
            terms,
            embedded.health(),
        ))
    }

    fn save(&self, store: &Checkpoints, position: &mut TrainingState, optimizer: Option<&Optimizer>) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self
            .model
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (format!("model.{n}"), t))
            .collect();
        if let Some(optimizer) = optimizer {
            let (state, steps) = optimizer.state();
            tensors.extend(state.into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
            position.optimizer_steps = steps;
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        position.objectives = self
            .model
            .objectives
            .iter()
            .map(|(k, o)| (k.clone(), o.state()))
            .collect();
        store.save(&tensors, position)?;
        Ok(())
    }

    /// Writes the loss plot and the report.
    fn finish(&self, run_dir: &Path, seconds: f64, steps: usize) -> Result<Summary> {
        let records = metrics::read_records(&run_dir.join(METRICS_FILE))?;
        metrics::plot_losses(&records, &run_dir.join(PLOT_FILE))?;
        let mut stages = Vec::new();
        let mut report = String::new();
        report.push_str(&format!("# medssl run `{}`\n\n", run_dir.display()));
        report.push_str(&format!(
            "- device: {:?}\n- samples: {} (global ids over sources {})\n- steps: {steps}\n- wall time of this invocation: {seconds:.1} s\n- encoder: {}, aggregator: {}\n\n",
            self.device,
            self.data.num_samples(),
            self.data.sources.keys().join(", "),
            self.cfg.section("encoder", "name").map(|s| s.name).unwrap_or_default(),
            self.cfg.run.aggregator.as_ref().and_then(|_| self.cfg.section("aggregator", "name").ok()).map(|s| s.name).unwrap_or_else(|| "none".into()),
        ));
        for module in &self.untrained {
            report.push_str(&format!("- warning: {module}\n"));
        }
        if !self.untrained.is_empty() {
            report.push('\n');
        }
        report.push_str(
            "| stage | epochs | steps an epoch (batch) | objectives (weight) | first loss | last loss |\n|---|---|---|---|---|---|\n",
        );
        let stage_records: Vec<Vec<_>> = (0..self.cfg.run.stages.len())
            .map(|i| {
                records
                    .iter()
                    .filter(|r| r.get("stage_index").and_then(Value::as_u64) == Some(i as u64))
                    .cloned()
                    .collect()
            })
            .collect();
        for ((stage, stage_records), data) in self.cfg.run.stages.iter().zip(&stage_records).zip(&self.stage_data) {
            let w = (stage_records.len() / 10).max(1);
            let loss = metrics::first_and_last_mean(stage_records, "loss", w);
            stages.push((stage.name.clone(), loss));
            let objectives: Vec<String> = stage.objectives.iter().map(|(k, w)| format!("{k} ({w})")).collect();
            let (first, last) = match loss {
                Some((a, b)) => (format!("{a:.4}"), format!("{b:.4}")),
                None => ("—".to_string(), "—".to_string()),
            };
            report.push_str(&format!(
                "| {} | {} | {} ({}) | {} | {} | {} |\n",
                stage.name,
                stage.epochs,
                data.steps_per_epoch(),
                data.batch_size(),
                objectives.join(", "),
                first,
                last
            ));
        }
        report.push_str(&format!(
            "\nFirst and last loss are means over the first and last tenth of the logged steps. Loss curve: `{PLOT_FILE}`; every step: `{METRICS_FILE}`; config: `{CONFIG_FILE}`; weights: `{CHECKPOINT_DIR}/`.\n"
        ));
        // Collapse and stalled clustering show over epochs, not in the first and last loss.
        report.push_str(
            "\n## Health by epoch\n\nMeans over each epoch's logged steps: the loss, its terms (`loss/<objective>/...`: e.g. a clustering objective's code entropy, at most log K, and prototypes used by the batch) and the embeddings' per-dimension std (`health/...`, about 1/sqrt(d) when spread evenly over the sphere, 0 when collapsed).\n",
        );
        for (stage, stage_records) in self.cfg.run.stages.iter().zip(&stage_records) {
            let table = metrics::epoch_table(stage_records);
            if !table.is_empty() {
                report.push_str(&format!("\n### Stage `{}`\n\n{table}", stage.name));
            }
        }
        checkpoint::write_atomic(&run_dir.join(REPORT_FILE), report.as_bytes())?;
        Ok(Summary {
            run_dir: run_dir.to_path_buf(),
            steps,
            stages,
            seconds,
        })
    }
}

fn progress_bar(total: usize, done: usize) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {per_sec}  eta {eta}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    bar
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
