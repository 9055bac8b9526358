//! The run's data sources: datasets concatenated under globally unique sample ids, how
//! each enters the run (whole volumes or single slices, sampling weight, target spacing),
//! and a bounded cache of decoded volumes.
//!
//! Sample ids are offsets into the concatenation of the run's sources (in key order), so
//! they never collide across datasets, unlike the authors' code where concatenated datasets
//! reuse indices and corrupt DeepCluster-v2's memory bank. What is cached is the decoded
//! volume, never an augmented view (the authors' cached views froze their augmentations).

use crate::dataset::Dataset;
use crate::rng::{self, domain};
use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// What one sample of a source is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Each file (volume or image) is one sample.
    Volumes,
    /// Each of `slices_per_volume` evenly spaced slices of each volume is its own 2D sample,
    /// as the paper's stage 1 trains f_intra on slices of its 3D data.
    Slices,
}

/// The keys of a `[data.sources.KEY]` section that core reads; the rest belong to the
/// reader named by `format`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceOptions {
    /// Visits of each sample per epoch: 2 visits each twice, 0.5 a seeded half (a new half
    /// every epoch), 0 leaves the source out.
    pub weight: f64,
    pub unit: Unit,
    /// Slices drawn from each volume under `unit = "slices"`.
    pub slices_per_volume: usize,
    /// Resample each volume to this voxel spacing in mm (D, H, W), where the format records
    /// the spacing; a one-slice sample (a 2D image) is resampled in-plane only.
    pub target_spacing: Option<[f64; 3]>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            weight: 1.0,
            unit: Unit::Volumes,
            slices_per_volume: 16,
            target_spacing: None,
        }
    }
}

/// Core's keys in a source section (split off before the reader parses the rest).
pub const SOURCE_OPTION_KEYS: [&str; 4] = ["weight", "unit", "slices_per_volume", "target_spacing"];

impl SourceOptions {
    pub fn validate(&self, key: &str) -> Result<()> {
        anyhow::ensure!(
            self.weight >= 0.0 && self.weight.is_finite(),
            "config key `data.sources.{key}.weight` must be a finite number >= 0, got {}",
            self.weight
        );
        anyhow::ensure!(
            self.slices_per_volume >= 1,
            "config key `data.sources.{key}.slices_per_volume` must be at least 1"
        );
        if let Some(s) = self.target_spacing {
            anyhow::ensure!(
                s.iter().all(|v| *v > 0.0),
                "config key `data.sources.{key}.target_spacing` must be positive, got {s:?}"
            );
        }
        Ok(())
    }
}

/// One source: its key, reader and options.
pub struct Source {
    pub key: String,
    pub dataset: Box<dyn Dataset>,
    pub options: SourceOptions,
}

impl Source {
    /// Samples this source contributes to the id space.
    fn samples(&self) -> usize {
        match self.options.unit {
            Unit::Volumes => self.dataset.len(),
            Unit::Slices => self.dataset.len() * self.options.slices_per_volume,
        }
    }
}

/// A decoded sample: voxels `[D, H, W]` (one slice for slice samples) and its label.
pub struct Sample {
    pub voxels: Tensor,
    pub label: Option<i64>,
}

/// Decoded volumes, least recently used evicted past the byte budget.
struct VolumeCache {
    budget: usize,
    used: usize,
    clock: u64,
    entries: HashMap<(usize, usize), (Tensor, Option<i64>, u64)>,
}

impl VolumeCache {
    fn get(&mut self, key: (usize, usize)) -> Option<(Tensor, Option<i64>)> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(&key).map(|(t, label, used)| {
            *used = clock;
            (t.shallow_clone(), *label)
        })
    }

    fn put(&mut self, key: (usize, usize), voxels: &Tensor, label: Option<i64>) {
        let bytes = voxels.numel() * voxels.kind().elt_size_in_bytes();
        if bytes > self.budget || self.entries.contains_key(&key) {
            return;
        }
        while self.used + bytes > self.budget {
            let Some((&oldest, _)) = self.entries.iter().min_by_key(|(_, (_, _, used))| *used) else {
                break;
            };
            if let Some((t, _, _)) = self.entries.remove(&oldest) {
                self.used -= t.numel() * t.kind().elt_size_in_bytes();
            }
        }
        self.clock += 1;
        self.used += bytes;
        self.entries.insert(key, (voxels.shallow_clone(), label, self.clock));
    }
}

