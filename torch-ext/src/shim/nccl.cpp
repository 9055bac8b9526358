// NCCL process groups (CUDA tensors); build.rs compiles this wherever it finds NCCL's and the
// CUDA runtime's headers (no GPU needed; see build.rs). Collectives on them are the
// same Backend virtuals as for Gloo (collectives.cpp, autograd.cpp).
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "common.hpp"

extern "C" char* tx_pg_nccl_new(const tx_store* store, int rank, int world_size, int64_t timeout_ms, tx_pg** out) {
  return tx::guard([&] {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = tx::millis(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store->store, rank, world_size, opts);
    *out = new tx_pg{std::move(pg)};
  });
}
