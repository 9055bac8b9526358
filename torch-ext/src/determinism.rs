//! ATen's process-wide reproducibility switches, as PyTorch's Python API sets them:
//! `torch.backends.cudnn.deterministic`, `torch.backends.cudnn.benchmark` and
//! `torch.use_deterministic_algorithms(mode, warn_only=...)`. tch exposes only the benchmark
//! flag. They are global to the process (not per thread), and setting them needs no GPU.

use crate::error::{context, Result};
use crate::ffi;

/// The switches, as [`set_determinism`] sets them and [`determinism`] reads them back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Determinism {
    /// cuDNN picks only deterministic convolution algorithms.
    pub cudnn_deterministic: bool,
    /// cuDNN times the candidate algorithms for each new shape and keeps the fastest (which
    /// may differ from run to run).
    pub cudnn_benchmark: bool,
    /// Ops with only a non-deterministic CUDA kernel (`index_add_`, scatter-add, some
    /// backward passes) raise, or warn under `warn_only`; ops with a deterministic variant
    /// use it.
    pub deterministic_algorithms: bool,
    pub warn_only: bool,
}

fn flag(b: bool) -> i32 {
    i32::from(b)
}

/// Sets all four switches for the whole process.
pub fn set_determinism(wanted: Determinism) -> Result<()> {
    let raw = ffi::Determinism {
        cudnn_deterministic: flag(wanted.cudnn_deterministic),
        cudnn_benchmark: flag(wanted.cudnn_benchmark),
        deterministic_algorithms: flag(wanted.deterministic_algorithms),
        warn_only: flag(wanted.warn_only),
    };
    context(ffi::set_determinism(&raw), || format!("setting {wanted:?}"))
}

/// The switches as ATen has them now.
pub fn determinism() -> Result<Determinism> {
    let raw = context(ffi::determinism_state(), || {
        "reading ATen's determinism switches".to_owned()
    })?;
    Ok(Determinism {
        cudnn_deterministic: raw.cudnn_deterministic != 0,
        cudnn_benchmark: raw.cudnn_benchmark != 0,
        deterministic_algorithms: raw.deterministic_algorithms != 0,
        warn_only: raw.warn_only != 0,
    })
}
