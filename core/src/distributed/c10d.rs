//! [`Communicator`] over PyTorch's c10d process groups (Gloo for CPU tensors, NCCL for CUDA),
//! through the `medssl-torch-ext` crate: the engine torch.distributed runs on, with its
//! TCPStore rendezvous, so that medssl launches as PyTorch jobs do (torchrun, srun, mpirun).

use super::communicator::Communicator;
use super::launch::Launch;
use super::Backend;
use anyhow::{anyhow, Result};
use std::sync::Mutex;
use std::time::Duration;
use tch::Tensor;
use torch_ext::{ProcessGroup, Store, TcpStoreOptions, DEFAULT_STORE_TIMEOUT};

/// A c10d process group and the store it met through.
pub struct C10d {
    /// `ProcessGroup` is `Send` but not `Sync`: collectives from two threads could interleave
    /// differently on different ranks. Training calls them from one thread; the lock makes
    /// that a guarantee.
    group: Mutex<ProcessGroup>,
    store: Store,
    rank: usize,
    world_size: usize,
}

/// Store key under which each rank reports that it is still there after a failure.
fn survivor_key(rank: usize) -> String {
    format!("survivor/{rank}")
}

impl C10d {
    /// Meets the other ranks of `launch` at its TCPStore and forms a `backend` group whose
    /// collectives fail after `timeout` without progress. Rank 0 serves the store unless
    /// torchrun's agent does; a port in use is an error naming it.
    pub fn connect(launch: &Launch, backend: Backend, timeout: Duration) -> Result<C10d> {
        let mut options = TcpStoreOptions::for_rank(
            launch.master_addr.clone(),
            launch.master_port,
            launch.rank,
            launch.world_size,
            launch.agent_store,
        );
        // Rendezvous waits for ranks that start late (a second node, a slow import), so it
        // gets c10d's generous default; the collectives get `timeout`.
        options.timeout = DEFAULT_STORE_TIMEOUT.max(timeout);
        let where_ = format!("{}:{}", launch.master_addr, launch.master_port);
        let store = Store::tcp(&options).map_err(|e| {
            let hint = if options.is_server {
                format!("rank 0 cannot serve the rendezvous at {where_} (is the port in use? set MASTER_PORT to a free one)")
            } else {
                format!("rank {} cannot reach the rendezvous at {where_} (is rank 0 running, and MASTER_ADDR/MASTER_PORT the same on every rank?)", launch.rank)
            };
            anyhow!("{hint}: {e}")
        })?;
        let restart = std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|_| "0".into());
        let store = store.with_prefix(&format!("medssl/attempt_{restart}/"))?;
        let group = match backend {
            Backend::Gloo => ProcessGroup::gloo(&store, launch.rank, launch.world_size, timeout),
            Backend::Nccl => ProcessGroup::nccl(&store, launch.rank, launch.world_size, timeout),
        }
        .map_err(|e| {
            anyhow!(
                "forming the {backend:?} process group of {} ranks at {where_}: {e}",
                launch.world_size
            )
        })?;
        Ok(C10d {
            group: Mutex::new(group),
            store,
            rank: launch.rank,
            world_size: launch.world_size,
        })
    }

    fn group(&self) -> std::sync::MutexGuard<'_, ProcessGroup> {
        // A panic while holding the lock poisons it; the group itself is still whole.
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Communicator for C10d {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        Ok(self.group().all_reduce_sum(tensors)?)
    }

    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.group().all_gather(input)?)
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        Ok(self.group().broadcast(tensor, root)?)
    }

    fn barrier(&self) -> Result<()> {
        Ok(self.group().barrier()?)
    }

    fn all_reduce_sum_with_grad(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.group().differentiable_all_reduce_sum(input)?)
    }

    fn all_gather_with_grad(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.group().differentiable_all_gather(input)?)
    }

    /// Every surviving rank leaves its mark in the store and, after a short wait for the
    /// others to do the same, names the ranks that did not (nothing when all answered: the
    /// failure was this rank's own). The store lives in rank 0 (or
    /// torchrun's agent): when it is unreachable, rank 0 is the one lost.
    fn diagnose_failure(&self) -> String {
        if self.store.set(&survivor_key(self.rank), b"1").is_err() {
            return "the rendezvous store is unreachable: rank 0, which serves it, has probably died".into();
        }
        std::thread::sleep(Duration::from_secs(2));
        // `check` answers at once; `get` would wait for the store's timeout.
        let lost: Vec<String> = (0..self.world_size)
            .filter(|&r| r != self.rank && !self.store.check(&survivor_key(r)).unwrap_or(false))
            .map(|r| r.to_string())
            .collect();
        if lost.is_empty() {
            String::new()
        } else {
            format!(
                "lost rank(s) {}: they stopped answering (see their logs)",
                lost.join(", ")
            )
        }
    }
}
