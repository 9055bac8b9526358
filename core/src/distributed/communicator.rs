//! What training asks of the other processes: a small set of collectives, the same on one
//! process (where each is the identity) and on many (PyTorch's c10d, [`super::c10d`]).

use anyhow::Result;
use tch::Tensor;

/// The collectives of data-parallel training. Every rank calls the same ones in the same
/// order with tensors of the same shapes.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces each tensor with its sum over ranks, in place, outside autograd (gradient
    /// buckets, Sinkhorn and k-means sums). One dtype and device for all of them.
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()>;
    /// Every rank's `input` concatenated along dim 0 in rank order, outside autograd.
    fn all_gather(&self, input: &Tensor) -> Result<Tensor>;
    /// Overwrites `tensor` with rank `root`'s, in place.
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// The sum over ranks as an autograd op whose backward all-reduces the gradient
    /// (SyncBatchNorm's statistics).
    fn all_reduce_sum_with_grad(&self, input: &Tensor) -> Result<Tensor>;
    /// Every rank's `input` concatenated along dim 0 as an autograd op whose backward
    /// all-reduces the gradient and keeps this rank's rows (solo-learn's `GatherLayer`):
    /// contrastive negatives and VICReg's statistics over the global batch.
    fn all_gather_with_grad(&self, input: &Tensor) -> Result<Tensor>;
    /// After a step failed: which ranks are gone, as far as this rank can tell (empty when
    /// none is, or when it cannot tell).
    fn diagnose_failure(&self) -> String {
        String::new()
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _tensors: &mut [Tensor]) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        Ok(input.shallow_clone())
    }

    fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum_with_grad(&self, input: &Tensor) -> Result<Tensor> {
        Ok(input.shallow_clone())
    }

    fn all_gather_with_grad(&self, input: &Tensor) -> Result<Tensor> {
        Ok(input.shallow_clone())
    }
}