/// The run's datasets, concatenated.
pub struct Sources {
    sources: Vec<Source>,
    /// `offsets[k]` is the global id of source k's first sample.
    offsets: Vec<usize>,
    total: usize,
    cache: Mutex<VolumeCache>,
}

impl Sources {
    /// The sources, with a cache of decoded volumes of at most `cache_mib` MiB.
    pub fn new(sources: Vec<Source>, cache_mib: usize) -> Result<Self> {
        anyhow::ensure!(
            !sources.is_empty(),
            "the config lists no data sources under [data.sources]"
        );
        let mut offsets = Vec::with_capacity(sources.len());
        let mut total = 0;
        for source in &sources {
            anyhow::ensure!(
                !source.dataset.is_empty(),
                "data source `{}` has no samples",
                source.key
            );
            source.options.validate(&source.key)?;
            offsets.push(total);
            total += source.samples();
        }
        let cache = VolumeCache {
            budget: cache_mib << 20,
            used: 0,
            clock: 0,
            entries: HashMap::new(),
        };
        Ok(Sources {
            sources,
            offsets,
            total,
            cache: Mutex::new(cache),
        })
    }

    /// Size of the global id space.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Keys of the sources, in id order.
    pub fn keys(&self) -> Vec<&str> {
        self.sources.iter().map(|s| s.key.as_str()).collect()
    }

    /// Indices of the sources named by `keys` (all when `None`), or an error naming an
    /// unknown key and the known ones.
    pub fn select(&self, keys: Option<&[String]>) -> Result<Vec<usize>> {
        let Some(keys) = keys else {
            return Ok((0..self.sources.len()).collect());
        };
        keys.iter()
            .map(|k| {
                self.sources
                    .iter()
                    .position(|s| &s.key == k)
                    .with_context(|| format!("no data source `{k}`; sources: {}", self.keys().join(", ")))
            })
            .collect()
    }

    /// The ids epoch `epoch` visits, shuffled, for the selected sources: each sample
    /// `floor(weight)` times, plus a seeded subset of the fractional part.
    pub fn epoch_order(&self, selection: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
        let mut order = Vec::new();
        for &k in selection {
            let source = &self.sources[k];
            let ids: Vec<usize> = (self.offsets[k]..self.offsets[k] + source.samples()).collect();
            let weight = source.options.weight;
            for _ in 0..weight.floor() as usize {
                order.extend(&ids);
            }
            let extra = ((weight - weight.floor()) * ids.len() as f64).round() as usize;
            if extra > 0 {
                let mut subset = ids.clone();
                subset.shuffle(&mut rng::generator(seed, &[domain::ORDER, epoch as u64, 1 + k as u64]));
                order.extend(&subset[..extra]);
            }
        }
        order.shuffle(&mut rng::generator(seed, &[domain::ORDER, epoch as u64]));
        order
    }

    /// (source index, index within it) of a global id.
    fn locate(&self, id: usize) -> (usize, usize) {
        let k = self.offsets.partition_point(|&o| o <= id) - 1;
        (k, id - self.offsets[k])
    }

    /// Decodes sample `id`, with an error naming its source and file.
    pub fn load(&self, id: usize) -> Result<Sample> {
        anyhow::ensure!(
            id < self.total,
            "sample id {id} is out of range (the run has {})",
            self.total
        );
        let (k, local) = self.locate(id);
        let source = &self.sources[k];
        let (volume_index, slice) = match source.options.unit {
            Unit::Volumes => (local, None),
            Unit::Slices => (
                local / source.options.slices_per_volume,
                Some(local % source.options.slices_per_volume),
            ),
        };
        let (voxels, label) = self.volume(k, volume_index)?;
        let voxels = match slice {
            None => voxels,
            Some(j) => {
                // Evenly spaced: slice j of n sits at the centre of the j-th of n equal parts.
                let depth = voxels.size()[0];
                let n = source.options.slices_per_volume as f64;
                let index = (((j as f64 + 0.5) / n) * depth as f64).floor() as i64;
                voxels.narrow(0, index.clamp(0, depth - 1), 1)
            }
        };
        Ok(Sample { voxels, label })
    }

