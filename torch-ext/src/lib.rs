//! medssl's glue over the libtorch calls that tch does not expose, starting with
//! torch.distributed's c10d: stores ([`Store`]), process groups ([`ProcessGroup`]: Gloo on
//! CPU, NCCL on CUDA: see build.rs) and their collectives on tch tensors, including
//! two that autograd differentiates through; and ATen's autocast on the CPU as well as CUDA
//! ([`AutocastRegion`]), for mixed precision; and ATen's reproducibility switches
//! ([`set_determinism`]).
//!
//! The C++ lives in src/shim (compiled by build.rs against the libtorch torch-sys found);
//! `ffi` (src/ffi.rs) is the one module that calls it, and the only `unsafe` code in the workspace.
//! Every C++ exception is caught in the shim and surfaces here as an [`Error`].

#[allow(unsafe_code)]
mod ffi;

mod autocast;
mod cuda_memory;
mod determinism;
mod error;
mod gradients;
mod process_group;
mod store;

pub use autocast::{autocast_dtype, autocast_enabled, AutocastDevice, AutocastRegion};
pub use cuda_memory::{cuda_memory_peaks, reset_cuda_memory_peaks, CudaMemoryPeaks};
pub use determinism::{determinism, set_determinism, Determinism};
pub use error::{Error, Result};
pub use gradients::clear_grad;
pub use process_group::{Backend, GlooDevice, ProcessGroup};
pub use store::{torchelastic_agent_store, Store, TcpStoreOptions, DEFAULT_STORE_TIMEOUT};
