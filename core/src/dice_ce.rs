//! MONAI's `DiceCELoss(to_onehot_y=True, softmax=True)` (`monai/losses/dice.py`, MONAI 1.6):
//! the loss UNETR, Swin UNETR and MONAI's BTCV tutorials train with, over logits of any
//! number of spatial axes. Shared by the `unetr` and `swin-unetr` heads.
//!
//! For softmax probabilities `p` and one-hot targets `g` of logits `[N, K, ...]`, per sample
//! `n` and class `c` (per class over the whole batch with `batch`), summed over every voxel:
//!
//! dice_nc = 1 − (2 Σ p g + smooth_nr) / (Σ p + Σ g + smooth_dr),
//!
//! the Dice term is the mean over samples and classes (classes 1.. only without
//! `include_background`), the cross-entropy term PyTorch's `cross_entropy` with mean
//! reduction over voxels, and the loss `lambda_dice` Dice + `lambda_ce` CE. The smoothing keeps
//! the term of a class absent from a sample defined: 1 − smooth_nr / (Σ p + smooth_dr), which
//! falls to 0 only as the probability the class is given there vanishes.
//!
//! Not the U-Net head's soft Dice (`medssl_unet::soft_dice_loss`) on purpose, so the two are
//! kept apart: that one follows nnU-Net's batch Dice over the foreground classes present in
//! the batch (in the targets or the arg-max), without smoothing; this one is MONAI's, which
//! UNETR's and Swin UNETR's published numbers were trained with: per sample, background
//! included, every class counted, smoothed. They share no option value, and each head
//! reproduces its reference.

use crate::precision::loss_kind;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The options of MONAI's `DiceCELoss` that medssl exposes, with MONAI's defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiceCeConfig {
    /// Count the background class (0) in the Dice term.
    pub include_background: bool,
    /// One Dice a class over the whole batch instead of one a sample and class.
    pub batch: bool,
    /// Added to the Dice numerator.
    pub smooth_nr: f64,
    /// Added to the Dice denominator.
    pub smooth_dr: f64,
    /// Weight of the Dice term.
    pub lambda_dice: f64,
    /// Weight of the cross-entropy term.
    pub lambda_ce: f64,
}

impl Default for DiceCeConfig {
    fn default() -> Self {
        DiceCeConfig {
            include_background: true,
            batch: false,
            smooth_nr: 1e-5,
            smooth_dr: 1e-5,
            lambda_dice: 1.0,
            lambda_ce: 1.0,
        }
    }
}

impl DiceCeConfig {
    /// MONAI's own checks, each naming its config key under `key`.
    pub fn validate(&self, key: &str) -> Result<()> {
        for (name, value) in [
            ("smooth_nr", self.smooth_nr),
            ("smooth_dr", self.smooth_dr),
            ("lambda_dice", self.lambda_dice),
            ("lambda_ce", self.lambda_ce),
        ] {
            ensure!(
                value.is_finite() && value >= 0.0,
                "config key `{key}.{name}` must be a finite number at least 0, got {value}"
            );
        }
        Ok(())
    }
}

/// A 3D segmentation head's training loss: [`dice_ce_loss`] of `logits` `[N, K, D, H, W]`
/// against class ids `[N, D, H, W]`, after checking that their shapes agree (an error naming
/// `head` otherwise).
pub fn segmentation_loss(head: &str, logits: &Tensor, targets: &Tensor, cfg: &DiceCeConfig) -> Result<Tensor> {
    let size = logits.size();
    let expected = [&size[..1], &size[2..]].concat();
    ensure!(
        targets.size() == expected,
        "head `{head}`: targets of shape {:?} for logits {size:?}; expected [N, D, H, W] = {expected:?} class ids",
        targets.size()
    );
    Ok(dice_ce_loss(logits, targets, cfg))
}

