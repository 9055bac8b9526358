//! Data-parallel training across processes and machines on PyTorch's c10d (Gloo on CPU, NCCL
//! on CUDA), launched by torchrun, srun or mpirun: each rank trains a replica on its own share
//! of every global batch, gradients are averaged over ranks after backward (as PyTorch's DDP),
//! and rank 0 alone writes.
//!
//! The communicator is process-wide, as torch.distributed's default group: set once by
//! [`init`] before the run is built, read by whoever needs the other ranks
//! ([`communicator`]): the loader's sampler, the gradient averaging, the objectives whose loss
//! needs the whole batch (SwAV's Sinkhorn, gathered contrastive negatives) and
//! [`crate::batch_norm::BatchNorm`] under `sync_batchnorm`. Without a launcher it is
//! [`SingleProcess`] and every collective is the identity: one process trains exactly as it
//! did before this module existed.

pub mod c10d;
pub mod communicator;
pub mod gradients;
pub mod launch;

pub use communicator::{Communicator, SingleProcess};
pub use launch::Launch;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// `[run.distributed]`: how the ranks of a launch talk. Read only when a launcher started
/// several processes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// `auto` (NCCL for CUDA, Gloo for CPU), `gloo` or `nccl`.
    pub backend: BackendChoice,
    /// Seconds a collective may wait for the other ranks before failing: how long a rank
    /// that hangs (rather than dies, which is noticed at once) holds the others up. Must
    /// exceed the longest pause of one rank between collectives (rank 0 writing a checkpoint).
    pub timeout_s: u64,
    /// Batch norm over the global batch (PyTorch's `SyncBatchNorm`) instead of each rank's
    /// share: what makes world W with batch B train as world 1 with batch W·B.
    pub sync_batchnorm: bool,
    /// Gradient bucket size in MiB (DDP's default is 25).
    pub bucket_mib: f64,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            backend: BackendChoice::Auto,
            timeout_s: 300,
            sync_batchnorm: false,
            bucket_mib: 25.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Gloo,
    Nccl,
}

/// A c10d backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl DistributedConfig {
    /// The backend for tensors on `device`.
    pub fn backend_for(&self, device: Device) -> Result<Backend> {
        Ok(match (self.backend, device) {
            (BackendChoice::Auto, Device::Cuda(_)) | (BackendChoice::Nccl, Device::Cuda(_)) => Backend::Nccl,
            (BackendChoice::Auto, _) | (BackendChoice::Gloo, _) => Backend::Gloo,
            (BackendChoice::Nccl, other) => bail!(
                "config key `run.distributed.backend` is \"nccl\", which needs CUDA tensors, but the run's device is {other:?}: use \"gloo\" or \"auto\""
            ),
        })
    }

    fn timeout(&self) -> Result<Duration> {
        if self.timeout_s == 0 {
            bail!("config key `run.distributed.timeout_s` is 0: expected the seconds a collective may wait, e.g. 300");
        }
        Ok(Duration::from_secs(self.timeout_s))
    }
}

