// c10d key-value stores: TCPStore, FileStore, and PrefixStore over either. They carry the
// rendezvous of every process group and the few values ranks compare (config hashes, which
// rank was lost).
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "common.hpp"

extern "C" char* tx_tcp_store_new(
    const char* host,
    uint16_t port,
    int64_t world_size,
    int is_server,
    int wait_workers,
    int64_t timeout_ms,
    tx_store** out,
    uint16_t* bound_port) {
  return tx::guard([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    if (world_size >= 0) {
      opts.numWorkers = static_cast<std::size_t>(world_size);
    }
    opts.waitWorkers = wait_workers != 0;
    opts.timeout = tx::millis(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(host, opts);
    *bound_port = store->getPort();
    *out = new tx_store{std::move(store)};
  });
}

extern "C" char* tx_file_store_new(const char* path, int64_t world_size, int64_t timeout_ms, tx_store** out) {
  return tx::guard([&] {
    auto store = c10::make_intrusive<c10d::FileStore>(path, static_cast<int>(world_size));
    store->setTimeout(tx::millis(timeout_ms));
    *out = new tx_store{std::move(store)};
  });
}

extern "C" char* tx_prefix_store_new(const tx_store* base, const char* prefix, tx_store** out) {
  return tx::guard([&] {
    auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, base->store);
    *out = new tx_store{std::move(store)};
  });
}

extern "C" void tx_store_free(tx_store* store) {
  delete store;
}

extern "C" char* tx_store_set(const tx_store* store, const char* key, const uint8_t* data, size_t len) {
  return tx::guard([&] { store->store->set(key, std::vector<uint8_t>(data, data + len)); });
}

extern "C" char* tx_store_check(const tx_store* store, const char* key, int* found) {
  // `check` answers at once, where `get` would wait for the key until the store's timeout.
  return tx::guard([&] { *found = store->store->check({std::string(key)}) ? 1 : 0; });
}

extern "C" char* tx_store_get(const tx_store* store, const char* key, uint8_t** data, size_t* len) {
  return tx::guard([&] {
    // Blocks until the key is set or the store's timeout passes (then throws).
    std::vector<uint8_t> value = store->store->get(key);
    // malloc(0) may return NULL; always ask for at least one byte so NULL means failure.
    auto* copy = static_cast<uint8_t*>(std::malloc(value.size() + 1));
    if (copy == nullptr) {
      throw std::bad_alloc();
    }
    if (!value.empty()) {
      std::memcpy(copy, value.data(), value.size());
    }
    *data = copy;
    *len = value.size();
  });
}
