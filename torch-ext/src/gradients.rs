//! `tensor.grad = None`, which tch lacks: an optimizer that drops its parameters' gradients
//! before each backward pass (as `torch.optim`'s `zero_grad(set_to_none=True)`, PyTorch's
//! default) lets the backward pass write them afresh instead of adding into zeroed buffers.

use tch::Tensor;

use crate::error::{context, Result};
use crate::ffi;

/// Makes `tensor`'s gradient undefined until a backward pass reaches it again.
pub fn clear_grad(tensor: &Tensor) -> Result<()> {
    let mut handle = tensor.shallow_clone();
    context(ffi::clear_grad(&mut handle), || "clearing a gradient".to_owned())
}
