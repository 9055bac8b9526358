//! Contrastive losses that several objectives share.
//!
//! [`nt_xent`] is SimCLR's NT-Xent (Chen et al., ICML 2020, Eq. 1) generalised to V views
//! (SupCon's positives, Khosla et al. 2020, Eq. 2). For two views it is also MONAI's
//! `ContrastiveLoss` (`monai/losses/contrastive.py`), which the ViT reconstruction method
//! applies to its two flattened reconstructions: the same cosine logits over the 2N anchors,
//! self-similarity excluded, as a log-softmax (log-sum-exp), so that `exp(1 / 0.05)` never
//! has to be formed.

use crate::ops::l2_normalize;
use crate::precision::loss_kind;
use tch::{Kind, Tensor};

/// NT-Xent over `views` (each `[N, D]`, already projected): mean over anchors of the mean
/// over positives of `-log softmax`, with self-similarity excluded. In fp32 (f64 views stay
/// f64).
pub fn nt_xent(views: &[Tensor], temperature: f64) -> Tensor {
    let n = views[0].size()[0];
    nt_xent_of_anchors(views, 0, n, temperature)
}

/// [`nt_xent`] with the anchors restricted to samples `start..start + count` of every view,
/// the candidates being all samples of all views: each rank's part of the loss over a
/// batch gathered from every rank (solo-learn's `gather`), whose mean over ranks is the loss
/// of the whole batch.
pub fn nt_xent_of_anchors(views: &[Tensor], start: i64, count: i64, temperature: f64) -> Tensor {
    let kind = loss_kind(&views[0]);
    let v = views.len() as i64;
    let n = views[0].size()[0];
    let z = l2_normalize(&Tensor::cat(views, 0));
    let device = z.device();
    // Anchor rows: samples start..start+count of each view, view-major as the candidates.
    let anchor_rows = Tensor::cat(
        &(0..v)
            .map(|view| Tensor::arange_start(view * n + start, view * n + start + count, (Kind::Int64, device)))
            .collect::<Vec<_>>(),
        0,
    );
    let logits = z.index_select(0, &anchor_rows).matmul(&z.tr()) / temperature;
    let columns = Tensor::arange(v * n, (Kind::Int64, device));
    let itself = anchor_rows.unsqueeze(1).eq_tensor(&columns.unsqueeze(0));
    let logits = logits.masked_fill(&itself, f64::NEG_INFINITY);
    let log_prob = logits.log_softmax(1, kind);
    let positives = anchor_rows
        .remainder(n)
        .unsqueeze(1)
        .eq_tensor(&columns.remainder(n).unsqueeze(0))
        .logical_and(&itself.logical_not());
    let pos_log_prob = log_prob
        .masked_fill(&positives.logical_not(), 0.0)
        .sum_dim_intlist(1, false, kind);
    -(pos_log_prob / (v - 1) as f64).mean(kind)
}
