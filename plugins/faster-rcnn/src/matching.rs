//! Matching anchors or proposals to ground-truth boxes by IoU, and the balanced sample of
//! positives and negatives that trains on them (Ren et al., Faster R-CNN, NeurIPS 2015,
//! Sec. 3.1.2 for the RPN; Girshick, Fast R-CNN, ICCV 2015, Sec. 2.3 for the box head).
//!
//! [`Matcher`]: each candidate takes the ground-truth box it overlaps most. With IoU at or
//! above `high` it is a positive matched to that box; below `low` a negative; in between it
//! is ignored (the RPN's 0.7 / 0.3). With `force_best`, every ground-truth box also claims
//! the candidates of its highest IoU even below `high` (Faster R-CNN's first positive rule,
//! "the anchor with the highest IoU with a ground-truth box"), so no object goes without a
//! positive; ties all count, as in torchvision, because anchors of several sizes on one
//! cell can tie exactly. A candidate that is the best of several boxes goes to the one it
//! overlaps most (lower index on ties). A box whose best IoU is 0 claims nothing: claiming
//! every candidate at IoU 0 would turn the whole image positive.
//!
//! [`sample`]: at most `batch * positive_fraction` positives drawn at random, negatives fill
//! the rest of the batch (Faster R-CNN: 256 anchors per image, up to half positive; Fast
//! R-CNN: 128 RoIs, a quarter positive, torchvision's 512 / 0.25 for the FPN model). The draw
//! is a pure function of the seed, so a training step is reproducible.

use crate::boxes::iou;
use anyhow::{ensure, Result};
use rand::seq::index;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// A candidate below the low threshold: a negative.
pub const NEGATIVE: i64 = -1;
/// A candidate between the thresholds: neither trained as positive nor as negative.
pub const IGNORED: i64 = -2;

/// IoU thresholds of a match.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matcher {
    pub high: f64,
    pub low: f64,
    pub force_best: bool,
}

impl Matcher {
    /// Checks `0 <= low <= high <= 1`; `key` names the config table, for messages.
    pub fn new(high: f64, low: f64, force_best: bool, key: &str) -> Result<Matcher> {
        ensure!(
            (0.0..=1.0).contains(&high) && (0.0..=1.0).contains(&low) && low <= high,
            "config keys `{key}.fg_iou_threshold` ({high}) and `{key}.bg_iou_threshold` ({low}) must satisfy \
             0 <= bg_iou_threshold <= fg_iou_threshold <= 1"
        );
        Ok(Matcher { high, low, force_best })
    }

    /// For each of `candidates` `[N, 4]`: the index of its matched box in `truth` `[M, 4]`,
    /// [`NEGATIVE`] or [`IGNORED`], as plain integers. With no ground truth every candidate
    /// is a negative.
    pub fn assign(&self, truth: &Tensor, candidates: &Tensor) -> Vec<i64> {
        let n = candidates.size()[0] as usize;
        if truth.size()[0] == 0 || n == 0 {
            return vec![NEGATIVE; n];
        }
        let overlaps = iou(&truth.to_kind(Kind::Float), &candidates.to_kind(Kind::Float)).to_device(Device::Cpu);
        let (best, best_truth) = overlaps.max_dim(0, false);
        let best: Vec<f32> = Vec::try_from(best).unwrap_or_default();
        let best_truth: Vec<i64> = Vec::try_from(best_truth).unwrap_or_default();
        let mut matches: Vec<i64> = best
            .iter()
            .zip(&best_truth)
            .map(|(&value, &truth)| {
                let value = value as f64;
                if value >= self.high {
                    truth
                } else if value < self.low {
                    NEGATIVE
                } else {
                    IGNORED
                }
            })
            .collect();
        if self.force_best {
            // Candidates at each box's highest IoU; plain loops keep the tie rule exact.
            let (per_truth_best, _) = overlaps.max_dim(1, true);
            let claims = overlaps
                .eq_tensor(&per_truth_best)
                .logical_and(&per_truth_best.gt(0.0))
                .nonzero();
            let claims: Vec<Vec<i64>> = Vec::try_from(claims).unwrap_or_default();
            let mut claimed: Vec<Option<(f32, i64)>> = vec![None; n];
            for pair in claims {
                let (t, c) = (pair[0], pair[1] as usize);
                let value = overlaps.double_value(&[t, c as i64]) as f32;
                if claimed[c].is_none_or(|(v, _)| value > v) {
                    claimed[c] = Some((value, t));
                }
            }
            for (c, claim) in claimed.into_iter().enumerate() {
                if let Some((_, t)) = claim {
                    matches[c] = t;
                }
            }
        }
        matches
    }
}

/// Positives and negatives drawn for one image's loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub positives: Vec<i64>,
    pub negatives: Vec<i64>,
}

