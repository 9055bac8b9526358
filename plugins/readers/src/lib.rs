//! medssl-readers: dataset formats for the layouts medical imaging data comes in, each
//! decoded with the field's crate into normalised float32 `[D, H, W]` tensors.
//!
//! | format | file | layout |
//! |---|---|---|
//! | `image-folder` | [`png_folder`] | 2D `.png` / `.jpg` images, `ROOT/<dataset>/NNN.png` (`image`) |
//! | `npy` | [`npy_volumes`] | `.npy` volumes H x W x C, slices last (`npyz`) |
//! | `dicom` | [`dicom_series`] | DICOM files: series as volumes, multi-frame files as volumes, single X-rays as 2D images (`dicom-object`, `dicom-pixeldata`) |
//! | `medmnist` | [`medmnist`] | MedMNIST `.npz` archives with labels (`npyz`, `zip`) |
//! | `nifti` | [`nifti_folder`] | NIfTI-1 volumes `.nii` / `.nii.gz`, a folder or one file (`nifti`) |
//! | `decathlon` | [`decathlon`] | Medical Segmentation Decathlon `imagesTr/` + `labelsTr/` (`nifti`) |
//!
//! The readers share [`intensity`] (the `normalize` and `window` options, RGB to grey),
//! [`numpy`] (NumPy arrays of any numeric dtype to tensors), [`nifti_file`] (one NIfTI file
//! to a `[D, H, W]` tensor) and [`files`] (listing).

pub mod decathlon;
pub mod dicom_series;
pub mod files;
pub mod intensity;
pub mod medmnist;
pub mod nifti_file;
pub mod nifti_folder;
pub mod npy_volumes;
pub mod numpy;
pub mod png_folder;
