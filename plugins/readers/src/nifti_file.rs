//! NIfTI-1 decoding shared by the `nifti` and `decathlon` formats: one `.nii` / `.nii.gz`
//! file to a float32 tensor laid out `[D, H, W]` with its spacing and stored data type.
//!
//! Decoding uses the `nifti` crate (DESIGN.md, "Data": the field's crates, no hand-written
//! parsers), whose ndarray conversion applies the header's `scl_slope` / `scl_inter`, so
//! integer files stored with a rescale come back in their real units. What that conversion
//! would panic on (see [`check_scalar_volume`]) is rejected first, as an error.

use crate::files;
use medssl_core::anyhow::anyhow;
use medssl_core::prelude::*;
use nifti::{InMemNiftiVolume, IntoNdArray, NiftiHeader, NiftiObject, NiftiType, NiftiVolume, ReaderOptions, Unit};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file stem of a NIfTI name (`NAME.nii.gz` or `NAME.nii`), if it is one. The suffixes
/// are matched exactly, as the `nifti` crate picks gzip decoding by the exact `.gz` suffix.
pub fn nifti_stem(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".nii.gz").or_else(|| name.strip_suffix(".nii"))
}

/// Whether `path` is named like a NIfTI-1 single file and is not hidden (macOS leaves
/// `._name.nii.gz` resource forks beside copied data).
pub fn is_nifti_name(path: &Path) -> bool {
    nifti_stem(path).is_some() && !files::is_hidden(path)
}

/// A decoded volume before normalisation.
pub struct Decoded {
    /// float32 `[D, H, W]`, the file's values after slope and intercept.
    pub voxels: Tensor,
    /// Voxel size in mm along (D, H, W), where the header gives a usable one.
    pub spacing: Option<[f64; 3]>,
    /// The stored data type in `Volume::dtype`'s vocabulary, e.g. `int16`.
    pub dtype: String,
}

/// Which 3D volume of a 4D time series (fMRI, DCE, diffusion) to read: config key
/// `timepoint`, a 0-based index along the fourth axis or `"mean"`, the voxel-wise mean over
/// all of them (as a mean functional image is taken for registration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timepoint {
    Index(usize),
    Mean,
}

impl Serialize for Timepoint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Timepoint::Index(index) => serializer.serialize_u64(*index as u64),
            Timepoint::Mean => serializer.serialize_str("mean"),
        }
    }
}

impl<'de> Deserialize<'de> for Timepoint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Expected;
        impl serde::de::Visitor<'_> for Expected {
            type Value = Timepoint;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a 0-based timepoint index (0, 1, ...) or \"mean\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Timepoint, E> {
                usize::try_from(v)
                    .map(Timepoint::Index)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Timepoint, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Timepoint, E> {
                match v {
                    "mean" => Ok(Timepoint::Mean),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        deserializer.deserialize_any(Expected)
    }
}

/// What to do with the fourth axis of a 4D file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FourthAxis {
    /// Refuse a fourth axis longer than one, naming the `timepoint` key that picks a volume.
    Refuse,
    /// Modality `c` of a multi-modal image (the Decathlon's `channel` key).
    Channel(usize),
    /// A volume of a time series (the `nifti` format's `timepoint` key).
    Timepoint(Timepoint),
}