/// The loss of `logits` `[N, K, ...]` against int64 class ids `targets` `[N, ...]` in `0..K`,
/// as the module documentation defines it: a scalar, in fp32 (f64 logits stay f64).
pub fn dice_ce_loss(logits: &Tensor, targets: &Tensor, cfg: &DiceCeConfig) -> Tensor {
    let kind = loss_kind(logits);
    let logits = logits.to_kind(kind);
    let classes = logits.size()[1];
    let axes = logits.dim() as i64;
    let probabilities = logits.softmax(1, kind);
    // [N, ..., K] to [N, K, ...].
    let mut order = vec![0, axes - 1];
    order.extend(1..axes - 1);
    let truth = targets.one_hot(classes).permute(order).to_kind(kind);
    let (probabilities, truth) = if cfg.include_background || classes == 1 {
        (probabilities, truth)
    } else {
        (probabilities.narrow(1, 1, classes - 1), truth.narrow(1, 1, classes - 1))
    };
    let mut reduce: Vec<i64> = (2..axes).collect();
    if cfg.batch {
        reduce.insert(0, 0);
    }
    let sum = |t: &Tensor| t.sum_dim_intlist(reduce.as_slice(), false, kind);
    let overlap = sum(&(&probabilities * &truth));
    let total = sum(&probabilities) + sum(&truth);
    let dice = ((overlap * 2.0 + cfg.smooth_nr) / (total + cfg.smooth_dr)).neg() + 1.0;
    let cross_entropy = logits.cross_entropy_loss::<Tensor>(targets, None, tch::Reduction::Mean, -100, 0.0);
    dice.mean(kind) * cfg.lambda_dice + cross_entropy * cfg.lambda_ce
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// `3 sin(0.37 j)` logits `[2, 3, 4, 5, 6]` and `(7 j mod 11) mod 3` class ids, over the
    /// flat index `j`.
    fn batch() -> (Tensor, Tensor) {
        let j = Tensor::arange(2 * 3 * 4 * 5 * 6, (Kind::Double, Device::Cpu));
        let logits = ((j * 0.37).sin() * 3.0).reshape([2, 3, 4, 5, 6]).to_kind(Kind::Float);
        let k = Tensor::arange(2 * 4 * 5 * 6, (Kind::Int64, Device::Cpu));
        let targets = (k * 7).remainder(11).remainder(3).reshape([2, 4, 5, 6]);
        (logits, targets)
    }

    /// The values MONAI 1.6.1's `DiceCELoss(to_onehot_y=True, softmax=True, **options)` gives
    /// on [`batch`] (torch 2.13.0, CPU; targets as `[2, 1, 4, 5, 6]`).
    #[test]
    fn equals_monais_dice_ce_loss() {
        let (logits, targets) = batch();
        let defaults = DiceCeConfig::default();
        for (cfg, monai) in [
            (defaults.clone(), 2.0102508068084717),
            (
                DiceCeConfig {
                    include_background: false,
                    ..defaults.clone()
                },
                2.0276761054992676,
            ),
            (
                DiceCeConfig {
                    batch: true,
                    ..defaults.clone()
                },
                2.010226249694824,
            ),
            (
                DiceCeConfig {
                    lambda_dice: 0.5,
                    lambda_ce: 2.0,
                    ..defaults.clone()
                },
                3.0112059116363525,
            ),
        ] {
            let loss = dice_ce_loss(&logits, &targets, &cfg).double_value(&[]);
            assert!((loss - monai).abs() < 1e-6, "{cfg:?}: {loss} vs MONAI {monai}");
        }
    }

    /// Any number of spatial axes: a 2D batch is the 3D one with a depth of 1.
    #[test]
    fn two_dimensional_logits_are_the_depth_one_case() {
        let (logits, targets) = batch();
        let (logits, targets) = (logits.select(2, 0), targets.select(1, 0));
        let cfg = DiceCeConfig::default();
        let flat = dice_ce_loss(&logits, &targets, &cfg).double_value(&[]);
        let deep = dice_ce_loss(&logits.unsqueeze(2), &targets.unsqueeze(1), &cfg).double_value(&[]);
        assert!((flat - deep).abs() < 1e-7, "{flat} vs {deep}");
    }

    #[test]
    fn confident_correct_logits_have_almost_no_loss() {
        let (_, targets) = batch();
        let logits = targets.one_hot(3).permute([0, 4, 1, 2, 3]).to_kind(Kind::Float) * 40.0;
        let loss = dice_ce_loss(&logits, &targets, &DiceCeConfig::default()).double_value(&[]);
        assert!((0.0..1e-6).contains(&loss), "{loss}");
    }
}
