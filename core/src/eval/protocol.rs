//! The probe protocol: which samples each fit trains on and which it scores (a label
//! fraction of the training set, or stratified K-fold over both sets), and the scores of
//! each seed and fold.

use crate::metrics::{mean, sample_std};
use crate::probe::split;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One seed's scores: under cross-validation the mean over its folds, each kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
pub(super) fn probe_fits(
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub(super) fn from_runs(runs: Vec<SeedScores>) -> Row {
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
