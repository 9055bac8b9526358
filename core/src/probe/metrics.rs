//! Classification metrics of a probe: accuracy, and ROC AUC computed exactly from ranks.
//!
//! Binary AUC is the Mann-Whitney statistic: the fraction of (positive, negative) pairs the
//! score orders correctly, a tie counting one half; average ranks over tied scores give it
//! in O(n log n). With more than two classes the AUC is the macro average of one-vs-rest
//! AUCs over the classes present in the evaluation set (sklearn's `roc_auc_score` with
//! `multi_class="ovr", average="macro"`, except that sklearn refuses a class absent from
//! the labels where this leaves it out).

use anyhow::{bail, Result};
use serde::Serialize;

/// What a probe scores on the evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    pub acc: f64,
    pub auc: f64,
}

/// ROC AUC of `scores` for the samples where `positive` is true against the others; `None`
/// when either group is empty.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), positive.len(), "one score a label");
    let positives = positive.iter().filter(|&&p| p).count();
    let negatives = positive.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' 1-based ranks, tied scores sharing their average rank.
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let average_rank = (start + 1 + end) as f64 / 2.0;
        rank_sum += average_rank * order[start..end].iter().filter(|&&i| positive[i]).count() as f64;
        start = end;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// Fraction of rows of `probabilities` (`[M, classes]`, row-major) whose largest entry is
/// at the label (the first largest on ties).
pub fn accuracy(probabilities: &[f64], classes: usize, labels: &[i64]) -> f64 {
    let correct = labels
        .iter()
        .enumerate()
        .filter(|(i, &label)| {
            let row = &probabilities[i * classes..(i + 1) * classes];
            let best = row
                .iter()
                .enumerate()
                .fold(0, |best, (c, &p)| if p > row[best] { c } else { best });
            best as i64 == label
        })
        .count();
    correct as f64 / labels.len().max(1) as f64
}

/// ROC AUC of class probabilities: binary for two classes, else the macro one-vs-rest
/// average over the classes present in `labels`. `None` when `labels` hold one class only.
pub fn auc(probabilities: &[f64], classes: usize, labels: &[i64]) -> Option<f64> {
    let column = |c: usize| -> Vec<f64> { (0..labels.len()).map(|i| probabilities[i * classes + c]).collect() };
    let one_vs_rest = |c: usize| {
        let positive: Vec<bool> = labels.iter().map(|&l| l == c as i64).collect();
        roc_auc(&column(c), &positive)
    };
    if classes == 2 {
        return one_vs_rest(1);
    }
    let per_class: Vec<f64> = (0..classes).filter_map(one_vs_rest).collect();
    (!per_class.is_empty()).then(|| per_class.iter().sum::<f64>() / per_class.len() as f64)
}

/// Accuracy and AUC of `probabilities` (`[M, classes]`) against `labels`.
pub fn scores(probabilities: &[f64], classes: usize, labels: &[i64]) -> Result<Scores> {
    let Some(auc) = auc(probabilities, classes, labels) else {
        bail!("the evaluation set holds one class only: AUC is undefined; evaluate on a set with at least two classes")
    };
    Ok(Scores {
        acc: accuracy(probabilities, classes, labels),
        auc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition: correctly ordered (positive, negative) pairs, ties counting half.
    fn pairwise_auc(scores: &[f64], positive: &[bool]) -> f64 {
        let (mut favourable, mut pairs) = (0.0, 0.0);
        for i in (0..scores.len()).filter(|&i| positive[i]) {
            for j in (0..scores.len()).filter(|&j| !positive[j]) {
                pairs += 1.0;
                favourable += match scores[i].total_cmp(&scores[j]) {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Less => 0.0,
                };
            }
        }
        favourable / pairs
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn auc_equals_the_pairwise_count_with_ties(
            // Scores from a few values, so that ties are common.
            samples in proptest::collection::vec((0u8..5, any::<bool>()), 2..40),
        ) {
            let scores: Vec<f64> = samples.iter().map(|(s, _)| *s as f64 / 4.0).collect();
            let positive: Vec<bool> = samples.iter().map(|(_, p)| *p).collect();
            let both = positive.iter().any(|&p| p) && positive.iter().any(|&p| !p);
            match roc_auc(&scores, &positive) {
                Some(auc) => {
                    prop_assert!(both);
                    prop_assert!((auc - pairwise_auc(&scores, &positive)).abs() < 1e-12);
                    prop_assert!((0.0..=1.0).contains(&auc));
                }
                None => prop_assert!(!both),
            }
        }

        #[test]
        fn multi_class_auc_is_the_mean_of_one_vs_rest(
            rows in proptest::collection::vec((proptest::collection::vec(0u8..4, 3), 0i64..3), 3..30),
        ) {
            let probabilities: Vec<f64> = rows.iter().flat_map(|(p, _)| p.iter().map(|&v| v as f64)).collect();
            let labels: Vec<i64> = rows.iter().map(|(_, l)| *l).collect();
            let expected: Vec<f64> = (0..3)
                .filter_map(|c| {
                    let positive: Vec<bool> = labels.iter().map(|&l| l == c).collect();
                    let column: Vec<f64> = (0..labels.len()).map(|i| probabilities[i * 3 + c as usize]).collect();
                    (positive.iter().any(|&p| p) && positive.iter().any(|&p| !p))
                        .then(|| pairwise_auc(&column, &positive))
                })
                .collect();
            match auc(&probabilities, 3, &labels) {
                Some(value) => prop_assert!((value - expected.iter().sum::<f64>() / expected.len() as f64).abs() < 1e-12),
                None => prop_assert!(expected.is_empty()),
            }
        }
    }

    #[test]
    fn accuracy_takes_the_arg_max_and_one_class_has_no_auc() {
        let probabilities = [0.9, 0.1, 0.2, 0.8, 0.6, 0.4];
        assert_eq!(accuracy(&probabilities, 2, &[0, 1, 1]), 2.0 / 3.0);
        assert_eq!(auc(&probabilities, 2, &[0, 1, 0]), Some(1.0));
        let err = scores(&probabilities, 2, &[1, 1, 1]).unwrap_err().to_string();
        assert!(err.contains("one class"), "{err}");
    }
}
