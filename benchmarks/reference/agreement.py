"""Reference values for tests/agreement.rs: medssl's SSL and segmentation losses against the
formulas of the published reference implementations, on small fixed inputs, in float64.

Each function below writes out, in NumPy, the computation of one reference implementation in
the order that implementation performs it (read from its source; cited per function):

- SwAV codes: facebookresearch/swav, main_swav.py, `distributed_sinkhorn` (one process,
  world_size 1): Q = exp(out / epsilon)^T, divided by its total, then `sinkhorn_iterations`
  times rows (prototypes) to 1/K and columns (samples) to 1/B, then Q * B; in the plain
  exponential domain. With a queue, main_swav.py's `train` puts the queue's scores before the
  batch's and keeps the last B rows of the codes.
- SwAV loss: main_swav.py, `train`: for each crop in `crops_for_assign`, the mean over the
  other crops of -mean_b sum_k q log_softmax(scores / temperature), divided by
  (number of crops - 1); then divided by len(crops_for_assign).
- DeepCluster-v2: facebookresearch/swav, main_deepclusterv2.py, `train`: per prototype set h,
  nn.CrossEntropyLoss(ignore_index=-100) of output[h] / temperature against the assignments
  repeated over the crops; averaged over the sets.
- NT-Xent: vturrisi/solo-learn, solo/losses/simclr.py, `simclr_loss_func` (one process), and
  lightly-ai/lightly, lightly/loss/ntx_ent_loss.py, `NTXentLoss.forward` (no memory bank); for
  three views, HobbitLong/SupContrast, losses.py, `SupConLoss.forward` with one label per
  sample and temperature == base_temperature.
- VICReg: solo-learn, solo/losses/vicreg.py (`invariance_loss`, `variance_loss`,
  `covariance_loss`, `vicreg_loss_func`), with lightly's VICRegLoss and
  facebookresearch/vicreg's main_vicreg.py variants noted where they differ.
- Soft Dice: Project-MONAI/MONAI, monai/losses/dice.py, `DiceLoss` with softmax=True,
  to_onehot_y=True, include_background=False, batch=True (sums over batch and space), and
  smooth_nr = smooth_dr = 0 (medssl has no smoothing terms); the default smoothing 1e-5 is
  printed too, for the size of that difference.

Inputs are short decimals from a seeded generator (two decimals), so both sides parse the same
literals to the same float64 numbers. The script prints Rust `const` arrays (inputs and
reference values) that tests/agreement.rs embeds. It is the provenance of those numbers, not a
CI step. Run with any Python that has NumPy:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install numpy
    /tmp/refenv/bin/python benchmarks/reference/agreement.py
"""

import numpy as np

rng = np.random.default_rng(20240516)


def literal(shape, low=-1.0, high=1.0):
    """Seeded inputs rounded to two decimals."""
    return np.round(rng.uniform(low, high, size=shape), 2)


def rust(name, array):
    flat = np.asarray(array, dtype=np.float64).ravel()
    body = ", ".join(repr(float(v)) for v in flat)
    shape = "x".join(str(s) for s in np.shape(array)) or "scalar"
    print(f"/// {shape}")
    print(f"const {name}: [f64; {flat.size}] = [{body}];")


def rust_int(name, array):
    flat = np.asarray(array, dtype=np.int64).ravel()
    body = ", ".join(str(int(v)) for v in flat)
    print(f"const {name}: [i64; {flat.size}] = [{body}];")


def log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


# ---------------------------------------------------------------- SwAV (facebookresearch/swav)


def distributed_sinkhorn(out, epsilon, iterations):
    q = np.exp(out / epsilon).T  # K x B
    b = q.shape[1]
    k = q.shape[0]
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True)
        q = q / k
        q = q / q.sum(axis=0, keepdims=True)
        q = q / b
    q = q * b
    return q.T


def swav_loss(scores, crops_for_assign, codes, temperature):
    crops = len(scores)
    loss = 0.0
    for i, crop_id in enumerate(crops_for_assign):
        q = codes[i]
        subloss = 0.0
        for v in np.delete(np.arange(crops), crop_id):
            x = scores[v] / temperature
            subloss -= np.mean(np.sum(q * log_softmax(x, 1), axis=1))
        loss += subloss / (crops - 1)
    return loss / len(crops_for_assign)


# ------------------------------------------ DeepCluster-v2 (facebookresearch/swav), CE with ignore


def cross_entropy(logits, targets, ignore_index):
    keep = targets != ignore_index
    lp = log_softmax(logits, 1)
    picked = lp[np.arange(len(targets))[keep], targets[keep]]
    return -picked.mean()


def deepcluster_v2_loss(z, prototypes, assignments, crops, temperature):
    total = 0.0
    per_head = []
    for c, a in zip(prototypes, assignments):
        scores = (z @ c.T) / temperature
        targets = np.tile(a, crops)
        h = cross_entropy(scores, targets, -100)
        per_head.append(h)
        total += h
    return total / len(prototypes), per_head


