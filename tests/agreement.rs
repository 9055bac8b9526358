//! Numerical agreement of medssl's losses with the published reference implementations, on
//! fixed small inputs in f64 (issue 16).
//!
//! Every input and every expected value below is a literal: the constants at the end of this
//! file are printed by `benchmarks/reference/agreement.py`, a NumPy (float64) transcription of
//! each reference formula in the order its implementation computes it. No Python runs here.
//!
//! Tolerance: every value agrees within 1e-6 **absolute** ([`TOLERANCE`]), inputs fed as
//! `Kind::Double` tensors; each test also checks that the function's result is f64, so the
//! agreement is one of f64 computations (not an f32 result that happens to be close).
//!
//! The references, and where medssl differs on purpose:
//! - [`sinkhorn_knopp`] and [`codes`]: facebookresearch/swav, `main_swav.py`,
//!   `distributed_sinkhorn` (one process): Q = exp(out / epsilon)^T divided by its total, then
//!   per iteration the rows (prototypes) to 1/K and the columns (samples) to 1/B, then Q * B;
//!   with a queue, `train` puts the queue's scores before the batch's and keeps the last B
//!   rows. *Deliberate differences*: medssl runs the same normalisations in the log domain
//!   (after subtracting the maximum, which is exact) and ends with a per-sample softmax, which
//!   is the reference's last column normalisation; it takes the logits `out / epsilon` rather
//!   than `out` (`codes` does the division). The reference overflows where exp(out / epsilon)
//!   does (out / epsilon > 88.7 in fp32); the `epsilon = 0.005` case below reaches
//!   out / epsilon = 170, beyond fp32, and agrees with the f64 reference. With zero iterations
//!   the reference returns Q * B / sum(Q), not codes; medssl returns a per-sample softmax and
//!   refuses `sinkhorn_iterations = 0` in its config, so that case is not compared.
//! - [`swapped_prediction`]: `main_swav.py`, `train`: for each crop of `crops_for_assign`, the
//!   mean over every other crop v of `-mean_b sum_k q log_softmax(scores_v / temperature)`,
//!   over (crops - 1); then over `len(crops_for_assign)`. Identical formula.
//! - [`cluster_loss`]: facebookresearch/swav, `main_deepclusterv2.py`, `train`:
//!   `nn.CrossEntropyLoss(ignore_index=-100)` of `output[h] / temperature` against
//!   `assignments[h][idx].repeat(crops)`, averaged over the prototype sets. *Convention*:
//!   medssl marks "no assignment" with any negative id (-1) where the reference uses -100; with
//!   every row unassigned medssl returns 0 where the reference's mean is 0/0 (not compared).
//! - [`nt_xent`]: vturrisi/solo-learn, `solo/losses/simclr.py`, `simclr_loss_func`, and
//!   lightly-ai/lightly, `lightly/loss/ntx_ent_loss.py`, `NTXentLoss` (no memory bank); the two
//!   agree with each other for two views. *Deliberate difference for more than two views*:
//!   medssl averages the log-probabilities of an anchor's V - 1 positives, which is
//!   HobbitLong/SupContrast's `SupConLoss` (`losses.py`, labels = sample ids,
//!   `temperature == base_temperature`), the three-view reference here; solo-learn instead
//!   takes the log of the summed positives (4.18619 on the same three views, vs 7.10436).
//! - [`variance`], [`covariance`], [`invariance`] and their combination: solo-learn,
//!   `solo/losses/vicreg.py` (`variance_loss`, `covariance_loss`, `invariance_loss`,
//!   `vicreg_loss_func` with 25/25/1), whose terms are those of facebookresearch/vicreg's
//!   `main_vicreg.py` and lightly's `VICRegLoss`. The invariance is their `F.mse_loss`, the
//!   mean over all n x d entries; the paper's Eq. 5 as printed, 1/n sum_i ||z_i - z'_i||^2,
//!   is d times that (medssl computed it until this test found the factor: 14.3268 vs
//!   3.5817 here), while the paper's Algorithm 1 and its lambda = 25 go with the mean.
//!   *Convention*: medssl, like solo-learn, sums the two views' variance terms;
//!   facebookresearch/vicreg and lightly average them (the same loss with mu halved: 96.10240
//!   vs 100.18544 here).
//! - [`soft_dice_loss`]: Project-MONAI/MONAI, `monai/losses/dice.py`, `DiceLoss(softmax=True,
//!   to_onehot_y=True, include_background=False, batch=True)` with `smooth_nr = smooth_dr =
//!   0`. *Deliberate differences*: medssl has no smoothing terms (MONAI's default 1e-5 moves
//!   this case's loss by 8.7e-7, still within the tolerance); and a foreground class in no
//!   target and never the arg-max is left out of the mean, where MONAI scores it
//!   (1 - 0 / sum p = 1): the second case shows medssl equal to MONAI's per-class loss
//!   (`reduction="none"`) over the classes kept.

