//! The data loader: a seeded epoch order over the selected sources, and decoding plus
//! augmentation on worker threads behind a bounded prefetch window, so batches arrive in
//! order and memory stays bounded whatever the dataset size.

use crate::encoder::SpatialDims;
use crate::objective::Consumes;
use crate::rng::{self, domain};
use crate::sources::Sources;
use crate::views::{self, ViewConfig};
use crate::volume_crops;
use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tch::{Device, Tensor};

/// What to do with a sample that cannot be read.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop the run with an error naming the file.
    Fail,
    /// Log a warning and leave the sample out of its batch.
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Decoding and augmentation threads.
    pub workers: usize,
    /// Batches prepared ahead of the training step (bounds memory).
    pub prefetch: usize,
    pub on_error: OnError,
    /// Budget of the cache of decoded volumes (not views), in MiB; 0 disables it.
    pub cache_mib: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 8,
            workers: 2,
            prefetch: 4,
            on_error: OnError::Fail,
            cache_mib: 1024,
        }
    }
}

/// What a batch carries: the inputs ([`Consumes`]) its stage's objectives consume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    slice_views: bool,
    volume_views: bool,
    sequence: bool,
    volume_crops: bool,
}

impl Needs {
    /// The inputs of objectives that consume `consumes`.
    pub fn of(consumes: impl IntoIterator<Item = Consumes>) -> Needs {
        let mut needs = Needs::default();
        for c in consumes {
            match c {
                Consumes::SliceViews => needs.slice_views = true,
                Consumes::VolumeViews => needs.volume_views = true,
                Consumes::SliceSequence => needs.sequence = true,
                Consumes::VolumeCrops => needs.volume_crops = true,
            }
        }
        needs
    }

    /// The inputs of objectives that consume `consumes` in a run whose encoder has `dims`: a
    /// 3D encoder's volume views are 3D crops, not slice stacks.
    pub fn of_run(consumes: impl IntoIterator<Item = Consumes>, dims: SpatialDims) -> Needs {
        let mut needs = Needs::of(consumes);
        if dims == SpatialDims::Three && needs.volume_views {
            needs.volume_views = false;
            needs.volume_crops = true;
        }
        needs
    }

    pub fn contains(&self, input: Consumes) -> bool {
        match input {
            Consumes::SliceViews => self.slice_views,
            Consumes::VolumeViews => self.volume_views,
            Consumes::SliceSequence => self.sequence,
            Consumes::VolumeCrops => self.volume_crops,
        }
    }
}

/// One batch of owned CPU tensors.
pub struct Batch {
    /// Global sample ids `[B]` (int64).
    pub ids: Tensor,
    /// One `[B, 1, S, S]` per 2D view: the `slice_views` global views, then the
    /// `local_views` local ones.
    pub slice_views: Vec<Tensor>,
    /// One `[B, 1, T, S, S]` per 3D view.
    pub volume_views: Vec<Tensor>,
    /// Which slices of each 3D view are real: one `[B, T]` (bool) per view.
    pub volume_valid: Vec<Tensor>,
    /// One `[B, 1, D, H, W]` per 3D crop of each volume (`volume_views` of them), for a 3D
    /// encoder ([`crate::volume_crops`]).
    pub volume_crops: Vec<Tensor>,
    /// The un-augmented sequence `[B, 1, T, S, S]` and its real slices `[B, T]`.
    pub sequence: Option<(Tensor, Tensor)>,
    /// Class labels `[B]` (int64, -1 where a sample has none).
    pub labels: Tensor,
    /// Samples of this batch left out as unreadable (`on_error = "skip"`).
    pub skipped: usize,
}

impl Batch {
    /// The batch in page-locked host memory (from which CUDA copies asynchronously).
    fn pinned(self) -> Result<Batch> {
        let pin = |t: &Tensor| {
            t.f_pin_memory(Device::Cuda(0))
                .context("pinning a batch in host memory for CUDA")
        };
        let pin_all = |ts: &[Tensor]| ts.iter().map(pin).collect::<Result<Vec<_>>>();
        Ok(Batch {
            ids: pin(&self.ids)?,
            slice_views: pin_all(&self.slice_views)?,
            volume_views: pin_all(&self.volume_views)?,
            volume_valid: pin_all(&self.volume_valid)?,
            volume_crops: pin_all(&self.volume_crops)?,
            sequence: match &self.sequence {
                Some((voxels, valid)) => Some((pin(voxels)?, pin(valid)?)),
                None => None,
            },
            labels: pin(&self.labels)?,
            skipped: self.skipped,
        })
    }
}

