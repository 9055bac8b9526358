// The C ABI between the C++ shim and Rust (mirrored by src/ffi.rs; keep the two in step).
//
// Conventions:
// - Every function that can fail returns NULL on success or a malloc'd, NUL-terminated error
//   message, which the caller frees with `tx_string_free`. No C++ exception crosses this ABI.
// - Tensors are tch's `C_tensor*`, i.e. heap `at::Tensor*`. Tensors passed in are borrowed;
//   tensors handed out through `at::Tensor** out` are new heap objects owned by the caller
//   (tch's `Tensor::from_ptr` takes them over and frees them with `at_free`).
// - Handles (`tx_store`, `tx_pg`) are opaque, owned by the caller, freed by their `_free`.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#include <ATen/core/Tensor.h>
typedef at::Tensor tx_tensor;
extern "C" {
#else
typedef void tx_tensor;
#endif

typedef struct tx_store tx_store;
typedef struct tx_pg tx_pg;

void tx_string_free(char* message);
void tx_bytes_free(uint8_t* bytes);

// Stores (store.cpp). Timeouts are in milliseconds. `world_size < 0` means "not given" for
// the TCPStore (a server then waits for nobody).
char* tx_tcp_store_new(
    const char* host,
    uint16_t port,
    int64_t world_size,
    int is_server,
    int wait_workers,
    int64_t timeout_ms,
    tx_store** out,
    uint16_t* bound_port);
char* tx_file_store_new(const char* path, int64_t world_size, int64_t timeout_ms, tx_store** out);
char* tx_prefix_store_new(const tx_store* base, const char* prefix, tx_store** out);
void tx_store_free(tx_store* store);
char* tx_store_set(const tx_store* store, const char* key, const uint8_t* data, size_t len);
char* tx_store_get(const tx_store* store, const char* key, uint8_t** data, size_t* len);
char* tx_store_check(const tx_store* store, const char* key, int* found);

// Process groups. `device_kind`: 0 = as torch.distributed picks (GLOO_SOCKET_IFNAME, else
// this host's name, else loopback), 1 = the address `device_name` resolves to, 2 = the
// network interface `device_name`.
char* tx_pg_gloo_new(
    const tx_store* store,
    int rank,
    int world_size,
    int64_t timeout_ms,
    int device_kind,
    const char* device_name,
    tx_pg** out);
// Defined by nccl.cpp, which build.rs compiles only where it finds the CUDA headers.
char* tx_pg_nccl_new(const tx_store* store, int rank, int world_size, int64_t timeout_ms, tx_pg** out);
void tx_pg_free(tx_pg* pg);
int tx_pg_rank(const tx_pg* pg);
int tx_pg_world_size(const tx_pg* pg);

// Blocking collectives (collectives.cpp), outside autograd.
char* tx_all_reduce_sum(const tx_pg* pg, tx_tensor* const* tensors, size_t count);
char* tx_all_gather(const tx_pg* pg, const tx_tensor* input, tx_tensor** out);
char* tx_broadcast(const tx_pg* pg, tx_tensor* tensor, int root);
char* tx_barrier(const tx_pg* pg);

// Differentiable collectives (autograd.cpp).
char* tx_differentiable_all_reduce_sum(const tx_pg* pg, const tx_tensor* input, tx_tensor** out);
char* tx_differentiable_all_gather(const tx_pg* pg, const tx_tensor* input, tx_tensor** out);

// Autocast (autocast.cpp): ATen's thread-local mixed-precision state, per device type.
// `device_type`: 0 = CPU, 1 = CUDA (anything else is an error). Dtypes are c10::ScalarType
// values, the numbering tch's `Kind` uses: 5 = Half, 6 = Float, 15 = BFloat16; these three
// are the only ones the shim sets or reports (anything else is an error).
typedef struct tx_autocast_state {
  int enabled;
  int dtype;
  int cache_enabled;
} tx_autocast_state;
char* tx_autocast_is_enabled(int device_type, int* enabled);
char* tx_autocast_dtype(int device_type, int* dtype);
// torch.autocast's __enter__: saves the device type's enabled flag and dtype and the cast
// cache's flag in `*prev`, sets `enabled` and `dtype`, and counts one more nesting level.
char* tx_autocast_enter(int device_type, int enabled, int dtype, tx_autocast_state* prev);
// torch.autocast's __exit__: counts one nesting level less, clears the cast cache when that
// was the outermost one, and restores `*prev`.
char* tx_autocast_exit(int device_type, const tx_autocast_state* prev);

// CUDA memory (cuda_memory.cpp, built with nccl.cpp): the caching allocator's peaks, bytes.
char* tx_cuda_memory_peaks(int device, int64_t* peak_allocated, int64_t* peak_reserved);
char* tx_cuda_memory_reset_peaks(int device);

// Gradients (gradients.cpp): `tensor.grad = None`.
char* tx_clear_grad(tx_tensor* tensor);

// Determinism (determinism.cpp): ATen's process-wide reproducibility switches.
typedef struct tx_determinism {
  int cudnn_deterministic;
  int cudnn_benchmark;
  int deterministic_algorithms;
  int warn_only;
} tx_determinism;
char* tx_set_determinism(const tx_determinism* wanted);
char* tx_determinism_state(tx_determinism* out);

#ifdef __cplusplus
}
#endif
