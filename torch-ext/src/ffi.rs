//! The only module with `unsafe`: declarations of the shim's C ABI (src/shim/torch_ext.h,
//! keep the two in step) and safe wrappers that own its handles and error strings.
//!
//! Invariants the wrappers uphold for every call:
//! - handles are non-null, owned by exactly one wrapper, freed once in `Drop`;
//! - strings passed in are NUL-terminated copies that outlive the call;
//! - tensor pointers come from live `tch::Tensor`s borrowed for the call; tensors handed out
//!   by the shim are fresh heap `at::Tensor`s, which `Tensor::from_ptr` takes over;
//! - an error is a malloc'd C string (or the shim's static out-of-memory message), copied
//!   into a `String` and given back to `tx_string_free`.

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr::{self, NonNull};
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

#[repr(C)]
struct TxStore {
    _opaque: [u8; 0],
}

#[repr(C)]
struct TxPg {
    _opaque: [u8; 0],
}

extern "C" {
    fn tx_string_free(message: *mut c_char);
    fn tx_bytes_free(bytes: *mut u8);

    fn tx_tcp_store_new(
        host: *const c_char,
        port: u16,
        world_size: i64,
        is_server: c_int,
        wait_workers: c_int,
        timeout_ms: i64,
        out: *mut *mut TxStore,
        bound_port: *mut u16,
    ) -> *mut c_char;
    fn tx_file_store_new(path: *const c_char, world_size: i64, timeout_ms: i64, out: *mut *mut TxStore) -> *mut c_char;
    fn tx_prefix_store_new(base: *const TxStore, prefix: *const c_char, out: *mut *mut TxStore) -> *mut c_char;
    fn tx_store_free(store: *mut TxStore);
    fn tx_store_set(store: *const TxStore, key: *const c_char, data: *const u8, len: usize) -> *mut c_char;
    fn tx_store_get(store: *const TxStore, key: *const c_char, data: *mut *mut u8, len: *mut usize) -> *mut c_char;
    fn tx_store_check(store: *const TxStore, key: *const c_char, found: *mut c_int) -> *mut c_char;

    fn tx_pg_gloo_new(
        store: *const TxStore,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        device_kind: c_int,
        device_name: *const c_char,
        out: *mut *mut TxPg,
    ) -> *mut c_char;
    #[cfg(medssl_nccl)]
    fn tx_pg_nccl_new(
        store: *const TxStore,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        out: *mut *mut TxPg,
    ) -> *mut c_char;
    fn tx_pg_free(pg: *mut TxPg);
    fn tx_pg_rank(pg: *const TxPg) -> c_int;
    fn tx_pg_world_size(pg: *const TxPg) -> c_int;

    fn tx_all_reduce_sum(pg: *const TxPg, tensors: *const *mut C_tensor, count: usize) -> *mut c_char;
    fn tx_all_gather(pg: *const TxPg, input: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn tx_broadcast(pg: *const TxPg, tensor: *mut C_tensor, root: c_int) -> *mut c_char;
    fn tx_barrier(pg: *const TxPg) -> *mut c_char;
    fn tx_differentiable_all_reduce_sum(
        pg: *const TxPg,
        input: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn tx_differentiable_all_gather(pg: *const TxPg, input: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char;

    fn tx_autocast_is_enabled(device_type: c_int, enabled: *mut c_int) -> *mut c_char;
    fn tx_autocast_dtype(device_type: c_int, dtype: *mut c_int) -> *mut c_char;
    fn tx_autocast_enter(device_type: c_int, enabled: c_int, dtype: c_int, prev: *mut AutocastState) -> *mut c_char;
    fn tx_autocast_exit(device_type: c_int, prev: *const AutocastState) -> *mut c_char;

    #[cfg(medssl_nccl)]
    fn tx_cuda_memory_peaks(device: c_int, peak_allocated: *mut i64, peak_reserved: *mut i64) -> *mut c_char;
    #[cfg(medssl_nccl)]
    fn tx_cuda_memory_reset_peaks(device: c_int) -> *mut c_char;

    fn tx_clear_grad(tensor: *mut C_tensor) -> *mut c_char;

    fn tx_set_determinism(wanted: *const Determinism) -> *mut c_char;
    fn tx_determinism_state(out: *mut Determinism) -> *mut c_char;
}

/// `tx_determinism`: ATen's reproducibility switches, each 0 or 1.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Determinism {
    pub(crate) cudnn_deterministic: c_int,
    pub(crate) cudnn_benchmark: c_int,
    pub(crate) deterministic_algorithms: c_int,
    pub(crate) warn_only: c_int,
}

/// The CUDA caching allocator's (peak allocated, peak reserved) bytes on `device`.
#[cfg(medssl_nccl)]
pub(crate) fn cuda_memory_peaks(device: c_int) -> CallResult<(i64, i64)> {
    let (mut allocated, mut reserved) = (0, 0);
    // SAFETY: plain values in and out.
    check(unsafe { tx_cuda_memory_peaks(device, &mut allocated, &mut reserved) })?;
    Ok((allocated, reserved))
}

#[cfg(medssl_nccl)]
pub(crate) fn cuda_memory_reset_peaks(device: c_int) -> CallResult<()> {
    // SAFETY: a plain value in.
    check(unsafe { tx_cuda_memory_reset_peaks(device) })
}

/// Drops `tensor`'s gradient (it becomes undefined).
pub(crate) fn clear_grad(tensor: &mut Tensor) -> CallResult<()> {
    // SAFETY: a live tensor borrowed mutably for the call.
    check(unsafe { tx_clear_grad(tensor.as_mut_ptr()) })
}

pub(crate) fn set_determinism(wanted: &Determinism) -> CallResult<()> {
    // SAFETY: a plain struct read by the shim during the call.
    check(unsafe { tx_set_determinism(wanted) })
}

pub(crate) fn determinism_state() -> CallResult<Determinism> {
    let mut out = Determinism::default();
    // SAFETY: a plain struct written by the shim.
    check(unsafe { tx_determinism_state(&mut out) })?;
    Ok(out)
}

/// `tx_autocast_state`: what an autocast region replaced, restored when it ends.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AutocastState {
    enabled: c_int,
    dtype: c_int,
    cache_enabled: c_int,
}

/// Whether autocast is on for a device type (0 = CPU, 1 = CUDA) on this thread.
pub(crate) fn autocast_is_enabled(device_type: c_int) -> CallResult<bool> {
    let mut enabled = 0;
    // SAFETY: plain values in and out.
    check(unsafe { tx_autocast_is_enabled(device_type, &mut enabled) })?;
    Ok(enabled != 0)
}

/// The dtype autocast casts to for a device type on this thread (a c10::ScalarType code).
pub(crate) fn autocast_dtype(device_type: c_int) -> CallResult<c_int> {
    let mut dtype = 0;
    // SAFETY: plain values in and out.
    check(unsafe { tx_autocast_dtype(device_type, &mut dtype) })?;
    Ok(dtype)
}

/// Opens an autocast region on this thread; the returned state must go to
/// [`autocast_exit`] on the same thread, regions closing in the reverse order of opening.
pub(crate) fn autocast_enter(device_type: c_int, enabled: bool, dtype: c_int) -> CallResult<AutocastState> {
    let mut prev = AutocastState::default();
    // SAFETY: plain values in, `prev` written by the shim.
    check(unsafe { tx_autocast_enter(device_type, c_int::from(enabled), dtype, &mut prev) })?;
    Ok(prev)
}

pub(crate) fn autocast_exit(device_type: c_int, prev: &AutocastState) -> CallResult<()> {
    // SAFETY: `prev` came from `autocast_enter`.
    check(unsafe { tx_autocast_exit(device_type, prev) })
}

/// What a shim call reports: the C++ exception's message.
pub(crate) type CallResult<T> = Result<T, String>;

/// Takes over an error string from the shim (NULL: success).
fn check(error: *mut c_char) -> CallResult<()> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: non-null errors are NUL-terminated strings from the shim, alive until freed here.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    // SAFETY: freed once, by the shim's own deallocator.
    unsafe { tx_string_free(error) };
    Err(message)
}

