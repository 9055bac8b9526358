//! SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
//! Assignments", NeurIPS 2020): the clustering objective that the medssl paper uses as
//! L_intra on 2D views of slices (its Eq. 1-5) and, with `level = "volume"`, as L_inter
//! between views of whole volumes (its Eq. 11-12).
//!
//! Every view's embedding goes through the projection head (Linear-BN-ReLU-Linear, run once
//! over all views together as SwAV's reference code does, so batch norm sees every crop) and
//! is L2-normalised to z. The scores of z against the K prototypes c_k (a bias-free linear
//! layer whose rows are kept on the unit sphere) are z^T c_k.
//! - Codes (Sec. 3.1, Eq. 4-5): for each global view, Q = Diag(u) exp(C^T Z / epsilon) Diag(v)
//!   with uniform marginals over the prototypes, found by a few Sinkhorn-Knopp iterations
//!   ([`sinkhorn_knopp`], Appendix A.1), without gradient. With a queue ("working with small
//!   batches", Sec. 3.1) the stored embeddings of earlier batches join the Sinkhorn input and
//!   only the current batch's codes are kept ([`codes`]). `queue_length` counts the
//!   embeddings of every rank together, as the reference's `queue_length` does.
//! - Swapped prediction (Eq. 1-3): l(z_t, q_s) = -sum_k q_s^(k) log p_t^(k) with
//!   p_t^(k) = softmax_k(z_t^T c_k / tau). With multi-crop (Sec. 3.2, Eq. 6) codes come from
//!   the global views only and each global view's code is predicted from every other view,
//!   global and local; the loss is averaged over those views and over the global views,
//!   exactly as the reference training loop does ([`swapped_prediction`]).
//! - The prototypes get no gradient during the first `freeze_prototypes_steps` steps of a
//!   stage (Appendix A.1: frozen during the first epoch), and are renormalised after every
//!   optimizer step.
//!
//! Data-parallel: Sinkhorn runs over the batches of every rank ([`sinkhorn_knopp_across`]).
//! The reference keeps a queue of `queue_length / world` local embeddings on each rank; here
//! every rank keeps the whole queue (each step's embeddings are all-gathered before they are
//! pushed) and feeds its own share of it (rows r, r + W, ...) to Sinkhorn, so the rows that
//! Sinkhorn sees over all ranks are the reference's, and equal one process's with the global
//! batch. medssl differs on purpose: rank 0's checkpoint then holds the whole queue, so a
//! resumed run is exact without a checkpoint per rank. It costs `queue_length x output_dim`
//! floats per view on each rank instead of a W-th of that.

use medssl_core::distributed::Communicator;
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SwavConfig {
    /// `slice` (2D views through the encoder) or `volume` (3D views through the aggregator).
    pub level: ViewLevel,
    /// Hidden width of the projection head.
    pub hidden_dim: i64,
    /// Output width of the projection head (the prototypes' width).
    pub output_dim: i64,
    /// Number of prototypes K.
    pub prototypes: i64,
    /// tau of the swapped prediction's softmax (Eq. 2).
    pub temperature: f64,
    /// epsilon, the entropy regularisation of the codes (Eq. 3-5).
    pub epsilon: f64,
    /// Sinkhorn-Knopp iterations per code computation.
    pub sinkhorn_iterations: usize,
    /// Steps at the start of each stage during which the prototypes get no gradient.
    pub freeze_prototypes_steps: usize,
    /// Embeddings of earlier batches kept per global view for the codes (0: no queue).
    pub queue_length: usize,
    /// First epoch of a stage at which the queue is filled and used; before it, it is empty.
    /// The queue keeps one FIFO per global view of the run (`data.views.slice_views` at the
    /// slice level, `data.views.volume_views` at the volume level).
    pub queue_start_epoch: usize,
}

impl Default for SwavConfig {
    fn default() -> Self {
        // The reference implementation's ImageNet defaults.
        SwavConfig {
            level: ViewLevel::Slice,
            hidden_dim: 2048,
            output_dim: 128,
            prototypes: 3000,
            temperature: 0.1,
            epsilon: 0.05,
            sinkhorn_iterations: 3,
            freeze_prototypes_steps: 313,
            queue_length: 0,
            queue_start_epoch: 15,
        }
    }
}

pub struct SwavObjective {
    cfg: SwavConfig,
    consumes: Consumes,
    projector: nn::SequentialT,
    /// `[K, output_dim]`, rows of unit norm.
    prototypes: Tensor,
    /// Global views per sample at the objective's level: the codes' views, one queue each.
    global_views: usize,
    /// `[global_views, queue_length, output_dim]`, newest rows first; absent without a queue.
    queue: Option<Tensor>,
    /// Filled rows of each view's queue (checkpointed through `state`).
    filled: Vec<usize>,
}

impl SwavObjective {
    pub fn new(p: nn::Path, cfg: SwavConfig, shape: &ObjectiveShape) -> Result<Self> {
        let (consumes, input_dim) = cfg.level.resolve(shape, "swav")?;
        ensure!(
            cfg.hidden_dim > 0 && cfg.output_dim > 0,
            "swav: `hidden_dim` and `output_dim` must be positive, got {} and {}",
            cfg.hidden_dim,
            cfg.output_dim
        );
        ensure!(
            cfg.prototypes > 0,
            "swav: `prototypes` must be positive, got {}",
            cfg.prototypes
        );
        ensure!(
            cfg.temperature > 0.0 && cfg.temperature.is_finite(),
            "swav: `temperature` must be positive, got {}",
            cfg.temperature
        );
        ensure!(
            cfg.epsilon > 0.0 && cfg.epsilon.is_finite(),
            "swav: `epsilon` must be positive, got {}",
            cfg.epsilon
        );
        ensure!(
            cfg.sinkhorn_iterations > 0,
            "swav: `sinkhorn_iterations` must be at least 1"
        );
        let global_views = cfg.level.global_views(shape);
        ensure!(
            global_views > 0,
            "swav: the run makes no global views at the {:?} level ({}): the codes need at least one",
            cfg.level,
            cfg.level.global_views_key()
        );
        // SwAV's `resnet50.py`: PyTorch's default init for the head's linear layers and the
        // prototypes (`nn.Linear(output_dim, nmb_prototypes, bias=False)`), batch norm at 1/0.
        let projector = projection_head(&p / "projector", &[input_dim, cfg.hidden_dim, cfg.output_dim]);
        let prototypes = layers::linear_without_bias(&p / "prototypes", cfg.output_dim, cfg.prototypes).ws;
        normalize_rows_(&prototypes);
        let (queue, filled) = if cfg.queue_length > 0 {
            let queue = p.zeros_no_train("queue", &[global_views as i64, cfg.queue_length as i64, cfg.output_dim]);
            (Some(queue), vec![0; global_views])
        } else {
            (None, Vec::new())
        };
        Ok(SwavObjective {
            cfg,
            consumes,
            global_views,
            projector,
            prototypes,
            queue,
            filled,
        })
    }

