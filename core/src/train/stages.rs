//! The stage loop: every step's batch, forward passes shared by the objectives, the
//! optimizer step, the metrics log, checkpoints, and resuming from one.

use super::{Run, Summary, Terms};
use crate::checkpoint::{self, Checkpoints, TrainingState, FORMAT};
use crate::config::{OptimizerConfig, StageConfig};
use crate::distributed::{self, gradients};
use crate::encoder::{EncoderOutput, SpatialDims};
use crate::loader::Batch;
use crate::loss_scaling::{self, LossScaler};
use crate::metrics::MetricsLog;
use crate::objective::{Consumes, Progress, SliceSequence, StepInput, VolumeCrops};
use crate::optim::{self, Optimizer};
use crate::precision::Precision;
use crate::rng::{self, domain};
use crate::run_dir::{self, CHECKPOINT_DIR, METRICS_FILE};
use crate::tensorboard::{view_images, EventWriter, RecordLayout, TENSORBOARD_DIR};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;

/// A batch's embeddings, computed once per step and shared by every objective.
pub(super) struct Embedded {
    pub(super) ids: Tensor,
    pub(super) slice_views: Vec<Tensor>,
    pub(super) global_slice_views: usize,
    pub(super) volume_views: Vec<Tensor>,
    pub(super) sequence: Option<Tensor>,
    pub(super) valid: Option<Tensor>,
    pub(super) train_aggregator: bool,
    /// The batch's 3D crops on the device, for objectives that encode them themselves.
    pub(super) crops: Vec<Tensor>,
    /// Whether those objectives' encoder passes train it.
    pub(super) train_encoder: bool,
}

impl Embedded {
    /// What the objectives read; `encode` runs the encoder on crops, for objectives that
    /// consume them.
    pub(super) fn input<'a>(
        &'a self,
        aggregator: Option<&'a dyn crate::aggregator::Aggregator>,
        encode: &'a dyn Fn(&Tensor) -> Result<EncoderOutput>,
    ) -> StepInput<'a> {
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
            volume_crops: (!self.crops.is_empty()).then_some(VolumeCrops {
                crops: &self.crops,
                encode,
            }),
        }
    }
}

/// The encoder on `x` as a stage's step runs it: in training mode with `train` (else eval
/// mode without autograd), in `precision`'s autocast region, with fp32 outputs under mixed
/// precision.
fn encode(
    encoder: &dyn crate::encoder::Encoder,
    precision: Precision,
    x: &Tensor,
    train: bool,
) -> Result<EncoderOutput> {
    let region = precision.autocast(x.device())?;
    let out = if train {
        encoder.forward(x, true)
    } else {
        tch::no_grad(|| encoder.forward(x, false))
    };
    Ok(match region {
        None => out,
        Some(region) => {
            drop(region);
            let kind = precision.kind();
            EncoderOutput {
                levels: out.levels.iter().map(|t| t.to_kind(kind)).collect(),
                pooled: out.pooled.to_kind(kind),
            }
        }
    })
}

/// The name of the first tensor of `tensors` with a NaN or infinite value: one sum each, so
/// the check costs a few reductions a step.
fn first_non_finite(tensors: &[(String, Tensor)]) -> Option<&str> {
    if tensors.is_empty() {
        return None;
    }
    let sums: Vec<Tensor> = tensors.iter().map(|(_, t)| t.sum(tch::Kind::Double)).collect();
    let sums = Vec::<f64>::try_from(Tensor::stack(&sums, 0)).unwrap_or_default();
    sums.iter()
        .zip(tensors)
        .find(|(s, _)| !s.is_finite())
        .map(|(_, (name, _))| name.as_str())
}

/// The message for a run that diverged at `step` of `stage`: what happened, the learning
/// rate, and the last good checkpoint (or that there is none yet).
fn diverged(what: &str, stage: &StageConfig, step: usize, lr: f64, store: &Checkpoints) -> String {
    let last_good = match store.latest() {
        Ok(Some(path)) => format!(
            "the last good checkpoint, `{}`, is kept: resume from it with a lower `lr` (edit it with `medssl resume --allow-config-change`)",
            path.display()
        ),
        _ => "no checkpoint was written yet".to_string(),
    };
    format!(
        "stage `{}`, step {step} (lr {lr:.3e}): {what}; stopping: {last_good}",
        stage.name
    )
}