fn c_string(what: &str, text: &str) -> CallResult<CString> {
    CString::new(text).map_err(|_| format!("{what} contains a NUL byte: {text:?}"))
}

/// Milliseconds for the shim; at least 1 (c10d reads 0 as "no timeout" in places).
fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn rank_arg(value: usize, what: &str) -> CallResult<c_int> {
    c_int::try_from(value).map_err(|_| format!("{what} {value} does not fit a C int"))
}

/// An owned c10d store (`c10::intrusive_ptr<c10d::Store>`).
pub(crate) struct StoreHandle(NonNull<TxStore>);

// SAFETY: c10d stores are used from many threads inside libtorch (Gloo's worker threads share
// one); TCPStore, FileStore and PrefixStore lock around every operation.
unsafe impl Send for StoreHandle {}
// SAFETY: as above; every method takes the store by const pointer and locks inside.
unsafe impl Sync for StoreHandle {}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        // SAFETY: owned, non-null, freed once.
        unsafe { tx_store_free(self.0.as_ptr()) }
    }
}

/// A TCPStore; also returns the port it bound or connected to (the bound one when 0 was asked).
pub(crate) fn tcp_store(
    host: &str,
    port: u16,
    world_size: Option<usize>,
    is_server: bool,
    wait_workers: bool,
    timeout: Duration,
) -> CallResult<(StoreHandle, u16)> {
    let host = c_string("host", host)?;
    let world = match world_size {
        Some(n) => i64::try_from(n).map_err(|_| format!("world size {n} too large"))?,
        None => -1,
    };
    let mut out = ptr::null_mut();
    let mut bound = 0u16;
    // SAFETY: see the module invariants; `out` and `bound` are written before a NULL return.
    check(unsafe {
        tx_tcp_store_new(
            host.as_ptr(),
            port,
            world,
            c_int::from(is_server),
            c_int::from(wait_workers),
            millis(timeout),
            &mut out,
            &mut bound,
        )
    })?;
    Ok((owned_store(out)?, bound))
}

