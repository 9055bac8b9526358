//! The labelled subset a probe trains on: a seeded, class-stratified fraction of the
//! training set; and, for cross-validation, a seeded, class-stratified split into folds.
//!
//! Each class keeps `round(F * n_c)` of its `n_c` samples, and at least one, drawn by a
//! shuffle seeded from (seed, class), so the draw of one class does not depend on the
//! others and a seed always gives the same subset. Folds deal each class's shuffled samples
//! round-robin, so every fold holds `floor` or `ceil` of `n_c / k` of each class.

use crate::rng::{self, domain};
use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use std::collections::BTreeMap;

/// Sub-domain of [`domain::PROBE`] for the label-fraction draw.
const DRAW: u64 = 1;
/// Sub-domain of [`domain::PROBE`] for the fold assignment.
const FOLDS: u64 = 2;

/// Checks a label fraction: finite and in (0, 1].
pub fn check_fraction(fraction: f64) -> Result<()> {
    ensure!(
        fraction.is_finite() && fraction > 0.0 && fraction <= 1.0,
        "--label-fraction {fraction}: expected a fraction of the training labels in (0, 1], e.g. 0.1 for 10%"
    );
    Ok(())
}

/// Indices (ascending) of the stratified `fraction` of `labels` drawn with `seed`.
pub fn stratified_fraction(labels: &[i64], fraction: f64, seed: u64) -> Result<Vec<usize>> {
    check_fraction(fraction)?;
    let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &label) in labels.iter().enumerate() {
        by_class.entry(label).or_default().push(i);
    }
    let mut chosen = Vec::new();
    for (class, mut members) in by_class {
        let keep = ((fraction * members.len() as f64).round() as usize).clamp(1, members.len());
        if keep < members.len() {
            members.shuffle(&mut rng::generator(seed, &[domain::PROBE, DRAW, class as u64]));
        }
        chosen.extend_from_slice(&members[..keep]);
    }
    chosen.sort_unstable();
    Ok(chosen)
}

/// The fold (`0..k`) of every sample of `labels`, drawn with `seed`: each class is shuffled
/// and dealt round-robin, starting where the previous class stopped so that folds also get
/// equal sizes. Every class needs at least `k` samples, so each fold can score every class.
pub fn stratified_folds(labels: &[i64], k: usize, seed: u64) -> Result<Vec<usize>> {
    ensure!(k >= 2, "--folds {k}: cross-validation needs at least 2 folds");
    let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &label) in labels.iter().enumerate() {
        by_class.entry(label).or_default().push(i);
    }
    let mut fold = vec![0; labels.len()];
    let mut next = 0;
    for (class, mut members) in by_class {
        ensure!(
            members.len() >= k,
            "--folds {k}: class {class} has {} samples; every fold needs at least one of each class",
            members.len()
        );
        members.shuffle(&mut rng::generator(seed, &[domain::PROBE, FOLDS, class as u64]));
        for i in members {
            fold[i] = next;
            next = (next + 1) % k;
        }
    }
    Ok(fold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn the_draw_is_a_stratified_deterministic_subset(
            labels in proptest::collection::vec(0i64..4, 1..200),
            fraction in 0.01f64..=1.0,
            seed in 0u64..1000,
        ) {
            let subset = stratified_fraction(&labels, fraction, seed).unwrap();
            prop_assert_eq!(&subset, &stratified_fraction(&labels, fraction, seed).unwrap());
            prop_assert!(subset.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
            prop_assert!(subset.iter().all(|&i| i < labels.len()));
            for class in 0..4 {
                let total = labels.iter().filter(|&&l| l == class).count();
                let kept = subset.iter().filter(|&&i| labels[i] == class).count();
                let expected = if total == 0 { 0 } else { ((fraction * total as f64).round() as usize).clamp(1, total) };
                prop_assert_eq!(kept, expected, "class {}", class);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn folds_are_stratified_balanced_and_deterministic(
            counts in proptest::collection::vec(5usize..60, 1..4),
            k in 2usize..6,
            seed in 0u64..1000,
        ) {
            let labels: Vec<i64> = counts.iter().enumerate().flat_map(|(c, &n)| vec![c as i64; n]).collect();
            let folds = stratified_folds(&labels, k, seed).unwrap();
            prop_assert_eq!(&folds, &stratified_folds(&labels, k, seed).unwrap());
            let sizes: Vec<usize> = (0..k).map(|f| folds.iter().filter(|&&x| x == f).count()).collect();
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{:?}", sizes);
            for (class, &n) in counts.iter().enumerate() {
                for f in 0..k {
                    let held = (0..labels.len()).filter(|&i| labels[i] == class as i64 && folds[i] == f).count();
                    prop_assert!(held == n / k || held == n.div_ceil(k), "class {} fold {}: {} of {}", class, f, held, n);
                }
            }
        }
    }

    #[test]
    fn folds_differ_by_seed_and_refuse_what_cannot_be_scored() {
        let labels: Vec<i64> = (0..40).map(|i| i % 2).collect();
        assert_ne!(
            stratified_folds(&labels, 5, 0).unwrap(),
            stratified_folds(&labels, 5, 1).unwrap()
        );
        let err = stratified_folds(&labels, 1, 0).unwrap_err().to_string();
        assert!(err.contains("--folds 1") && err.contains("at least 2"), "{err}");
        let err = stratified_folds(&[0, 0, 0, 1, 1], 3, 0).unwrap_err().to_string();
        assert!(err.contains("class 1 has 2 samples"), "{err}");
    }

    #[test]
    fn seeds_draw_different_subsets_and_bad_fractions_are_refused() {
        let labels: Vec<i64> = (0..100).map(|i| i % 2).collect();
        let a = stratified_fraction(&labels, 0.2, 0).unwrap();
        let b = stratified_fraction(&labels, 0.2, 1).unwrap();
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
        assert_eq!(
            stratified_fraction(&labels, 1.0, 3).unwrap(),
            (0..100).collect::<Vec<_>>()
        );
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let err = stratified_fraction(&labels, bad, 0).unwrap_err().to_string();
            assert!(err.contains("--label-fraction") && err.contains("(0, 1]"), "{err}");
        }
    }
}