/// The mean over ranks of this step's loss `value` and of each of `terms` (replaced in
/// place); every rank gets the same numbers.
fn mean_over_ranks(comm: &dyn distributed::Communicator, value: f64, terms: &mut Terms) -> Result<f64> {
    let mut values = vec![value];
    values.extend(terms.iter().map(|(_, v)| *v));
    // On the collectives' device: NCCL takes CUDA tensors only.
    let mut buffer = [Tensor::from_slice(&values).to_device(distributed::collective_device())];
    comm.all_reduce_sum(&mut buffer)?;
    let world = comm.world_size() as f64;
    let means: Vec<f64> = Vec::try_from((&buffer[0] / world).to_device(tch::Device::Cpu))?;
    for ((_, v), mean) in terms.iter_mut().zip(&means[1..]) {
        *v = *mean;
    }
    Ok(means[0])
}

/// One stage's training: the stage, its optimizer, where it starts, and where it writes.
struct StageRun<'a> {
    index: usize,
    stage: StageConfig,
    optimizer_cfg: OptimizerConfig,
    optimizer: Optimizer,
    /// Steps of the stage already done (a resumed run).
    start: usize,
    /// Steps of the whole run, for the log lines.
    run_steps: usize,
    store: &'a Checkpoints,
    /// Rank 0's log; `None` on the other ranks, which write nothing.
    log: Option<&'a mut MetricsLog>,
    bar: &'a indicatif::ProgressBar,
}

