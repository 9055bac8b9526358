//! DeepCluster-v2 (Caron, Misra, Mairal, Goyal, Bojanowski and Joulin, "Unsupervised Learning
//! of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020, Appendix:
//! DeepCluster-v2), the clustering objective the medssl paper uses for L_intra (2D views of
//! slices, its Eq. 1-5) and L_inter (3D views of volumes, its Eq. 11-12).
//!
//! Per step, every view's embedding goes through a projection head g (Linear-BN-ReLU-Linear)
//! and is L2-normalised: z = g(h) / ||g(h)||. For each of H prototype sets ("heads") with
//! centroids C_h (K_h unit rows) and k-means assignments y_h, the loss is the cross-entropy
//!
//!   L = 1/H sum_h 1/|B| sum_{(n, v) in B} -log [ exp(z_nv . c_{h, y_h(n)} / tau)
//!                                               / sum_k exp(z_nv . c_{h, k} / tau) ],
//!
//! over every view v (local ones included) of every sample n that has an assignment.
//!
//! Between epochs (as the reference implementation, `main_deepclusterv2.py`):
//! - a memory bank holds, for every sample (indexed by its global id, unique across the
//!   run's datasets), the detached z of each of its global views (`data.views.slice_views` at
//!   the slice level, every 3D view at the volume level), written at every step; before the
//!   first epoch of a fresh run a no-grad pass over the data fills it (the reference's
//!   `init_memory`);
//! - at each epoch start, head h runs spherical k-means (kmeans.rs: cosine similarity, centroids
//!   re-normalised after each update) on bank view `h % global views` (the reference cycles
//!   through its `crops_for_assign` the same way), over the samples the bank holds: K_h
//!   initial centroids drawn without replacement, `kmeans_iterations` update steps, then a
//!   last assignment step. The centroids become head h's prototypes and the assignments its
//!   targets for the epoch;
//! - an empty cluster (the reference keeps its stale centroid) is re-seeded here with the
//!   sample farthest from its own centroid (lowest cosine similarity) among clusters that
//!   keep at least one other member, so no cluster is empty whenever there are at least K
//!   samples, and the k-means objective (the sum of each sample's cosine similarity to its
//!   centroid) never decreases;
//! - the prototypes stay fixed during the epoch, as in the reference, whose
//!   `freeze_prototypes_niters` defaults to 1e10 (gradients of the prototypes are dropped);
//!   `train_prototypes = true` trains them with the rest until the next epoch start resets
//!   them.
//!
//! Data-parallel (several processes): every rank keeps the whole bank. Each step's detached
//! projections and ids are all-gathered and written on every rank, so the banks stay equal
//! and each rank's k-means is the single-process k-means on the same bank, bit for bit; the
//! loss divides by the number of assigned rows over all ranks, so its mean over ranks is the
//! single-process loss on the global batch. The reference code instead shards the bank by
//! rank and all-reduces the k-means sums. medssl differs on purpose: clustering that does
//! not depend on the world size, and a checkpoint (written by rank 0) that holds the whole
//! bank, so resuming needs nothing from the other ranks. What it costs: every rank holds
//! `num_samples x global views x output_dim` floats (100 MB at 100k samples of 128 floats
//! and 2 views) and runs the whole k-means; k-means runs once an epoch.
//!
//! Randomness: the initial centroids are a function of (epoch, head, sample ids) only, through
//! medssl's seed derivation with a fixed tag, so a resumed run clusters exactly as an
//! uninterrupted one and libtorch's generator is not touched. The bank, prototypes and
//! assignments are non-trainable variables, saved in every checkpoint.

use crate::kmeans::{initial_centroids, spherical_kmeans};
use medssl_core::distributed::Communicator;
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