    fn clear_queue(&mut self) {
        if let Some(queue) = &self.queue {
            tch::no_grad(|| {
                let _ = queue.shallow_clone().zero_();
            });
            self.filled.iter_mut().for_each(|f| *f = 0);
        }
    }

    /// Pushes each global view's batch embeddings `z[i]`, those of every rank in rank order,
    /// to the front of its FIFO.
    fn push(&mut self, z: &[Tensor], comm: &dyn Communicator) -> Result<()> {
        let Some(queue) = &self.queue else { return Ok(()) };
        let length = self.cfg.queue_length as i64;
        tch::no_grad(|| {
            for (i, z) in z.iter().enumerate() {
                let z = comm.all_gather(&z.detach().contiguous())?;
                let mut slot = queue.get(i as i64);
                let shifted = Tensor::cat(&[z.to_kind(slot.kind()), slot.shallow_clone()], 0).narrow(0, 0, length);
                slot.copy_(&shifted);
                self.filled[i] = (self.filled[i] + z.size()[0] as usize).min(self.cfg.queue_length);
            }
            Ok(())
        })
    }

    /// This rank's share of view `i`'s filled queue (rows rank, rank + W, ...): over all
    /// ranks, every filled row once.
    fn queue_share(&self, queue: &Tensor, i: usize, comm: &dyn Communicator) -> Tensor {
        let filled = self.filled[i] as i64;
        queue
            .get(i as i64)
            .narrow(0, 0, filled)
            .slice(0, comm.rank() as i64, filled, comm.world_size() as i64)
    }
}

/// Scales every row of `w` to unit L2 norm, in place and without gradient.
fn normalize_rows_(w: &Tensor) {
    tch::no_grad(|| {
        w.shallow_clone().copy_(&l2_normalize(w));
    });
}

/// Sinkhorn-Knopp (SwAV's Appendix A.1, `distributed_sinkhorn` of the reference code) on
/// `logits` `[B, K]` (scores over epsilon): the codes `[B, K]`, each row (sample) summing to 1
/// and, as the iterations converge, each column (prototype) to B / K.
///
/// It alternates the reference code's normalisations of Q = exp(logits)^T (prototypes to
/// 1 / K, then samples to 1 / B) and ends with every sample's column scaled to sum 1, but
/// in the log domain, in fp32 (f64 input stays f64) and without gradient: any finite input
/// gives finite codes (exp(1e4) would overflow the reference code), and the last step is a
/// softmax, so each sample's code sums to 1 to rounding. With zero iterations it is a per-sample softmax.
pub fn sinkhorn_knopp(logits: &Tensor, iterations: usize) -> Tensor {
    tch::no_grad(|| {
        let (b, k) = logits.size2().expect("sinkhorn_knopp takes [B, K] logits");
        let (log_b, log_k) = ((b as f64).ln(), (k as f64).ln());
        // fp32 (f64 input stays f64); [K, B]; total mass 1.
        let kind = if logits.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let mut log_q = logits.detach().to_kind(kind).tr();
        // Subtracting the max first is exact for entries near it (a large common offset
        // costs no precision); then the total mass is normalised to 1.
        log_q = &log_q - log_q.max();
        log_q = &log_q - log_q.logsumexp([0, 1], true);
        for _ in 0..iterations {
            log_q = &log_q - log_q.logsumexp([1], true) - log_k;
            log_q = &log_q - log_q.logsumexp([0], true) - log_b;
        }
        log_q.softmax(0, kind).tr().contiguous()
    })
}

/// [`sinkhorn_knopp`] over the batch of every rank together, each rank holding its
/// `logits` `[B_r, K]` (B_r may differ between ranks: queue shares): the reference code's
/// `distributed_sinkhorn`, whose prototype sums are all-reduced and whose sample target is
/// 1 / (sum of B_r), in the same log domain. Each
/// all-reduce of a sum of exponentials is a gathered log-sum-exp (one `[K]` gather an
/// iteration), so it is as overflow-free as the single-process one, and its codes for a
/// rank's rows equal those of one process over the concatenated batch. One process takes
/// [`sinkhorn_knopp`] itself.
pub fn sinkhorn_knopp_across(logits: &Tensor, iterations: usize, comm: &dyn Communicator) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(sinkhorn_knopp(logits, iterations));
    }
    tch::no_grad(|| {
        let (b, k) = logits.size2().context("sinkhorn_knopp takes [B, K] logits")?;
        let mut rows = [Tensor::from_slice(&[b]).to_device(logits.device())];
        comm.all_reduce_sum(&mut rows)?;
        let global_b = rows[0].int64_value(&[0]);
        let (log_b, log_k) = ((global_b as f64).ln(), (k as f64).ln());
        let kind = if logits.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let mut log_q = logits.detach().to_kind(kind).tr();
        let global_max = comm.all_gather(&log_q.max().reshape([1]))?.max();
        log_q = &log_q - global_max;
        let total = comm
            .all_gather(&log_q.logsumexp([0, 1], false).reshape([1]))?
            .logsumexp([0], false);
        log_q = &log_q - total;
        for _ in 0..iterations {
            let rows = comm
                .all_gather(&log_q.logsumexp([1], false).reshape([1, k]))?
                .logsumexp([0], false)
                .reshape([k, 1]);
            log_q = &log_q - rows - log_k;
            log_q = &log_q - log_q.logsumexp([0], true) - log_b;
        }
        Ok(log_q.softmax(0, kind).tr().contiguous())
    })
}