use medssl_core::contrastive::nt_xent;
use medssl_deepcluster_v2::cluster_loss;
use medssl_swav::{codes, sinkhorn_knopp, swapped_prediction};
use medssl_unet::soft_dice_loss;
use medssl_vicreg::{covariance, invariance, variance, VicRegConfig};
use tch::{Kind, Tensor};

/// Largest absolute difference allowed between medssl and the reference, for every value.
const TOLERANCE: f64 = 1e-6;

/// A `Kind::Double` tensor of `shape` holding `data`.
fn tensor(data: &[f64], shape: &[i64]) -> Tensor {
    let t = Tensor::from_slice(data).view(shape);
    assert_eq!(t.kind(), Kind::Double);
    t
}

/// Asserts that `got` is f64 and agrees with `want` elementwise within [`TOLERANCE`];
/// returns the largest absolute difference (printed with `--nocapture`).
fn assert_agrees(what: &str, got: &Tensor, want: &[f64]) -> f64 {
    let values: Vec<f64> = Vec::try_from(got.to_kind(Kind::Double).flatten(0, -1)).expect("a numeric tensor");
    assert_eq!(
        values.len(),
        want.len(),
        "{what}: {} values, the reference has {}",
        values.len(),
        want.len()
    );
    let deviation = values.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
    println!("{what}: max |medssl - reference| = {deviation:.3e} ({:?})", got.kind());
    assert!(
        deviation <= TOLERANCE,
        "{what}: medssl {values:?}\n  reference {want:?}\n  max deviation {deviation:.3e} > {TOLERANCE:e}"
    );
    assert_eq!(
        got.kind(),
        Kind::Double,
        "{what}: computed in {:?}, not f64",
        got.kind()
    );
    deviation
}

/// View `i` of a stack of `[views, rows, cols]` values.
fn view(stack: &[f64], i: usize, rows: i64, cols: i64) -> Tensor {
    let n = (rows * cols) as usize;
    tensor(&stack[i * n..(i + 1) * n], &[rows, cols])
}

const SWAV_B: i64 = 5;
const SWAV_K: i64 = 4;
const SWAV_EPSILON: f64 = 0.05;
const SWAV_TEMPERATURE: f64 = 0.1;

#[test]
fn sinkhorn_knopp_matches_swav_distributed_sinkhorn() {
    let scores = view(&SWAV_SCORES, 0, SWAV_B, SWAV_K);
    for (iterations, want) in [
        (1, &SWAV_SINKHORN_ITER1),
        (3, &SWAV_SINKHORN_ITER3),
        (10, &SWAV_SINKHORN_ITER10),
    ] {
        let got = sinkhorn_knopp(&(&scores / SWAV_EPSILON), iterations);
        assert_agrees(&format!("sinkhorn_knopp, {iterations} iterations"), &got, want);
    }
    // epsilon = 0.005: logits up to 170, where the reference's exp would overflow fp32.
    let scores = view(&SWAV_SCORES, 1, SWAV_B, SWAV_K);
    let got = sinkhorn_knopp(&(&scores / 0.005), 3);
    assert_agrees("sinkhorn_knopp, epsilon 0.005", &got, &SWAV_SINKHORN_EPS0005);
}