impl Run {
    /// Trains in `run_dir`: from the start, or from its latest checkpoint when `resume`.
    pub fn train(mut self, run_dir: &Path, resume: bool) -> Result<Summary> {
        let started = Instant::now();
        let store = Checkpoints::new(run_dir.join(CHECKPOINT_DIR), self.cfg.run.options.keep_checkpoints);
        let fingerprint = self.model.fingerprint();
        let mut position = TrainingState {
            format: FORMAT,
            stage: 0,
            stage_step: 0,
            global_step: 0,
            optimizer_steps: 0,
            objectives: BTreeMap::new(),
            model_fingerprint: fingerprint.clone(),
            config: Some(self.resolved_config.clone()),
            world_size: self.data.shard.world,
            global_step_offset: 0,
            loss_scaler: self.scales_loss().then(LossScaler::default),
        };
        distributed::check_same_config(&self.resolved_config)?;
        let mut optimizer_state = Vec::new();
        if resume {
            if let Some(latest) = store.latest()? {
                let (tensors, mut state) = checkpoint::load(&latest)?;
                if state.model_fingerprint != fingerprint {
                    bail!(
                        "checkpoint `{}` was written for another model (fingerprint {}, this config gives {}): its config is incompatible",
                        latest.display(),
                        state.model_fingerprint,
                        fingerprint
                    );
                }
                let state_file = latest.join(checkpoint::STATE_FILE);
                self.check_position(&state, state.world_size)
                    .with_context(|| format!("checkpoint state `{}`", state_file.display()))?;
                self.check_config_unchanged(&state, run_dir)?;
                if state.world_size != self.data.shard.world {
                    self.renumber_for_this_world(&mut state);
                }
                optimizer_state = self.restore(&latest, tensors)?;
                for (key, value) in &state.objectives {
                    if let Some(objective) = self.model.objectives.get_mut(key) {
                        objective
                            .load_state(value.clone())
                            .with_context(|| format!("checkpoint `{}`: objective `{key}`", latest.display()))?;
                    }
                }
                tracing::info!("resuming from {} (global step {})", latest.display(), state.global_step);
                if self.scales_loss() && state.loss_scaler.is_none() {
                    // Precision is checked unchanged above, so this is a checkpoint from
                    // before loss scaling was kept: start the scale afresh, as GradScaler would.
                    state.loss_scaler = Some(LossScaler::default());
                }
                position = state;
                position.config = Some(self.resolved_config.clone());
            } else {
                tracing::info!("no checkpoint in {}: starting from the beginning", run_dir.display());
            }
        }
        // Replicas start equal, whatever each initialised or loaded.
        let mut variables = self.model.backbone.vs.variables().into_iter().collect::<Vec<_>>();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        gradients::broadcast_variables(&*distributed::communicator(), &variables)
            .map_err(|e| distributed::collective_failed(e, "broadcasting rank 0's variables"))?;
        // Rank 0 alone writes the run's files.
        let mut log = match distributed::is_writer() {
            true => Some(MetricsLog::open(
                &run_dir.join(METRICS_FILE),
                resume.then_some(position.global_step),
            )?),
            false => None,
        };
        if let Some(metrics) = log.take_if(|_| self.cfg.run.options.tensorboard) {
            let writer = EventWriter::create(
                &run_dir.join(TENSORBOARD_DIR),
                RecordLayout::Steps,
                resume.then_some(position.global_step as i64 + 1),
            )?;
            log = Some(metrics.with_tensorboard(writer));
        }
        let run_steps = (self.stage_steps().iter().sum::<usize>() as i64 + position.global_step_offset).max(0) as usize;
        let bar = progress_bar(run_steps, position.global_step);

        for stage_index in position.stage..self.cfg.run.stages.len() {
            let stage = self.cfg.run.stages[stage_index].clone();
            if stage.epochs == 0 {
                tracing::info!("stage `{}` has epochs = 0: skipped", stage.name);
                continue;
            }
            let optimizer_cfg = self.stage_optimizer(stage_index)?;
            let mut optimizer = Optimizer::new(&optimizer_cfg, self.stage_parameters(&stage))?;
            if stage_index == position.stage && position.stage_step > 0 {
                optimizer.load_state(std::mem::take(&mut optimizer_state), position.optimizer_steps)?;
            }
            let start = if stage_index == position.stage {
                position.stage_step
            } else {
                0
            };
            let stage_run = StageRun {
                index: stage_index,
                stage,
                optimizer_cfg,
                optimizer,
                start,
                run_steps,
                store: &store,
                log: log.as_mut(),
                bar: &bar,
            };
            self.train_stage(stage_run, &mut position)?;
            // Stage done: the next one starts with fresh optimizer state.
            position.stage = stage_index + 1;
            position.stage_step = 0;
            position.optimizer_steps = 0;
            self.save(&store, &mut position, None)?;
        }
        bar.finish_and_clear();
        if !distributed::is_writer() {
            return Ok(Summary {
                run_dir: run_dir.to_path_buf(),
                steps: position.global_step,
                stages: Vec::new(),
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let summary = self.finish(run_dir, started.elapsed().as_secs_f64(), position.global_step)?;
        Ok(summary)
    }

    /// Whether this run scales its loss (`run.loss_scaling` with `run.precision`).
    fn scales_loss(&self) -> bool {
        let options = &self.cfg.run.options;
        options.loss_scaling.enabled(options.precision)
    }

    /// Refuses to resume under a `config.toml` edited since the checkpoint was written (a
    /// changed `lr`, `batch_size` or `seed` would silently make a different run), naming
    /// every changed key, unless `allow_config_change`, which warns as loudly. The `[run]`
    /// table (where and how often the run writes, its threads) may change freely.
    fn check_config_unchanged(&self, state: &TrainingState, run_dir: &Path) -> Result<()> {
        let Some(trained) = &state.config else {
            return Ok(());
        };
        let changes = crate::config::changed_keys(trained, &self.resolved_config, &["run."])?;
        if changes.is_empty() {
            return Ok(());
        }
        let listed = changes.join("; ");
        let file = run_dir.join(crate::run_dir::CONFIG_FILE);
        if self.allow_config_change {
            tracing::warn!(
                "`{}` differs from the config the checkpoint was trained with ({listed}): resuming anyway (--allow-config-change); this is no longer an exact resume of the same run",
                file.display()
            );
            return Ok(());
        }
        bail!(
            "`{}` differs from the config the checkpoint was trained with: {listed}; resuming would silently train a different run: restore those keys, or pass --allow-config-change to resume under the edited config (no longer an exact resume)",
            file.display()
        )
    }

    /// Refuses a checkpoint position that this config cannot have produced: a stage index
    /// past the last stage, more steps in a stage than it has, or a global step that is not
    /// the sum of the stages before plus the steps into this one.
    /// Checks that `state`'s stage, stage step and global step fit the config's stages as
    /// `world` processes count their steps.
    pub(super) fn check_position(&self, state: &TrainingState, world: usize) -> Result<()> {
        let steps = self.stage_steps_at(world);
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
        let expected =
            (steps[..state.stage].iter().sum::<usize>() + state.stage_step) as i64 + state.global_step_offset;
        anyhow::ensure!(
            state.global_step as i64 == expected,
            "global step {} but stage {} at step {} means global step {expected}: the file is corrupt or from another config",
            state.global_step,
            state.stage,
            state.stage_step
        );
        Ok(())
    }

    /// Moves a position that `state.world_size` processes reached to this launch's world
    /// size: the same stage and epoch, and in the epoch the step after which no more than
    /// the samples already seen have been (a few may be seen twice, none skipped). The
    /// global step keeps counting the steps taken. Not exact, and said so: the global batch
    /// changes, and so do the batches' composition and the learning rate's schedule in steps.
    fn renumber_for_this_world(&self, state: &mut TrainingState) {
        let (from, to) = (state.world_size, self.data.shard.world);
        let steps = self.stage_steps_at(to);
        let mut note = String::new();
        if let Some(data) = self.stage_data.get(state.stage) {
            let before = data.as_rank_zero_of(from);
            let (per_epoch_before, per_epoch) = (before.steps_per_epoch(), data.steps_per_epoch());
            let (epoch, within) = (state.stage_step / per_epoch_before, state.stage_step % per_epoch_before);
            let seen = within * before.batch_size() * from;
            let within_now = seen / (data.batch_size() * to);
            let stage_step = (epoch * per_epoch + within_now).min(steps[state.stage]);
            note = format!(
                " stage {} continues at its step {stage_step} of {} (epoch {epoch}, from step {} of {}); the global batch goes from {} to {}",
                state.stage,
                steps[state.stage],
                state.stage_step,
                self.stage_steps_at(from)[state.stage],
                before.batch_size() * from,
                data.batch_size() * to
            );
            state.stage_step = stage_step;
        }
        let counted = steps[..state.stage.min(steps.len())].iter().sum::<usize>() + state.stage_step;
        state.global_step_offset = state.global_step as i64 - counted as i64;
        state.world_size = to;
        tracing::warn!(
            "the checkpoint was written by {from} process(es), this launch has {to}:{note}. This is a continuation, not an exact resume: the batches and the learning rate's schedule in steps differ from an uninterrupted run at either size"
        );
    }

    /// Copies checkpoint tensors into the model, strictly; returns the optimizer's part.
    pub(super) fn restore(&mut self, from: &Path, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let variables: Vec<(String, Tensor)> = self.model.backbone.vs.variables().into_iter().collect();
        run_dir::load_variables(&variables, &tensors, "model.", &[], from)?;
        Ok(tensors
            .into_iter()
            .filter_map(|(name, t)| Some((name.strip_prefix("optim.")?.to_string(), t)))
            .collect())
    }

    /// Runs the memory pass that objectives ask for (one pass over the epoch's batches
    /// without gradients, every module in eval mode), then each objective's epoch-start hook.
    pub(super) fn start_epoch(&mut self, stage_index: usize, progress: &Progress) -> Result<()> {
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
                let embedded = tch::no_grad(|| self.embed(stage, &batch, true))?;
                let aggregator = self.model.backbone.aggregator.as_deref();
                let encoder = self.model.backbone.encoder.as_ref();
                let precision = self.cfg.run.options.precision;
                let encode = move |x: &Tensor| encode(encoder, precision, x, false);
                for key in &wanting {
                    let objective = self.model.objectives.get_mut(key).expect("checked");
                    tch::no_grad(|| objective.observe(&embedded.input(aggregator, &encode), progress))
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

    /// Trains one stage from its step `start` to its end, logging and checkpointing as it
    /// goes; `position` follows every step.
    fn train_stage(&mut self, stage_run: StageRun, position: &mut TrainingState) -> Result<()> {
        let StageRun {
            index: stage_index,
            stage,
            optimizer_cfg: opt_cfg,
            mut optimizer,
            start,
            run_steps: total_run_steps,
            store,
            mut log,
            bar,
        } = stage_run;
        let comm = distributed::communicator();
        let bucket_bytes = (self.cfg.run.options.distributed.bucket_mib * 1024.0 * 1024.0).max(1.0) as usize;
        let (stage, opt_cfg, optimizer) = (&stage, &opt_cfg, &mut optimizer);
        let data = self.stage_data[stage_index].clone();
        crate::activity::set(format!("stage `{}` (batch size {})", stage.name, data.batch_size()));
        let steps_per_epoch = data.steps_per_epoch();
        let total = stage.epochs * steps_per_epoch;
        let needs = self.needs(stage);
        // Checked after every step with the loss: a diverging batch norm would otherwise run
        // on until the next checkpoint refused it.
        let statistics: Vec<(String, Tensor)> = self
            .model
            .backbone
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| name.ends_with(".running_mean") || name.ends_with(".running_var"))
            .collect();
        let options = self.cfg.run.options.clone();
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
                    if let Some(writer) = log.as_deref_mut().and_then(MetricsLog::tensorboard) {
                        writer.images(position.global_step as i64 + 1, &view_images(&batch))?;
                    }
                }
                tch::manual_seed(
                    rng::derive(self.cfg.run.seed, &[domain::STEP, stage_index as u64, step as u64]) as i64,
                );
                let lr = optim::learning_rate(opt_cfg, step, total, steps_per_epoch);
                let (loss, mut terms, health) = match self.loss(stage, &batch, &progress) {
                    Ok(loss) => loss,
                    // An objective's collective (a gather, Sinkhorn's sums) fails when a rank
                    // is lost: say which.
                    Err(e) if comm.world_size() > 1 => {
                        return Err(distributed::collective_failed(
                            e,
                            &format!("step {}", position.global_step + 1),
                        ))
                    }
                    Err(e) => return Err(e),
                };
                if let Some(e) = distributed::take_deferred_failure() {
                    return Err(distributed::collective_failed(
                        e,
                        &format!("the forward pass of step {}", position.global_step + 1),
                    ));
                }
                let mut value = loss.double_value(&[]);
                if comm.world_size() > 1 {
                    // The logged loss and the divergence check are the global batch's, the
                    // same on every rank, so that all stop together.
                    value = mean_over_ranks(&*comm, value, &mut terms).map_err(|e| {
                        distributed::collective_failed(
                            e,
                            &format!("averaging the loss of step {}", position.global_step + 1),
                        )
                    })?;
                }
                if !value.is_finite() {
                    bail!(
                        "{}",
                        diverged(
                            &format!("the loss became {value} (terms: {terms:?})"),
                            stage,
                            position.global_step + 1,
                            lr,
                            store
                        )
                    );
                }
                anyhow::ensure!(
                    batch.ids.size()[0] >= 2,
                    "stage `{}`, step {}: only {} sample of the batch was readable (the others skipped under `on_error = \"skip\"`); batch norm cannot train on one sample",
                    stage.name,
                    position.global_step + 1,
                    batch.ids.size()[0]
                );
                optimizer.zero_grad();
                loss_scaling::loss_for_backward(position.loss_scaler.as_ref(), &loss)
                    .f_backward()
                    .map_err(|e| {
                        distributed::collective_failed(
                            e.into(),
                            &format!("the backward pass of step {}", position.global_step + 1),
                        )
                    })?;
                gradients::average_gradients(&*comm, optimizer.parameters(), bucket_bytes).map_err(|e| {
                    distributed::collective_failed(
                        e,
                        &format!("averaging the gradients of step {}", position.global_step + 1),
                    )
                })?;
                // After the all-reduce, so that every rank sees the same overflow.
                let global_step = position.global_step + 1;
                let grad_norm = loss_scaling::finish_step(
                    position.loss_scaler.as_mut(),
                    optimizer,
                    opt_cfg.clip_grad_norm,
                    lr,
                    global_step,
                    || format!("stage {} step {global_step}", stage.name),
                );
                for key in stage.objectives.keys() {
                    self.model
                        .objectives
                        .get_mut(key)
                        .expect("checked")
                        .on_step_end(&progress)?;
                }
                if let Some(name) = first_non_finite(&statistics) {
                    bail!(
                        "{}",
                        diverged(
                            &format!("batch norm statistics `{name}` became non-finite"),
                            stage,
                            position.global_step + 1,
                            lr,
                            store
                        )
                    );
                }
                step += 1;
                position.stage = stage_index;
                position.stage_step = step;
                position.global_step += 1;
                checkpoint::abort_if_asked("step", position.global_step);
                let batch_size = (batch.ids.size()[0] * comm.world_size() as i64) as f64;
                let logging = position.global_step.is_multiple_of(options.log_every.max(1)) || step == total;
                if let (true, Some(log)) = (logging, log.as_deref_mut()) {
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
                    // null on a step skipped for overflowing gradients.
                    record.insert("grad_norm".into(), json!(grad_norm));
                    if let Some(scaler) = &position.loss_scaler {
                        record.insert("loss_scale".into(), json!(scaler.scale));
                        record.insert("skipped_step".into(), json!(grad_norm.is_none()));
                    }
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
                if position.global_step.is_multiple_of(options.checkpoint_every.max(1)) && step < total {
                    self.save(store, position, Some(&*optimizer))?;
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
    pub(super) fn embed(&self, stage: &StageConfig, batch: &Batch, observe: bool) -> Result<Embedded> {
        let device = self.device;
        // Batches come in fp32; `run.precision` may ask for another kind.
        let precision = self.cfg.run.options.precision;
        let kind = precision.kind();
        // Batches of a CUDA run are pinned by the loader, so the copy need not wait.
        let non_blocking = device.is_cuda();
        let input = |t: &Tensor| t.to_device_(device, kind, non_blocking, false);
        // Under mixed precision the encoder and aggregator run in the autocast region and
        // hand the objectives fp32 embeddings (crate::precision says why).
        let region = precision.autocast(device)?;
        let output = |t: Tensor| if region.is_some() { t.to_kind(kind) } else { t };
        let train_encoder = !observe && stage.train.iter().any(|m| m == "encoder");
        let train_aggregator = !observe && stage.train.iter().any(|m| m == "aggregator");
        let backbone = &self.model.backbone;
        let slice_views = batch
            .slice_views
            .iter()
            .map(|v| output(backbone.embed_images(&input(v), train_encoder).pooled))
            .collect();
        // Volume views need an aggregator (in 2D); `Model::build` refuses objectives that
        // consume them without one. A 3D encoder's volume views are its crops' embeddings.
        let consumes = |input: Consumes| {
            stage
                .objectives
                .keys()
                .any(|k| self.model.objectives[k].consumes() == input)
        };
        let three_d = backbone.encoder.spatial_dims() == SpatialDims::Three;
        let volume_views = match &backbone.aggregator {
            _ if three_d && consumes(Consumes::VolumeViews) => batch
                .volume_crops
                .iter()
                .map(|c| output(backbone.embed_images(&input(c), train_encoder).pooled))
                .collect(),
            _ if three_d => Vec::new(),
            Some(_) => batch
                .volume_views
                .iter()
                .zip(&batch.volume_valid)
                .map(|(v, valid)| {
                    let valid = valid.to_device(device);
                    output(
                        backbone
                            .embed_volumes(&input(v), &valid, train_encoder, train_aggregator)
                            .1,
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        let sequence = batch
            .sequence
            .as_ref()
            .map(|(voxels, _)| output(backbone.embed_slices(&input(voxels), train_encoder).1));
        drop(region);
        let valid = batch.sequence.as_ref().map(|(_, valid)| valid.to_device(device));
        let crops = if consumes(Consumes::VolumeCrops) {
            batch.volume_crops.iter().map(input).collect()
        } else {
            Vec::new()
        };
        Ok(Embedded {
            ids: batch.ids.to_device(device),
            slice_views,
            global_slice_views: self.data.views.slice_views,
            volume_views,
            sequence,
            valid,
            train_aggregator,
            crops,
            train_encoder,
        })
    }

    /// The weighted sum of the stage's objectives over one batch, each term, and the
    /// embeddings' health.
    pub(super) fn loss(
        &mut self,
        stage: &StageConfig,
        batch: &Batch,
        progress: &Progress,
    ) -> Result<(Tensor, Terms, Terms)> {
        let embedded = self.embed(stage, batch, false)?;
        let aggregator = self.model.backbone.aggregator.as_deref();
        let encoder = self.model.backbone.encoder.as_ref();
        let precision = self.cfg.run.options.precision;
        let train_encoder = embedded.train_encoder;
        let encode = move |x: &Tensor| encode(encoder, precision, x, train_encoder);
        let mut total: Option<Tensor> = None;
        let mut terms = Vec::new();
        let mut health = embedded.health();
        for (key, weight) in &stage.objectives {
            let objective = self.model.objectives.get_mut(key).expect("checked");
            let loss = objective
                .loss(&embedded.input(aggregator, &encode), progress)
                .with_context(|| format!("objective `{key}`"))?;
            terms.push((key.clone(), loss.total.double_value(&[])));
            for (name, v) in loss.terms {
                terms.push((format!("{key}/{name}"), v));
            }
            for (name, v) in loss.health {
                health.push((format!("{key}/{name}"), v));
            }
            let weighted = loss.total * *weight;
            total = Some(match total {
                Some(t) => t + weighted,
                None => weighted,
            });
        }
        Ok((total.expect("a stage has at least one objective"), terms, health))
    }

    pub(super) fn save(
        &self,
        store: &Checkpoints,
        position: &mut TrainingState,
        optimizer: Option<&Optimizer>,
    ) -> Result<()> {
        if !distributed::is_writer() {
            return Ok(());
        }
        let mut tensors: Vec<(String, Tensor)> = self
            .model
            .backbone
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