/// The codes `[B, K]` of one global view: Sinkhorn-Knopp over `scores / epsilon`, with the
/// queue's scores `[Q, K]` (if any) first in the same Sinkhorn batch; only the batch's rows
/// are returned. No gradient; fp32 (f64 scores stay f64).
pub fn codes(scores: &Tensor, queue_scores: Option<&Tensor>, epsilon: f64, iterations: usize) -> Tensor {
    codes_across(scores, queue_scores, epsilon, iterations, &distributed::SingleProcess)
        .expect("one process runs no collective that could fail")
}

/// [`codes`] with Sinkhorn over every rank's batch and queue ([`sinkhorn_knopp_across`]).
pub fn codes_across(
    scores: &Tensor,
    queue_scores: Option<&Tensor>,
    epsilon: f64,
    iterations: usize,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    tch::no_grad(|| {
        let b = scores.size()[0];
        let kind = loss_kind(scores);
        let scores = scores.detach().to_kind(kind);
        let all = match queue_scores {
            Some(queue) => Tensor::cat(&[queue.detach().to_kind(kind), scores], 0),
            None => scores,
        };
        let n = all.size()[0];
        Ok(sinkhorn_knopp_across(&(all / epsilon), iterations, comm)?.narrow(0, n - b, b))
    })
}

/// The swapped-prediction loss (Eq. 1-3, with multi-crop as in Eq. 6): `scores` holds one
/// `[B, K]` per view (the global views first), `codes` the codes of the first `codes.len()`
/// views. For each coded view i, the mean over every other view v of
/// `-mean_b sum_k q_i log softmax(scores_v / tau)`; then the mean over the coded views.
/// In fp32 (f64 scores stay f64).
pub fn swapped_prediction(scores: &[Tensor], codes: &[Tensor], temperature: f64) -> Tensor {
    let views = scores.len();
    assert!(
        views >= 2 && !codes.is_empty() && codes.len() <= views,
        "swapped prediction needs 2+ views and 1+ codes"
    );
    let kind = loss_kind(&scores[0]);
    let log_p: Vec<Tensor> = scores.iter().map(|s| (s / temperature).log_softmax(1, kind)).collect();
    let mut total: Option<Tensor> = None;
    for (i, q) in codes.iter().enumerate() {
        let mut sub: Option<Tensor> = None;
        for (v, lp) in log_p.iter().enumerate() {
            if v == i {
                continue;
            }
            let ce = -(q * lp).sum_dim_intlist(1, false, kind).mean(kind);
            sub = Some(match sub {
                Some(s) => s + ce,
                None => ce,
            });
        }
        let sub = sub.expect("at least one other view") / (views - 1) as f64;
        total = Some(match total {
            Some(t) => t + sub,
            None => sub,
        });
    }
    total.expect("at least one code") / codes.len() as f64
}

/// Two health figures of the global batch's codes (every rank's, so all ranks log the same):
/// the entropy of the mean code (log K at perfect equipartition), averaged over the global
/// views, and the number of prototypes that are some row's most likely code (collapse shows
/// as this falling towards 1 while the entropy can stay high).
fn code_health(codes: &[Tensor], prototypes: i64, comm: &dyn Communicator) -> Result<(f64, f64)> {
    let rows = codes[0].size()[0] * comm.world_size() as i64;
    let mut sums: Vec<Tensor> = codes
        .iter()
        .map(|q| q.sum_dim_intlist(0, false, Kind::Double))
        .collect();
    let best = Tensor::cat(&codes.iter().map(|q| q.argmax(1, false)).collect::<Vec<_>>(), 0);
    sums.push(best.bincount::<Tensor>(None, prototypes).to_kind(Kind::Double));
    comm.all_reduce_sum(&mut sums)?;
    let counts = sums.pop().expect("pushed above");
    let entropy = sums
        .iter()
        .map(|sum| {
            let mean = sum / rows as f64;
            -(&mean * mean.clamp_min(1e-12).log())
                .sum(Kind::Double)
                .double_value(&[])
        })
        .sum::<f64>()
        / codes.len() as f64;
    let used = counts.gt(0).sum(Kind::Int64).int64_value(&[]) as f64;
    Ok((entropy, used))
}

impl Objective for SwavObjective {
    fn consumes(&self) -> Consumes {
        self.consumes
    }

    fn loss(&mut self, input: &StepInput, progress: &Progress) -> Result<Loss> {
        let views = self.cfg.level.views(input, "swav")?;
        let global = match self.cfg.level {
            ViewLevel::Slice => input.global_slice_views,
            ViewLevel::Volume => views.len(),
        };
        // The runner supplies the view counts it announced at build time; a mismatch is a
        // bug in whatever calls the objective, reported rather than indexed past.
        ensure!(
            global == self.global_views && global <= views.len(),
            "swav: built for {} global views ({}), but this step has {global} global of {} views",
            self.global_views,
            self.cfg.level.global_views_key(),
            views.len()
        );
        // One pass of the head over every view, as SwAV's reference code does.
        let sizes: Vec<i64> = views.iter().map(|v| v.size()[0]).collect();
        let z = Tensor::cat(views, 0).apply_t(&self.projector, true);
        let z = l2_normalize(&z);
        let prototypes = if progress.step < self.cfg.freeze_prototypes_steps {
            self.prototypes.detach()
        } else {
            self.prototypes.shallow_clone()
        };
        let scores = z.matmul(&prototypes.tr()).split_with_sizes(&sizes, 0);
        let z = z.split_with_sizes(&sizes, 0);

        let use_queue = self.queue.is_some() && progress.epoch >= self.cfg.queue_start_epoch;
        let comm = distributed::communicator();
        let codes: Vec<Tensor> = tch::no_grad(|| {
            (0..global)
                .map(|i| {
                    let queue_scores = match &self.queue {
                        Some(queue) if use_queue && self.filled[i] > 0 => {
                            Some(self.queue_share(queue, i, &*comm).matmul(&self.prototypes.tr()))
                        }
                        _ => None,
                    };
                    codes_across(
                        &scores[i],
                        queue_scores.as_ref(),
                        self.cfg.epsilon,
                        self.cfg.sinkhorn_iterations,
                        &*comm,
                    )
                })
                .collect::<Result<Vec<_>>>()
        })
        .context("swav: Sinkhorn-Knopp over the batch of every rank")?;
        if use_queue {
            self.push(&z[..global], &*comm)
                .context("swav: gathering the batch's embeddings of every rank for the queue")?;
        }
        let total = swapped_prediction(&scores, &codes, self.cfg.temperature);
        let (entropy, used) = tch::no_grad(|| code_health(&codes, self.cfg.prototypes, &*comm))
            .context("swav: summing the codes' statistics over every rank")?;
        Ok(Loss {
            total,
            terms: Vec::new(),
            health: vec![("entropy".to_string(), entropy), ("prototypes_used".to_string(), used)],
        })
    }