const NAME: &str = "deepcluster-v2";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeepClusterV2Config {
    /// `slice` (2D views through the encoder) or `volume` (3D views through the aggregator).
    pub level: ViewLevel,
    /// Hidden width of the projection head.
    pub hidden_dim: i64,
    /// Output width of the projection head: the width of the bank and of the prototypes.
    pub output_dim: i64,
    /// Number of clusters of each prototype set (head); one k-means per entry.
    pub prototypes: Vec<i64>,
    /// tau, the softmax temperature.
    pub temperature: f64,
    /// k-means update steps at each epoch start.
    pub kmeans_iterations: usize,
    /// Train the prototypes during the epoch (the reference freezes them).
    pub train_prototypes: bool,
}

impl Default for DeepClusterV2Config {
    fn default() -> Self {
        DeepClusterV2Config {
            level: ViewLevel::Slice,
            hidden_dim: 2048,
            output_dim: 128,
            prototypes: vec![3000, 3000, 3000],
            temperature: 0.1,
            kmeans_iterations: 10,
            train_prototypes: false,
        }
    }
}

pub struct DeepClusterV2Objective {
    cfg: DeepClusterV2Config,
    consumes: Consumes,
    num_samples: i64,
    /// Global views per sample at the objective's level, each kept in the bank (the
    /// reference's `crops_for_assign = [0, 1]`); head h clusters bank view `h % bank_views`.
    bank_views: usize,
    projector: nn::SequentialT,
    /// One `[K_h, output_dim]` per head.
    prototypes: Vec<Tensor>,
    /// One `[num_samples]` int64 per head: the sample's cluster, -1 where it has none.
    assignments: Vec<Tensor>,
    /// `[bank_views, num_samples, output_dim]`: the last projected embeddings seen.
    memory: Tensor,
    /// `[num_samples]` bool: whether the bank holds the sample.
    filled: Tensor,
}

impl DeepClusterV2Objective {
    pub fn new(p: nn::Path, cfg: DeepClusterV2Config, shape: &ObjectiveShape) -> Result<Self> {
        let (consumes, input_dim) = cfg.level.resolve(shape, NAME)?;
        ensure!(
            cfg.temperature > 0.0,
            "{NAME}: `temperature` must be positive, got {}",
            cfg.temperature
        );
        ensure!(
            cfg.hidden_dim > 0 && cfg.output_dim > 0,
            "{NAME}: `hidden_dim` and `output_dim` must be positive, got {} and {}",
            cfg.hidden_dim,
            cfg.output_dim
        );
        ensure!(
            !cfg.prototypes.is_empty(),
            "{NAME}: `prototypes` lists no cluster count; give at least one, e.g. [3000]"
        );
        let bank_views = cfg.level.global_views(shape);
        ensure!(
            bank_views > 0,
            "{NAME}: the run makes no global views at the {:?} level ({}): the memory bank needs at least one",
            cfg.level,
            cfg.level.global_views_key()
        );
        let num_samples = shape.num_samples as i64;
        for (h, &k) in cfg.prototypes.iter().enumerate() {
            ensure!(k > 0, "{NAME}: `prototypes[{h}]` must be positive, got {k}");
            ensure!(
                k <= num_samples,
                "{NAME}: `prototypes[{h}]` asks for {k} clusters, but the run's data sources hold only {num_samples} samples; every cluster needs a sample: lower `prototypes` to at most {num_samples}"
            );
        }
        let d = cfg.output_dim;
        // The reference's projection head; the first layer has no bias, which batch norm
        // would cancel anyway.
        let projector = projection_head_without_first_bias(&p / "projector", &[input_dim, cfg.hidden_dim, d]);
        // Set by k-means before they are first used.
        let prototypes = cfg
            .prototypes
            .iter()
            .enumerate()
            .map(|(h, &k)| {
                let head = &p / "prototypes" / h;
                if cfg.train_prototypes {
                    head.zeros("weight", &[k, d])
                } else {
                    head.zeros_no_train("weight", &[k, d])
                }
            })
            .collect();
        let device = p.device();
        let assignments = (0..cfg.prototypes.len())
            .map(|h| {
                (&p / "assignments").add(
                    &h.to_string(),
                    Tensor::full([num_samples], -1, (Kind::Int64, device)),
                    false,
                )
            })
            .collect();
        let memory = p.zeros_no_train("memory_embeddings", &[bank_views as i64, num_samples, d]);
        let filled = p.add(
            "memory_filled",
            Tensor::zeros([num_samples], (Kind::Bool, device)),
            false,
        );
        Ok(DeepClusterV2Objective {
            cfg,
            consumes,
            num_samples,
            bank_views,
            projector,
            prototypes,
            assignments,
            memory,
            filled,
        })
    }