/// Draws up to `batch` of the matched candidates (`matches` from [`Matcher::assign`]), at
/// most `batch * positive_fraction` of them positive, with a generator seeded by `seed`.
/// Indices come back in increasing order.
pub fn sample(matches: &[i64], batch: usize, positive_fraction: f64, seed: u64) -> Sample {
    let positives: Vec<i64> = (0..matches.len() as i64)
        .filter(|&i| matches[i as usize] >= 0)
        .collect();
    let negatives: Vec<i64> = (0..matches.len() as i64)
        .filter(|&i| matches[i as usize] == NEGATIVE)
        .collect();
    let wanted_positives = ((batch as f64 * positive_fraction) as usize).min(positives.len());
    let wanted_negatives = (batch - wanted_positives).min(negatives.len());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |pool: &[i64], amount: usize| {
        let mut picked: Vec<i64> = index::sample(&mut rng, pool.len(), amount)
            .into_iter()
            .map(|k| pool[k])
            .collect();
        picked.sort_unstable();
        picked
    };
    Sample {
        positives: draw(&positives, wanted_positives),
        negatives: draw(&negatives, wanted_negatives),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::{iou_xyxy, tensor_of};
    use proptest::prelude::*;

    fn random_boxes(max: usize) -> impl Strategy<Value = Vec<[f64; 4]>> {
        prop::collection::vec(
            (0.0..30.0f64, 0.0..30.0f64, 1.0..20.0f64, 1.0..20.0f64).prop_map(|(x, y, w, h)| [x, y, x + w, y + h]),
            0..max,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn matches_follow_the_thresholds_and_every_box_gets_its_best_candidate(
            truth in random_boxes(4),
            candidates in random_boxes(30),
            (low, gap) in (0.1..0.5f64, 0.0..0.4f64),
            force_best in any::<bool>(),
        ) {
            let high = low + gap;
            let matcher = Matcher::new(high, low, force_best, "head.rpn").unwrap();
            let got = matcher.assign(&tensor_of(&truth), &tensor_of(&candidates));
            prop_assert_eq!(got.len(), candidates.len());
            for (c, candidate) in candidates.iter().enumerate() {
                let overlaps: Vec<f64> = truth.iter().map(|t| iou_xyxy(*t, *candidate)).collect();
                let best = overlaps.iter().copied().fold(0.0, f64::max);
                // Is the candidate the best of some box with a positive overlap?
                let claimed = force_best && truth.iter().enumerate().any(|(t, _)| {
                    let top = candidates.iter().map(|k| iou_xyxy(truth[t], *k)).fold(0.0, f64::max);
                    top > 0.0 && (overlaps[t] - top).abs() < 1e-6
                });
                match got[c] {
                    NEGATIVE => prop_assert!(best < low + 1e-6 && !claimed, "candidate {c}: best {best}"),
                    IGNORED => prop_assert!(best >= low - 1e-6 && best < high + 1e-6 && !claimed),
                    t => {
                        prop_assert!(t >= 0 && (t as usize) < truth.len());
                        prop_assert!(best >= high - 1e-6 || claimed, "candidate {c}: best {best}");
                        if !claimed {
                            prop_assert!((overlaps[t as usize] - best).abs() < 1e-5);
                        }
                    }
                }
            }
            if force_best {
                // Every box that overlaps anything has at least one positive at its top IoU.
                for (t, b) in truth.iter().enumerate() {
                    let top = candidates.iter().map(|k| iou_xyxy(*b, *k)).fold(0.0, f64::max);
                    if top > 0.0 {
                        prop_assert!(got
                            .iter()
                            .enumerate()
                            .any(|(c, &m)| m >= 0 && (iou_xyxy(*b, candidates[c]) - top).abs() < 1e-5), "box {t}");
                    }
                }
            }
        }

        #[test]
        fn samples_respect_the_batch_and_the_positive_fraction(
            matches in prop::collection::vec(prop::sample::select(vec![NEGATIVE, IGNORED, 0, 1, 2]), 0..200),
            batch in 1usize..64,
            fraction in 0.0..1.0f64,
            seed in any::<u64>(),
        ) {
            let drawn = sample(&matches, batch, fraction, seed);
            let positives = matches.iter().filter(|&&m| m >= 0).count();
            let negatives = matches.iter().filter(|&&m| m == NEGATIVE).count();
            let want_pos = ((batch as f64 * fraction) as usize).min(positives);
            prop_assert_eq!(drawn.positives.len(), want_pos);
            prop_assert_eq!(drawn.negatives.len(), (batch - want_pos).min(negatives));
            prop_assert!(drawn.positives.iter().all(|&i| matches[i as usize] >= 0));
            prop_assert!(drawn.negatives.iter().all(|&i| matches[i as usize] == NEGATIVE));
            prop_assert!(drawn.positives.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(drawn.negatives.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(sample(&matches, batch, fraction, seed), drawn);
        }
    }

    #[test]
    fn no_ground_truth_makes_every_candidate_negative() {
        let matcher = Matcher::new(0.7, 0.3, true, "head.rpn").unwrap();
        let candidates = tensor_of(&[[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 9.0, 9.0]]);
        let got = matcher.assign(&Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)), &candidates);
        assert_eq!(got, vec![NEGATIVE, NEGATIVE]);
    }

    #[test]
    fn a_box_claims_its_best_anchor_below_the_threshold() {
        let matcher = Matcher::new(0.7, 0.3, true, "head.rpn").unwrap();
        let truth = tensor_of(&[[0.0, 0.0, 10.0, 10.0]]);
        // IoU 0.5 and 0.25: neither reaches 0.7, the first is the box's best.
        let candidates = tensor_of(&[[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 5.0, 5.0], [50.0, 50.0, 60.0, 60.0]]);
        assert_eq!(matcher.assign(&truth, &candidates), vec![0, NEGATIVE, NEGATIVE]);
        let plain = Matcher::new(0.7, 0.3, false, "head.rpn").unwrap();
        assert_eq!(plain.assign(&truth, &candidates), vec![IGNORED, NEGATIVE, NEGATIVE]);
        let error = Matcher::new(0.3, 0.7, false, "head.rpn").unwrap_err().to_string();
        assert!(error.contains("head.rpn.fg_iou_threshold"), "{error}");
    }
}