/// A started communicator, and whether batch norm syncs over it.
struct Installed {
    communicator: Arc<dyn Communicator>,
    sync_batchnorm: bool,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// The run's device, as [`init`] was given it.
static COLLECTIVE_DEVICE: OnceLock<Device> = OnceLock::new();

/// Where to build a tensor that exists only to be sent through a collective (a config hash,
/// the logged loss terms): the run's device, as [`init`] was given it, or the CPU before
/// that. NCCL refuses host tensors, so such a tensor made on the CPU would fail every CUDA
/// run of several processes.
pub fn collective_device() -> Device {
    COLLECTIVE_DEVICE.get().copied().unwrap_or(Device::Cpu)
}

/// The process's communicator: the one [`init`] started, or [`SingleProcess`].
pub fn communicator() -> Arc<dyn Communicator> {
    match INSTALLED.get() {
        Some(installed) => installed.communicator.clone(),
        None => Arc::new(SingleProcess),
    }
}

/// Whether batch norm in training mode computes its statistics over every rank's batch.
pub fn sync_batchnorm() -> bool {
    INSTALLED
        .get()
        .is_some_and(|i| i.sync_batchnorm && i.communicator.world_size() > 1)
}

/// Starts this process's part of the launch the environment describes ([`Launch::from_env`])
/// and makes it [`communicator`]. World 1 installs nothing. `device` picks the backend.
/// Called once, before the run is built; a second call is an error.
pub fn init(cfg: &DistributedConfig, device: Device) -> Result<Launch> {
    let launch = Launch::from_env()?;
    if !launch.is_distributed() {
        return Ok(launch);
    }
    let backend = cfg.backend_for(device)?;
    let timeout = cfg.timeout()?;
    tracing::info!(
        "rank {} of {} ({}): meeting at {}:{} ({backend:?})",
        launch.rank,
        launch.world_size,
        launch.launcher,
        launch.master_addr,
        launch.master_port
    );
    let group = c10d::C10d::connect(&launch, backend, timeout)?;
    install(Arc::new(group), cfg.sync_batchnorm)?;
    // `install` refuses a second call, so this is the first and only device recorded.
    let _ = COLLECTIVE_DEVICE.set(device);
    Ok(launch)
}

/// Makes `communicator` the process's (tests install one of their own).
pub fn install(communicator: Arc<dyn Communicator>, sync_batchnorm: bool) -> Result<()> {
    INSTALLED
        .set(Installed {
            communicator,
            sync_batchnorm,
        })
        .map_err(|_| anyhow::anyhow!("the distributed communicator was already started in this process"))
}

/// Whether this process writes the run's files: rank 0.
pub fn is_writer() -> bool {
    communicator().rank() == 0
}

/// Refuses to train when the ranks were given different configs: each rank's resolved
/// config is hashed, the hashes gathered, and a rank whose hash differs from rank 0's is
/// named (by every rank, so that each exits with the reason).
pub fn check_same_config(resolved: &str) -> Result<()> {
    let comm = communicator();
    if comm.world_size() == 1 {
        return Ok(());
    }
    // FNV-1a: stable across processes and machines, unlike std's randomised hasher.
    let hash = resolved.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let mine = Tensor::from_slice(&[hash as i64]).to_device(collective_device());
    let all = comm.all_gather(&mine).context("comparing the ranks' configs")?;
    let all: Vec<i64> = Vec::try_from(all.to_kind(Kind::Int64))?;
    let differing: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, h)| **h != all[0])
        .map(|(r, _)| r.to_string())
        .collect();
    if !differing.is_empty() {
        bail!(
            "rank(s) {} resolved another config than rank 0 (a different file, `--set` or MEDSSL_ environment variable): every rank must run the same config",
            differing.join(", ")
        );
    }
    Ok(())
}

/// A collective's failure inside a module's forward pass, which cannot return it
/// ([`crate::batch_norm::BatchNorm`]), kept for the training loop.
static DEFERRED: std::sync::Mutex<Option<anyhow::Error>> = std::sync::Mutex::new(None);

/// Keeps `error` (the first one) for [`take_deferred_failure`].
pub fn defer_failure(error: anyhow::Error) {
    let mut deferred = DEFERRED.lock().unwrap_or_else(|p| p.into_inner());
    deferred.get_or_insert(error);
}

/// The failure a module deferred during the last forward pass, if any.
pub fn take_deferred_failure() -> Option<anyhow::Error> {
    DEFERRED.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// `error` from a collective, with what this rank can tell of the others.
pub fn collective_failed(error: anyhow::Error, what: &str) -> anyhow::Error {
    let comm = communicator();
    let diagnosis = comm.diagnose_failure();
    error.context(format!(
        "rank {} of {}: {what} failed{}{diagnosis}; this rank stops; checkpoints already written are kept",
        comm.rank(),
        comm.world_size(),
        if diagnosis.is_empty() { "" } else { ": " }
    ))
}