pub(crate) fn file_store(path: &str, world_size: usize, timeout: Duration) -> CallResult<StoreHandle> {
    let path = c_string("path", path)?;
    let world = i64::try_from(world_size).map_err(|_| format!("world size {world_size} too large"))?;
    let mut out = ptr::null_mut();
    // SAFETY: see the module invariants.
    check(unsafe { tx_file_store_new(path.as_ptr(), world, millis(timeout), &mut out) })?;
    owned_store(out)
}

fn owned_store(raw: *mut TxStore) -> CallResult<StoreHandle> {
    NonNull::new(raw)
        .map(StoreHandle)
        .ok_or_else(|| "shim returned no store".to_owned())
}

impl StoreHandle {
    pub(crate) fn prefixed(&self, prefix: &str) -> CallResult<StoreHandle> {
        let prefix = c_string("prefix", prefix)?;
        let mut out = ptr::null_mut();
        // SAFETY: see the module invariants; the new store holds its own reference to `self`'s.
        check(unsafe { tx_prefix_store_new(self.0.as_ptr(), prefix.as_ptr(), &mut out) })?;
        owned_store(out)
    }

    pub(crate) fn set(&self, key: &str, value: &[u8]) -> CallResult<()> {
        let key = c_string("key", key)?;
        // SAFETY: see the module invariants; `value` is read for `value.len()` bytes.
        check(unsafe { tx_store_set(self.0.as_ptr(), key.as_ptr(), value.as_ptr(), value.len()) })
    }

    pub(crate) fn check(&self, key: &str) -> CallResult<bool> {
        let key = c_string("key", key)?;
        let mut found: c_int = 0;
        // SAFETY: see the module invariants; `found` is written on success.
        check(unsafe { tx_store_check(self.0.as_ptr(), key.as_ptr(), &mut found) })?;
        Ok(found != 0)
    }

    pub(crate) fn get(&self, key: &str) -> CallResult<Vec<u8>> {
        let key = c_string("key", key)?;
        let mut data = ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: see the module invariants; on success `data` is a malloc'd buffer of `len`
        // bytes (never NULL), ours to free.
        check(unsafe { tx_store_get(self.0.as_ptr(), key.as_ptr(), &mut data, &mut len) })?;
        // SAFETY: as above.
        let value = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        // SAFETY: freed once, by the shim's deallocator.
        unsafe { tx_bytes_free(data) };
        Ok(value)
    }
}