#[test]
fn codes_match_swav_with_and_without_the_queue() {
    for i in 0..2 {
        let scores = view(&SWAV_SCORES, i, SWAV_B, SWAV_K);
        let got = codes(&scores, None, SWAV_EPSILON, 3);
        let n = (SWAV_B * SWAV_K) as usize;
        assert_agrees(&format!("codes, crop {i}"), &got, &SWAV_CODES[i * n..(i + 1) * n]);
    }
    let scores = view(&SWAV_SCORES, 0, SWAV_B, SWAV_K);
    let queue = tensor(&SWAV_QUEUE_SCORES, &[3, SWAV_K]);
    let got = codes(&scores, Some(&queue), SWAV_EPSILON, 3);
    assert_agrees("codes with a queue of 3", &got, &SWAV_CODES_WITH_QUEUE);
}

#[test]
fn swapped_prediction_matches_main_swav() {
    let scores: Vec<Tensor> = (0..4).map(|i| view(&SWAV_SCORES, i, SWAV_B, SWAV_K)).collect();
    // The reference's own codes, so only the loss is compared.
    let reference_codes: Vec<Tensor> = (0..2).map(|i| view(&SWAV_CODES, i, SWAV_B, SWAV_K)).collect();
    let got = swapped_prediction(&scores, &reference_codes, SWAV_TEMPERATURE);
    assert_agrees("swapped_prediction, 2 global + 2 local crops", &got, &SWAV_LOSS);
    let got = swapped_prediction(&scores, &reference_codes[..1], SWAV_TEMPERATURE);
    assert_agrees("swapped_prediction, crops_for_assign = [0]", &got, &SWAV_LOSS_ONE_CODE);
    // End to end: medssl's codes into medssl's loss.
    let own_codes: Vec<Tensor> = scores[..2].iter().map(|s| codes(s, None, SWAV_EPSILON, 3)).collect();
    let got = swapped_prediction(&scores, &own_codes, SWAV_TEMPERATURE);
    assert_agrees("swapped_prediction of medssl's codes", &got, &SWAV_LOSS);
}

#[test]
fn cluster_loss_matches_deepclusterv2_cross_entropy() {
    let (batch, crops) = (4, 3);
    let z = tensor(&DC_Z, &[crops * batch, 3]);
    let heads = [tensor(&DC_PROTOTYPES0, &[4, 3]), tensor(&DC_PROTOTYPES1, &[3, 3])];
    // The reference's -100 (no assignment) is -1 here.
    let assignments: [&[i64]; 2] = [&[0, 3, 1, 2], &[2, 0, -1, 1]];
    let mut total: Option<Tensor> = None;
    for (h, (prototypes, assigned)) in heads.iter().zip(assignments).enumerate() {
        let targets = Tensor::from_slice(assigned).repeat([crops]);
        let loss = cluster_loss(&z, prototypes, &targets, 0.1);
        assert_agrees(&format!("cluster_loss, head {h}"), &loss, &DC_HEAD_LOSSES[h..=h]);
        total = Some(match total {
            Some(t) => t + loss,
            None => loss,
        });
    }
    // The objective's mean over the prototype sets.
    let mean = total.expect("two heads") / heads.len() as f64;
    assert_agrees("cluster_loss, mean over heads", &mean, &DC_LOSS);
}