    /// Volume `index` of source `k`, decoded (or from the cache) and resampled.
    fn volume(&self, k: usize, index: usize) -> Result<(Tensor, Option<i64>)> {
        if let Some(hit) = self
            .cache
            .lock()
            .map_err(|_| anyhow::anyhow!("volume cache poisoned"))?
            .get((k, index))
        {
            return Ok(hit);
        }
        let source = &self.sources[k];
        let what = || {
            format!(
                "data source `{}`: cannot read {}",
                source.key,
                source.dataset.describe(index)
            )
        };
        let volume = source.dataset.load(index).with_context(what)?;
        anyhow::ensure!(
            volume.voxels.dim() == 3,
            "data source `{}`: {} decoded to shape {:?}, expected [D, H, W]",
            source.key,
            source.dataset.describe(index),
            volume.voxels.size()
        );
        anyhow::ensure!(
            volume.voxels.size().iter().all(|&n| n > 0),
            "data source `{}`: {} holds no voxels: its shape [D, H, W] is {:?}, with an axis of length 0",
            source.key,
            source.dataset.describe(index),
            volume.voxels.size()
        );
        let voxels = match (source.options.target_spacing, volume.spacing) {
            (Some(target), Some(spacing)) => resample_to_spacing(&volume.voxels, spacing, target),
            _ => volume.voxels,
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.put((k, index), &voxels, volume.label);
        }
        Ok((voxels, volume.label))
    }
}

/// The size `[D, H, W]` of `size` resampled from `spacing` to `target`. A sample of one
/// slice (a 2D image) stays one slice: its slice spacing (a SliceThickness, or 1 mm where the
/// format records none) says nothing about a second one.
fn resampled_size(size: &[i64], spacing: [f64; 3], target: [f64; 3]) -> Vec<i64> {
    (0..3)
        .map(|i| match (i, size[i]) {
            (0, 1) => 1,
            _ => ((size[i] as f64 * spacing[i] / target[i]).round() as i64).max(1),
        })
        .collect()
}

/// Trilinear resampling of `[D, H, W]` from `spacing` to `target` (mm per voxel).
pub fn resample_to_spacing(voxels: &Tensor, spacing: [f64; 3], target: [f64; 3]) -> Tensor {
    let size = voxels.size();
    let out = resampled_size(&size, spacing, target);
    if out == size {
        return voxels.shallow_clone();
    }
    crate::resize::resize_linear(voxels, [out[0], out[1], out[2]])
}

/// Nearest-neighbour resampling of a label map `[D, H, W]` (int64 class ids) from `spacing`
/// to `target`, to the size [`resample_to_spacing`] gives its image, so that the two stay
/// voxel for voxel aligned (MONAI resamples labels with `mode="nearest"`).
pub fn resample_labels_to_spacing(labels: &Tensor, spacing: [f64; 3], target: [f64; 3]) -> Tensor {
    let size = labels.size();
    let out = resampled_size(&size, spacing, target);
    if out == size {
        return labels.shallow_clone();
    }
    labels
        .to_kind(tch::Kind::Float)
        .view([1, 1, size[0], size[1], size[2]])
        .upsample_nearest3d([out[0], out[1], out[2]], None, None, None)
        .view([out[0], out[1], out[2]])
        .to_kind(tch::Kind::Int64)
}