    fn on_epoch_start(&mut self, progress: &Progress) -> Result<()> {
        // Before the start epoch the queue is empty (also when a later stage reuses the
        // objective: the previous stage's embeddings are not carried over).
        if progress.epoch < self.cfg.queue_start_epoch {
            self.clear_queue();
        }
        Ok(())
    }

    fn on_step_end(&mut self, _: &Progress) -> Result<()> {
        normalize_rows_(&self.prototypes);
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        match self.queue {
            Some(_) => serde_json::json!({ "queue_filled": self.filled }),
            None => serde_json::Value::Null,
        }
    }

    fn load_state(&mut self, state: serde_json::Value) -> Result<()> {
        if self.queue.is_none() || state.is_null() {
            // No queue, or no record of one: start empty.
            self.clear_queue();
            return Ok(());
        }
        let filled: Vec<usize> = state
            .get("queue_filled")
            .cloned()
            .map(serde_json::from_value)
            .transpose()?
            .context("swav: state has no `queue_filled`")?;
        ensure!(
            filled.len() == self.global_views && filled.iter().all(|&f| f <= self.cfg.queue_length),
            "swav: state's queue_filled {filled:?} does not fit {} queues of {} rows",
            self.global_views,
            self.cfg.queue_length
        );
        self.filled = filled;
        Ok(())
    }
}

fn build(section: &Section, p: nn::Path, shape: &ObjectiveShape) -> Result<Box<dyn Objective>> {
    Ok(Box::new(SwavObjective::new(p, section.parse()?, shape)?))
}