#[test]
fn nt_xent_matches_solo_learn_lightly_and_supcon() {
    let views: Vec<Tensor> = (0..3).map(|i| view(&NTX_VIEWS, i, 4, 3)).collect();
    let got = nt_xent(&views[..2], 0.1);
    assert_agrees("nt_xent, 2 views, tau 0.1", &got, &NTX_LOSS_TAU01);
    let got = nt_xent(&views[..2], 0.5);
    assert_agrees("nt_xent, 2 views, tau 0.5", &got, &NTX_LOSS_TAU05);
    let got = nt_xent(&views, 0.1);
    assert_agrees("nt_xent, 3 views (SupConLoss)", &got, &NTX_LOSS_3VIEWS_SUPCON);
    // The deliberate difference: solo-learn's log of the summed positives is another loss.
    let solo_learn = NTX_LOSS_3VIEWS_SOLO_LEARN[0];
    assert!((got.double_value(&[]) - solo_learn).abs() > 1.0, "{solo_learn}");
}

fn vicreg_views() -> (Tensor, Tensor) {
    (tensor(&VIC_Z1, &[5, 4]), tensor(&VIC_Z2, &[5, 4]))
}

#[test]
fn vicreg_variance_matches_solo_learn() {
    let (z1, z2) = vicreg_views();
    assert_agrees("variance, view 1", &variance(&z1, 1.0), &VIC_VARIANCE[..1]);
    assert_agrees("variance, view 2", &variance(&z2, 1.0), &VIC_VARIANCE[1..]);
}

#[test]
fn vicreg_covariance_matches_solo_learn() {
    let (z1, z2) = vicreg_views();
    assert_agrees("covariance, view 1", &covariance(&z1), &VIC_COVARIANCE[..1]);
    assert_agrees("covariance, view 2", &covariance(&z2), &VIC_COVARIANCE[1..]);
}

#[test]
fn vicreg_invariance_matches_solo_learn() {
    let (z1, z2) = vicreg_views();
    assert_agrees("invariance", &invariance(&z1, &z2), &VIC_INVARIANCE_MSE);
}

#[test]
fn vicreg_objective_with_default_weights_matches_solo_learn() {
    // The objective's combination for two views (one pair), with its default coefficients.
    let cfg = VicRegConfig::default();
    let (z1, z2) = vicreg_views();
    let total = invariance(&z1, &z2) * cfg.invariance_weight
        + (variance(&z1, cfg.target_std) + variance(&z2, cfg.target_std)) * cfg.variance_weight
        + (covariance(&z1) + covariance(&z2)) * cfg.covariance_weight;
    assert_agrees("vicreg loss, default weights", &total, &VIC_LOSS_SOLO_LEARN);
    // lightly and facebookresearch/vicreg average the variance terms: mu halved.
    let averaged = invariance(&z1, &z2) * cfg.invariance_weight
        + (variance(&z1, cfg.target_std) + variance(&z2, cfg.target_std)) * (cfg.variance_weight / 2.0)
        + (covariance(&z1) + covariance(&z2)) * cfg.covariance_weight;
    assert_agrees("vicreg loss, variance averaged (lightly)", &averaged, &VIC_LOSS_LIGHTLY);
}

#[test]
fn soft_dice_loss_matches_monai_dice_loss() {
    let logits = tensor(&DICE_LOGITS, &[2, 3, 2, 3]);
    let targets = Tensor::from_slice(&DICE_TARGETS).view([2, 2, 3]);
    let loss = soft_dice_loss(&logits, &targets);
    assert_agrees("soft_dice_loss", &loss, &DICE_LOSS);
    // MONAI's default smoothing (1e-5 in numerator and denominator) moves it by 8.7e-7.
    assert_agrees(
        "soft_dice_loss vs MONAI's default smoothing",
        &loss,
        &DICE_LOSS_MONAI_DEFAULT_SMOOTH,
    );
    // Class 2 nowhere: MONAI's per-class losses are [class 1, 1.0]; medssl keeps class 1 only.
    let logits = tensor(&DICE_ABSENT_LOGITS, &[2, 3, 2, 3]);
    let targets = Tensor::from_slice(&DICE_ABSENT_TARGETS).view([2, 2, 3]);
    assert_agrees(
        "soft_dice_loss, class 2 absent",
        &soft_dice_loss(&logits, &targets),
        &DICE_ABSENT_PER_CLASS[..1],
    );
}

