//! Batch normalisation (Ioffe & Szegedy, ICML 2015, Alg. 1) as `torch.nn.BatchNorm1d/2d`,
//! and, when the run asks for it across several processes, as `torch.nn.SyncBatchNorm`:
//! the batch's mean and variance over every rank's share of the global batch.
//!
//! One process, or `run.distributed.sync_batchnorm = false`, runs libtorch's own kernel,
//! exactly as `nn::BatchNorm` did. Synced, each rank sums x over its share
//! (everything but the channel axis), one differentiable all-reduce adds the sums and the
//! counts of all ranks into the global mean, a second adds the squares about it into the
//! global biased variance that normalises; the running variance takes the unbiased one, as
//! PyTorch's. Each all-reduce's backward all-reduces the statistics' gradients, so the
//! gradient is that of batch norm over the global batch. Where medssl differs: PyTorch's
//! SyncBatchNorm gathers per-rank means and variances and merges them (Welford); medssl's
//! two all-reduces give the same two-pass statistics with plain sums.

use crate::distributed;
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// `torch.nn.BatchNorm{1,2}d`'s momentum.
const MOMENTUM: f64 = 0.1;
/// `torch.nn.BatchNorm{1,2}d`'s eps.
const EPS: f64 = 1e-5;

/// Batch norm that syncs its statistics across ranks when [`distributed::sync_batchnorm`]
/// says so. Built by [`crate::layers::batch_norm1d`] and friends.
#[derive(Debug)]
pub struct BatchNorm {
    inner: nn::BatchNorm,
}

impl BatchNorm {
    /// Wraps a batch norm built with momentum 0.1 and eps 1e-5 (what `layers` builds).
    pub(crate) fn new(inner: nn::BatchNorm) -> BatchNorm {
        BatchNorm { inner }
    }

    /// The learned scale (γ), as `weight` in PyTorch.
    pub fn scale(&self) -> Option<&Tensor> {
        self.inner.ws.as_ref()
    }

    /// The learned shift (β), as `bias` in PyTorch.
    pub fn shift(&self) -> Option<&Tensor> {
        self.inner.bs.as_ref()
    }

    /// Training-mode batch norm over the global batch.
    fn synced(&self, xs: &Tensor) -> Tensor {
        match self.try_synced(xs) {
            Ok(ys) => ys,
            Err(e) => {
                // A module cannot return an error: the training loop takes it after the
                // forward pass; NaN keeps anything from training on this batch meanwhile.
                distributed::defer_failure(e.context("batch norm's statistics over the ranks"));
                xs.full_like(f64::NAN)
            }
        }
    }

    fn try_synced(&self, xs: &Tensor) -> anyhow::Result<Tensor> {
        let comm = distributed::communicator();
        let channels = xs.size()[1];
        let dims: Vec<i64> = (0..xs.dim() as i64).filter(|&d| d != 1).collect();
        let mut shape = vec![1i64; xs.dim()];
        shape[1] = channels;
        // Two passes, as the variance of one process: the global mean first, then the
        // global sum of squares about it (E[x²] - E[x]² loses digits in fp32 where
        // |mean| ≫ std, and did: 0.3% in a gradient).
        let count = Tensor::full([1], (xs.numel() as i64 / channels) as f64, (xs.kind(), xs.device()));
        let sums = comm.all_reduce_sum_with_grad(&Tensor::cat(
            &[xs.sum_dim_intlist(dims.as_slice(), false, None), count],
            0,
        ))?;
        let n = sums.narrow(0, channels, 1);
        let mean = sums.narrow(0, 0, channels) / &n;
        let centered = xs - mean.view(shape.as_slice());
        let squares =
            comm.all_reduce_sum_with_grad(&(&centered * &centered).sum_dim_intlist(dims.as_slice(), false, None))?;
        let var = squares / &n;
        let mut ys = centered * (&var + EPS).rsqrt().view(shape.as_slice());
        if let Some(w) = &self.inner.ws {
            ys *= w.view(shape.as_slice());
        }
        if let Some(b) = &self.inner.bs {
            ys += b.view(shape.as_slice());
        }
        tch::no_grad(|| {
            let n = n.detach();
            let unbiased = var.detach() * &n / (&n - 1.0).clamp_min(1.0);
            let (mut rm, mut rv) = (
                self.inner.running_mean.shallow_clone(),
                self.inner.running_var.shallow_clone(),
            );
            rm.copy_(&(&rm * (1.0 - MOMENTUM) + mean.detach().to_kind(rm.kind()) * MOMENTUM));
            rv.copy_(&(&rv * (1.0 - MOMENTUM) + unbiased.to_kind(rv.kind()) * MOMENTUM));
        });
        Ok(ys)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train && distributed::sync_batchnorm() {
            self.synced(xs)
        } else {
            self.inner.forward_t(xs, train)
        }
    }
}