    /// The L2-normalised projections of `views`.
    pub fn project(&self, views: &[Tensor], train: bool) -> Vec<Tensor> {
        views
            .iter()
            .map(|h| l2_normalize(&h.apply_t(&self.projector, train)))
            .collect()
    }

    /// This step's views, checked against the global views the bank was built for.
    fn views<'a>(&self, input: &StepInput<'a>) -> Result<&'a [Tensor]> {
        let views = self.cfg.level.views(input, NAME)?;
        let global = match self.cfg.level {
            ViewLevel::Slice => input.global_slice_views,
            ViewLevel::Volume => views.len(),
        };
        // The runner supplies the view counts it announced at build time; a mismatch is a
        // bug in whatever calls the objective, reported rather than indexed past.
        ensure!(
            global == self.bank_views && global <= views.len(),
            "{NAME}: built for {} global views ({}), but this step has {global} global of {} views",
            self.bank_views,
            self.cfg.level.global_views_key(),
            views.len()
        );
        Ok(views)
    }

    /// Writes the first `bank_views` projections (detached) into the bank rows of `ids`, on
    /// every rank those of every rank's batch.
    fn remember(&self, projected: &[Tensor], ids: &Tensor) -> Result<()> {
        let comm = distributed::communicator();
        let ids = comm
            .all_gather(&ids.to_device(self.memory.device()).to_kind(Kind::Int64))
            .context("deepcluster-v2: gathering the batch's sample ids from every rank")?;
        let projected = projected
            .iter()
            .take(self.bank_views)
            .map(|z| comm.all_gather(&z.detach().contiguous()))
            .collect::<Result<Vec<_>>>()
            .context("deepcluster-v2: gathering the batch's projections from every rank")?;
        if ids.numel() == 0 {
            return Ok(());
        }
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        ensure!(
            lo >= 0 && hi < self.num_samples,
            "{NAME}: sample ids {lo}..={hi} are outside the memory bank of {} samples",
            self.num_samples
        );
        tch::no_grad(|| {
            for (v, z) in projected.iter().enumerate() {
                let mut row = self.memory.select(0, v as i64);
                let _ = row.index_copy_(0, &ids, &z.detach().to_kind(self.memory.kind()));
            }
            let mut filled = self.filled.shallow_clone();
            let _ = filled.index_fill_(0, &ids, 1);
        });
        Ok(())
    }

    /// Number of samples the bank holds.
    pub fn filled_samples(&self) -> i64 {
        self.filled.sum(Kind::Int64).int64_value(&[])
    }

    /// Head `h`'s assignments, `[num_samples]` int64 (-1: none).
    pub fn assignments(&self, h: usize) -> &Tensor {
        &self.assignments[h]
    }

    /// Head `h`'s prototypes `[K_h, output_dim]`.
    pub fn prototypes(&self, h: usize) -> &Tensor {
        &self.prototypes[h]
    }

    /// The bank `[global views, num_samples, output_dim]`.
    pub fn memory(&self) -> &Tensor {
        &self.memory
    }

    /// k-means of every head over the bank; sets the prototypes and the assignments.
    fn cluster(&mut self, epoch: usize) -> Result<()> {
        let ids = self.filled.nonzero().squeeze_dim(1);
        let n = ids.size()[0];
        ensure!(
            n > 0,
            "{NAME}: the memory bank is empty at the start of epoch {epoch}: no batch reached it"
        );
        // The ids come to the host for the seeded choice of initial centroids (plain Rust);
        // the bank, k-means and the assignments stay on the bank's device.
        let id_list: Vec<i64> = Vec::try_from(&ids.to_device(Device::Cpu))?;
        for (h, &k) in self.cfg.prototypes.iter().enumerate() {
            ensure!(
                k <= n,
                "{NAME}: `prototypes[{h}]` asks for {k} clusters, but the memory bank holds only {n} samples at the start of epoch {epoch} (each epoch drops its last partial batch: lower `prototypes` or change data.loader.batch_size)"
            );
            let view = (h % self.bank_views) as i64;
            let x = self.memory.select(0, view).index_select(0, &ids);
            let init = initial_centroids(&id_list, k as usize, epoch, h);
            let result = spherical_kmeans(&x, &init, self.cfg.kmeans_iterations)?;
            let kind = self.prototypes[h].kind();
            self.prototypes[h].copy_(&result.centroids.to_kind(kind));
            let _ = self.assignments[h].fill_(-1);
            let _ = self.assignments[h].index_copy_(0, &ids, &result.assignments);
            tracing::debug!(
                "{NAME}: epoch {epoch}, head {h}: {k} clusters over {n} samples, mean cosine {:.4}, {} re-seeded",
                result.objective.last().copied().unwrap_or(0.0) / n as f64,
                result.reseeded
            );
        }
        Ok(())
    }
}

