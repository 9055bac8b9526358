// The CUDA caching allocator's peak statistics, as torch.cuda.max_memory_allocated() and
// torch.cuda.max_memory_reserved() read them and torch.cuda.reset_peak_memory_stats() resets
// them. tch has none of it. Compiled with nccl.cpp, when the CUDA headers are present; on a
// machine without a GPU every call fails with CUDA's own error, which the guard returns.
#include <c10/cuda/CUDACachingAllocator.h>

#include "common.hpp"

namespace {

constexpr size_t kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

} // namespace

extern "C" char* tx_cuda_memory_peaks(int device, int64_t* peak_allocated, int64_t* peak_reserved) {
  return tx::guard([&] {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *peak_allocated = stats.allocated_bytes[kAggregate].peak;
    *peak_reserved = stats.reserved_bytes[kAggregate].peak;
  });
}

extern "C" char* tx_cuda_memory_reset_peaks(int device) {
  return tx::guard([&] { c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device)); });
}