register!(OBJECTIVES, SWAV: ObjectiveEntry = ObjectiveEntry {
    name: "swav",
    about: "SwAV swapped prediction of Sinkhorn cluster codes (multi-crop, queue), on slice or volume views",
    default_config: default_toml::<SwavConfig>,
    smoke_configs: &[
        "level = \"slice\"\nhidden_dim = 16\noutput_dim = 8\nprototypes = 10\nfreeze_prototypes_steps = 0",
        "level = \"volume\"\nhidden_dim = 16\noutput_dim = 8\nprototypes = 10\nfreeze_prototypes_steps = 0\nqueue_length = 8\nqueue_start_epoch = 0",
    ],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::device::test_device;
    use proptest::prelude::*;

    /// SwAV's `distributed_sinkhorn` on one process, in f64, exactly as written there.
    fn reference_sinkhorn(logits: &[Vec<f64>], iterations: usize) -> Vec<Vec<f64>> {
        let (b, k) = (logits.len(), logits[0].len());
        // q[k][b]
        let mut q: Vec<Vec<f64>> = (0..k).map(|j| (0..b).map(|i| logits[i][j].exp()).collect()).collect();
        let total: f64 = q.iter().flatten().sum();
        q.iter_mut().flatten().for_each(|x| *x /= total);
        for _ in 0..iterations {
            for row in q.iter_mut() {
                let s: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= s * k as f64);
            }
            for i in 0..b {
                let s: f64 = q.iter().map(|row| row[i]).sum();
                q.iter_mut().for_each(|row| row[i] /= s * b as f64);
            }
        }
        (0..b).map(|i| (0..k).map(|j| q[j][i] * b as f64).collect()).collect()
    }

    fn to_tensor(m: &[Vec<f64>], device: Device) -> Tensor {
        let (r, c) = (m.len() as i64, m[0].len() as i64);
        Tensor::from_slice(&m.concat())
            .view([r, c])
            .to_kind(Kind::Float)
            .to_device(device)
    }

    fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
        let (r, c) = t.size2().unwrap();
        let flat: Vec<f64> = Vec::try_from(t.to_kind(Kind::Double).contiguous().view([-1])).unwrap();
        (0..r as usize)
            .map(|i| flat[i * c as usize..(i + 1) * c as usize].to_vec())
            .collect()
    }

    fn shape(slice_dim: i64, volume_dim: Option<i64>) -> ObjectiveShape {
        ObjectiveShape {
            spatial_dims: medssl_core::encoder::SpatialDims::Two,
            in_channels: 1,
            deepest_level: (slice_dim, 32),
            levels: Vec::new(),
            input_size: None,
            slice_dim,
            volume_dim,
            sequence_dim: None,
            global_slice_views: 2,
            local_slice_views: 0,
            volume_views: 2,
            seed: 0,
            num_samples: 16,
        }
    }

    fn small_config() -> SwavConfig {
        SwavConfig {
            hidden_dim: 12,
            output_dim: 6,
            prototypes: 5,
            freeze_prototypes_steps: 0,
            ..Default::default()
        }
    }

    fn views(n: i64, dim: i64, count: usize, seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        (0..count)
            .map(|_| Tensor::randn([n, dim], (Kind::Float, test_device())))
            .collect()
    }

    fn input<'a>(ids: &'a Tensor, views: &'a [Tensor], global: usize) -> StepInput<'a> {
        StepInput {
            ids,
            slice_views: Some(views),
            global_slice_views: global,
            volume_views: None,
            volume_crops: None,
            slice_sequence: None,
        }
    }

    fn progress(epoch: usize, step: usize) -> Progress {
        Progress {
            epoch,
            step,
            steps_per_epoch: 10,
        }
    }

    fn random_matrix(b: usize, k: usize, magnitude: f64, values: &[f64]) -> Vec<Vec<f64>> {
        (0..b)
            .map(|i| {
                (0..k)
                    .map(|j| (values[(i * k + j) % values.len()] * magnitude) as f32 as f64)
                    .collect()
            })
            .collect()
    }

    // The device is a strategy: it is read before any case runs, so a bad MEDSSL_TEST_DEVICE
    // fails the test plainly instead of as a shrunk case saved to proptest-regressions/.
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn sinkhorn_is_finite_and_normalises_every_sample_for_any_finite_input(
            b in 1usize..16, k in 1usize..32, magnitude in prop_oneof![Just(1.0), Just(20.0), Just(1e3), Just(1e4)],
            values in proptest::collection::vec(-1.0f64..1.0, 512), iterations in 0usize..8,
            device in Just(test_device()),
        ) {
            let logits = random_matrix(b, k, magnitude, &values);
            let q = sinkhorn_knopp(&to_tensor(&logits, device), iterations);
            prop_assert_eq!(q.size(), vec![b as i64, k as i64]);
            let rows = to_rows(&q);
            for row in &rows {
                prop_assert!(row.iter().all(|x| x.is_finite() && *x >= 0.0), "{:?}", row);
                let s: f64 = row.iter().sum();
                prop_assert!((s - 1.0).abs() < 1e-4, "a sample's code sums to {}", s);
            }
        }

        #[test]
        fn sinkhorn_matches_the_reference_and_converges_to_uniform_prototypes(
            b in 1usize..16, k in 1usize..32, magnitude in prop_oneof![Just(1.0), Just(5.0)],
            values in proptest::collection::vec(-1.0f64..1.0, 512), device in Just(test_device()),
        ) {
            let logits = random_matrix(b, k, magnitude, &values);
            let target = b as f64 / k as f64;
            // L1 distance of the prototypes' marginals from uniform.
            let marginal_error = |rows: &[Vec<f64>]| -> f64 {
                (0..k).map(|j| (rows.iter().map(|row| row[j]).sum::<f64>() - target).abs()).sum()
            };
            let mut errors = Vec::new();
            for iterations in [3, 200] {
                let got = to_rows(&sinkhorn_knopp(&to_tensor(&logits, device), iterations));
                let want = reference_sinkhorn(&logits, iterations);
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    prop_assert!((g - w).abs() < 1e-5, "{} iterations: {} vs {}", iterations, g, w);
                }
                errors.push(marginal_error(&got));
            }
            // Sinkhorn's marginal error never grows; how fast it shrinks depends on the
            // logits' spread: for magnitude 1 it is gone after 200 iterations, while logits
            // spread over +-5 can still be 2e-4 away (a 5 x 5 case proptest found).
            prop_assert!(errors[1] <= errors[0] + 1e-5, "marginal error grew: {:?}", errors);
            if magnitude == 1.0 {
                prop_assert!(errors[1] < 1e-4 * target.max(1.0) * k as f64, "marginal error {} after 200 iterations", errors[1]);
            }
        }

        #[test]
        fn sinkhorn_at_large_magnitudes_agrees_with_an_f64_log_domain_run(
            b in 1usize..8, k in 1usize..8, values in proptest::collection::vec(-1.0f64..1.0, 64),
            spread in prop_oneof![Just(1.0), Just(1e2), Just(1e4)], offset in prop_oneof![Just(0.0), Just(1e4), Just(-1e4)],
            device in Just(test_device()),
        ) {
            // exp overflows in the reference code here; f64 log-domain Sinkhorn is the truth.
            let logits: Vec<Vec<f64>> = random_matrix(b, k, spread, &values)
                .into_iter()
                .map(|row| row.into_iter().map(|x| (x + offset) as f32 as f64).collect())
                .collect();
            let got = to_rows(&sinkhorn_knopp(&to_tensor(&logits, device), 3));
            let want = to_rows(&sinkhorn_knopp(&to_tensor(&logits, device).to_kind(Kind::Double), 3));
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                prop_assert!((g - w).abs() < 1e-4, "{} vs {}", g, w);
            }
        }
    }

    /// The fixture that tests/fixtures/make_reference.py writes from a PyTorch implementation.
    fn pytorch_reference() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/clustering_reference.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    /// A `{"shape": [..], "data": [..]}` entry as an f32 tensor.
    fn fixture_tensor(entry: &serde_json::Value) -> Tensor {
        let shape: Vec<i64> = serde_json::from_value(entry["shape"].clone()).unwrap();
        let data: Vec<f64> = serde_json::from_value(entry["data"].clone()).unwrap();
        Tensor::from_slice(&data)
            .view(shape.as_slice())
            .to_kind(Kind::Float)
            .to_device(test_device())
    }

    fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
        assert_eq!(got.size(), want.size(), "{what}");
        let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "{what}: off by {diff}");
    }

    #[test]
    fn codes_and_loss_match_the_pytorch_reference() {
        let fixture = pytorch_reference();
        let epsilon = fixture["epsilon"].as_f64().unwrap();
        let iterations = fixture["sinkhorn_iterations"].as_u64().unwrap() as usize;
        let temperature = fixture["temperature"].as_f64().unwrap();
        let swav = &fixture["swav"];
        let scores: Vec<Tensor> = swav["scores"].as_array().unwrap().iter().map(fixture_tensor).collect();
        let want_codes: Vec<Tensor> = swav["codes"].as_array().unwrap().iter().map(fixture_tensor).collect();
        let global = swav["global_views"].as_u64().unwrap() as usize;
        assert_eq!((scores.len(), want_codes.len()), (6, global));

        let got_codes: Vec<Tensor> = scores[..global]
            .iter()
            .map(|s| codes(s, None, epsilon, iterations))
            .collect();
        for (i, (got, want)) in got_codes.iter().zip(&want_codes).enumerate() {
            assert_close(got, want, &format!("codes of global view {i}"));
            assert_close(
                &sinkhorn_knopp(&(&scores[i] / epsilon), iterations),
                want,
                "sinkhorn_knopp",
            );
        }
        let want_loss = swav["loss"].as_f64().unwrap();
        // From the reference's codes (the loss alone) and from ours (codes and loss).
        for (which, q) in [("reference codes", &want_codes), ("our codes", &got_codes)] {
            let loss = swapped_prediction(&scores, q, temperature).double_value(&[]);
            assert!((loss - want_loss).abs() < 1e-5, "{which}: {loss} vs {want_loss}");
        }
        let queued = codes(
            &scores[0],
            Some(&fixture_tensor(&swav["queue_scores"])),
            epsilon,
            iterations,
        );
        assert_close(
            &queued,
            &fixture_tensor(&swav["codes_with_queue"]),
            "codes with a queue",
        );
    }

    #[test]
    fn sinkhorn_splits_identical_samples_evenly_across_prototypes() {
        // Four identical samples that all prefer prototype 0 by 1e4 / epsilon: the
        // equipartition constraint still spreads them (rows sum to B / K = 2).
        let logits = Tensor::from_slice(&[2e5f32, 0.0, 2e5, 0.0, 2e5, 0.0, 2e5, 0.0])
            .view([4, 2])
            .to_device(test_device());
        let q = sinkhorn_knopp(&logits, 3);
        let sums = to_rows(&q.sum_dim_intlist(0, true, Kind::Float));
        assert!(sums[0].iter().all(|s| (s - 2.0).abs() < 1e-4), "{sums:?}");
    }

    #[test]
    fn codes_include_the_queue_in_the_sinkhorn_batch_and_return_the_batch_rows() {
        tch::manual_seed(3);
        let batch = Tensor::randn([3, 4], (Kind::Float, test_device()));
        let queue = Tensor::randn([5, 4], (Kind::Float, test_device()));
        let got = codes(&batch, Some(&queue), 0.5, 3);
        let want = sinkhorn_knopp(&(Tensor::cat(&[&queue, &batch], 0) / 0.5), 3).narrow(0, 5, 3);
        assert!(got.allclose(&want, 1e-6, 1e-7, false));
        assert!(!got.allclose(&codes(&batch, None, 0.5, 3), 1e-3, 1e-3, false));
    }

    #[test]
    fn swapped_prediction_matches_a_hand_computation() {
        // Uniform scores: log softmax = -ln K for every view, so any codes give ln K.
        let k = 4;
        let flat = Tensor::zeros([2, k], (Kind::Float, test_device()));
        let q = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 0.25, 0.25, 0.25, 0.25])
            .view([2, k])
            .to_device(test_device());
        let loss = swapped_prediction(&[flat.shallow_clone(), flat.shallow_clone(), flat], &[q], 0.1);
        assert!((loss.double_value(&[]) - (k as f64).ln()).abs() < 1e-6);

        // Two global views and one local view of one sample, K = 2, tau = 1.
        let s = [[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]];
        let q = [[0.75, 0.25], [0.1, 0.9]];
        let log_softmax = |v: &[f64; 2]| {
            let lse = (v[0].exp() + v[1].exp()).ln();
            [v[0] - lse, v[1] - lse]
        };
        let ce = |q: &[f64; 2], v: &[f64; 2]| -(q[0] * log_softmax(v)[0] + q[1] * log_softmax(v)[1]);
        // Code of view 0 predicted from views 1 and 2; code of view 1 from views 0 and 2.
        let want = ((ce(&q[0], &s[1]) + ce(&q[0], &s[2])) / 2.0 + (ce(&q[1], &s[0]) + ce(&q[1], &s[2])) / 2.0) / 2.0;
        let t = |m: &[f64; 2]| {
            Tensor::from_slice(m)
                .view([1, 2])
                .to_kind(Kind::Float)
                .to_device(test_device())
        };
        let got = swapped_prediction(&[t(&s[0]), t(&s[1]), t(&s[2])], &[t(&q[0]), t(&q[1])], 1.0);
        assert!(
            (got.double_value(&[]) - want).abs() < 1e-6,
            "{} vs {want}",
            got.double_value(&[])
        );
    }

    #[test]
    fn objective_loss_is_swapped_prediction_of_sinkhorn_codes() {
        let vs = nn::VarStore::new(test_device());
        let cfg = small_config();
        let mut obj = SwavObjective::new(vs.root() / "swav", cfg.clone(), &shape(7, None)).unwrap();
        let v = views(4, 7, 4, 0);
        let ids = Tensor::arange(4, (Kind::Int64, test_device()));
        let loss = obj.loss(&input(&ids, &v, 2), &progress(0, 0)).unwrap();
        // Recompute from the parts.
        let z: Vec<Tensor> = Tensor::cat(&v, 0)
            .apply_t(&obj.projector, true)
            .split(4, 0)
            .iter()
            .map(|z| z / z.norm_scalaropt_dim(2, [1], true))
            .collect();
        let scores: Vec<Tensor> = z.iter().map(|z| z.matmul(&obj.prototypes.tr())).collect();
        let q: Vec<Tensor> = scores[..2]
            .iter()
            .map(|s| sinkhorn_knopp(&(s / cfg.epsilon), 3))
            .collect();
        let want = swapped_prediction(&scores, &q, cfg.temperature).double_value(&[]);
        assert!((loss.total.double_value(&[]) - want).abs() < 1e-5);
        let entropy = loss.health[0].1;
        assert!(entropy > 0.0 && entropy <= (cfg.prototypes as f64).ln() + 1e-6);
        let mut best: Vec<i64> = q
            .iter()
            .flat_map(|q| Vec::<i64>::try_from(q.argmax(1, false)).unwrap())
            .collect();
        best.sort_unstable();
        best.dedup();
        assert_eq!(loss.health[1], ("prototypes_used".to_string(), best.len() as f64));
    }

    #[test]
    fn prototypes_are_unit_norm_at_build_and_after_every_step() {
        let vs = nn::VarStore::new(test_device());
        let mut obj = SwavObjective::new(vs.root(), small_config(), &shape(7, None)).unwrap();
        let norms = |t: &Tensor| t.norm_scalaropt_dim(2, [1], false);
        let ones = Tensor::ones([5], (Kind::Float, test_device()));
        assert!(norms(&obj.prototypes).allclose(&ones, 1e-5, 1e-6, false));
        tch::no_grad(|| {
            let noise = Tensor::randn([5, 6], (Kind::Float, test_device()));
            let scrambled = &obj.prototypes * 3.0 + noise;
            obj.prototypes.shallow_clone().copy_(&scrambled);
        });
        assert!(!norms(&obj.prototypes).allclose(&ones, 1e-3, 1e-3, false));
        obj.on_step_end(&progress(0, 0)).unwrap();
        assert!(norms(&obj.prototypes).allclose(&ones, 1e-5, 1e-6, false));
        // The store's variable is the one normalised.
        let var = vs.variables()["prototypes.weight"].shallow_clone();
        assert!(norms(&var).allclose(&ones, 1e-5, 1e-6, false));
    }

    #[test]
    fn prototypes_get_no_gradient_while_frozen_and_do_after() {
        let vs = nn::VarStore::new(test_device());
        let cfg = SwavConfig {
            freeze_prototypes_steps: 5,
            ..small_config()
        };
        let mut obj = SwavObjective::new(vs.root(), cfg, &shape(7, None)).unwrap();
        let v = views(4, 7, 3, 1);
        let ids = Tensor::arange(4, (Kind::Int64, test_device()));
        let projector = vs.variables()["projector.0.weight"].shallow_clone();
        for (step, frozen) in [(0, true), (4, true), (5, false), (100, false)] {
            let mut p = obj.prototypes.shallow_clone();
            p.zero_grad();
            let mut w = projector.shallow_clone();
            w.zero_grad();
            obj.loss(&input(&ids, &v, 2), &progress(0, step))
                .unwrap()
                .total
                .backward();
            let g = obj.prototypes.grad();
            let reached = g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0;
            assert_eq!(reached, !frozen, "step {step}");
            assert!(
                projector.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "step {step}"
            );
        }
    }

    fn queue_config() -> SwavConfig {
        SwavConfig {
            queue_length: 5,
            queue_start_epoch: 1,
            ..small_config()
        }
    }

    #[test]
    fn the_queue_fills_from_its_start_epoch_and_feeds_the_codes() {
        let vs = nn::VarStore::new(test_device());
        let mut obj = SwavObjective::new(vs.root(), queue_config(), &shape(7, None)).unwrap();
        let ids = Tensor::arange(3, (Kind::Int64, test_device()));
        let v = views(3, 7, 3, 2);
        let queue = obj.queue.as_ref().unwrap().shallow_clone();
        assert_eq!(queue.size(), [2, 5, 6]);
        // Epoch 0 is before the start: nothing stored.
        obj.loss(&input(&ids, &v, 2), &progress(0, 0)).unwrap();
        assert_eq!(obj.filled, [0, 0]);
        assert_eq!(queue.abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Epoch 1: the first loss sees an empty queue, then stores 3 rows per global view.
        let first = obj
            .loss(&input(&ids, &v, 2), &progress(1, 10))
            .unwrap()
            .total
            .double_value(&[]);
        assert_eq!(obj.filled, [3, 3]);
        let row_norms = queue.norm_scalaropt_dim(2, [2], false);
        let stored = row_norms.narrow(1, 0, 3);
        assert!(stored.allclose(&stored.ones_like(), 1e-5, 1e-6, false), "{stored}");
        assert_eq!(row_norms.narrow(1, 3, 2).sum(Kind::Float).double_value(&[]), 0.0);
        assert!(first.is_finite());
        let newest = queue.narrow(1, 0, 3).copy();
        // Another batch: before the start epoch the queue is neither used nor filled; from
        // it, the queue joins the Sinkhorn batch, so the codes and the loss change.
        let v2 = views(3, 7, 3, 7);
        let without = obj
            .loss(&input(&ids, &v2, 2), &progress(0, 11))
            .unwrap()
            .total
            .double_value(&[]);
        assert_eq!(obj.filled, [3, 3]);
        let with = obj
            .loss(&input(&ids, &v2, 2), &progress(1, 11))
            .unwrap()
            .total
            .double_value(&[]);
        assert!((without - with).abs() > 1e-6, "{without} vs {with}");
        assert_eq!(obj.filled, [5, 5]);
        // FIFO: the previous batch moved back by 3 rows and its oldest row fell off.
        assert!(queue
            .narrow(1, 3, 2)
            .allclose(&newest.narrow(1, 0, 2), 1e-6, 1e-7, false));
        // A stage reusing the objective starts with an empty queue.
        obj.on_epoch_start(&progress(0, 0)).unwrap();
        assert_eq!(obj.filled, [0, 0]);
        assert_eq!(queue.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn a_queue_longer_or_shorter_than_the_batch_keeps_the_newest_rows() {
        for length in [1usize, 2, 7] {
            let vs = nn::VarStore::new(test_device());
            let cfg = SwavConfig {
                queue_length: length,
                queue_start_epoch: 0,
                ..small_config()
            };
            let mut obj = SwavObjective::new(vs.root(), cfg, &shape(7, None)).unwrap();
            let ids = Tensor::arange(3, (Kind::Int64, test_device()));
            for seed in 0..3 {
                let v = views(3, 7, 2, seed);
                let loss = obj.loss(&input(&ids, &v, 2), &progress(0, seed as usize)).unwrap();
                assert!(loss.total.double_value(&[]).is_finite());
                assert_eq!(obj.filled, [(3 * (seed as usize + 1)).min(length); 2]);
            }
        }
    }

    #[test]
    fn queue_and_its_fill_survive_a_checkpoint_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tensors.safetensors");
        let ids = Tensor::arange(3, (Kind::Int64, test_device()));
        let v = views(3, 7, 4, 4);
        let vs = nn::VarStore::new(test_device());
        let mut obj = SwavObjective::new(vs.root(), queue_config(), &shape(7, None)).unwrap();
        obj.loss(&input(&ids, &v, 2), &progress(1, 10)).unwrap();
        obj.on_step_end(&progress(1, 10)).unwrap();
        vs.save(&file).unwrap();
        let state = obj.state();
        assert_eq!(state, serde_json::json!({ "queue_filled": [3, 3] }));

        let mut vs2 = nn::VarStore::new(test_device());
        tch::manual_seed(99); // different initial weights
        let mut restored = SwavObjective::new(vs2.root(), queue_config(), &shape(7, None)).unwrap();
        vs2.load(&file).unwrap();
        restored.load_state(state).unwrap();
        assert_eq!(restored.filled, [3, 3]);
        assert!(restored.queue.as_ref().unwrap().equal(obj.queue.as_ref().unwrap()));
        let a = obj
            .loss(&input(&ids, &v, 2), &progress(1, 11))
            .unwrap()
            .total
            .double_value(&[]);
        let b = restored
            .loss(&input(&ids, &v, 2), &progress(1, 11))
            .unwrap()
            .total
            .double_value(&[]);
        assert_eq!(a, b);
        assert!(restored.queue.as_ref().unwrap().equal(obj.queue.as_ref().unwrap()));

        let bad = restored.load_state(serde_json::json!({ "queue_filled": [9, 0] }));
        assert!(bad.unwrap_err().to_string().contains("queue_filled"));
    }

    #[test]
    fn the_queue_has_one_fifo_per_global_view_of_the_run() {
        // 3 global 2D views and 1 local one at the slice level; 4 volume views at the volume
        // level: the queue follows what core reports, with no key to keep in step.
        let shape = ObjectiveShape {
            global_slice_views: 3,
            local_slice_views: 1,
            volume_views: 4,
            ..shape(7, Some(9))
        };
        for (level, want) in [(ViewLevel::Slice, 3), (ViewLevel::Volume, 4)] {
            let vs = nn::VarStore::new(test_device());
            let cfg = SwavConfig {
                level,
                ..queue_config()
            };
            let obj = SwavObjective::new(vs.root(), cfg, &shape).unwrap();
            assert_eq!(obj.queue.as_ref().unwrap().size(), [want, 5, 6], "{level:?}");
            assert_eq!(obj.filled, vec![0; want as usize]);
        }
        let vs = nn::VarStore::new(test_device());
        let mut obj = SwavObjective::new(vs.root(), queue_config(), &shape).unwrap();
        let ids = Tensor::arange(3, (Kind::Int64, test_device()));
        let v = views(3, 7, 4, 5);
        let loss = obj.loss(&input(&ids, &v, 3), &progress(1, 0)).unwrap();
        assert!(loss.total.double_value(&[]).is_finite());
        assert_eq!(obj.filled, [3, 3, 3]);
    }

    #[test]
    fn a_step_with_other_global_views_than_announced_is_a_clear_error() {
        let vs = nn::VarStore::new(test_device());
        let mut obj = SwavObjective::new(vs.root(), queue_config(), &shape(7, None)).unwrap();
        let ids = Tensor::arange(3, (Kind::Int64, test_device()));
        let v = views(3, 7, 4, 5);
        let err = obj
            .loss(&input(&ids, &v, 3), &progress(0, 0))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("built for 2 global views") && err.contains("data.views.slice_views"),
            "{err}"
        );
    }

    #[test]
    fn volume_level_uses_every_view_as_global() {
        let vs = nn::VarStore::new(test_device());
        let cfg = SwavConfig {
            level: ViewLevel::Volume,
            ..queue_config()
        };
        let mut obj = SwavObjective::new(vs.root(), cfg, &shape(7, Some(9))).unwrap();
        assert_eq!(obj.consumes(), Consumes::VolumeViews);
        let ids = Tensor::arange(3, (Kind::Int64, test_device()));
        let v = views(3, 9, 2, 6);
        let step = StepInput {
            ids: &ids,
            slice_views: None,
            global_slice_views: 0,
            volume_views: Some(&v),
            volume_crops: None,
            slice_sequence: None,
        };
        assert!(obj
            .loss(&step, &progress(1, 0))
            .unwrap()
            .total
            .double_value(&[])
            .is_finite());
        assert_eq!(obj.filled, [3, 3]);
    }

    #[test]
    fn invalid_settings_are_errors_naming_the_key() {
        let build = |cfg: SwavConfig, volume_dim: Option<i64>| {
            let vs = nn::VarStore::new(test_device());
            SwavObjective::new(vs.root(), cfg, &shape(8, volume_dim))
                .err()
                .unwrap()
                .to_string()
        };
        let cases = [
            (
                SwavConfig {
                    prototypes: 0,
                    ..small_config()
                },
                "`prototypes` must be positive",
            ),
            (
                SwavConfig {
                    temperature: 0.0,
                    ..small_config()
                },
                "temperature",
            ),
            (
                SwavConfig {
                    epsilon: -1.0,
                    ..small_config()
                },
                "epsilon",
            ),
            (
                SwavConfig {
                    sinkhorn_iterations: 0,
                    ..small_config()
                },
                "sinkhorn_iterations",
            ),
            (
                SwavConfig {
                    output_dim: 0,
                    ..small_config()
                },
                "output_dim",
            ),
        ];
        for (cfg, key) in cases {
            let err = build(cfg, Some(8));
            assert!(err.contains(key), "{err}");
        }
        let vs = nn::VarStore::new(test_device());
        let no_global = ObjectiveShape {
            global_slice_views: 0,
            ..shape(8, None)
        };
        let err = SwavObjective::new(vs.root(), small_config(), &no_global)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("no global views") && err.contains("data.views.slice_views"),
            "{err}"
        );
        let err = build(
            SwavConfig {
                level: ViewLevel::Volume,
                ..small_config()
            },
            None,
        );
        assert!(err.contains("aggregator"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_and_defaults_fill_the_rest() {
        let section = Section::inline("objectives.s", "swav", "prototypes = 7").unwrap();
        let cfg: SwavConfig = section.parse().unwrap();
        assert_eq!(
            cfg,
            SwavConfig {
                prototypes: 7,
                ..Default::default()
            }
        );
        let section = Section::inline("objectives.s", "swav", "prototype = 7").unwrap();
        let err = format!("{:#}", section.parse::<SwavConfig>().err().unwrap());
        assert!(err.contains("prototype"), "{err}");
    }
}
