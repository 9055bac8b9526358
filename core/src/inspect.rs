//! `medssl data inspect`: what a file or folder holds, as the run would read it.
//!
//! The format is recognised from the path (extension, or what a folder contains); the
//! registered reader of that format decodes the samples with intensities left as stored
//! (`normalize = "none"` where the reader has the option), and the report gives shapes,
//! spacing, stored type, intensity range and label values.

use crate::registry::{self, Registered};
use crate::section::Section;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;
use tch::Kind;

/// What `inspect` reports.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub format: String,
    /// Samples the reader lists.
    pub samples: usize,
    /// Samples decoded for this report.
    pub inspected: usize,
    /// Distinct shapes `[D, H, W]` among the inspected samples.
    pub shapes: Vec<Vec<i64>>,
    /// The stored dtypes of the inspected samples, distinct ones joined by `, ` (a folder
    /// may mix 8- and 16-bit files).
    pub dtype: Option<String>,
    /// The first inspected sample's voxel spacing, where the format stores one.
    pub spacing: Option<[f64; 3]>,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Class labels, or segmentation mask values, found in the inspected samples.
    pub labels: Vec<i64>,
    /// What the first sample's file records beyond its voxels, where the format says
    /// (DICOM: modality, frames, rows, columns, bits allocated and stored, photometric
    /// interpretation, transfer syntax).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// The dataset format a path holds, from its name or contents.
pub fn guess_format(path: &Path) -> Result<&'static str> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_lowercase();
    if let Some(what) = crate::paths::not_a_file_or_folder(path) {
        bail!(
            "`{}` {what}; expected a file or folder of images or volumes",
            path.display()
        );
    }
    if path.is_file() {
        return Ok(match () {
            _ if name.ends_with(".nii") || name.ends_with(".nii.gz") => "nifti",
            _ if name.ends_with(".npy") => "npy",
            _ if name.ends_with(".npz") => "medmnist",
            _ if is_dicom_name(&name) || has_dicom_marker(path) => "dicom",
            _ if [".png", ".jpg", ".jpeg"].iter().any(|e| name.ends_with(e)) => "image-folder",
            _ => bail!("`{}`: cannot tell the format from the file name; expected .nii, .nii.gz, .npy, .npz, .dcm (or a DICOM file's `DICM` marker), .png or .jpg", path.display()),
        });
    }
    if path.join("imagesTr").is_dir() {
        return Ok("decathlon");
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("cannot list `{}`", path.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_lowercase();
        if entry.path().is_dir() {
            if let Ok(inner) = guess_format(&entry.path()) {
                names.push(format!("dir:{inner}"));
            }
        } else {
            names.push(name);
        }
    }
    let any = |f: &dyn Fn(&str) -> bool| names.iter().any(|n| f(n));
    Ok(match () {
        _ if any(&|n| n.ends_with(".nii") || n.ends_with(".nii.gz")) => "nifti",
        _ if any(&|n| n.ends_with(".npy")) => "npy",
        _ if any(&|n| is_dicom_name(n) || n == "dir:dicom") => "dicom",
        _ if any(&|n| [".png", ".jpg", ".jpeg"].iter().any(|e| n.ends_with(e)) || n == "dir:image-folder") => {
            "image-folder"
        }
        _ => bail!(
            "`{}`: found no NIfTI, NPY, DICOM or image files to inspect",
            path.display()
        ),
    })
}

/// Whether a lower-cased file name has a DICOM extension.
fn is_dicom_name(name: &str) -> bool {
    [".dcm", ".dicom", ".ima"].iter().any(|e| name.ends_with(e))
}

/// Whether bytes 128..132 of the file are `DICM`, the marker after a DICOM file's preamble
/// (scanners often write DICOM files without an extension).
fn has_dicom_marker(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut head))
        .is_ok_and(|()| &head[128..] == b"DICM")
}

/// Inspects `path` (as `format`, or the recognised one), decoding at most `limit` samples.
pub fn inspect(path: &Path, format: Option<&str>, limit: usize) -> Result<Inspection> {
    let entry = match format {
        Some(f) => registry::datasets().get(f).with_context(|| format!("--format `{f}`"))?,
        None => registry::datasets().get(guess_format(path)?)?,
    };
    let format = entry.name();
    let path_text = toml::Value::String(path.display().to_string()).to_string();
    // Raw intensities where the reader can leave them; readers without the key are built
    // with their path alone.
    let raw = Section::inline(
        "data.sources.inspect",
        format,
        &format!("path = {path_text}\nnormalize = \"none\""),
    )?;
    let plain = Section::inline("data.sources.inspect", format, &format!("path = {path_text}"))?;
    let dataset = match (entry.build)(&raw) {
        Ok(d) => d,
        Err(_) if !entry.default_config().contains("normalize") => (entry.build)(&plain)?,
        Err(e) => return Err(e),
    };
    let samples = dataset.len();
    let inspected = samples.min(limit.max(1));
    let (mut min, mut max, mut sum, mut count) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0usize);
    let (mut shapes, mut labels) = (BTreeSet::new(), BTreeSet::new());
    let (mut dtypes, mut spacing) = (BTreeSet::new(), None);
    for i in 0..inspected {
        let volume = dataset
            .load(i)
            .with_context(|| format!("cannot read {}", dataset.describe(i)))?;
        let v = volume.voxels.to_kind(Kind::Double);
        min = min.min(v.min().double_value(&[]));
        max = max.max(v.max().double_value(&[]));
        sum += v.sum(Kind::Double).double_value(&[]);
        count += v.numel();
        shapes.insert(volume.voxels.size());
        labels.extend(volume.label);
        if let Some(mask) = &volume.mask {
            let values = mask.to_kind(Kind::Int64).flatten(0, -1).internal_unique(true, false).0;
            labels.extend(Vec::<i64>::try_from(values).unwrap_or_default());
        }
        dtypes.extend(volume.dtype);
        spacing = spacing.or(volume.spacing);
    }
    let attributes = match samples {
        0 => serde_json::Map::new(),
        _ => dataset
            .attributes(0)
            .with_context(|| format!("cannot read {}", dataset.describe(0)))?,
    };
    Ok(Inspection {
        path: path.display().to_string(),
        format: entry.name().to_string(),
        samples,
        inspected,
        shapes: shapes.into_iter().collect(),
        dtype: (!dtypes.is_empty()).then(|| dtypes.into_iter().collect::<Vec<_>>().join(", ")),
        spacing,
        min,
        max,
        mean: sum / count.max(1) as f64,
        labels: labels.into_iter().collect(),
        attributes,
    })
}
