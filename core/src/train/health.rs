//! Diagnostics: the embeddings' collapse indicators logged every step, and the probe step
//! of `medssl check` (one forward and backward pass, gradient norms by group).

use super::stages::Embedded;
use super::Run;
use crate::objective::Progress;
use crate::optim::Optimizer;
use crate::rng::{self, domain};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use tch::Tensor;

/// What [`Run::probe_step`] measured.
#[derive(Debug, Clone)]
pub struct StepProbe {
    pub loss: f64,
    /// The kind the loss was computed in (fp32, or f64 under `run.precision = "fp64"`).
    pub loss_kind: tch::Kind,
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

impl Run {
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
        let loss = loss.detach();
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
            loss_kind: loss.kind(),
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
}

impl Embedded {
    /// Collapse indicators (Jing et al., ICLR 2022, Sec. 3): the mean over dimensions of the
    /// per-dimension std, across the batch, of the L2-normalised embeddings of the first
    /// view at each level. Collapse shows as it falling towards 0; for embeddings spread
    /// uniformly on the sphere of dimension d it is about 1/sqrt(d).
    pub(super) fn health(&self) -> Vec<(String, f64)> {
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
}
