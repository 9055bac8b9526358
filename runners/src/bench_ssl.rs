//! `medssl bench swav-step` and `medssl bench kmeans`: fixed-shape benchmarks of the
//! clustering objectives' hot paths, each with a PyTorch twin in benchmarks/ (same shapes,
//! same JSON), so the two can be run side by side on one machine (docs/benchmarks.md).
//!
//! They live in the runner because they build plugins (core must not depend on any). Each
//! runs in a process of its own, so the peak resident memory reported is the benchmark's.

use anyhow::{Context, Result};
use medssl_core::bench::peak_rss_mib;
use medssl_core::config::{OptimizerConfig, Section};
use medssl_core::distributed::{self, gradients, DistributedConfig};
use medssl_core::encoder::EncoderShape;
use medssl_core::memory_format::MemoryFormat;
use medssl_core::objective::{ObjectiveShape, Progress, StepInput};
use medssl_core::ops::l2_normalize;
use medssl_core::optim::Optimizer;
use medssl_core::precision::Precision;
use medssl_core::registry;
use medssl_deepcluster_v2::{initial_centroids, spherical_kmeans};
use serde::Serialize;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// The SwAV step of the paper's setting at a small batch: ResNet-50 on 3-channel images,
/// 2 global crops of 96 px and 4 local crops of 48 px per sample.
pub struct SwavStep {
    pub batch: i64,
    pub warmup: usize,
    pub steps: usize,
    pub device: Device,
    /// The encoder's `memory_format` (its weights and the crops).
    pub memory_format: MemoryFormat,
    /// `run.precision`: under bf16 or fp16 the encoder's forward pass runs in autocast and
    /// its embeddings go on in fp32, as in `medssl run` (docs/precision.md).
    pub precision: Precision,
}