/// Mean cross-entropy of `softmax(z . prototypes^T / temperature)` against `targets` over
/// the rows whose target is not negative (zero when there is none). `z` `[M, D]`,
/// `prototypes` `[K, D]`, `targets` `[M]` int64. In fp32 (f64 `z` stays f64).
pub fn cluster_loss(z: &Tensor, prototypes: &Tensor, targets: &Tensor, temperature: f64) -> Tensor {
    cluster_loss_across(z, prototypes, targets, temperature, &distributed::SingleProcess)
        .expect("one process runs no collective that could fail")
}

/// [`cluster_loss`] with every rank's batch counted: the sum over this rank's assigned rows
/// times the world size over the assigned rows of all ranks, so that the mean over ranks
/// (what data-parallel training optimises) is the mean over the global batch.
pub fn cluster_loss_across(
    z: &Tensor,
    prototypes: &Tensor,
    targets: &Tensor,
    temperature: f64,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let kind = loss_kind(z);
    let log_prob = (z.matmul(&prototypes.tr()) / temperature).log_softmax(1, kind);
    let valid = targets.ge(0);
    let picked = log_prob
        .gather(1, &targets.clamp_min(0).unsqueeze(1), false)
        .squeeze_dim(1)
        .masked_fill(&valid.logical_not(), 0.0);
    let mut count = [valid.sum(kind).reshape([1])];
    comm.all_reduce_sum(&mut count)?;
    let [count] = count;
    Ok(-picked.sum(kind) * comm.world_size() as f64 / count.clamp_min(1.0).squeeze())
}

impl Objective for DeepClusterV2Objective {
    fn consumes(&self) -> Consumes {
        self.consumes
    }

    fn loss(&mut self, input: &StepInput, _: &Progress) -> Result<Loss> {
        let views = self.views(input)?;
        let z = self.project(views, true);
        self.remember(&z, input.ids)?;
        let ids = input.ids.to_device(self.memory.device()).to_kind(Kind::Int64);
        let z = Tensor::cat(&z, 0);
        let heads = self.prototypes.len();
        let comm = distributed::communicator();
        let mut total: Option<Tensor> = None;
        let mut terms = Vec::with_capacity(heads);
        let mut health = Vec::with_capacity(2);
        for (h, (prototypes, assignments)) in self.prototypes.iter().zip(&self.assignments).enumerate() {
            let targets = assignments.index_select(0, &ids).repeat([views.len() as i64]);
            if h == 0 {
                // Over the global batch, so every rank logs the same figures.
                let all_targets = comm
                    .all_gather(&targets)
                    .context("deepcluster-v2: gathering the batch's targets")?;
                health.push((
                    "assigned".to_string(),
                    all_targets
                        .ge(0)
                        .to_kind(Kind::Double)
                        .mean(Kind::Double)
                        .double_value(&[]),
                ));
                // Distinct clusters among the batch's targets: k-means re-seeds empty
                // clusters, so the bank always uses them all; a batch drawn from a few
                // giant clusters is what collapse looks like here.
                let used = all_targets
                    .masked_select(&all_targets.ge(0))
                    .bincount::<Tensor>(None, prototypes.size()[0])
                    .gt(0)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                health.push(("prototypes_used".to_string(), used as f64));
            }
            let loss = cluster_loss_across(&z, prototypes, &targets, self.cfg.temperature, &*comm)
                .context("deepcluster-v2: counting the assigned rows of every rank")?;
            terms.push((format!("head{h}"), loss.double_value(&[])));
            total = Some(match total {
                Some(t) => t + loss,
                None => loss,
            });
        }
        let total = total.expect("at least one head") / heads as f64;
        Ok(Loss { total, terms, health })
    }