# ------------------------------------------------------------------------------- NT-Xent


def normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def solo_learn_simclr(z, indexes, temperature):
    z = normalize(z)
    sim = np.exp(z @ z.T / temperature)
    pos_mask = indexes[None, :] == indexes[:, None]
    np.fill_diagonal(pos_mask, False)
    neg_mask = indexes[None, :] != indexes[:, None]
    pos = (sim * pos_mask).sum(1)
    neg = (sim * neg_mask).sum(1)
    return -np.mean(np.log(pos / (pos + neg)))


def lightly_ntxent(out0, out1, temperature):
    n = out0.shape[0]
    out0, out1 = normalize(out0), normalize(out1)
    off = ~np.eye(n, dtype=bool)
    l00 = (out0 @ out0.T / temperature)[off].reshape(n, -1)
    l01 = out0 @ out1.T / temperature
    l10 = out1 @ out0.T / temperature
    l11 = (out1 @ out1.T / temperature)[off].reshape(n, -1)
    logits = np.concatenate([np.concatenate([l01, l00], 1), np.concatenate([l10, l11], 1)], 0)
    labels = np.tile(np.arange(n), 2)
    return cross_entropy(logits, labels, -100)


def supcon(features, temperature, base_temperature):
    """features [bsz, n_views, dim], already normalised; labels = one per sample."""
    bsz, views, _ = features.shape
    mask = np.eye(bsz)
    contrast = np.concatenate([features[:, v] for v in range(views)], 0)
    anchor_dot_contrast = contrast @ contrast.T / temperature
    logits = anchor_dot_contrast - anchor_dot_contrast.max(axis=1, keepdims=True)
    mask = np.tile(mask, (views, views))
    logits_mask = 1.0 - np.eye(bsz * views)
    mask = mask * logits_mask
    exp_logits = np.exp(logits) * logits_mask
    log_prob = logits - np.log(exp_logits.sum(1, keepdims=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.reshape(views, bsz).mean()


# ------------------------------------------------------------------------ VICReg (solo-learn)


def vicreg_invariance(z1, z2):
    return np.mean((z1 - z2) ** 2)  # F.mse_loss: mean over all n * d entries


def vicreg_variance_one(z, eps=1e-4):
    std = np.sqrt(z.var(axis=0, ddof=1) + eps)
    return np.mean(np.maximum(1.0 - std, 0.0))


def vicreg_covariance_one(z):
    n, d = z.shape
    z = z - z.mean(axis=0)
    cov = z.T @ z / (n - 1)
    off = ~np.eye(d, dtype=bool)
    return (cov[off] ** 2).sum() / d


def solo_learn_vicreg(z1, z2, sim_w=25.0, var_w=25.0, cov_w=1.0):
    sim = vicreg_invariance(z1, z2)
    var = vicreg_variance_one(z1) + vicreg_variance_one(z2)
    cov = vicreg_covariance_one(z1) + vicreg_covariance_one(z2)
    return sim_w * sim + var_w * var + cov_w * cov


# ----------------------------------------------------------------------- Soft Dice (MONAI)


def monai_dice(logits, targets, smooth_nr, smooth_dr, reduction="mean"):
    """DiceLoss(softmax, to_onehot_y, include_background=False, batch=True)."""
    k = logits.shape[1]
    m = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - m)
    p = e / e.sum(axis=1, keepdims=True)
    g = np.moveaxis(np.eye(k)[targets], -1, 1)  # one-hot [N, K, H, W]
    p, g = p[:, 1:], g[:, 1:]
    axes = (0, 2, 3)
    intersection = (g * p).sum(axes)
    denominator = g.sum(axes) + p.sum(axes)
    f = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
    return f.mean() if reduction == "mean" else f


def main():
    print("// ---- generated by benchmarks/reference/agreement.py; do not edit by hand ----")

    # SwAV: 5 samples, 4 prototypes; 2 global crops then 2 local crops; a queue of 3 rows.
    b, k = 5, 4
    scores = [literal((b, k)) for _ in range(4)]
    queue_scores = literal((3, k))
    epsilon, temperature = 0.05, 0.1
    rust("SWAV_SCORES", np.stack(scores))
    rust("SWAV_QUEUE_SCORES", queue_scores)
    for iters in (1, 3, 10):
        rust(f"SWAV_SINKHORN_ITER{iters}", distributed_sinkhorn(scores[0], epsilon, iters))
    # A smaller epsilon: exp(out / eps) reaches e^170, beyond float32 (e^88.7; the reference
    # in fp32 overflows), still finite in float64.
    assert np.abs(scores[1]).max() / 0.005 > 89
    rust("SWAV_SINKHORN_EPS0005", distributed_sinkhorn(scores[1], 0.005, 3))
    codes = [distributed_sinkhorn(s, epsilon, 3) for s in scores[:2]]
    rust("SWAV_CODES", np.stack(codes))
    with_queue = distributed_sinkhorn(np.concatenate([queue_scores, scores[0]]), epsilon, 3)[-b:]
    rust("SWAV_CODES_WITH_QUEUE", with_queue)
    rust("SWAV_LOSS", [swav_loss(scores, [0, 1], codes, temperature)])
    # Only the first crop assigned (crops_for_assign = [0]).
    rust("SWAV_LOSS_ONE_CODE", [swav_loss(scores, [0], codes[:1], temperature)])

    # DeepCluster-v2: 4 samples, 3 crops, width 3; heads of 4 and 3 clusters; sample 2 has
    # no assignment in head 1 (-100 in the reference, -1 in medssl).
    batch, crops, d = 4, 3, 3
    z = literal((crops * batch, d))
    heads = [literal((4, d)), literal((3, d))]
    assignments = [np.array([0, 3, 1, 2]), np.array([2, 0, -100, 1])]
    loss, per_head = deepcluster_v2_loss(z, heads, assignments, crops, temperature)
    rust("DC_Z", z)
    rust("DC_PROTOTYPES0", heads[0])
    rust("DC_PROTOTYPES1", heads[1])
    rust("DC_HEAD_LOSSES", per_head)
    rust("DC_LOSS", [loss])

    # NT-Xent: 4 samples, width 3, 2 views (and a third for the multi-view form).
    n, d = 4, 3
    views = [literal((n, d)) for _ in range(3)]
    rust("NTX_VIEWS", np.stack(views))
    ids2 = np.tile(np.arange(n), 2)
    for tau, name in ((0.1, "NTX_LOSS_TAU01"), (0.5, "NTX_LOSS_TAU05")):
        solo = solo_learn_simclr(np.concatenate(views[:2]), ids2, tau)
        light = lightly_ntxent(views[0], views[1], tau)
        assert abs(solo - light) < 1e-12, (solo, light)
        rust(name, [solo])
    features = np.stack([normalize(v) for v in views], axis=1)
    rust("NTX_LOSS_3VIEWS_SUPCON", [supcon(features, 0.1, 0.1)])
    # solo-learn's form for 3 views (log of the summed positives), for the doc comment.
    ids3 = np.tile(np.arange(n), 3)
    rust("NTX_LOSS_3VIEWS_SOLO_LEARN", [solo_learn_simclr(np.concatenate(views), ids3, 0.1)])

    # VICReg: 5 rows, width 4; z2 has a collapsed-ish column so the hinge is active.
    z1 = literal((5, 4), -2.0, 2.0)
    z2 = literal((5, 4), -2.0, 2.0)
    z2[:, 3] = np.round(z2[:, 3] * 0.2, 2)
    rust("VIC_Z1", z1)
    rust("VIC_Z2", z2)
    rust("VIC_INVARIANCE_MSE", [vicreg_invariance(z1, z2)])
    rust("VIC_VARIANCE", [vicreg_variance_one(z1), vicreg_variance_one(z2)])
    rust("VIC_COVARIANCE", [vicreg_covariance_one(z1), vicreg_covariance_one(z2)])
    rust("VIC_LOSS_SOLO_LEARN", [solo_learn_vicreg(z1, z2)])
    # lightly and facebookresearch/vicreg average the two variance terms (0.5 * (v1 + v2)).
    lightly = (
        25.0 * vicreg_invariance(z1, z2)
        + 25.0 * 0.5 * (vicreg_variance_one(z1) + vicreg_variance_one(z2))
        + (vicreg_covariance_one(z1) + vicreg_covariance_one(z2))
    )
    rust("VIC_LOSS_LIGHTLY", [lightly])

    # Soft Dice: logits [2, 3, 2, 3], targets [2, 2, 3].
    logits = literal((2, 3, 2, 3), -2.0, 2.0)
    targets = np.array([[[0, 1, 2], [1, 1, 0]], [[2, 2, 0], [0, 1, 2]]])
    rust("DICE_LOGITS", logits)
    rust_int("DICE_TARGETS", targets)
    rust("DICE_LOSS", [monai_dice(logits, targets, 0.0, 0.0)])
    rust("DICE_LOSS_MONAI_DEFAULT_SMOOTH", [monai_dice(logits, targets, 1e-5, 1e-5)])
    # Class 2 in no target and never the arg-max: MONAI scores it (1 - 0 / sum p = 1);
    # medssl leaves it out, so its loss is MONAI's class-1 term alone.
    absent = logits.copy()
    absent[:, 2] = np.round(absent[:, 2] - 4.0, 2)
    targets_absent = np.where(targets == 2, 1, targets)
    per_class = monai_dice(absent, targets_absent, 0.0, 0.0, reduction="none")
    assert (absent.argmax(axis=1) != 2).all()
    rust("DICE_ABSENT_LOGITS", absent)
    rust_int("DICE_ABSENT_TARGETS", targets_absent)
    rust("DICE_ABSENT_PER_CLASS", per_class)


if __name__ == "__main__":
    main()
