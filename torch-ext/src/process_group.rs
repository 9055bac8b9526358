//! c10d process groups (Gloo on CPU, NCCL on CUDA) and their collectives on tch tensors.

use std::time::Duration;

use tch::Tensor;

use crate::error::{context, Result};
use crate::ffi;
use crate::store::Store;

/// Which network device a Gloo group talks through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GlooDevice {
    /// As torch.distributed picks: the interfaces in `GLOO_SOCKET_IFNAME`, else the address
    /// this host's name resolves to, else loopback.
    #[default]
    Default,
    /// The address this host name or IP resolves to (`"127.0.0.1"` for one machine).
    Hostname(String),
    /// A network interface by name (`"eth0"`).
    Interface(String),
}

/// Which c10d backend runs a group's collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, over TCP.
    Gloo,
    /// NCCL: CUDA tensors.
    Nccl,
}

/// A process group: `world_size` processes, this one being `rank`, that call the same
/// collectives in the same order.
///
/// Every collective blocks until it has finished (for NCCL: until it is ordered before later
/// work on the current CUDA stream). A collective fails, rather than hangs, when a peer
/// process dies (its connections close) or stops taking part for longer than the group's
/// timeout. `Send` but not `Sync`: calls from two threads could interleave differently on
/// different ranks.
pub struct ProcessGroup {
    handle: ffi::PgHandle,
    backend: Backend,
    rank: usize,
    world_size: usize,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} process group (rank {} of {})",
            self.backend, self.rank, self.world_size
        )
    }
}

impl ProcessGroup {
    /// A Gloo group on the device torch.distributed would pick ([`GlooDevice::Default`]).
    /// Returns once all `world_size` processes have connected through `store`; `timeout`
    /// bounds that and every later collective.
    pub fn gloo(store: &Store, rank: usize, world_size: usize, timeout: Duration) -> Result<Self> {
        Self::gloo_with_device(store, rank, world_size, timeout, &GlooDevice::Default)
    }

    /// A Gloo group on a chosen network device.
    pub fn gloo_with_device(
        store: &Store,
        rank: usize,
        world_size: usize,
        timeout: Duration,
        device: &GlooDevice,
    ) -> Result<Self> {
        let device_arg = match device {
            GlooDevice::Default => ffi::GlooDeviceArg::Default,
            GlooDevice::Hostname(host) => ffi::GlooDeviceArg::Hostname(host),
            GlooDevice::Interface(iface) => ffi::GlooDeviceArg::Interface(iface),
        };
        let handle = context(ffi::gloo(store.handle(), rank, world_size, timeout, device_arg), || {
            format!("Gloo process group (rank {rank} of {world_size}, {device:?}) over {store:?}")
        })?;
        Ok(Self::new(handle, Backend::Gloo))
    }

    /// An NCCL group (CUDA tensors; the caller picks the CUDA device). Fails with
    /// [`crate::Error::NcclNotBuilt`] when this crate was built without NCCL: build.rs compiles
    /// it whenever it finds NCCL's and the CUDA runtime's headers (see [`Self::NCCL_BUILT`]).
    pub fn nccl(store: &Store, rank: usize, world_size: usize, timeout: Duration) -> Result<Self> {
        #[cfg(medssl_nccl)]
        {
            let handle = context(ffi::nccl(store.handle(), rank, world_size, timeout), || {
                format!("NCCL process group (rank {rank} of {world_size}) over {store:?}")
            })?;
            Ok(Self::new(handle, Backend::Nccl))
        }
        #[cfg(not(medssl_nccl))]
        {
            let _ = (store, rank, world_size, timeout);
            Err(crate::Error::NcclNotBuilt)
        }
    }

    /// Whether [`ProcessGroup::nccl`] is available in this build: true when build.rs found the
    /// CUDA headers (`make setup` installs them), GPU or not.
    pub const NCCL_BUILT: bool = cfg!(medssl_nccl);

    fn new(handle: ffi::PgHandle, backend: Backend) -> Self {
        let rank = handle.rank();
        let world_size = handle.world_size();
        Self {
            handle,
            backend,
            rank,
            world_size,
        }
    }

    /// This process's rank, in `0..world_size`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The backend running the collectives.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Replaces every tensor with its sum over all ranks, in place, outside autograd (for
    /// gradients and buffers). The tensors must share one dtype and device; several are
    /// packed into one flat bucket and reduced in one collective. Every rank passes the same
    /// shapes in the same order.
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        context(self.handle.all_reduce_sum(tensors), || {
            self.op(&format!("all_reduce_sum of {} tensors", tensors.len()))
        })
    }

    /// Every rank's `input` concatenated along dim 0 in rank order, outside autograd. Every
    /// rank passes the same shape (at least one dimension).
    pub fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        context(self.handle.all_gather(input), || {
            self.op(&format!("all_gather of {:?}", input.size()))
        })
    }

    /// Overwrites `tensor` on every rank with rank `root`'s, in place, outside autograd.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        context(self.handle.broadcast(tensor, root), || {
            self.op(&format!("broadcast from rank {root}"))
        })
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        context(self.handle.barrier(), || self.op("barrier"))
    }

    /// The sum of `input` over all ranks, as an autograd op: the backward pass all-reduces
    /// the incoming gradient, which is right when the loss being minimised is the sum of
    /// every rank's local loss (as with DDP). Every rank must run backward through it, in
    /// the same order as its other differentiable collectives.
    pub fn differentiable_all_reduce_sum(&self, input: &Tensor) -> Result<Tensor> {
        context(self.handle.differentiable_all_reduce_sum(input), || {
            self.op(&format!("differentiable_all_reduce_sum of {:?}", input.size()))
        })
    }

    /// Every rank's `input` concatenated along dim 0, as an autograd op (solo-learn's
    /// GatherLayer): the backward pass all-reduces the gradient of the whole concatenation and
    /// keeps this rank's rows. For losses over embeddings gathered from all ranks (NT-Xent
    /// negatives, VICReg statistics). Same shape on every rank; every rank runs backward.
    pub fn differentiable_all_gather(&self, input: &Tensor) -> Result<Tensor> {
        context(self.handle.differentiable_all_gather(input), || {
            self.op(&format!("differentiable_all_gather of {:?}", input.size()))
        })
    }

    fn op(&self, what: &str) -> String {
        format!(
            "{what} on rank {} of {} ({:?})",
            self.rank, self.world_size, self.backend
        )
    }
}