#[derive(Debug, Serialize)]
pub struct SwavStepReport {
    /// Median over the timed steps.
    pub ms_per_step: f64,
    pub peak_rss_mib: Option<f64>,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Medians of the step's phases: encoder forward; projection, codes and loss; backward;
    /// the gradients' all-reduce (0 in one process); optimizer step with the prototypes'
    /// renormalisation.
    pub phases_ms: Phases,
    /// Processes taking part (under a launcher: `medssl bench distributed`); `batch` is each
    /// one's.
    pub world_size: usize,
    pub steps: usize,
    pub warmup: usize,
    pub batch: i64,
    pub threads: i32,
    pub device: String,
    pub memory_format: MemoryFormat,
    pub precision: Precision,
    /// Peak GPU memory held by tensors over the timed steps (the CUDA caching allocator's
    /// `max_memory_allocated`), MiB; absent on the CPU.
    pub peak_gpu_mib: Option<f64>,
    /// Samples (each with its 6 crops) a second at the median step.
    pub samples_per_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Phases {
    pub forward: f64,
    pub loss: f64,
    pub backward: f64,
    pub allreduce: f64,
    pub optimizer: f64,
}

/// One SwAV training step, timed: the `resnet50` encoder and the `swav` objective built from
/// the registry with config sections, and medssl's SGD. As SwAV's reference training loop
/// does, crops of one resolution go through the encoder together (2 x B global, then 4 x B
/// local), the projection head and the prototypes see all 6 x B embeddings at once, and the
/// prototypes are renormalised after the step. Under a launcher it is the data-parallel step
/// of `medssl run`: Sinkhorn over every rank's batch, variables broadcast from rank 0 at the
/// start, gradients averaged in 25 MiB buckets before the update.
pub fn swav_step(args: &SwavStep) -> Result<SwavStepReport> {
    let (global_views, local_views, global_size, local_size) = (2usize, 4usize, 96i64, 48i64);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(args.device);
    let root = vs.root();

    let encoder_entry = registry::encoders().get("resnet50")?;
    let encoder_body = format!("input_channels = 3\nmemory_format = \"{}\"", args.memory_format.name());
    let encoder_section = Section::inline("encoder", "resnet50", &encoder_body)?;
    let encoder = (encoder_entry.build)(&encoder_section, &root / "encoder", &EncoderShape { in_channels: 3 })
        .context("bench swav-step: building the resnet50 encoder")?;

    let objective_entry = registry::objectives().get("swav")?;
    let objective_section = Section::inline(
        "objectives.swav",
        "swav",
        // The prototypes train from the first step, as in every step after SwAV's first epoch.
        "level = \"slice\"\nhidden_dim = 2048\noutput_dim = 128\nprototypes = 3000\n\
         temperature = 0.1\nepsilon = 0.05\nsinkhorn_iterations = 3\nfreeze_prototypes_steps = 0",
    )?;
    let shape = ObjectiveShape {
        spatial_dims: medssl_core::encoder::SpatialDims::Two,
        in_channels: 1,
        deepest_level: (encoder.embedding_dim(), 32),
        levels: encoder.levels().to_vec(),
        input_size: None,
        slice_dim: encoder.embedding_dim(),
        volume_dim: None,
        sequence_dim: None,
        num_samples: args.batch as usize,
        global_slice_views: global_views,
        local_slice_views: local_views,
        volume_views: 0,
        seed: 0,
    };
    let mut objective = (objective_entry.build)(&objective_section, &root / "objectives" / "swav", &shape)
        .context("bench swav-step: building the swav objective")?;

    let optimizer_cfg = OptimizerConfig {
        name: "sgd".into(),
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let comm = distributed::communicator();
    gradients::broadcast_variables(&*comm, &variables).context("bench swav-step: broadcasting rank 0's variables")?;
    let parameters: Vec<(String, Tensor)> = variables.into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let mut optimizer = Optimizer::new(&optimizer_cfg, parameters)?;
    let bucket_bytes = (DistributedConfig::default().bucket_mib * 1024.0 * 1024.0) as usize;

    let options = (Kind::Float, args.device);
    // Laid out once, as the PyTorch twin does, so the encoder's entry has nothing to convert.
    let crops = |views: usize, size: i64| {
        let crops = Tensor::randn([views as i64 * args.batch, 3, size, size], options);
        args.memory_format.apply(&crops)
    };
    let (global, local) = (crops(global_views, global_size), crops(local_views, local_size));
    let ids = Tensor::arange(args.batch, (Kind::Int64, args.device));
    let progress = Progress {
        epoch: 0,
        step: 0,
        steps_per_epoch: 1,
    };

    let sync = || {
        if let Device::Cuda(i) = args.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let gpu = match args.device {
        Device::Cuda(index) => Some(index),
        _ => None,
    };
    let mut times = Vec::with_capacity(args.steps);
    let mut phases: [Vec<f64>; 5] = Default::default();
    for step in 0..args.warmup + args.steps {
        let tick = Instant::now();
        let mut marks = [0.0; 5];
        let region = args.precision.autocast(args.device)?;
        let pooled = |crops: &Tensor, views: usize| {
            encoder
                .forward(crops, true)
                .pooled
                .to_kind(Kind::Float)
                .chunk(views as i64, 0)
        };
        let mut views = pooled(&global, global_views);
        views.extend(pooled(&local, local_views));
        drop(region);
        sync();
        marks[0] = tick.elapsed().as_secs_f64();
        let input = StepInput {
            ids: &ids,
            slice_views: Some(&views),
            global_slice_views: global_views,
            volume_views: None,
            volume_crops: None,
            slice_sequence: None,
        };
        let loss = objective.loss(&input, &progress)?.total;
        sync();
        marks[1] = tick.elapsed().as_secs_f64();
        optimizer.zero_grad();
        loss.backward();
        sync();
        marks[2] = tick.elapsed().as_secs_f64();
        gradients::average_gradients(&*comm, optimizer.parameters(), bucket_bytes)
            .context("bench swav-step: averaging the gradients over the ranks")?;
        sync();
        marks[3] = tick.elapsed().as_secs_f64();
        optimizer.step(optimizer_cfg.lr);
        objective.on_step_end(&progress)?;
        let value = loss.double_value(&[]);
        anyhow::ensure!(value.is_finite(), "bench swav-step: loss {value} at step {step}");
        sync();
        marks[4] = tick.elapsed().as_secs_f64();
        if step + 1 == args.warmup {
            if let Some(index) = gpu {
                torch_ext::reset_cuda_memory_peaks(index)
                    .context("bench swav-step: resetting the GPU's peak memory")?;
            }
        }
        if step >= args.warmup {
            times.push(marks[4] * 1e3);
            let mut previous = 0.0;
            for (phase, mark) in phases.iter_mut().zip(marks) {
                phase.push((mark - previous) * 1e3);
                previous = mark;
            }
        }
    }
    let [forward, loss, backward, allreduce, step] = phases.map(|mut p| summarise(&mut p).0);
    let (median, min, max) = summarise(&mut times);
    let peak_gpu_mib = match gpu {
        Some(index) => Some(
            torch_ext::cuda_memory_peaks(index)
                .context("bench swav-step: reading the GPU's peak memory")?
                .allocated as f64
                / (1024.0 * 1024.0),
        ),
        None => None,
    };
    Ok(SwavStepReport {
        ms_per_step: median,
        peak_rss_mib: peak_rss_mib(),
        min_ms: min,
        max_ms: max,
        phases_ms: Phases {
            forward,
            loss,
            backward,
            allreduce,
            optimizer: step,
        },
        world_size: comm.world_size(),
        steps: args.steps,
        warmup: args.warmup,
        batch: args.batch,
        threads: tch::get_num_threads(),
        device: format!("{:?}", args.device),
        memory_format: args.memory_format,
        precision: args.precision,
        peak_gpu_mib,
        samples_per_s: args.batch as f64 / (median / 1e3),
    })
}

/// DeepCluster-v2's clustering at the start of an epoch, on a synthetic bank.
pub struct KmeansBench {
    pub samples: i64,
    pub dim: i64,
    pub clusters: Vec<i64>,
    pub iterations: usize,
    pub repeats: usize,
    pub device: Device,
}

#[derive(Debug, Serialize)]
pub struct KmeansReport {
    /// Median over the repeats of the time to cluster the bank once per prototype set.
    pub ms: f64,
    pub peak_rss_mib: Option<f64>,
    pub min_ms: f64,
    pub max_ms: f64,
    pub repeats: usize,
    pub samples: i64,
    pub dim: i64,
    pub clusters: Vec<i64>,
    pub iterations: usize,
    pub threads: i32,
    pub device: String,
}

/// Spherical k-means ([`spherical_kmeans`], the function DeepCluster-v2 runs at each epoch
/// start) of a bank of L2-normalised Gaussian embeddings, once per prototype set, with the
/// objective's seeded initial centroids.
pub fn kmeans(args: &KmeansBench) -> Result<KmeansReport> {
    tch::manual_seed(0);
    let bank = l2_normalize(&Tensor::randn([args.samples, args.dim], (Kind::Float, args.device)));
    let ids: Vec<i64> = (0..args.samples).collect();
    let mut times = Vec::with_capacity(args.repeats);
    for repeat in 0..args.repeats.max(1) {
        let tick = Instant::now();
        for (head, &k) in args.clusters.iter().enumerate() {
            let init = initial_centroids(&ids, k as usize, repeat, head);
            let result = spherical_kmeans(&bank, &init, args.iterations)?;
            anyhow::ensure!(
                result.assignments.size() == [args.samples],
                "bench kmeans: k-means returned {:?} assignments",
                result.assignments.size()
            );
        }
        if let Device::Cuda(i) = args.device {
            tch::Cuda::synchronize(i as i64);
        }
        times.push(tick.elapsed().as_secs_f64() * 1e3);
    }
    let (median, min, max) = summarise(&mut times);
    Ok(KmeansReport {
        ms: median,
        peak_rss_mib: peak_rss_mib(),
        min_ms: min,
        max_ms: max,
        repeats: times.len(),
        samples: args.samples,
        dim: args.dim,
        clusters: args.clusters.clone(),
        iterations: args.iterations,
        threads: tch::get_num_threads(),
        device: format!("{:?}", args.device),
    })
}

/// Median, minimum and maximum of `times` (sorted in place); the median of an even count is
/// the mean of the middle two, as Python's `statistics.median`.
pub fn summarise(times: &mut [f64]) -> (f64, f64, f64) {
    if times.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    };
    (median, times[0], times[n - 1])
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::summarise(&mut [3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(super::summarise(&mut [4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
