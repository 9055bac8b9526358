// Blocking collectives on any process group, and the process-group handle itself (rank,
// world size, freeing). They run with autograd off: they are for gradients, buffers and
// bookkeeping; the differentiable versions live in autograd.cpp.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "collectives.hpp"
#include "common.hpp"

namespace tx {

void all_reduce_sum(c10d::Backend& pg, const std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) {
    return;
  }
  const at::Tensor& first = tensors.front();
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.defined(), "all_reduce_sum: undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, "all_reduce_sum: only dense tensors, got ", t.layout());
    TORCH_CHECK(
        t.scalar_type() == first.scalar_type() && t.device() == first.device(),
        "all_reduce_sum: all tensors must share one dtype and device, got ",
        first.scalar_type(), " on ", first.device(), " and ", t.scalar_type(), " on ", t.device());
  }
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  if (tensors.size() == 1 && first.is_contiguous()) {
    std::vector<at::Tensor> io{first};
    wait(pg.allreduce(io, opts));
    return;
  }
  // Several tensors, or a strided one: c10d reads a vector of tensors as one tensor per
  // device, not as a list to reduce, so pack one flat bucket and copy the sums back.
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    flat.push_back(t.reshape({-1}));
  }
  std::vector<at::Tensor> io{at::cat(flat)};
  wait(pg.allreduce(io, opts));
  int64_t offset = 0;
  for (const at::Tensor& t : tensors) {
    const int64_t n = t.numel();
    t.copy_(io[0].narrow(0, offset, n).view(t.sizes()));
    offset += n;
  }
}

at::Tensor all_reduce_sum_copy(c10d::Backend& pg, const at::Tensor& input) {
  at::Tensor sum = input.clone(at::MemoryFormat::Contiguous);
  all_reduce_sum(pg, {sum});
  return sum;
}

at::Tensor all_gather_cat(c10d::Backend& pg, const at::Tensor& input) {
  TORCH_CHECK(input.defined(), "all_gather: undefined tensor");
  TORCH_CHECK(input.dim() >= 1, "all_gather: needs at least one dimension to concatenate along");
  at::Tensor local = input.contiguous();
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < pg.getSize(); ++r) {
    outputs[0].push_back(at::empty_like(local, local.options(), at::MemoryFormat::Contiguous));
  }
  std::vector<at::Tensor> inputs{local};
  wait(pg.allgather(outputs, inputs));
  return at::cat(outputs[0], 0);
}

} // namespace tx

extern "C" void tx_pg_free(tx_pg* pg) {
  delete pg;
}

extern "C" int tx_pg_rank(const tx_pg* pg) {
  return pg->backend->getRank();
}

extern "C" int tx_pg_world_size(const tx_pg* pg) {
  return pg->backend->getSize();
}

extern "C" char* tx_all_reduce_sum(const tx_pg* pg, tx_tensor* const* tensors, size_t count) {
  return tx::guard([&] {
    at::NoGradGuard no_grad;
    // Shallow copies: each shares its TensorImpl with the caller's tensor, so sums land there.
    std::vector<at::Tensor> shared;
    shared.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      shared.push_back(*tensors[i]);
    }
    tx::all_reduce_sum(*pg->backend, shared);
  });
}

extern "C" char* tx_all_gather(const tx_pg* pg, const tx_tensor* input, tx_tensor** out) {
  return tx::guard([&] {
    at::NoGradGuard no_grad;
    *out = new at::Tensor(tx::all_gather_cat(*pg->backend, *input));
  });
}

extern "C" char* tx_broadcast(const tx_pg* pg, tx_tensor* tensor, int root) {
  return tx::guard([&] {
    at::NoGradGuard no_grad;
    at::Tensor& t = *tensor;
    TORCH_CHECK(t.defined(), "broadcast: undefined tensor");
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    std::vector<at::Tensor> io{t.contiguous()};
    tx::wait(pg->backend->broadcast(io, opts));
    if (!io[0].is_same(t)) {
      t.copy_(io[0]);
    }
  });
}

extern "C" char* tx_barrier(const tx_pg* pg) {
  return tx::guard([&] { tx::wait(pg->backend->barrier(c10d::BarrierOptions())); });
}