// ---- generated by benchmarks/reference/agreement.py; do not edit by hand ----
/// 4x5x4
const SWAV_SCORES: [f64; 80] = [
    -0.87, 0.1, -0.96, -0.23, 0.86, -0.41, 0.39, 0.69, 0.82, -0.92, -1.0, -0.35, 0.32, 0.8, -0.88, 0.0, -0.66, 0.1,
    -0.32, -0.53, 0.77, 0.84, 0.85, -0.7, -0.38, 0.67, -0.5, -0.2, 0.21, -0.89, -0.04, -0.53, -0.89, 0.65, 0.33, -0.82,
    -0.93, -0.68, -0.36, -0.56, 0.18, -0.58, -0.23, 0.19, -0.15, -0.02, 0.2, -0.53, 0.93, -0.17, 0.89, 0.39, 0.68,
    -0.08, -0.82, 0.88, -0.4, -0.72, -0.36, 0.81, -0.2, 0.73, -0.76, 0.94, -0.82, 0.21, -0.52, 0.02, 0.04, 0.06, -0.5,
    0.72, -0.15, -0.4, -0.78, 0.65, -0.58, -0.37, 0.27, 0.16,
];
/// 3x4
const SWAV_QUEUE_SCORES: [f64; 12] = [
    -0.99, -0.02, 0.8, 0.53, 0.09, -0.92, 0.38, 0.17, 0.91, -0.68, -0.3, -0.26,
];
/// 5x4
const SWAV_SINKHORN_ITER1: [f64; 20] = [
    7.710114405343204e-10,
    0.9878693507998035,
    2.232912337205499e-06,
    0.012128415516847957,
    0.25649600155191576,
    1.1490171190579587e-11,
    0.3717520635279375,
    0.37175193490865666,
    0.9999999970099436,
    3.705764090797951e-15,
    2.7240920314229354e-12,
    2.9873286147087894e-09,
    1.4074749686096167e-05,
    0.9999849096242136,
    9.309235833298157e-12,
    1.0156167909742427e-06,
    2.8616878073333054e-08,
    0.5498245383346989,
    0.45015870051185564,
    1.6732536567310438e-05,
];
/// 5x4
const SWAV_SINKHORN_ITER3: [f64; 20] = [
    2.440557819131612e-09,
    0.7892254594662542,
    1.2225818183349677e-05,
    0.21076231227500442,
    0.08723199093346923,
    9.862680877588321e-13,
    0.21868880635603816,
    0.6940792027095064,
    0.9999999835952965,
    9.353002692782013e-16,
    4.711939991961684e-12,
    1.6399990693167147e-08,
    5.576222891812409e-05,
    0.9999221480017783,
    6.37957075708466e-11,
    2.208970550788731e-05,
    3.118955213160843e-08,
    0.15124614017056756,
    0.8486537113057989,
    0.00010011733408127097,
];
/// 5x4
const SWAV_SINKHORN_ITER10: [f64; 20] = [
    1.2895332450914162e-08,
    0.34550539369309796,
    4.575909718071771e-05,
    0.6544488343143889,
    0.1341952018070019,
    1.2570903339309196e-13,
    0.23831085761993578,
    0.6274939405729365,
    0.9999999903587511,
    7.749280212094374e-17,
    3.3377655373741475e-12,
    9.637910884925943e-09,
    0.0006725172355029868,
    0.9991709179982968,
    5.450179741149355e-10,
    0.00015656422118224118,
    5.081839712393705e-08,
    0.020417681611505,
    0.9794864024981,
    9.586507199759294e-05,
];
/// 5x4
const SWAV_SINKHORN_EPS0005: [f64; 20] = [
    0.4761904761904763,
    0.047619047619047374,
    0.4761904761904763,
    2.915991358824885e-46,
    7.86711401949197e-99,
    1.0411993721617538e-14,
    3.342228732157284e-116,
    0.9999999999999896,
    6.39735004471392e-19,
    1.5173694969010017e-121,
    1.3885589086065881e-47,
    1.0,
    2.076932204386719e-127,
    1.0,
    2.17052201130365e-28,
    7.364245771491615e-39,
    2.469591559736863e-115,
    1.0646981040826932e-100,
    8.984302346782621e-73,
    1.0,
];
/// 2x5x4
const SWAV_CODES: [f64; 40] = [
    2.440557819131612e-09,
    0.7892254594662542,
    1.2225818183349677e-05,
    0.21076231227500442,
    0.08723199093346923,
    9.862680877588321e-13,
    0.21868880635603816,
    0.6940792027095064,
    0.9999999835952965,
    9.353002692782013e-16,
    4.711939991961684e-12,
    1.6399990693167147e-08,
    5.576222891812409e-05,
    0.9999221480017783,
    6.37957075708466e-11,
    2.208970550788731e-05,
    3.118955213160843e-08,
    0.15124614017056756,
    0.8486537113057989,
    0.00010011733408127097,
    0.4400230185870042,
    0.04795147841415077,
    0.5120250754112541,
    4.27587590892831e-07,
    4.098059081110255e-09,
    0.14523679822147167,
    8.734059010907669e-11,
    0.8547631975931286,
    0.3193925745715492,
    2.394200649593463e-12,
    0.0005055883624073748,
    0.6801018370636492,
    1.542186763565715e-12,
    0.9856468649944844,
    0.014317493443446308,
    3.5641560527116814e-05,
    1.0725372668184417e-10,
    4.27758976342408e-10,
    2.250682054458294e-06,
    0.9999977487829328,
];
/// 5x4
const SWAV_CODES_WITH_QUEUE: [f64; 20] = [
    4.777482934457532e-10,
    0.9175650162159305,
    1.5768802540421822e-09,
    0.0824349817294411,
    0.059172906196915995,
    3.9734505531255336e-12,
    9.774271710723462e-05,
    0.9407293510820033,
    0.9999999672318247,
    5.554906703044891e-15,
    3.104634522743792e-15,
    3.276816656135301e-08,
    9.38946645253848e-06,
    0.9999831786437,
    7.077876603842341e-15,
    7.43188984039282e-06,
    3.4692228923613206e-08,
    0.9991554970677318,
    0.0006219626687407246,
    0.00022250557129855898,
];
/// 1
const SWAV_LOSS: [f64; 1] = [5.166079079204018];
/// 1
const SWAV_LOSS_ONE_CODE: [f64; 1] = [4.899378342948002];
/// 12x3
const DC_Z: [f64; 36] = [
    -0.41, -0.17, -0.83, 0.75, -0.84, 0.97, -0.33, 0.62, -0.79, 0.42, 0.27, 0.58, -0.33, -0.07, -0.22, 0.02, -0.75,
    0.14, -1.0, 0.63, -0.08, -0.53, 0.44, 0.31, -0.74, 0.04, -0.61, 0.32, -0.07, 0.36, -0.01, 0.78, 0.2, 0.27, -0.53,
    -0.16,
];
/// 4x3
const DC_PROTOTYPES0: [f64; 12] = [
    0.98, 0.04, -0.07, 0.43, -0.51, 0.0, 0.97, 0.63, 0.94, -0.57, 0.73, -0.26,
];
/// 3x3
const DC_PROTOTYPES1: [f64; 9] = [-0.83, -0.09, -0.61, -0.12, -0.37, -0.36, -0.06, -0.06, -0.12];
/// 2
const DC_HEAD_LOSSES: [f64; 2] = [10.10913377486927, 5.000828433659426];
/// 1
const DC_LOSS: [f64; 1] = [7.554981104264348];
/// 3x4x3
const NTX_VIEWS: [f64; 36] = [
    0.56, -0.5, 0.92, -0.61, 1.0, 0.63, 0.78, -0.33, -0.29, -0.98, -0.47, -0.29, 0.28, 0.3, -0.01, 0.05, 0.93, 0.38,
    -0.33, 0.23, -0.87, 0.23, -0.89, 0.86, 0.94, -0.97, 0.6, 0.69, 0.05, 0.88, -0.97, -0.96, -0.01, -0.42, 0.23, -0.16,
];
/// 1
const NTX_LOSS_TAU01: [f64; 1] = [5.135454461033849];
/// 1
const NTX_LOSS_TAU05: [f64; 1] = [1.8164539579798185];
/// 1
const NTX_LOSS_3VIEWS_SUPCON: [f64; 1] = [7.104364223504519];
/// 1
const NTX_LOSS_3VIEWS_SOLO_LEARN: [f64; 1] = [4.186189611919263];
/// 5x4
const VIC_Z1: [f64; 20] = [
    -0.37, -1.01, 1.24, -0.89, -1.3, -0.54, 1.03, -1.76, 0.53, 1.69, -0.17, -0.38, 0.74, 1.9, 1.18, 1.84, -0.45, 1.79,
    1.55, -1.61,
];
/// 5x4
const VIC_Z2: [f64; 20] = [
    -0.95, 0.41, 0.15, -0.29, -1.67, 1.6, -1.91, -0.22, -0.49, -1.68, -0.16, -0.01, 1.28, -0.36, 1.85, -0.2, 1.41,
    -1.54, -1.85, 0.22,
];
/// 1
const VIC_INVARIANCE_MSE: [f64; 1] = [3.5817];
/// 2
const VIC_VARIANCE: [f64; 2] = [0.12839373550395985, 0.19824939613878886];
/// 2
const VIC_COVARIANCE: [f64; 2] = [1.3734020428875002, 1.1034559216624995];
/// 1
const VIC_LOSS_SOLO_LEARN: [f64; 1] = [100.18543625561873];
/// 1
const VIC_LOSS_LIGHTLY: [f64; 1] = [96.10239711008435];
/// 2x3x2x3
const DICE_LOGITS: [f64; 36] = [
    -0.41, 0.15, 0.75, -1.9, 0.3, 1.15, -1.36, -1.29, -1.0, -1.92, -0.5, -1.32, 1.78, 1.34, 1.92, 1.56, 1.33, 0.74,
    1.56, 1.29, 0.92, 1.5, -1.15, -1.39, -1.25, -1.15, -0.88, 0.43, 0.8, 1.19, 0.52, 0.8, 0.14, 0.38, -1.48, 1.71,
];
const DICE_TARGETS: [i64; 12] = [0, 1, 2, 1, 1, 0, 2, 2, 0, 0, 1, 2];
/// 1
const DICE_LOSS: [f64; 1] = [0.6378490793823105];
/// 1
const DICE_LOSS_MONAI_DEFAULT_SMOOTH: [f64; 1] = [0.6378482118142679];
/// 2x3x2x3
const DICE_ABSENT_LOGITS: [f64; 36] = [
    -0.41, 0.15, 0.75, -1.9, 0.3, 1.15, -1.36, -1.29, -1.0, -1.92, -0.5, -1.32, -2.22, -2.66, -2.08, -2.44, -2.67,
    -3.26, 1.56, 1.29, 0.92, 1.5, -1.15, -1.39, -1.25, -1.15, -0.88, 0.43, 0.8, 1.19, -3.48, -3.2, -3.86, -3.62, -5.48,
    -2.29,
];
const DICE_ABSENT_TARGETS: [i64; 12] = [0, 1, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1];
/// 2
const DICE_ABSENT_PER_CLASS: [f64; 2] = [0.4984848760180647, 1.0];