/// Reads `path` and lays its axes out as `[slice_axis, other, other]` (`slice_axis` 0, 1 or
/// 2). `fourth` says which volume of a 4D file to take (multi-modal images, time series):
/// with [`FourthAxis::Refuse`] a fourth axis longer than one is an error. Trailing axes of
/// size 1 are dropped, and a 2D image gets a third axis of one voxel.
pub fn decode(path: &Path, slice_axis: usize, fourth: FourthAxis) -> Result<Decoded> {
    let object = ReaderOptions::new().read_file(path).map_err(readable)?;
    let header = object.header().clone();
    check_scalar_volume(&header, object.volume())?;
    let array = object.into_volume().into_ndarray::<f32>()?;
    let shape: Vec<i64> = array.shape().iter().map(|&n| n as i64).collect();
    // The array is in NIfTI's column-major order, so its transpose is row-major: borrow its
    // buffer as a tensor of the reversed shape, then reverse the axes back.
    let transposed = array.t();
    let row_major = transposed.as_standard_layout();
    let values = row_major.as_slice().context("the decoded volume is not contiguous")?;
    let reversed_shape: Vec<i64> = shape.iter().rev().copied().collect();
    let reversed_axes: Vec<i64> = (0..shape.len() as i64).rev().collect();
    let tensor = Tensor::from_slice(values)
        .view(reversed_shape.as_slice())
        .permute(reversed_axes.as_slice());

    let voxels = spatial(tensor, fourth)?;
    let [a, b] = other_axes(slice_axis);
    let voxels = voxels.permute([slice_axis as i64, a as i64, b as i64]).contiguous();
    let spacing = spacing_mm(&header).map(|mm| [mm[slice_axis], mm[a], mm[b]]);
    let dtype = format!("{:?}", header.data_type()?).to_lowercase();
    Ok(Decoded { voxels, spacing, dtype })
}

/// The nifti crate's error as a sentence: its I/O variant prints the inner error's debug
/// form (`Io(Custom { kind: InvalidInput, .. })`), which says nothing to a user.
fn readable(error: nifti::NiftiError) -> anyhow::Error {
    match error {
        nifti::NiftiError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            anyhow!("the file is truncated or damaged ({io}); expected a complete .nii or gzip-compressed .nii.gz")
        }
        nifti::NiftiError::Io(io) => anyhow!("{io}"),
        other => anyhow!("{other}"),
    }
}

/// The three spatial axes `[X, Y, Z]` of a file's tensor `[X, Y, Z, ...]`.
fn spatial(tensor: Tensor, fourth: FourthAxis) -> Result<Tensor> {
    let shape = tensor.size();
    // A 2D or 3D file is a series of one timepoint: `timepoint = 0` or "mean" reads it.
    if let (2 | 3, FourthAxis::Timepoint(Timepoint::Index(index @ 1..))) = (shape.len(), fourth) {
        bail!(
            "the volume has shape {shape:?}: one timepoint, so config key `timepoint` = {index} is out of range \
             (0-based: the only timepoint is 0)"
        );
    }
    match (shape.len(), fourth) {
        (2, _) => Ok(tensor.unsqueeze(2)),
        (3, _) => Ok(tensor),
        (4, FourthAxis::Channel(channel)) => {
            ensure!(
                (channel as i64) < shape[3],
                "the image has shape {shape:?}: no channel {channel} along its fourth axis (config key `channel`)"
            );
            Ok(tensor.select(3, channel as i64))
        }
        (4, FourthAxis::Timepoint(Timepoint::Index(index))) => {
            ensure!(
                (index as i64) < shape[3],
                "the volume has shape {shape:?}: {} timepoints along its fourth axis, so config key `timepoint` = \
                 {index} is out of range (0-based: 0 to {})",
                shape[3],
                shape[3] - 1
            );
            Ok(tensor.select(3, index as i64))
        }
        (4, FourthAxis::Timepoint(Timepoint::Mean)) => Ok(tensor.mean_dim(3, false, Kind::Float)),
        (4, FourthAxis::Refuse) => {
            ensure!(
                shape[3] == 1,
                "the volume has shape {shape:?}: more than one time point or component ({} along its fourth axis); \
                 expected a 3D volume: set config key `timepoint` to a 0-based index or to \"mean\" to read one",
                shape[3]
            );
            Ok(tensor.select(3, 0))
        }
        (5.., _) if shape[4..].iter().all(|&n| n == 1) => spatial(tensor.reshape(&shape[..4]), fourth),
        _ => bail!(
            "the volume has shape {shape:?}; expected a 3D volume{}",
            match fourth {
                FourthAxis::Channel(_) => " or a 4D multi-modal one",
                FourthAxis::Refuse | FourthAxis::Timepoint(_) => " or a 4D time series",
            }
        ),
    }
}

