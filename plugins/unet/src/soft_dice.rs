//! Soft Dice loss: the Dice coefficient computed on softmax probabilities instead of hard
//! masks, so that it is differentiable (Milletari et al., "V-Net", 3DV 2016, Eq. 1, with the
//! plain sums of MONAI's `DiceLoss` in the denominator rather than V-Net's squares).
//!
//! For logits `[N, K, H, W]` with softmax `p` and one-hot targets `g`, summed over every
//! pixel of every image of the batch (one Dice a class for the whole batch, as nnU-Net's
//! `batch_dice`, so a class that is small in one image is not over-weighted):
//!
//! dice_c = 2 Σ p_c g_c / (Σ p_c + Σ g_c),   loss = 1 − mean_{c ∈ C} dice_c,
//!
//! where `C` holds the foreground classes (1..K, background 0 excluded) that are present in
//! the batch: in the targets, or the arg-max prediction of at least one pixel. A class in
//! neither has no meaningful Dice (0/0 for hard masks; near 0/ε soft); leaving it out
//! matches the evaluation, which skips such classes (`medssl_core::segmentation`), and
//! cross-entropy still pushes its probabilities down. With `C` empty the loss is 0 (with a
//! graph, so `backward` works).

use medssl_core::prelude::*;

/// Guards the denominator only: a class in `C` has Σ g_c ≥ 1 or an arg-max pixel, so its
/// Σ p_c + Σ g_c is positive, and this never changes a Dice by more than rounding.
const EPSILON: f64 = 1e-7;

/// The soft Dice loss of `logits` `[N, K, H, W]` against int64 class ids `targets`
/// `[N, H, W]` in `0..K`, as the module documentation defines it: a scalar in [0, 1]. In
/// fp32 (f64 logits stay f64).
pub fn soft_dice_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let classes = logits.size()[1];
    let kind = loss_kind(logits);
    let probabilities = logits.softmax(1, kind);
    let truth = targets.one_hot(classes).permute([0, 3, 1, 2]).to_kind(kind);
    let predicted = logits.argmax(1, false).one_hot(classes).permute([0, 3, 1, 2]);
    // Per-class sums over every pixel of every image: [K].
    let per_class = |t: &Tensor, kind: Kind| t.sum_dim_intlist([0i64, 2, 3].as_slice(), false, kind);
    let intersection = per_class(&(&probabilities * &truth), kind);
    let truth_total = per_class(&truth, kind);
    let dice = intersection * 2.0 / (per_class(&probabilities, kind) + &truth_total).clamp_min(EPSILON);
    let present = truth_total
        .gt(0.0)
        .logical_or(&per_class(&predicted, Kind::Int64).gt(0))
        .to_kind(kind)
        .narrow(0, 1, classes - 1);
    let foreground = dice.narrow(0, 1, classes - 1);
    let count = present.sum(kind);
    // (1 - dice) summed over C, over |C|; 0 when C is empty.
    let misses: Tensor = (foreground.neg() + 1.0) * &present;
    misses.sum(kind) / count.clamp_min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, pixel by pixel, in f64.
    fn brute_force(logits: &[f64], targets: &[i64], n: usize, k: usize, hw: usize) -> f64 {
        let at = |i: usize, c: usize, x: usize| logits[(i * k + c) * hw + x];
        let (mut inter, mut sum_p, mut sum_g, mut in_argmax) =
            (vec![0.0; k], vec![0.0; k], vec![0.0; k], vec![false; k]);
        for i in 0..n {
            for x in 0..hw {
                let max = (0..k).map(|c| at(i, c, x)).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = (0..k).map(|c| (at(i, c, x) - max).exp()).sum();
                // The first largest logit, as argmax picks it.
                let best = (0..k).fold(0, |b, c| if at(i, c, x) > at(i, b, x) { c } else { b });
                in_argmax[best] = true;
                let t = targets[i * hw + x] as usize;
                for c in 0..k {
                    let p = (at(i, c, x) - max).exp() / z;
                    sum_p[c] += p;
                    if c == t {
                        inter[c] += p;
                        sum_g[c] += 1.0;
                    }
                }
            }
        }
        let losses: Vec<f64> = (1..k)
            .filter(|&c| sum_g[c] > 0.0 || in_argmax[c])
            .map(|c| 1.0 - 2.0 * inter[c] / (sum_p[c] + sum_g[c]))
            .collect();
        if losses.is_empty() {
            0.0
        } else {
            losses.iter().sum::<f64>() / losses.len() as f64
        }
    }

    fn batch() -> impl Strategy<Value = (usize, usize, usize, usize, Vec<f64>, Vec<i64>)> {
        (1usize..3, 2usize..5, 1usize..4, 1usize..4).prop_flat_map(|(n, k, h, w)| {
            (
                Just(n),
                Just(k),
                Just(h),
                Just(w),
                proptest::collection::vec(-4.0f64..4.0, n * k * h * w),
                proptest::collection::vec(0..k as i64, n * h * w),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_the_pixelwise_definition((n, k, h, w, logits, targets) in batch()) {
            let shape = [n as i64, k as i64, h as i64, w as i64];
            let logits_t = Tensor::from_slice(&logits).to_kind(Kind::Float).reshape(shape);
            let targets_t = Tensor::from_slice(&targets).reshape([n as i64, h as i64, w as i64]);
            let loss = soft_dice_loss(&logits_t, &targets_t).double_value(&[]);
            let expected = brute_force(&logits, &targets, n, k, h * w);
            prop_assert!((loss - expected).abs() < 1e-5, "{} vs {}", loss, expected);
            prop_assert!((0.0..=1.0).contains(&loss));
        }
    }

    #[test]
    fn confident_correct_logits_have_no_loss_and_wrong_ones_almost_one() {
        let targets = Tensor::from_slice(&[0i64, 1, 2, 2, 1, 0]).reshape([1, 2, 3]);
        let logits = targets.one_hot(3).permute([0, 3, 1, 2]).to_kind(Kind::Float) * 30.0;
        assert!(soft_dice_loss(&logits, &targets).double_value(&[]) < 1e-6);
        let wrong = (&targets + 1).remainder(3);
        let logits = wrong.one_hot(3).permute([0, 3, 1, 2]).to_kind(Kind::Float) * 30.0;
        assert!(soft_dice_loss(&logits, &targets).double_value(&[]) > 1.0 - 1e-6);
    }

    #[test]
    fn a_class_absent_from_targets_and_prediction_is_left_out() {
        // Class 2 is nowhere and never the arg-max: the loss is class 1's alone.
        let targets = Tensor::from_slice(&[0i64, 1, 1, 0]).reshape([1, 2, 2]);
        let logits = Tensor::from_slice(&[2f32, 0., 0., 2., 0., 2., 2., 0., -5., -5., -5., -5.]).reshape([1, 3, 2, 2]);
        let three = soft_dice_loss(&logits, &targets).double_value(&[]);
        let two = soft_dice_loss(&logits.narrow(1, 0, 2), &targets).double_value(&[]);
        assert!(three > 0.0 && (three - two).abs() < 0.01, "{three} vs {two}");
        // Only background anywhere: no foreground class, no loss, and backward still runs.
        let logits = Tensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let background_wins = &logits + Tensor::from_slice(&[1f32, 0., 0.]).reshape([1, 3, 1, 1]);
        let loss = soft_dice_loss(&background_wins, &targets.zeros_like());
        assert_eq!(loss.double_value(&[]), 0.0);
        loss.backward();
        assert!(logits.grad().defined());
    }
}
