//! The data-parallel step's communication, as PyTorch's DDP does it: every variable
//! broadcast from rank 0 once at the start, and after each backward the gradients averaged
//! over ranks in buckets of about 25 MiB, in one fixed order on every rank.

use super::Communicator;
use anyhow::Result;
use tch::{Kind, Tensor};

/// Overwrites every variable with rank 0's (in the order given, which must be the same on
/// every rank: sorted by name), so that all replicas start equal whatever their own
/// initialisation or checkpoint did.
pub fn broadcast_variables(comm: &dyn Communicator, variables: &[(String, Tensor)]) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    tch::no_grad(|| {
        for (_, variable) in variables {
            let mut target = variable.shallow_clone();
            comm.broadcast(&mut target, 0)?;
        }
        Ok(())
    })
}

/// Replaces each parameter's gradient with its mean over ranks. Parameters without a
/// gradient (frozen, or not reached by this step's backward on any rank: the same on every
/// rank, as every rank runs the same graph) are left out. Gradients of one dtype are packed
/// into flat buckets of at most `bucket_bytes` (one larger gradient is a bucket of its own)
/// and each bucket is one all-reduce. Returns the number of buckets.
pub fn average_gradients(
    comm: &dyn Communicator,
    parameters: &[(String, Tensor)],
    bucket_bytes: usize,
) -> Result<usize> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(0);
    }
    let grads: Vec<Tensor> = parameters
        .iter()
        .map(|(_, p)| p.grad())
        .filter(|g| g.defined())
        .collect();
    let mut buckets = 0;
    let mut start = 0;
    while start < grads.len() {
        let kind = grads[start].kind();
        let mut end = start;
        let mut bytes = 0;
        while end < grads.len()
            && grads[end].kind() == kind
            && (end == start || bytes + grads[end].numel() * kind.elt_size_in_bytes() <= bucket_bytes)
        {
            bytes += grads[end].numel() * kind.elt_size_in_bytes();
            end += 1;
        }
        reduce_bucket(comm, &grads[start..end], kind, world)?;
        buckets += 1;
        start = end;
    }
    Ok(buckets)
}

fn reduce_bucket(comm: &dyn Communicator, grads: &[Tensor], kind: Kind, world: usize) -> Result<()> {
    tch::no_grad(|| {
        let flat = Tensor::cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
        let mut buffer = [flat];
        comm.all_reduce_sum(&mut buffer)?;
        let mean = &buffer[0] / world as f64;
        let mut offset = 0;
        for g in grads {
            let n = g.numel() as i64;
            let mut target = g.shallow_clone();
            target.copy_(&mean.narrow(0, offset, n).view(g.size().as_slice()).to_kind(kind));
            offset += n;
        }
        Ok(())
    })
}
