// The collectives as C++ functions, shared by the C ABI (collectives.cpp) and the
// differentiable ops (autograd.cpp). Each blocks until the collective has finished (on CUDA:
// until it is ordered before later work on the current stream) and throws on failure.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <vector>

namespace tx {

// Sums `tensors` (one dtype, one device) across ranks, in place.
void all_reduce_sum(c10d::Backend& pg, const std::vector<at::Tensor>& tensors);

// A new tensor: the sum of `input` across ranks; `input` is left alone.
at::Tensor all_reduce_sum_copy(c10d::Backend& pg, const at::Tensor& input);

// Every rank's `input` (same shape on all ranks, at least one dimension), concatenated
// along dim 0 in rank order.
at::Tensor all_gather_cat(c10d::Backend& pg, const at::Tensor& input);

} // namespace tx
