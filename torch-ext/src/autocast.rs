//! ATen's autocast on any device type, as `torch.autocast(device_type, dtype, enabled)`.
//!
//! tch's `autocast` reaches only CUDA's flag, through a deprecated call, and never the dtype,
//! so CPU mixed precision (bf16 on oneDNN) and fp16 on CUDA need these. Inside a region with
//! autocast on, the ops on ATen's lower-precision list (convolutions, matrix products,
//! linear layers) cast their floating-point inputs to the region's dtype and the ops on its
//! fp32 list (softmax, log-sum-exp, norms, losses) to fp32; everything else runs in the
//! kind of its inputs. The weights stay whatever they are (fp32 master weights); the cast
//! copies are cached for the outermost region and dropped when it closes.
//!
//! The state is per thread (ATen keeps it thread-local): a region applies to the thread that
//! opened it, and [`AutocastRegion`] is not `Send` so it closes there. Regions nest and must
//! close in reverse order, which Rust's drop order gives scoped guards.

use std::marker::PhantomData;

use tch::{Device, Kind};

use crate::error::{context, Result};
use crate::ffi;

/// The device types ATen keeps an autocast state for that medssl uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutocastDevice {
    Cpu,
    Cuda,
}

impl AutocastDevice {
    /// The autocast state that ops on `device` consult; `None` for devices medssl does not
    /// run mixed precision on (MPS, Vulkan).
    pub fn of(device: Device) -> Option<Self> {
        match device {
            Device::Cpu => Some(AutocastDevice::Cpu),
            Device::Cuda(_) => Some(AutocastDevice::Cuda),
            _ => None,
        }
    }

    fn code(self) -> i32 {
        match self {
            AutocastDevice::Cpu => 0,
            AutocastDevice::Cuda => 1,
        }
    }
}

/// c10::ScalarType's numbering, which the shim checks at compile time.
fn kind_code(kind: Kind) -> Option<i32> {
    match kind {
        Kind::Half => Some(5),
        Kind::Float => Some(6),
        Kind::BFloat16 => Some(15),
        _ => None,
    }
}

fn kind_from_code(code: i32) -> Option<Kind> {
    match code {
        5 => Some(Kind::Half),
        6 => Some(Kind::Float),
        15 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Whether autocast is on for `device` on this thread.
pub fn autocast_enabled(device: AutocastDevice) -> Result<bool> {
    context(ffi::autocast_is_enabled(device.code()), || {
        format!("autocast state of {device:?}")
    })
}

/// The dtype autocast casts to on `device` on this thread (ATen's defaults: bf16 on the CPU,
/// fp16 on CUDA), whether or not autocast is on.
pub fn autocast_dtype(device: AutocastDevice) -> Result<Kind> {
    let code = context(ffi::autocast_dtype(device.code()), || {
        format!("autocast dtype of {device:?}")
    })?;
    kind_from_code(code).ok_or_else(|| crate::Error::Torch {
        op: format!("autocast dtype of {device:?}"),
        message: format!("ScalarType {code} is not Half, Float or BFloat16"),
    })
}

/// An open autocast region on this thread; closing it (drop) restores the state it found.
#[must_use = "the region closes when this is dropped"]
#[derive(Debug)]
pub struct AutocastRegion {
    device: AutocastDevice,
    previous: ffi::AutocastState,
    // ATen's state is thread-local: the region must close on the thread that opened it.
    _same_thread: PhantomData<*const ()>,
}

impl AutocastRegion {
    /// Opens a region in which ops on `device` autocast to `dtype` (`BFloat16` or `Half`;
    /// `Float` is allowed and makes the lower-precision ops run in fp32).
    pub fn enable(device: AutocastDevice, dtype: Kind) -> Result<Self> {
        let code = kind_code(dtype).ok_or_else(|| crate::Error::Torch {
            op: format!("autocast region on {device:?}"),
            message: format!("dtype must be BFloat16, Half or Float, got {dtype:?}"),
        })?;
        Self::open(device, true, code)
    }

    /// Opens a region with autocast off on `device`, as `torch.autocast(enabled=False)`:
    /// for the numerically delicate parts inside a mixed-precision forward, which then run
    /// in the kind of their inputs.
    pub fn disable(device: AutocastDevice) -> Result<Self> {
        let current = context(ffi::autocast_dtype(device.code()), || {
            format!("autocast dtype of {device:?}")
        })?;
        Self::open(device, false, current)
    }

    fn open(device: AutocastDevice, enabled: bool, dtype: i32) -> Result<Self> {
        let previous = context(ffi::autocast_enter(device.code(), enabled, dtype), || {
            format!("autocast region on {device:?}")
        })?;
        Ok(AutocastRegion {
            device,
            previous,
            _same_thread: PhantomData,
        })
    }
}

impl Drop for AutocastRegion {
    fn drop(&mut self) {
        // The shim rejects only a dtype outside BFloat16/Half/Float, and `previous` holds one
        // that its enter checked, so restoring cannot fail; if it ever did, the thread would
        // keep a wrong autocast state, which is worth stopping for.
        if let Err(message) = ffi::autocast_exit(self.device.code(), &self.previous) {
            panic!("closing the autocast region on {:?}: {message}", self.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for kind in [Kind::Half, Kind::Float, Kind::BFloat16] {
            assert_eq!(kind_from_code(kind_code(kind).unwrap()), Some(kind));
        }
        assert_eq!(kind_code(Kind::Double), None);
        assert_eq!(kind_from_code(4), None);
        assert_eq!(AutocastDevice::of(Device::Cuda(3)), Some(AutocastDevice::Cuda));
        assert_eq!(AutocastDevice::of(Device::Mps), None);
    }
}