/// Shared handle.
pub type SharedSources = Arc<Sources>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Volume;

    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counted(usize, Arc<AtomicUsize>);
    impl Dataset for Counted {
        fn len(&self) -> usize {
            self.0
        }
        fn describe(&self, index: usize) -> String {
            format!("volume #{index}")
        }
        fn load(&self, index: usize) -> Result<Volume> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let voxels = Tensor::arange(8, (tch::Kind::Float, tch::Device::Cpu))
                .view([8, 1, 1])
                .expand([8, 4, 4], true)
                .contiguous()
                + 100.0 * index as f64;
            Ok(Volume::new(voxels, Some([2.0, 1.0, 1.0])))
        }
    }

    fn source(key: &str, n: usize, options: SourceOptions) -> Source {
        counted_source(key, n, options, Default::default())
    }

    fn counted_source(key: &str, n: usize, options: SourceOptions, calls: Arc<AtomicUsize>) -> Source {
        Source {
            key: key.into(),
            dataset: Box::new(Counted(n, calls)),
            options,
        }
    }

    #[test]
    fn slices_are_samples_with_their_own_ids_and_evenly_spaced() {
        let slices = SourceOptions {
            unit: Unit::Slices,
            slices_per_volume: 4,
            ..Default::default()
        };
        let sources = Sources::new(vec![source("a", 3, Default::default()), source("b", 2, slices)], 64).unwrap();
        assert_eq!(sources.len(), 3 + 2 * 4);
        assert_eq!(sources.load(0).unwrap().voxels.size(), [8, 4, 4]);
        // Source b, volume 1, slice 2 of 4: depth 8, centre of the third quarter is slice 5.
        let sample = sources.load(3 + 4 + 2).unwrap();
        assert_eq!(sample.voxels.size(), [1, 4, 4]);
        assert_eq!(sample.voxels.double_value(&[0, 0, 0]), 105.0);
    }

    #[test]
    fn weights_repeat_and_subsample_per_epoch() {
        let twice = SourceOptions {
            weight: 2.0,
            ..Default::default()
        };
        let half = SourceOptions {
            weight: 0.5,
            ..Default::default()
        };
        let sources = Sources::new(
            vec![
                source("a", 4, twice),
                source("b", 10, half),
                source(
                    "c",
                    3,
                    SourceOptions {
                        weight: 0.0,
                        ..Default::default()
                    },
                ),
            ],
            0,
        )
        .unwrap();
        let all = sources.select(None).unwrap();
        let order = sources.epoch_order(&all, 1, 0);
        assert_eq!(order.len(), 8 + 5);
        assert_eq!(order.iter().filter(|&&i| i < 4).count(), 8);
        assert!(order.iter().all(|&i| i < 14), "weight 0 leaves source c out");
        let next = sources.epoch_order(&all, 1, 1);
        let half_of = |o: &[usize]| {
            let mut v: Vec<usize> = o.iter().copied().filter(|&i| (4..14).contains(&i)).collect();
            v.sort();
            v
        };
        assert_ne!(half_of(&order), half_of(&next), "another epoch draws another half");
        assert_eq!(sources.select(Some(&["b".to_string()])).unwrap(), vec![1]);
        let err = sources.select(Some(&["z".to_string()])).unwrap_err().to_string();
        assert!(err.contains("no data source `z`") && err.contains("a, b, c"), "{err}");
    }

    #[test]
    fn the_cache_decodes_each_volume_once_within_its_budget() {
        let slices = SourceOptions {
            unit: Unit::Slices,
            slices_per_volume: 8,
            ..Default::default()
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let sources = Sources::new(vec![counted_source("a", 2, slices.clone(), calls.clone())], 1).unwrap();
        for id in 0..16 {
            sources.load(id).unwrap();
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "two volumes, each decoded once for its 8 slices"
        );
        // A zero budget caches nothing.
        let calls = Arc::new(AtomicUsize::new(0));
        let uncached = Sources::new(vec![counted_source("a", 2, slices, calls.clone())], 0).unwrap();
        for id in 0..16 {
            uncached.load(id).unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 16);
    }

    #[test]
    fn target_spacing_resamples() {
        let options = SourceOptions {
            target_spacing: Some([1.0, 2.0, 2.0]),
            ..Default::default()
        };
        let sources = Sources::new(vec![source("a", 1, options)], 0).unwrap();
        assert_eq!(sources.load(0).unwrap().voxels.size(), [16, 2, 2]);
    }

    #[test]
    fn a_single_slice_is_resampled_in_plane_only() {
        let image = Tensor::ones([1, 4, 6], (tch::Kind::Float, tch::Device::Cpu));
        let resampled = resample_to_spacing(&image, [2.5, 1.0, 1.0], [0.5, 2.0, 0.5]);
        assert_eq!(resampled.size(), [1, 2, 12]);
        let labels = Tensor::zeros([1, 4, 6], (tch::Kind::Int64, tch::Device::Cpu));
        let resampled = resample_labels_to_spacing(&labels, [2.5, 1.0, 1.0], [0.5, 2.0, 0.5]);
        assert_eq!(resampled.size(), [1, 2, 12]);
    }
}