    fn needs_memory_pass(&self, _: &Progress) -> bool {
        self.filled_samples() == 0
    }

    fn observe(&mut self, input: &StepInput, _: &Progress) -> Result<()> {
        let views = self.views(input)?;
        let global = &views[..self.bank_views];
        let z = tch::no_grad(|| self.project(global, false));
        self.remember(&z, input.ids)
    }

    fn on_epoch_start(&mut self, progress: &Progress) -> Result<()> {
        tch::no_grad(|| self.cluster(progress.epoch))
    }
}

fn build(section: &Section, p: nn::Path, shape: &ObjectiveShape) -> Result<Box<dyn Objective>> {
    Ok(Box::new(DeepClusterV2Objective::new(p, section.parse()?, shape)?))
}

register!(OBJECTIVES, DEEPCLUSTER_V2: ObjectiveEntry = ObjectiveEntry {
    name: NAME,
    about: "DeepCluster-v2: k-means over a memory bank at each epoch start, cross-entropy to the assignments, on slice or volume views",
    default_config: default_toml::<DeepClusterV2Config>,
    smoke_configs: &[
        "level = \"slice\"\nhidden_dim = 16\noutput_dim = 8\nprototypes = [2, 2]\nkmeans_iterations = 3",
        "level = \"volume\"\nhidden_dim = 16\noutput_dim = 8\nprototypes = [2]\nkmeans_iterations = 3\ntrain_prototypes = true",
    ],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::device::test_device;

    fn shape(num_samples: usize) -> ObjectiveShape {
        ObjectiveShape {
            spatial_dims: medssl_core::encoder::SpatialDims::Two,
            in_channels: 1,
            deepest_level: (6, 32),
            levels: Vec::new(),
            input_size: None,
            slice_dim: 6,
            volume_dim: None,
            sequence_dim: None,
            global_slice_views: 2,
            local_slice_views: 0,
            volume_views: 2,
            seed: 0,
            num_samples,
        }
    }

    fn config(prototypes: Vec<i64>) -> DeepClusterV2Config {
        DeepClusterV2Config {
            hidden_dim: 8,
            output_dim: 4,
            prototypes,
            kmeans_iterations: 5,
            ..Default::default()
        }
    }

    fn input<'a>(ids: &'a Tensor, views: &'a [Tensor]) -> StepInput<'a> {
        StepInput {
            ids,
            slice_views: Some(views),
            global_slice_views: 2,
            volume_views: None,
            volume_crops: None,
            slice_sequence: None,
        }
    }

    fn progress(epoch: usize) -> Progress {
        Progress {
            epoch,
            step: 0,
            steps_per_epoch: 1,
        }
    }

    fn ids(values: &[i64]) -> Tensor {
        Tensor::from_slice(values).to_device(test_device())
    }

    fn views(n: i64, seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        (0..2)
            .map(|_| Tensor::randn([n, 6], (Kind::Float, test_device())))
            .collect()
    }

    #[test]
    fn loss_matches_hand_computed_values() {
        // Logits [[2, 0], [0, 2]] at tau = 0.5: each row pays log(1 + e^-2).
        let z = Tensor::from_slice(&[1f32, 0.0, 0.0, 1.0])
            .view([2, 2])
            .to_device(test_device());
        let p = z.copy();
        let easy = (1.0 + (-2f64).exp()).ln();
        let got = cluster_loss(&z, &p, &ids(&[0, 1]), 0.5).double_value(&[]);
        assert!((got - easy).abs() < 1e-6, "{got} vs {easy}");
        // Wrong targets pay log(1 + e^2); a row without an assignment does not count.
        let hard = (1.0 + 2f64.exp()).ln();
        let got = cluster_loss(&z, &p, &ids(&[1, -1]), 0.5).double_value(&[]);
        assert!((got - hard).abs() < 1e-6, "{got} vs {hard}");
        let got = cluster_loss(&z, &p, &ids(&[1, 1]), 0.5).double_value(&[]);
        assert!((got - (easy + hard) / 2.0).abs() < 1e-6, "{got}");
        assert_eq!(cluster_loss(&z, &p, &ids(&[-1, -1]), 0.5).double_value(&[]), 0.0);
    }

    #[test]
    fn the_objective_averages_heads_and_views_over_assigned_rows() {
        let vs = nn::VarStore::new(test_device());
        let mut objective = DeepClusterV2Objective::new(vs.root(), config(vec![2, 3]), &shape(5)).unwrap();
        let batch_ids = ids(&[4, 0, 2, 1, 3]);
        let v = views(5, 3);
        objective.observe(&input(&batch_ids, &v), &progress(0)).unwrap();
        objective.on_epoch_start(&progress(0)).unwrap();
        // Take sample 2's assignments away: its rows must not count.
        let _ = objective.assignments[0].get(2).fill_(-1);
        let _ = objective.assignments[1].get(2).fill_(-1);
        let loss = objective.loss(&input(&batch_ids, &v), &progress(0)).unwrap();
        // By hand: the same projections (train mode, same batch), row by row.
        let z = objective.project(&v, true);
        let mut expected = 0.0;
        for h in 0..2 {
            let p = objective.prototypes(h);
            let (mut sum, mut count) = (0.0, 0.0);
            for zv in &z {
                for (row, &id) in [4i64, 0, 2, 1, 3].iter().enumerate() {
                    let target = objective.assignments(h).int64_value(&[id]);
                    if target < 0 {
                        continue;
                    }
                    let logits = zv.get(row as i64).matmul(&p.tr()) / 0.1;
                    let log_prob = logits.log_softmax(0, Kind::Double).double_value(&[target]);
                    sum -= log_prob;
                    count += 1.0;
                }
            }
            assert_eq!(count, 8.0);
            expected += sum / count / 2.0;
        }
        let got = loss.total.double_value(&[]);
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        assert_eq!(loss.health[0].0, "assigned");
        assert!((loss.health[0].1 - 0.8).abs() < 1e-6, "{:?}", loss.health);
        let mut used: Vec<i64> = [4i64, 0, 2, 1, 3]
            .iter()
            .map(|&id| objective.assignments(0).int64_value(&[id]))
            .filter(|&t| t >= 0)
            .collect();
        used.sort_unstable();
        used.dedup();
        assert_eq!(loss.health[1], ("prototypes_used".to_string(), used.len() as f64));
    }

    #[test]
    fn the_bank_is_indexed_by_global_id() {
        // Two datasets of 3 and 5 samples: global ids 0..3 and 3..8, batches out of order.
        let vs = nn::VarStore::new(test_device());
        let mut objective = DeepClusterV2Objective::new(vs.root(), config(vec![2]), &shape(8)).unwrap();
        assert!(objective.needs_memory_pass(&progress(0)));
        let first = ids(&[7, 1, 4]);
        let v = views(3, 1);
        objective.observe(&input(&first, &v), &progress(0)).unwrap();
        let z = tch::no_grad(|| objective.project(&v, false));
        for (row, id) in [7i64, 1, 4].into_iter().enumerate() {
            for (view, zv) in z.iter().enumerate() {
                let stored = objective.memory().get(view as i64).get(id);
                assert!(stored.equal(&zv.get(row as i64)), "id {id}, view {view}");
            }
        }
        let filled: Vec<bool> = Vec::try_from(&objective.filled).unwrap();
        assert_eq!(filled, [false, true, false, false, true, false, false, true]);
        assert!(!objective.needs_memory_pass(&progress(0)));
        // The training step writes the same rows with its own projections.
        let second = ids(&[0, 5]);
        let w = views(2, 2);
        objective.on_epoch_start(&progress(0)).unwrap();
        objective.loss(&input(&second, &w), &progress(0)).unwrap();
        assert_eq!(objective.filled_samples(), 5);
        assert!(
            objective
                .memory()
                .get(0)
                .get(3)
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                == 0.0
        );
        let norm = objective.memory().get(1).get(5).norm().double_value(&[]);
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        // Only the three samples clustered at epoch start have assignments.
        let assigned: Vec<i64> = Vec::try_from(objective.assignments(0)).unwrap();
        let with: Vec<usize> = (0..8).filter(|&i| assigned[i] >= 0).collect();
        assert_eq!(with, [1, 4, 7]);
        // An id outside the bank is a clear error.
        let err = objective
            .observe(&input(&ids(&[8, 0, 1]), &v), &progress(0))
            .unwrap_err();
        assert!(
            err.to_string().contains("outside the memory bank of 8 samples"),
            "{err}"
        );
    }

    #[test]
    fn a_dataset_smaller_than_a_cluster_count_is_a_config_error() {
        let vs = nn::VarStore::new(test_device());
        let err = DeepClusterV2Objective::new(vs.root(), config(vec![2, 5]), &shape(4))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`prototypes[1]`") && err.contains("5 clusters") && err.contains("only 4 samples"),
            "{err}"
        );
    }

    #[test]
    fn the_bank_keeps_every_global_view_and_heads_cycle_over_them() {
        // 3 global views and 1 local one: the bank holds the 3 global projections; head h
        // clusters bank view h % 3.
        let shape = ObjectiveShape {
            global_slice_views: 3,
            local_slice_views: 1,
            ..shape(6)
        };
        let vs = nn::VarStore::new(test_device());
        let mut objective = DeepClusterV2Objective::new(vs.root(), config(vec![2, 3, 2, 3]), &shape).unwrap();
        assert_eq!(objective.memory().size(), [3, 6, 4]);
        let batch = ids(&[5, 3, 1, 0, 2, 4]);
        tch::manual_seed(21);
        let v: Vec<Tensor> = (0..4)
            .map(|_| Tensor::randn([6, 6], (Kind::Float, test_device())))
            .collect();
        let step = StepInput {
            ids: &batch,
            slice_views: Some(&v),
            global_slice_views: 3,
            volume_views: None,
            volume_crops: None,
            slice_sequence: None,
        };
        objective.observe(&step, &progress(0)).unwrap();
        let z = tch::no_grad(|| objective.project(&v, false));
        let order = ids(&[3, 2, 4, 1, 5, 0]); // row of each id 0..6
        for (view, zv) in z.iter().take(3).enumerate() {
            let stored = objective.memory().get(view as i64);
            assert!(stored.equal(&zv.index_select(0, &order)), "view {view}");
        }
        objective.on_epoch_start(&progress(0)).unwrap();
        let all: Vec<i64> = (0..6).collect();
        for (h, k) in [2usize, 3, 2, 3].into_iter().enumerate() {
            let x = objective.memory().get((h % 3) as i64);
            let want = spherical_kmeans(&x, &initial_centroids(&all, k, 0, h), 5).unwrap();
            assert!(objective.prototypes(h).equal(&want.centroids), "head {h}");
            assert!(objective.assignments(h).equal(&want.assignments), "head {h}");
        }
    }

    #[test]
    fn a_step_with_other_global_views_than_announced_is_a_clear_error() {
        let vs = nn::VarStore::new(test_device());
        let shape = ObjectiveShape {
            global_slice_views: 3,
            ..shape(4)
        };
        let mut objective = DeepClusterV2Objective::new(vs.root(), config(vec![2]), &shape).unwrap();
        let batch = ids(&[0, 1, 2]);
        let err = objective
            .observe(&input(&batch, &views(3, 0)), &progress(0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("built for 3 global views") && err.contains("data.views.slice_views"),
            "{err}"
        );
        let none = ObjectiveShape {
            global_slice_views: 0,
            ..shape
        };
        let err = DeepClusterV2Objective::new(vs.root() / "none", config(vec![2]), &none)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no global views"), "{err}");
    }

    #[test]
    fn restored_variables_reproduce_assignments_and_loss_exactly() {
        let batch = ids(&[3, 0, 5, 2, 4, 1]);
        let v = views(6, 11);
        let vs = nn::VarStore::new(test_device());
        let mut a = DeepClusterV2Objective::new(vs.root(), config(vec![3, 2]), &shape(6)).unwrap();
        a.observe(&input(&batch, &v), &progress(0)).unwrap();
        a.on_epoch_start(&progress(0)).unwrap();
        a.loss(&input(&batch, &views(6, 12)), &progress(0)).unwrap();
        a.on_epoch_start(&progress(1)).unwrap();

        tch::manual_seed(99);
        let mut restored_vs = nn::VarStore::new(test_device());
        let mut b = DeepClusterV2Objective::new(restored_vs.root(), config(vec![3, 2]), &shape(6)).unwrap();
        assert!(b.needs_memory_pass(&progress(0)));
        restored_vs.copy(&vs).unwrap();
        b.load_state(a.state()).unwrap();
        assert!(!b.needs_memory_pass(&progress(1)));
        for h in 0..2 {
            assert!(a.assignments(h).equal(b.assignments(h)));
        }
        let next = views(6, 13);
        let la = a
            .loss(&input(&batch, &next), &progress(1))
            .unwrap()
            .total
            .double_value(&[]);
        let lb = b
            .loss(&input(&batch, &next), &progress(1))
            .unwrap()
            .total
            .double_value(&[]);
        assert_eq!(la.to_bits(), lb.to_bits());
        // And the next epoch clusters the same way.
        a.on_epoch_start(&progress(2)).unwrap();
        b.on_epoch_start(&progress(2)).unwrap();
        for h in 0..2 {
            assert!(a.assignments(h).equal(b.assignments(h)));
            assert!(a.prototypes(h).equal(b.prototypes(h)));
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

    #[test]
    fn loss_matches_the_pytorch_reference() {
        let fixture = pytorch_reference();
        let temperature = fixture["temperature"].as_f64().unwrap();
        let dc = &fixture["deepcluster_v2"];
        let z = fixture_tensor(&dc["z"]);
        let views = dc["views"].as_i64().unwrap();
        let prototypes: Vec<Tensor> = dc["prototypes"]
            .as_array()
            .unwrap()
            .iter()
            .map(fixture_tensor)
            .collect();
        let targets: Vec<Vec<i64>> = serde_json::from_value(dc["targets"].clone()).unwrap();
        // As the objective does: each sample's target repeated over its views, then the
        // mean over the heads.
        let got = prototypes
            .iter()
            .zip(&targets)
            .map(|(p, t)| cluster_loss(&z, p, &ids(t).repeat([views]), temperature).double_value(&[]))
            .sum::<f64>()
            / prototypes.len() as f64;
        let want = dc["loss"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn kmeans_matches_the_pytorch_reference_where_no_cluster_empties() {
        let fixture = pytorch_reference();
        let km = &fixture["kmeans"];
        let init: Vec<i64> = serde_json::from_value(km["init"].clone()).unwrap();
        let iterations = km["iterations"].as_u64().unwrap() as usize;
        let result = spherical_kmeans(&fixture_tensor(&km["x"]), &init, iterations).unwrap();
        assert_eq!(result.reseeded, 0);
        let want: Vec<i64> = serde_json::from_value(km["assignments"].clone()).unwrap();
        assert_eq!(Vec::<i64>::try_from(&result.assignments).unwrap(), want);
        let diff = (result.centroids - fixture_tensor(&km["centroids"]))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "centroids off by {diff}");
    }
}
