//! The crate's error: what failed, and libtorch's reason.

/// A failed store or process-group call. `Display` gives the operation (with its arguments:
/// host and port, rank, key) followed by libtorch's message without its C++ backtrace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch raised: a peer lost or timed out, a port in use, a tensor it refuses.
    #[error("{op}: {message}")]
    Torch {
        /// The operation and its arguments, e.g. `TCPStore server on 127.0.0.1:29500`.
        op: String,
        /// The C++ exception's message.
        message: String,
    },
    /// An NCCL group was asked of a build without NCCL (its build found no CUDA headers).
    #[error(
        "NCCL process group: medssl-torch-ext was built without NCCL, because its build found no \
         CUDA headers (`make setup` installs the nvidia-cuda-crt and nvidia-cuda-cccl header \
         wheels into .venv; or set MEDSSL_CUDA_INCLUDE; see torch-ext/build.rs), then rebuild"
    )]
    NcclNotBuilt,
    /// CUDA memory statistics were asked of a build without the CUDA parts (as NCCL above).
    #[error(
        "CUDA memory statistics: medssl-torch-ext was built without its CUDA parts, because its \
         build found no CUDA headers (see the NCCL error for how to get them)"
    )]
    CudaNotBuilt,
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the operation to a shim error.
pub(crate) fn context<T>(result: std::result::Result<T, String>, op: impl FnOnce() -> String) -> Result<T> {
    result.map_err(|message| Error::Torch { op: op(), message })
}