/// How a Gloo process group picks its network device (see `GlooDevice`).
pub(crate) enum GlooDeviceArg<'a> {
    Default,
    Hostname(&'a str),
    Interface(&'a str),
}

/// An owned c10d backend (`c10::intrusive_ptr<c10d::Backend>`).
pub(crate) struct PgHandle(NonNull<TxPg>);

// SAFETY: a c10d backend may be used from any one thread at a time (its collectives are
// queued to its own worker threads); `PgHandle` is not Sync, so calls never overlap.
unsafe impl Send for PgHandle {}

impl Drop for PgHandle {
    fn drop(&mut self) {
        // SAFETY: owned, non-null, freed once. Autograd graphs holding the group keep their
        // own reference, so this does not pull it from under a pending backward.
        unsafe { tx_pg_free(self.0.as_ptr()) }
    }
}

fn owned_pg(raw: *mut TxPg) -> CallResult<PgHandle> {
    NonNull::new(raw)
        .map(PgHandle)
        .ok_or_else(|| "shim returned no process group".to_owned())
}

pub(crate) fn gloo(
    store: &StoreHandle,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    device: GlooDeviceArg<'_>,
) -> CallResult<PgHandle> {
    let (kind, name) = match device {
        GlooDeviceArg::Default => (0, ""),
        GlooDeviceArg::Hostname(host) => (1, host),
        GlooDeviceArg::Interface(iface) => (2, iface),
    };
    let name = c_string("device name", name)?;
    let mut out = ptr::null_mut();
    // SAFETY: see the module invariants.
    check(unsafe {
        tx_pg_gloo_new(
            store.0.as_ptr(),
            rank_arg(rank, "rank")?,
            rank_arg(world_size, "world size")?,
            millis(timeout),
            kind,
            name.as_ptr(),
            &mut out,
        )
    })?;
    owned_pg(out)
}

#[cfg(medssl_nccl)]
pub(crate) fn nccl(store: &StoreHandle, rank: usize, world_size: usize, timeout: Duration) -> CallResult<PgHandle> {
    let mut out = ptr::null_mut();
    // SAFETY: see the module invariants.
    check(unsafe {
        tx_pg_nccl_new(
            store.0.as_ptr(),
            rank_arg(rank, "rank")?,
            rank_arg(world_size, "world size")?,
            millis(timeout),
            &mut out,
        )
    })?;
    owned_pg(out)
}

/// Takes over a tensor the shim created after a successful call.
fn owned_tensor(raw: *mut C_tensor) -> CallResult<Tensor> {
    if raw.is_null() {
        return Err("shim returned no tensor".to_owned());
    }
    // SAFETY: a fresh heap at::Tensor owned by nobody else; tch frees it on drop.
    Ok(unsafe { Tensor::from_ptr(raw) })
}

impl PgHandle {
    pub(crate) fn rank(&self) -> usize {
        // SAFETY: live handle; the call cannot fail.
        let rank = unsafe { tx_pg_rank(self.0.as_ptr()) };
        usize::try_from(rank).expect("c10d rank is non-negative")
    }

    pub(crate) fn world_size(&self) -> usize {
        // SAFETY: live handle; the call cannot fail.
        let size = unsafe { tx_pg_world_size(self.0.as_ptr()) };
        usize::try_from(size).expect("c10d world size is positive")
    }

    pub(crate) fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> CallResult<()> {
        let pointers: Vec<*mut C_tensor> = tensors.iter_mut().map(Tensor::as_mut_ptr).collect();
        // SAFETY: see the module invariants; the tensors are borrowed mutably for the call.
        check(unsafe { tx_all_reduce_sum(self.0.as_ptr(), pointers.as_ptr(), pointers.len()) })
    }

    pub(crate) fn all_gather(&self, input: &Tensor) -> CallResult<Tensor> {
        let mut out = ptr::null_mut();
        // SAFETY: see the module invariants.
        check(unsafe { tx_all_gather(self.0.as_ptr(), input.as_ptr(), &mut out) })?;
        owned_tensor(out)
    }

    pub(crate) fn broadcast(&self, tensor: &mut Tensor, root: usize) -> CallResult<()> {
        let root = rank_arg(root, "root")?;
        // SAFETY: see the module invariants; the tensor is borrowed mutably for the call.
        check(unsafe { tx_broadcast(self.0.as_ptr(), tensor.as_mut_ptr(), root) })
    }

    pub(crate) fn barrier(&self) -> CallResult<()> {
        // SAFETY: live handle.
        check(unsafe { tx_barrier(self.0.as_ptr()) })
    }

    pub(crate) fn differentiable_all_reduce_sum(&self, input: &Tensor) -> CallResult<Tensor> {
        let mut out = ptr::null_mut();
        // SAFETY: see the module invariants.
        check(unsafe { tx_differentiable_all_reduce_sum(self.0.as_ptr(), input.as_ptr(), &mut out) })?;
        owned_tensor(out)
    }

    pub(crate) fn differentiable_all_gather(&self, input: &Tensor) -> CallResult<Tensor> {
        let mut out = ptr::null_mut();
        // SAFETY: see the module invariants.
        check(unsafe { tx_differentiable_all_gather(self.0.as_ptr(), input.as_ptr(), &mut out) })?;
        owned_tensor(out)
    }
}
