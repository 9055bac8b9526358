// ATen's autocast state: whether ops on a device type run in a lower precision, and which.
// tch only reaches CUDA's flag (through the deprecated at::autocast::set_enabled); CPU
// autocast and the dtype need the per-device-type calls below.
//
// All of it is thread-local in ATen (the flags are dispatch keys in the thread's local
// dispatch key set, the dtypes and the nesting count are thread_local), so it applies to the
// calling thread only. Setting CUDA's flag or dtype touches no GPU and works without one.
#include <ATen/autocast_mode.h>

#include "common.hpp"

namespace {

// The C ABI's numbering is tch's Kind numbering, which is c10::ScalarType's.
static_assert(static_cast<int>(at::kHalf) == 5, "c10::ScalarType numbering changed");
static_assert(static_cast<int>(at::kFloat) == 6, "c10::ScalarType numbering changed");
static_assert(static_cast<int>(at::kBFloat16) == 15, "c10::ScalarType numbering changed");

at::DeviceType device_type(int code) {
  switch (code) {
    case 0:
      return at::kCPU;
    case 1:
      return at::kCUDA;
    default:
      TORCH_CHECK(false, "autocast: unknown device type code ", code, " (0 = CPU, 1 = CUDA)");
  }
}

// The dtypes autocast is set to here. ATen itself takes any ScalarType and would cast the
// lower-precision ops' inputs to it (an integer type included), so the shim checks.
bool settable(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat;
}

at::ScalarType dtype_from(int code) {
  TORCH_CHECK(
      code >= 0 && code < static_cast<int>(at::ScalarType::NumOptions) &&
          settable(static_cast<at::ScalarType>(code)),
      "autocast: dtype must be BFloat16, Half or Float, got ScalarType ", code);
  return static_cast<at::ScalarType>(code);
}

} // namespace

extern "C" char* tx_autocast_is_enabled(int device, int* enabled) {
  return tx::guard([&] { *enabled = at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0; });
}

extern "C" char* tx_autocast_dtype(int device, int* dtype) {
  return tx::guard([&] {
    const at::DeviceType type = device_type(device);
    const at::ScalarType current = at::autocast::get_autocast_dtype(type);
    // Only C++ outside this crate could have set another (PyTorch's Python API, in-process).
    TORCH_CHECK(settable(current), "autocast dtype for ", type, " is ", current, ", not BFloat16, Half or Float");
    *dtype = static_cast<int>(current);
  });
}

// Everything is checked before anything is set, so a failed enter leaves the state as it was.
extern "C" char* tx_autocast_enter(int device, int enabled, int dtype, tx_autocast_state* prev) {
  return tx::guard([&] {
    const at::DeviceType type = device_type(device);
    const at::ScalarType fast = dtype_from(dtype);
    const at::ScalarType prev_dtype = at::autocast::get_autocast_dtype(type);
    TORCH_CHECK(settable(prev_dtype), "autocast dtype for ", type, " is ", prev_dtype, ", not BFloat16, Half or Float");
    prev->cache_enabled = at::autocast::is_autocast_cache_enabled() ? 1 : 0;
    prev->enabled = at::autocast::is_autocast_enabled(type) ? 1 : 0;
    prev->dtype = static_cast<int>(prev_dtype);
    // torch.autocast's order; the cache flag is left as it is (its `cache_enabled=None`), so
    // it is not set here, only restored on exit as torch.autocast does.
    at::autocast::set_autocast_enabled(type, enabled != 0);
    at::autocast::set_autocast_dtype(type, fast);
    at::autocast::increment_nesting();
  });
}

extern "C" char* tx_autocast_exit(int device, const tx_autocast_state* prev) {
  return tx::guard([&] {
    const at::DeviceType type = device_type(device);
    const at::ScalarType prev_dtype = dtype_from(prev->dtype);
    // The cache holds lower-precision copies of leaf tensors that require grad (weights), cast
    // once per outermost region; leaving that region drops them, so a later region sees the
    // weights' new values after an optimizer step.
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, prev->enabled != 0);
    at::autocast::set_autocast_dtype(type, prev_dtype);
    at::autocast::set_autocast_cache_enabled(prev->cache_enabled != 0);
  });
}