/// Sources, views and loader settings: everything needed to produce any epoch's batches.
#[derive(Clone)]
pub struct DataPipeline {
    pub sources: Arc<Sources>,
    /// The sources this pipeline draws from (a stage may use a subset).
    pub selection: Arc<Vec<usize>>,
    pub views: ViewConfig,
    pub loader: LoaderConfig,
    pub seed: u64,
    /// This process's share of every global batch: the rank and the world size of the
    /// launch ([`crate::distributed::communicator`]); (0, 1) for one process.
    pub shard: Shard,
    /// Batches in page-locked memory, for a CUDA run: the workers pin them, so that the
    /// training thread's copy to the GPU is a non-blocking DMA (PyTorch's `pin_memory=True`).
    pub pin_memory: bool,
}

/// Which part of each global batch a rank takes: global batch `s` is the samples
/// `order[s·W·B .. (s+1)·W·B]` of the epoch's order (seeded by (seed, epoch), the same on every
/// rank), and rank `r` takes its `r`-th run of `B`. Every sample of the epoch is seen once
/// across ranks, no two ranks share one, every rank takes the same number of steps, and the
/// ranks' shares of a step together are the batch one process with batch `W·B` would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The share of the process's communicator.
    pub fn of_this_process() -> Shard {
        let comm = crate::distributed::communicator();
        Shard {
            rank: comm.rank(),
            world: comm.world_size(),
        }
    }

    /// The positions in the epoch's order of this rank's batch `step` of `batch` samples.
    pub fn batch(&self, step: usize, batch: usize) -> std::ops::Range<usize> {
        let start = (step * self.world + self.rank) * batch;
        start..start + batch
    }
}

impl DataPipeline {
    /// All of the run's sources, sharded as this process's communicator says.
    pub fn new(sources: Sources, views: ViewConfig, loader: LoaderConfig, seed: u64) -> Result<Self> {
        let selection = Arc::new(sources.select(None)?);
        let shard = Shard::of_this_process();
        if shard.world > 1 && loader.on_error == OnError::Skip {
            bail!(
                "config key `data.loader.on_error` is \"skip\", which would give the ranks batches of different sizes: with several processes unreadable samples must be errors (\"fail\"); find them first with `medssl data inspect`"
            );
        }
        Ok(DataPipeline {
            sources: Arc::new(sources),
            selection,
            views,
            loader,
            seed,
            shard,
            pin_memory: false,
        })
    }

    /// The same pipeline as rank 0 of `world` processes would run it: how a checkpoint
    /// written at another world size counted its steps.
    pub fn as_rank_zero_of(&self, world: usize) -> DataPipeline {
        DataPipeline {
            shard: Shard { rank: 0, world },
            ..self.clone()
        }
    }

    /// The same pipeline over the sources named by `keys` (all when `None`).
    pub fn restricted_to(&self, keys: Option<&[String]>) -> Result<DataPipeline> {
        Ok(DataPipeline {
            selection: Arc::new(self.sources.select(keys)?),
            ..self.clone()
        })
    }

    /// Size of the run's global id space (for memory banks), over every source.
    pub fn num_samples(&self) -> usize {
        self.sources.len()
    }

    /// Samples one epoch visits (weights applied).
    pub fn epoch_len(&self) -> usize {
        self.sources.epoch_order(&self.selection, self.seed, 0).len()
    }

    /// Batch size actually used by each rank: the configured one, or the epoch's share of a
    /// rank if smaller.
    pub fn batch_size(&self) -> usize {
        self.loader.batch_size.min(self.epoch_len() / self.shard.world).max(1)
    }

    /// Full global batches per epoch (the last partial one is dropped, as contrastive and
    /// clustering losses expect full batches).
    pub fn steps_per_epoch(&self) -> usize {
        self.epoch_len() / (self.batch_size() * self.shard.world)
    }

