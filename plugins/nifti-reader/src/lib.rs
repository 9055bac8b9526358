//! medssl-nifti-reader: the `nifti` dataset format, NIfTI-1 volumes (`.nii`, `.nii.gz`)
//! decoded with the `nifti` crate into normalised float32 `[D, H, W]` tensors.

pub mod nifti_reader;
