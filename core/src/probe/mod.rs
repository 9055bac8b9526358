//! Frozen-feature probes: what `medssl eval linear` and `medssl eval knn` fit on the
//! features of a frozen encoder, and how they are scored.
//!
//! - [`logistic`]: multinomial logistic regression on standardised features;
//! - [`knn`]: similarity-weighted kNN vote with cosine similarity;
//! - [`metrics`]: accuracy and exact ROC AUC (binary, or macro one-vs-rest);
//! - [`split`]: the seeded, class-stratified label fraction a probe trains on.

pub mod knn;
pub mod logistic;
pub mod metrics;
pub mod split;

use anyhow::{ensure, Result};
use metrics::Scores;
use tch::{Kind, Tensor};

/// A probe and its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Linear(logistic::LogisticConfig),
    Knn(knn::KnnConfig),
}

impl Probe {
    /// `linear` or `knn`.
    pub fn name(&self) -> &'static str {
        match self {
            Probe::Linear(_) => "linear",
            Probe::Knn(_) => "knn",
        }
    }

    pub fn check(&self) -> Result<()> {
        match self {
            Probe::Linear(cfg) => cfg.check(),
            Probe::Knn(cfg) => cfg.check(),
        }
    }

    /// The settings, for reports.
    pub fn settings(&self) -> serde_json::Value {
        match self {
            Probe::Linear(cfg) => serde_json::json!(cfg),
            Probe::Knn(cfg) => serde_json::json!(cfg),
        }
    }

    /// Fits on (`train`, `train_labels`) and scores the predictions for `queries` against
    /// `query_labels`. `seed` seeds what the probe draws (the linear probe's initial
    /// weights; kNN draws nothing).
    pub fn evaluate(
        &self,
        train: &Tensor,
        train_labels: &[i64],
        queries: &Tensor,
        query_labels: &[i64],
        classes: i64,
        seed: u64,
    ) -> Result<Scores> {
        ensure!(
            train.size()[0] == train_labels.len() as i64 && queries.size()[0] == query_labels.len() as i64,
            "probe: {} training features for {} labels, {} queries for {} labels",
            train.size()[0],
            train_labels.len(),
            queries.size()[0],
            query_labels.len()
        );
        let labels = Tensor::from_slice(train_labels).to_device(train.device());
        let probabilities = match self {
            Probe::Linear(cfg) => logistic::Logistic::fit(train, &labels, classes, cfg, seed)?.probabilities(queries),
            Probe::Knn(cfg) => knn::probabilities(train, &labels, queries, classes, cfg)?,
        };
        // To the host: the scores (exact ROC AUC, accuracy) are computed in plain Rust.
        let probabilities = Vec::<f64>::try_from(
            probabilities
                .to_kind(Kind::Double)
                .to_device(tch::Device::Cpu)
                .flatten(0, -1),
        )?;
        metrics::scores(&probabilities, classes as usize, query_labels)
    }
}