    /// The order in which epoch `epoch` visits the samples.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        self.sources.epoch_order(&self.selection, self.seed, epoch)
    }

    /// Batches `start..steps_per_epoch()` of `epoch`, prepared on worker threads.
    pub fn epoch(&self, epoch: usize, start: usize, needs: Needs) -> EpochBatches {
        let order = Arc::new(self.order(epoch));
        let steps = self.steps_per_epoch();
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<usize>();
        let (out_tx, out_rx) = crossbeam_channel::unbounded::<(usize, Result<Batch>)>();
        // libtorch's thread count is per thread once a thread has used it, but a new thread
        // starts from the last count set anywhere: fix the calling (training) thread's count
        // before the workers lower theirs.
        tch::get_num_threads();
        let workers = (0..self.loader.workers.max(1))
            .map(|_| {
                let (jobs, out, order, pipeline) = (job_rx.clone(), out_tx.clone(), order.clone(), self.clone());
                std::thread::spawn(move || {
                    // One intra-op thread per worker, as PyTorch's DataLoader workers: the
                    // workers already run in parallel, and a shared pool made them (and the
                    // training thread) wait on each other (bench loader: 183 -> 275
                    // volumes/s on 2 cores).
                    tch::set_num_threads(1);
                    for step in jobs {
                        let batch = pipeline.make_batch(epoch, &order, step, needs);
                        if out.send((step, batch)).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        let mut batches = EpochBatches {
            epoch,
            skipped: 0,
            jobs: Some(job_tx),
            results: out_rx,
            ready: BTreeMap::new(),
            next: start,
            issued: start,
            end: steps,
            window: self.loader.prefetch.max(1),
            workers,
        };
        batches.issue();
        batches
    }

    fn make_batch(&self, epoch: usize, order: &[usize], step: usize, needs: Needs) -> Result<Batch> {
        let b = self.batch_size();
        let (mut ids, mut labels) = (Vec::with_capacity(b), Vec::with_capacity(b));
        let (mut slices, mut volumes, mut sequences, mut crops) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let crop_settings = self.views.crop_settings();
        let mut skipped = 0;
        for &id in &order[self.shard.batch(step, b)] {
            let sample = match self.sources.load(id) {
                Ok(sample) => sample,
                Err(e) if self.loader.on_error == OnError::Skip => {
                    tracing::warn!("skipping sample {id}: {e:#}");
                    skipped += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let volume = &sample.voxels;
            ids.push(id as i64);
            labels.push(sample.label.unwrap_or(-1));
            let coords = |view: u64| [domain::VIEW, epoch as u64, id as u64, view];
            if needs.contains(Consumes::SliceViews) {
                let depth = volume.size()[0];
                let index = rng::generator(self.seed, &[domain::SLICE, epoch as u64, id as u64]).random_range(0..depth);
                slices.push(
                    (0..self.views.slice_views + self.views.local_views)
                        .map(|v| {
                            let mut generator = rng::generator(self.seed, &coords(v as u64));
                            views::slice_view(volume, index, v, &mut generator, &self.views)
                        })
                        .collect::<Vec<_>>(),
                );
            }
            if needs.contains(Consumes::VolumeViews) {
                volumes.push(
                    (0..self.views.volume_views)
                        .map(|v| {
                            let view = rng::VOLUME_VIEW_BASE + v as u64;
                            views::volume_view(volume, &mut rng::generator(self.seed, &coords(view)), &self.views)
                        })
                        .collect::<Vec<_>>(),
                );
            }
            if needs.contains(Consumes::SliceSequence) {
                sequences.push(views::sequence_view(volume, &self.views));
            }
            if needs.contains(Consumes::VolumeCrops) {
                let (prepared, _) = volume_crops::prepare(volume, None, &crop_settings);
                crops.push(
                    (0..self.views.volume_views)
                        .map(|v| {
                            let view = rng::VOLUME_VIEW_BASE + v as u64;
                            let mut generator = rng::generator(self.seed, &coords(view));
                            volume_crops::random_crop(&prepared, &mut generator, &crop_settings)
                        })
                        .collect::<Vec<_>>(),
                );
            }
        }
        if ids.is_empty() {
            return Err(anyhow!("every sample of batch {step} in epoch {epoch} was unreadable"));
        }
        let stack = |tensors: Vec<Tensor>| Tensor::stack(&tensors, 0);
        let per_view = |count: usize, pick: &dyn Fn(usize, usize) -> Tensor, samples: usize| -> Vec<Tensor> {
            if samples == 0 {
                return Vec::new();
            }
            (0..count)
                .map(|v| stack((0..samples).map(|i| pick(i, v)).collect()))
                .collect()
        };
        let slice_count = self.views.slice_views + self.views.local_views;
        let batch = Batch {
            skipped,
            ids: Tensor::from_slice(&ids),
            labels: Tensor::from_slice(&labels),
            slice_views: per_view(slice_count, &|i, v| slices[i][v].shallow_clone(), slices.len()),
            volume_views: per_view(
                self.views.volume_views,
                &|i, v| volumes[i][v].voxels.shallow_clone(),
                volumes.len(),
            ),
            volume_valid: per_view(
                self.views.volume_views,
                &|i, v| volumes[i][v].valid.shallow_clone(),
                volumes.len(),
            ),
            volume_crops: per_view(
                self.views.volume_views,
                &|i, v| crops[i][v].shallow_clone(),
                crops.len(),
            ),
            sequence: (!sequences.is_empty()).then(|| {
                (
                    stack(sequences.iter().map(|s| s.voxels.shallow_clone()).collect()),
                    stack(sequences.iter().map(|s| s.valid.shallow_clone()).collect()),
                )
            }),
        };
        if self.pin_memory {
            return batch.pinned();
        }
        Ok(batch)
    }
}

/// An epoch's batches, in order. At most `prefetch` batches are issued to the workers
/// ahead of the one being consumed, so memory stays bounded whatever the dataset size.
pub struct EpochBatches {
    epoch: usize,
    /// Unreadable samples skipped in the batches handed out so far.
    skipped: usize,
    jobs: Option<crossbeam_channel::Sender<usize>>,
    results: crossbeam_channel::Receiver<(usize, Result<Batch>)>,
    ready: BTreeMap<usize, Result<Batch>>,
    next: usize,
    issued: usize,
    end: usize,
    window: usize,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl EpochBatches {
    fn issue(&mut self) {
        if let Some(jobs) = &self.jobs {
            while self.issued < self.end && self.issued < self.next + self.window {
                if jobs.send(self.issued).is_err() {
                    break;
                }
                self.issued += 1;
            }
        }
    }

    /// Batches issued to workers and not yet consumed (for tests of the memory bound).
    pub fn in_flight(&self) -> usize {
        self.issued - self.next
    }
}

impl Iterator for EpochBatches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.end {
            return None;
        }
        while !self.ready.contains_key(&self.next) {
            match self.results.recv() {
                Ok((step, batch)) => {
                    self.ready.insert(step, batch);
                }
                Err(_) => return Some(Err(anyhow!("data loader workers stopped unexpectedly"))),
            }
        }
        let batch = self.ready.remove(&self.next);
        self.next += 1;
        if let Some(Ok(b)) = &batch {
            self.skipped += b.skipped;
        }
        if self.next == self.end && self.skipped > 0 {
            tracing::warn!(
                "epoch {}: {} unreadable sample(s) skipped (data.loader.on_error = \"skip\"); each is named above",
                self.epoch,
                self.skipped
            );
        }
        self.issue();
        batch
    }
}

impl Drop for EpochBatches {
    fn drop(&mut self) {
        self.jobs = None;
        // Drain so blocked workers finish; then join them.
        while self.results.try_recv().is_ok() {}
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Dataset, Volume};
    use crate::sources::Source;

    struct Ramp(usize);
    impl Dataset for Ramp {
        fn len(&self) -> usize {
            self.0
        }
        fn describe(&self, index: usize) -> String {
            format!("ramp #{index}")
        }
        fn load(&self, index: usize) -> Result<Volume> {
            anyhow::ensure!(index != 3, "sample 3 is broken");
            Ok(Volume::new(
                Tensor::ones([4, 16, 16], (tch::Kind::Float, tch::Device::Cpu)) * index as f64,
                None,
            ))
        }
    }

    fn pipeline(on_error: OnError) -> DataPipeline {
        let source = |key: &str, n| Source {
            key: key.into(),
            dataset: Box::new(Ramp(n)) as Box<dyn Dataset>,
            options: Default::default(),
        };
        let sources = Sources::new(vec![source("a", 5), source("b", 6)], 0).unwrap();
        let views = ViewConfig {
            slice_size: 8,
            volume_size: 8,
            volume_slices: 2,
            ..Default::default()
        };
        let loader = LoaderConfig {
            batch_size: 2,
            workers: 2,
            prefetch: 2,
            on_error,
            cache_mib: 0,
        };
        DataPipeline::new(sources, views, loader, 3).unwrap()
    }

    #[test]
    fn ids_are_global_and_each_epoch_visits_each_sample_once() {
        let p = pipeline(OnError::Skip);
        let mut order = p.order(0);
        assert_ne!(order, p.order(1));
        order.sort();
        assert_eq!(order, (0..11).collect::<Vec<_>>());
    }

    #[test]
    fn batches_come_in_order_and_the_window_bounds_memory() {
        let p = pipeline(OnError::Skip);
        let needs = Needs::of([Consumes::SliceViews, Consumes::VolumeViews, Consumes::SliceSequence]);
        let order = p.order(0);
        let mut batches = p.epoch(0, 0, needs);
        let mut seen = Vec::new();
        let mut skipped = 0;
        while let Some(batch) = batches.next() {
            assert!(batches.in_flight() <= 2);
            let batch = batch.unwrap();
            skipped += batch.skipped;
            assert_eq!(batch.slice_views.len(), 2);
            assert_eq!(batch.volume_views[0].size()[1..], [1, 2, 8, 8]);
            seen.extend(Vec::<i64>::try_from(&batch.ids).unwrap());
        }
        let expected: Vec<i64> = order[..10]
            .iter()
            .map(|&i| i as i64)
            .filter(|&i| i != 3 && i != 8)
            .collect();
        assert_eq!(
            seen, expected,
            "broken samples (local index 3 of each source) are skipped"
        );
        assert_eq!(skipped, 2, "each skipped sample is counted");
        assert_eq!(batches.skipped, 2, "the epoch's count, reported at its end");
    }

    #[test]
    fn an_unreadable_sample_fails_with_its_name_under_the_fail_policy() {
        let p = pipeline(OnError::Fail);
        let err = p
            .epoch(0, 0, Needs::of([Consumes::SliceViews]))
            .find_map(|b| b.err())
            .unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("ramp #3") && text.contains("sample 3 is broken"),
            "{text}"
        );
    }

    #[test]
    fn resuming_mid_epoch_gives_the_same_batches() {
        let p = pipeline(OnError::Skip);
        let needs = Needs::of([Consumes::SliceViews]);
        let full: Vec<Batch> = p.epoch(2, 0, needs).map(Result::unwrap).collect();
        let resumed: Vec<Batch> = p.epoch(2, 3, needs).map(Result::unwrap).collect();
        assert_eq!(full.len(), 5);
        for (a, b) in full[3..].iter().zip(&resumed) {
            assert!(a.ids.equal(&b.ids));
            assert!(a.slice_views[0].equal(&b.slice_views[0]));
        }
    }

    proptest::proptest! {
        /// Over a whole epoch, the ranks' batches take every position of the order below
        /// `steps · W · B` exactly once, and each step's shares together are the batch of
        /// one process with batch `W · B`.
        #[test]
        fn shards_cover_every_sample_once_and_make_up_the_single_process_batch(
            world in 1usize..5, batch in 1usize..6, samples in 1usize..80
        ) {
            let steps = samples / (world * batch);
            let mut seen = vec![0usize; samples];
            for step in 0..steps {
                let mut union: Vec<usize> = Vec::new();
                for rank in 0..world {
                    let range = Shard { rank, world }.batch(step, batch);
                    proptest::prop_assert_eq!(range.len(), batch);
                    union.extend(range);
                }
                union.sort_unstable();
                let single: Vec<usize> = Shard { rank: 0, world: 1 }.batch(step, world * batch).collect();
                proptest::prop_assert_eq!(&union, &single);
                for position in union {
                    seen[position] += 1;
                }
            }
            proptest::prop_assert!(seen.iter().take(steps * world * batch).all(|&n| n == 1));
            proptest::prop_assert!(seen.iter().skip(steps * world * batch).all(|&n| n == 0));
        }
    }
}
