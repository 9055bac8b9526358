// Gloo process groups (CPU tensors).
//
// Built with USE_C10D_GLOO against the declaration-only headers in include/gloo (see the
// README there for why that is layout-safe): this file allocates ProcessGroupGloo and its
// Options, whose members hold gloo types only behind pointers, and otherwise calls only
// libtorch's out-of-line functions.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "common.hpp"

namespace {

enum DeviceKind : int { kDefault = 0, kHostname = 1, kInterface = 2 };

c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> gloo_options(
    std::chrono::milliseconds timeout,
    int device_kind,
    const char* device_name) {
  const bool lazy = c10d::getDefaultGlooLazyInit();
  c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> opts;
  switch (device_kind) {
    case kDefault:
      // What torch.distributed does: GLOO_SOCKET_IFNAME's interfaces, else the address this
      // host's name resolves to, else loopback.
      opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
      break;
    case kHostname:
      opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(device_name, lazy));
      break;
    case kInterface:
      opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(device_name, lazy));
      break;
    default:
      TORCH_CHECK(false, "unknown gloo device kind ", device_kind);
  }
  // Set again: every collective times out after this, and a lost peer must not hang the rest.
  opts->timeout = timeout;
  // Two worker threads per device, as create_default does.
  opts->threads = static_cast<int>(opts->devices.size()) * 2;
  return opts;
}

} // namespace

extern "C" char* tx_pg_gloo_new(
    const tx_store* store,
    int rank,
    int world_size,
    int64_t timeout_ms,
    int device_kind,
    const char* device_name,
    tx_pg** out) {
  return tx::guard([&] {
    auto opts = gloo_options(tx::millis(timeout_ms), device_kind, device_name);
    // The constructor connects the full mesh through the store (unless TORCH_GLOO_LAZY_INIT).
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store->store, rank, world_size, opts);
    // getOptions() is inline: it reads options_ where our compile of the header puts it, after
    // the gloo-pointer members. Seeing the object libtorch's constructor stored there checks
    // that its layout and ours agree.
    TORCH_CHECK(pg->getOptions().get() == opts.get(), "ProcessGroupGloo layout differs from libtorch's");
    *out = new tx_pg{std::move(pg)};
  });
}