/// The two axes other than `slice_axis`, in their order.
fn other_axes(slice_axis: usize) -> [usize; 2] {
    match slice_axis {
        0 => [1, 2],
        1 => [0, 2],
        _ => [0, 1],
    }
}

/// Rejects what the `nifti` crate's ndarray conversion would panic on rather than report:
/// non-scalar data types, and a `bitpix` that disagrees with `datatype` (it reads `bitpix`
/// bytes per voxel but converts by the size of `datatype`).
fn check_scalar_volume(header: &NiftiHeader, volume: &InMemNiftiVolume) -> Result<()> {
    use NiftiType::*;
    let datatype = header.data_type()?;
    ensure!(
        matches!(
            datatype,
            Uint8 | Int8 | Uint16 | Int16 | Uint32 | Int32 | Uint64 | Int64 | Float32 | Float64
        ),
        "data type {datatype:?} is not supported; expected integer or real voxels"
    );
    let voxels = volume
        .dim()
        .iter()
        .try_fold(1usize, |count, &n| count.checked_mul(usize::from(n)));
    ensure!(
        voxels.and_then(|n| n.checked_mul(datatype.size_of())) == Some(volume.raw_data().len()),
        "inconsistent header: `bitpix` = {} but data type {datatype:?} has {} bits per voxel",
        header.bitpix,
        datatype.size_of() * 8
    );
    Ok(())
}

/// Voxel size along the three NIfTI axes in mm, when the header gives a usable one.
fn spacing_mm(header: &NiftiHeader) -> Option<[f64; 3]> {
    let to_mm = match header.xyzt_to_space().ok()? {
        Unit::Meter => 1000.0,
        Unit::Micron => 0.001,
        // Unknown units are millimetres in practice: that is what every scanner writes.
        _ => 1.0,
    };
    let spacing = [1, 2, 3].map(|i| f64::from(header.pixdim[i]).abs() * to_mm);
    spacing.iter().all(|s| s.is_finite() && *s > 0.0).then_some(spacing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Array4};
    use nifti::writer::WriterOptions;

    #[test]
    fn names_match_nii_and_nii_gz_exactly_and_skip_hidden_files() {
        for (name, stem) in [
            ("a.nii", Some("a")),
            ("case_001.nii.gz", Some("case_001")),
            ("a.NII", None),
            ("a.nii.bz2", None),
            ("notes.txt", None),
        ] {
            assert_eq!(nifti_stem(Path::new(name)), stem, "{name}");
        }
        assert!(is_nifti_name(Path::new("dir/a.nii.gz")));
        assert!(!is_nifti_name(Path::new("dir/._a.nii.gz")));
    }

    #[test]
    fn data_type_and_extra_axes_of_a_file() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("words.nii");
        WriterOptions::new(&path).write_nifti(&Array3::from_elem((2, 3, 4), 7u16))?;
        let decoded = decode(&path, 2, FourthAxis::Refuse)?;
        assert_eq!(decoded.dtype, "uint16");
        assert_eq!(decoded.voxels.size(), [4, 2, 3]);
        assert_eq!(decoded.voxels.kind(), Kind::Float);

        // Two time points: an error for a plain volume, a choice with `channel`.
        let path = folder.path().join("series.nii.gz");
        WriterOptions::new(&path).write_nifti(&Array4::from_shape_fn((2, 3, 4, 2), |(.., t)| t as i16))?;
        let message = format!("{:#}", decode(&path, 2, FourthAxis::Refuse).err().expect("4D"));
        assert!(
            message.contains("more than one time point") && message.contains("`timepoint`"),
            "{message}"
        );
        let second = decode(&path, 0, FourthAxis::Channel(1))?;
        assert_eq!(second.dtype, "int16");
        assert_eq!(second.voxels.size(), [2, 3, 4]);
        assert_eq!(second.voxels.min().double_value(&[]), 1.0);
        Ok(())
    }
}
