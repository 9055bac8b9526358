//! `medssl bench ssl`: a stage's loader and training throughput, each measured alone.

use super::Run;
use crate::loader::Batch;
use crate::objective::Progress;
use crate::optim::Optimizer;
use anyhow::{Context, Result};
use std::time::Instant;
use tch::Device;

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

impl Run {
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
            peak_rss_mib: crate::bench::peak_rss_mib(),
            device: format!("{:?}", self.device),
            threads: tch::get_num_threads(),
            loader_workers: data.loader.workers,
        })
    }
}
