//! What `medssl eval` reports: the setup and one row a backbone, as JSON and as a table.

use super::Row;
use serde::{Deserialize, Serialize};

/// What one set is, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// What `medssl eval` reports; `--json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
