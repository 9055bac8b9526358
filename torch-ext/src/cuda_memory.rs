//! Peak GPU memory of the CUDA caching allocator, as `torch.cuda.max_memory_allocated()`,
//! `torch.cuda.max_memory_reserved()` and `torch.cuda.reset_peak_memory_stats()`: for
//! benchmarks that report peak GPU memory. Built with the NCCL parts (it needs the same CUDA
//! headers); without them every call is [`crate::Error::CudaNotBuilt`].

use crate::error::Result;

/// Peaks since the process started or since [`reset_cuda_memory_peaks`], in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemoryPeaks {
    /// Bytes held by tensors at the peak.
    pub allocated: i64,
    /// Bytes the caching allocator had taken from the driver at its peak (what nvidia-smi
    /// shows, less the CUDA context).
    pub reserved: i64,
}

/// The peaks on CUDA device `index`; an error on a machine without that device.
pub fn cuda_memory_peaks(index: usize) -> Result<CudaMemoryPeaks> {
    #[cfg(medssl_nccl)]
    {
        let device = i32::try_from(index).unwrap_or(i32::MAX);
        let (allocated, reserved) = crate::error::context(crate::ffi::cuda_memory_peaks(device), || {
            format!("CUDA memory statistics of cuda:{index}")
        })?;
        Ok(CudaMemoryPeaks { allocated, reserved })
    }
    #[cfg(not(medssl_nccl))]
    {
        let _ = index;
        Err(crate::Error::CudaNotBuilt)
    }
}

/// Starts the peaks afresh from the current usage on CUDA device `index`.
pub fn reset_cuda_memory_peaks(index: usize) -> Result<()> {
    #[cfg(medssl_nccl)]
    {
        let device = i32::try_from(index).unwrap_or(i32::MAX);
        crate::error::context(crate::ffi::cuda_memory_reset_peaks(device), || {
            format!("resetting the CUDA memory statistics of cuda:{index}")
        })
    }
    #[cfg(not(medssl_nccl))]
    {
        let _ = index;
        Err(crate::Error::CudaNotBuilt)
    }
}
