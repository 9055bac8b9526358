//! Dataset format `dicom`: DICOM series, one folder a series, each series one volume.
//!
//! `path` is one series folder or a folder of them: every folder under `path` (itself
//! included, at most [`MAX_DEPTH`] levels down) that directly holds DICOM files is a series,
//! so `patient/study/series/` trees work too. Series are sorted by folder path. DICOM files
//! are recognised by name: extension `.dcm`, `.dicom` or `.ima` (any case), or no extension
//! at all (as many scanners write them); `DICOMDIR` and hidden files are skipped.
//!
//! Decoding uses `dicom-object` and `dicom-pixeldata`. Transfer syntaxes: the native ones,
//! deflate, JPEG baseline/extended/lossless, RLE, and JPEG 2000 (dicom-pixeldata's `openjp2`
//! feature, a pure-Rust port of OpenJPEG). JPEG-LS is not enabled: its `charls` feature
//! links the CharLS C++ library (Debian's libcharls-dev), which the project's machines lack;
//! such files fail to load with the file and transfer syntax named. The modality LUT
//! (RescaleSlope / RescaleIntercept: Hounsfield units for CT) is applied; VOI windows in the
//! files are not (use `window`), nor is MONOCHROME1 inverted: values are the physical ones.
//!
//! Slices are sorted by ImagePositionPatient projected on the slice normal (the cross
//! product of ImageOrientationPatient's row and column directions), so oblique and
//! sagittal stacks sort right and file names do not matter; where a slice lacks position
//! or orientation, by InstanceNumber; where one lacks that too, by file name. The spacing
//! is (median distance between consecutive slice positions, PixelSpacing's row spacing,
//! its column spacing) in mm; without positions the slice distance comes from
//! SpacingBetweenSlices, else SliceThickness. A series of one multi-frame file gives its
//! frames as slices, in stored order.
//!
//! `Volume::dtype` is the stored sample type before the modality LUT, from BitsAllocated and
//! PixelRepresentation (`int16` for most CT, `uint16` for most MRI); where the slices of a
//! series disagree, the first slice's (in slice order) is reported.
//!
//! A folder whose files belong to several SeriesInstanceUIDs, two slices at one position,
//! slices of different sizes and colour images are errors naming the files: each is a
//! volume that would silently come out wrong.

use crate::files;
use crate::intensity::{self, Normalization, Window};
use dicom_dictionary_std::tags;
use dicom_object::{open_file, DefaultDicomObject, Tag};
use dicom_pixeldata::{PixelDecoder, PixelRepresentation};
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Keys of a `[data.sources.NAME]` section with `format = "dicom"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DicomConfig {
    /// A series folder, or a folder whose subfolders (at any depth up to 8) are series; a
    /// relative path resolves against the config file's folder (from `--set` or the
    /// environment: against the working directory). Required.
    pub path: PathBuf,
    /// Clip the rescaled values to `[low, high]` before normalising (CT: Hounsfield units);
    /// unset keeps every value.
    pub window: Option<Window>,
    /// `"zscore"`, `"minmax"` or `"none"`.
    pub normalize: Normalization,
}

impl Default for DicomConfig {
    fn default() -> Self {
        DicomConfig {
            path: PathBuf::new(),
            window: None,
            normalize: Normalization::ZScore,
        }
    }
}

/// How many folder levels below `path` are searched for series.
pub const MAX_DEPTH: usize = 8;

/// One series: its folder and files (sorted by name; slice order is decided in `load`).
struct Series {
    folder: PathBuf,
    files: Vec<PathBuf>,
}

/// The DICOM reader: the listed series.
pub struct DicomSeries {
    series: Vec<Series>,
    window: Option<Window>,
    normalize: Normalization,
}

impl DicomSeries {
    /// Lists the series under `config.path` (already resolved); `key` is the section's
    /// dotted key, for messages.
    pub fn new(config: DicomConfig, key: &str) -> Result<DicomSeries> {
        ensure!(
            !config.path.as_os_str().is_empty(),
            "config key `{key}.path` is missing: expected a DICOM series folder or a folder of series folders"
        );
        let series = list_series(&config.path).with_context(|| format!("config key `{key}.path`"))?;
        Ok(DicomSeries {
            series,
            window: config.window,
            normalize: config.normalize,
        })
    }

    /// The series folders, in the order of their sample indices.
    pub fn folders(&self) -> Vec<&Path> {
        self.series.iter().map(|s| s.folder.as_path()).collect()
    }
}

impl Dataset for DicomSeries {
    fn len(&self) -> usize {
        self.series.len()
    }

    fn describe(&self, index: usize) -> String {
        match self.series.get(index) {
            Some(series) => series.folder.display().to_string(),
            None => format!("DICOM series #{index} (out of range: {} series)", self.series.len()),
        }
    }

    fn load(&self, index: usize) -> Result<Volume> {
        let Some(series) = self.series.get(index) else {
            bail!(
                "DICOM series #{index} does not exist: the source has {} series",
                self.series.len()
            );
        };
        let (voxels, spacing, dtype) = read_series(&series.files)
            .with_context(|| format!("cannot read DICOM series `{}`", series.folder.display()))?;
        let mut volume = Volume::new(
            intensity::normalize(&voxels, self.window, self.normalize, &self.describe(index)),
            spacing,
        );
        volume.dtype = dtype;
        Ok(volume)
    }
}

/// Whether `path` is named like a DICOM file (see the module's doc).
fn is_dicom_name(path: &Path) -> bool {
    if path
        .file_name()
        .is_some_and(|name| name.eq_ignore_ascii_case("DICOMDIR"))
    {
        return false;
    }
    match files::extension(path) {
        None => true,
        Some(extension) => matches!(extension.as_str(), "dcm" | "dicom" | "ima"),
    }
}

/// The series folders under `path`, sorted by path.
fn list_series(path: &Path) -> Result<Vec<Series>> {
    files::ensure_folder(path, "a DICOM series folder or a folder of series folders")?;
    let mut series = Vec::new();
    collect_series(path, 0, &mut series)?;
    ensure!(
        !series.is_empty(),
        "folder `{}` holds no DICOM file (.dcm, .dicom, .ima or no extension), neither itself nor in its \
         subfolders (searched {MAX_DEPTH} levels deep)",
        path.display()
    );
    series.sort_by(|a, b| a.folder.cmp(&b.folder));
    Ok(series)
}

fn collect_series(folder: &Path, depth: usize, series: &mut Vec<Series>) -> Result<()> {
    let files = files::files_in(folder, is_dicom_name)?;
    if !files.is_empty() {
        series.push(Series {
            folder: folder.to_path_buf(),
            files,
        });
    }
    if depth < MAX_DEPTH {
        for sub in files::subfolders(folder)? {
            collect_series(&sub, depth + 1, series)?;
        }
    }
    Ok(())
}

/// One decoded file: its frames and the attributes that place it.
struct Slice {
    path: PathBuf,
    /// float32 `[frames, rows, columns]`, after the modality LUT.
    pixels: Tensor,
    position: Option<[f64; 3]>,
    orientation: Option<[f64; 6]>,
    instance: Option<i64>,
    pixel_spacing: Option<[f64; 2]>,
    /// SpacingBetweenSlices, else SliceThickness.
    slice_gap: Option<f64>,
    series_uid: Option<String>,
    /// The stored sample type, before the modality LUT.
    dtype: Option<String>,
}

/// The `Volume::dtype` name of samples of `bits_allocated` bits: BitsAllocated 1 is a
/// bitmap (segmentations), 8 to 64 integers of the given signedness.
fn sample_type(bits_allocated: u16, representation: PixelRepresentation) -> Option<String> {
    match (bits_allocated, representation) {
        (1, _) => Some("bool".into()),
        (8 | 16 | 32 | 64, PixelRepresentation::Unsigned) => Some(format!("uint{bits_allocated}")),
        (8 | 16 | 32 | 64, PixelRepresentation::Signed) => Some(format!("int{bits_allocated}")),
        _ => None,
    }
}

/// A numeric attribute with `N` values, if present and well-formed.
fn floats<const N: usize>(object: &DefaultDicomObject, tag: Tag) -> Option<[f64; N]> {
    let values = object.get(tag)?.to_multi_float64().ok()?;
    let values: [f64; N] = values.get(..N)?.try_into().ok()?;
    values.iter().all(|v| v.is_finite()).then_some(values)
}

fn decode_slice(path: &Path) -> Result<Slice> {
    let object = open_file(path)?;
    let decoded = object.decode_pixel_data().with_context(|| {
        let syntax = object.meta().transfer_syntax().trim_end_matches('\0');
        format!("cannot decode the pixel data (transfer syntax {syntax})")
    })?;
    ensure!(
        decoded.samples_per_pixel() == 1,
        "the image has {} samples per pixel ({}); expected one (greyscale)",
        decoded.samples_per_pixel(),
        decoded.photometric_interpretation()
    );
    let shape = [
        i64::from(decoded.number_of_frames()),
        i64::from(decoded.rows()),
        i64::from(decoded.columns()),
    ];
    let values: Vec<f32> = decoded.to_vec()?;
    ensure!(
        values.len() as i64 == shape.iter().product::<i64>(),
        "the pixel data holds {} values, not frames x rows x columns = {shape:?}",
        values.len()
    );
    let instance = object.get(tags::INSTANCE_NUMBER).and_then(|e| e.to_int::<i64>().ok());
    let slice_gap = [tags::SPACING_BETWEEN_SLICES, tags::SLICE_THICKNESS]
        .into_iter()
        .find_map(|tag| floats::<1>(&object, tag))
        .map(|[gap]| gap.abs())
        .filter(|gap| *gap > 0.0);
    let series_uid = object
        .get(tags::SERIES_INSTANCE_UID)
        .and_then(|e| e.to_str().ok())
        .map(|uid| uid.trim_end_matches(['\0', ' ']).to_string());
    Ok(Slice {
        path: path.to_path_buf(),
        pixels: Tensor::from_slice(&values).view(shape),
        position: floats(&object, tags::IMAGE_POSITION_PATIENT),
        orientation: floats(&object, tags::IMAGE_ORIENTATION_PATIENT),
        instance,
        pixel_spacing: floats(&object, tags::PIXEL_SPACING).filter(|s| s.iter().all(|v| *v > 0.0)),
        slice_gap,
        series_uid,
        dtype: sample_type(decoded.bits_allocated(), decoded.pixel_representation()),
    })
}

/// The unit normal of an ImageOrientationPatient (row direction x column direction).
fn slice_normal(orientation: &[f64; 6]) -> Option<[f64; 3]> {
    let [r0, r1, r2, c0, c1, c2] = *orientation;
    let normal = [r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0];
    let norm = normal.iter().map(|v| v * v).sum::<f64>().sqrt();
    (norm > 1e-6).then(|| normal.map(|v| v / norm))
}

/// Decodes a series' files and stacks them in slice order: float32 `[D, H, W]`, the
/// spacing in mm, where the files give it, and the first slice's stored sample type.
fn read_series(paths: &[PathBuf]) -> Result<(Tensor, Option<[f64; 3]>, Option<String>)> {
    let mut slices = paths
        .iter()
        .map(|path| decode_slice(path).with_context(|| format!("cannot decode DICOM file `{}`", path.display())))
        .collect::<Result<Vec<_>>>()?;

    let mut uids: Vec<&str> = slices.iter().filter_map(|s| s.series_uid.as_deref()).collect();
    uids.sort_unstable();
    uids.dedup();
    ensure!(
        uids.len() <= 1,
        "the folder mixes {} series (SeriesInstanceUID {}); expected one series a folder",
        uids.len(),
        uids.join(", ")
    );
    let first = &slices[0];
    let in_plane = first.pixels.size()[1..].to_vec();
    if let Some(other) = slices.iter().find(|s| s.pixels.size()[1..] != in_plane[..]) {
        bail!(
            "slices differ in size: `{}` is {:?} but `{}` is {:?} (rows, columns)",
            first.path.display(),
            in_plane,
            other.path.display(),
            &other.pixels.size()[1..]
        );
    }
    if slices.len() > 1 {
        if let Some(multi) = slices.iter().find(|s| s.pixels.size()[0] > 1) {
            bail!(
                "`{}` holds {} frames in a series of {} files; expected single-frame slices, or one multi-frame file",
                multi.path.display(),
                multi.pixels.size()[0],
                slices.len()
            );
        }
    }

    // Slice order and the distance between slices.
    let normal = slices[0].orientation.as_ref().and_then(slice_normal);
    let located = slices.iter().all(|s| s.position.is_some() && s.orientation.is_some());
    let slice_distance = match normal {
        Some(normal) if located => {
            let depth = |s: &Slice| {
                let p = s.position.unwrap_or_default();
                p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2]
            };
            slices.sort_by(|a, b| {
                depth(a)
                    .total_cmp(&depth(b))
                    .then(a.instance.cmp(&b.instance))
                    .then(a.path.cmp(&b.path))
            });
            let depths: Vec<f64> = slices.iter().map(depth).collect();
            let mut gaps: Vec<f64> = depths.windows(2).map(|w| w[1] - w[0]).collect();
            if let Some(i) = gaps.iter().position(|gap| *gap < 1e-3) {
                bail!(
                    "`{}` and `{}` lie at the same position ({:.3} mm along the slice normal); \
                     expected one slice per position",
                    slices[i].path.display(),
                    slices[i + 1].path.display(),
                    depths[i]
                );
            }
            gaps.sort_by(f64::total_cmp);
            gaps.get(gaps.len() / 2).copied().or(slices[0].slice_gap)
        }
        _ => {
            if slices.iter().all(|s| s.instance.is_some()) {
                slices.sort_by(|a, b| a.instance.cmp(&b.instance).then(a.path.cmp(&b.path)));
            }
            slices[0].slice_gap
        }
    };
    let spacing = match (slice_distance, slices[0].pixel_spacing) {
        (Some(distance), Some([rows, columns])) => Some([distance, rows, columns]),
        _ => None,
    };
    let dtype = slices[0].dtype.clone();
    let frames: Vec<Tensor> = slices.into_iter().map(|s| s.pixels).collect();
    Ok((Tensor::cat(&frames, 0), spacing, dtype))
}

fn build(section: &Section) -> Result<Box<dyn Dataset>> {
    let mut config: DicomConfig = section.parse()?;
    if !config.path.as_os_str().is_empty() {
        config.path = section.resolve_path("path", &config.path);
    }
    Ok(Box::new(DicomSeries::new(config, &section.key)?))
}

register!(DATASETS, DICOM: DatasetEntry = DatasetEntry {
    name: "dicom",
    about: "DICOM series, one folder a series (slices sorted by position, rescale applied; JPEG 2000 included)",
    default_config: default_toml::<DicomConfig>,
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::value::PrimitiveValue;
    use dicom_core::{dicom_value, DataElement, VR};
    use dicom_dictionary_std::uids;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    use medssl_core::registry;

    fn reader(body: &str) -> Result<Box<dyn Dataset>> {
        build(&Section::inline("data.sources.mri", "dicom", body)?)
    }

    fn config_for(path: &Path, extra: &str) -> String {
        format!("path = {:?}\n{extra}", path.display().to_string())
    }

    /// What a test slice carries; `None` leaves the attribute out.
    struct SliceSpec {
        rows: u16,
        columns: u16,
        /// Stored value of every pixel is `base + pixel index`.
        base: u16,
        position: Option<[f64; 3]>,
        orientation: Option<[f64; 6]>,
        instance: Option<i32>,
        series: &'static str,
        /// PixelRepresentation 1: the stored values are int16 (the same bits as `base + i`).
        signed: bool,
    }

    impl SliceSpec {
        fn axial(z: f64, instance: i32, base: u16) -> SliceSpec {
            SliceSpec {
                rows: 2,
                columns: 3,
                base,
                position: Some([-10.0, -20.0, z]),
                orientation: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
                instance: Some(instance),
                series: "1.2.3.4",
                signed: false,
            }
        }
    }

    fn decimal_strings(values: &[f64]) -> PrimitiveValue {
        PrimitiveValue::Strs(values.iter().map(|v| format!("{v}")).collect())
    }

    /// Writes an MR slice: uint16 pixels (int16 if `signed`), rescale 2x - 1000, pixel
    /// spacing 0.5 x 0.75 mm.
    fn write_slice(path: &Path, spec: &SliceSpec) -> Result<()> {
        let count = usize::from(spec.rows) * usize::from(spec.columns);
        let pixels: Vec<u16> = (0..count as u16).map(|i| spec.base + i).collect();
        let pixel_data = if spec.signed {
            // Two's complement: the same bytes, read as signed.
            PrimitiveValue::I16(pixels.iter().map(|&v| v as i16).collect())
        } else {
            PrimitiveValue::U16(pixels.into())
        };
        let instance_uid = format!("1.2.3.4.{}", spec.base);
        let mut object = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(uids::MR_IMAGE_STORAGE),
            ),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(instance_uid)),
            DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, PrimitiveValue::from(spec.series)),
            DataElement::new(tags::PIXEL_SPACING, VR::DS, decimal_strings(&[0.5, 0.75])),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, dicom_value!(U16, 1)),
            DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from("MONOCHROME2"),
            ),
            DataElement::new(tags::ROWS, VR::US, dicom_value!(U16, spec.rows)),
            DataElement::new(tags::COLUMNS, VR::US, dicom_value!(U16, spec.columns)),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, dicom_value!(U16, 16)),
            DataElement::new(tags::BITS_STORED, VR::US, dicom_value!(U16, 16)),
            DataElement::new(tags::HIGH_BIT, VR::US, dicom_value!(U16, 15)),
            DataElement::new(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                dicom_value!(U16, u16::from(spec.signed)),
            ),
            DataElement::new(tags::RESCALE_SLOPE, VR::DS, decimal_strings(&[2.0])),
            DataElement::new(tags::RESCALE_INTERCEPT, VR::DS, decimal_strings(&[-1000.0])),
            DataElement::new(tags::PIXEL_DATA, VR::OW, pixel_data),
        ]);
        if let Some(position) = spec.position {
            object.put(DataElement::new(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                decimal_strings(&position),
            ));
        }
        if let Some(orientation) = spec.orientation {
            object.put(DataElement::new(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                decimal_strings(&orientation),
            ));
        }
        if let Some(instance) = spec.instance {
            object.put(DataElement::new(
                tags::INSTANCE_NUMBER,
                VR::IS,
                PrimitiveValue::from(instance.to_string()),
            ));
        }
        object
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))?
            .write_to_file(path)?;
        Ok(())
    }

    #[test]
    fn slices_sort_by_position_with_rescale_and_spacing() -> Result<()> {
        let folder = tempfile::tempdir()?;
        // File names and instance numbers disagree with the positions: positions win.
        write_slice(&folder.path().join("a.dcm"), &SliceSpec::axial(7.5, 1, 200))?;
        write_slice(&folder.path().join("b.dcm"), &SliceSpec::axial(2.5, 3, 0))?;
        write_slice(&folder.path().join("c"), &SliceSpec::axial(5.0, 2, 100))?;
        std::fs::write(folder.path().join("notes.txt"), "not DICOM")?;
        let dataset = reader(&config_for(folder.path(), "normalize = \"none\""))?;
        assert_eq!(dataset.len(), 1);
        assert_eq!(dataset.describe(0), folder.path().display().to_string());
        let volume = dataset.load(0)?;
        assert_eq!(volume.voxels.size(), [3, 2, 3]);
        assert_eq!(volume.voxels.kind(), Kind::Float);
        // Slice k has stored values 100k + pixel index; rescaled 2v - 1000.
        for (k, row, column) in [(0, 0, 0), (1, 1, 2), (2, 0, 1)] {
            let stored = 100 * k + 3 * row + column;
            assert_eq!(
                volume.voxels.double_value(&[k, row, column]),
                2.0 * stored as f64 - 1000.0
            );
        }
        assert_eq!(volume.spacing, Some([2.5, 0.5, 0.75]));
        assert_eq!(volume.dtype.as_deref(), Some("uint16"));
        Ok(())
    }

    #[test]
    fn dtype_is_the_stored_sample_type_before_rescale() -> Result<()> {
        let folder = tempfile::tempdir()?;
        for (i, z) in [0.0, 1.0].into_iter().enumerate() {
            let spec = SliceSpec {
                signed: true,
                ..SliceSpec::axial(z, i as i32, 65526 + i as u16)
            };
            write_slice(&folder.path().join(format!("{i}.dcm")), &spec)?;
        }
        let volume = reader(&config_for(folder.path(), "normalize = \"none\""))?.load(0)?;
        assert_eq!(volume.dtype.as_deref(), Some("int16"));
        // Stored 65526 as int16 is -10; rescaled 2 * -10 - 1000.
        assert_eq!(volume.voxels.double_value(&[0, 0, 0]), -1020.0);
        assert_eq!(sample_type(8, PixelRepresentation::Unsigned).as_deref(), Some("uint8"));
        assert_eq!(sample_type(32, PixelRepresentation::Signed).as_deref(), Some("int32"));
        assert_eq!(sample_type(12, PixelRepresentation::Unsigned), None);
        Ok(())
    }

    #[test]
    fn oblique_slices_sort_along_their_normal() -> Result<()> {
        let folder = tempfile::tempdir()?;
        // Sagittal slices: rows along y, columns along -z, normal along -x. Position x
        // grows with the file name, so the normal order is the reverse.
        for (i, x) in [0.0, 1.5, 3.0].into_iter().enumerate() {
            let spec = SliceSpec {
                position: Some([x, 0.0, 0.0]),
                orientation: Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]),
                ..SliceSpec::axial(0.0, i as i32, 100 * i as u16)
            };
            write_slice(&folder.path().join(format!("{i}.dcm")), &spec)?;
        }
        let volume = reader(&config_for(folder.path(), "normalize = \"none\""))?.load(0)?;
        let firsts: Vec<f64> = (0..3).map(|k| volume.voxels.double_value(&[k, 0, 0])).collect();
        assert_eq!(firsts, [2.0 * 200.0 - 1000.0, 2.0 * 100.0 - 1000.0, -1000.0]);
        assert_eq!(volume.spacing, Some([1.5, 0.5, 0.75]));
        Ok(())
    }

    #[test]
    fn without_positions_instance_numbers_order_the_slices() -> Result<()> {
        let folder = tempfile::tempdir()?;
        for (name, instance, base) in [("x.dcm", 2, 100), ("y.dcm", 1, 0), ("z.dcm", 3, 200)] {
            let spec = SliceSpec {
                position: None,
                ..SliceSpec::axial(0.0, instance, base)
            };
            write_slice(&folder.path().join(name), &spec)?;
        }
        let volume = reader(&config_for(folder.path(), "normalize = \"none\""))?.load(0)?;
        let firsts: Vec<f64> = (0..3).map(|k| volume.voxels.double_value(&[k, 0, 0])).collect();
        assert_eq!(firsts, [-1000.0, -800.0, -600.0]);
        // No positions and no SliceThickness: no spacing.
        assert_eq!(volume.spacing, None);
        Ok(())
    }

    #[test]
    fn folder_of_series_lists_each_series_folder_in_order() -> Result<()> {
        let root = tempfile::tempdir()?;
        for (series, count) in [("t2", 2), ("t1", 3), ("deep/er/flair", 1)] {
            let folder = root.path().join(series);
            std::fs::create_dir_all(&folder)?;
            for i in 0..count {
                write_slice(
                    &folder.join(format!("{i}.dcm")),
                    &SliceSpec::axial(i as f64, i, 10 * i as u16),
                )?;
            }
        }
        std::fs::create_dir_all(root.path().join("empty"))?;
        std::fs::write(root.path().join("DICOMDIR"), "an index, not a slice")?;
        let dataset = reader(&config_for(root.path(), ""))?;
        let folders: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
        let expected: Vec<String> = ["deep/er/flair", "t1", "t2"]
            .iter()
            .map(|s| root.path().join(s).display().to_string())
            .collect();
        assert_eq!(folders, expected);
        let depths: Vec<i64> = (0..3)
            .map(|i| dataset.load(i).map(|v| v.voxels.size()[0]))
            .collect::<Result<_>>()?;
        assert_eq!(depths, [1, 3, 2]);
        let voxels = dataset.load(1)?.voxels;
        assert!(voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn inconsistent_series_are_errors_naming_the_files() -> Result<()> {
        let root = tempfile::tempdir()?;
        let cases: [(&str, Vec<SliceSpec>, &str); 3] = [
            (
                "same-position",
                vec![SliceSpec::axial(1.0, 1, 0), SliceSpec::axial(1.0, 2, 10)],
                "same position",
            ),
            (
                "sizes",
                vec![
                    SliceSpec::axial(1.0, 1, 0),
                    SliceSpec {
                        rows: 3,
                        ..SliceSpec::axial(2.0, 2, 10)
                    },
                ],
                "differ in size",
            ),
            (
                "two-series",
                vec![
                    SliceSpec::axial(1.0, 1, 0),
                    SliceSpec {
                        series: "9.9",
                        ..SliceSpec::axial(2.0, 2, 10)
                    },
                ],
                "mixes 2 series",
            ),
        ];
        for (name, specs, expected) in cases {
            let folder = root.path().join(name);
            std::fs::create_dir_all(&folder)?;
            for (i, spec) in specs.iter().enumerate() {
                write_slice(&folder.join(format!("{i}.dcm")), spec)?;
            }
            let message = format!("{:#}", reader(&config_for(&folder, ""))?.load(0).err().expect(name));
            assert!(message.contains(expected), "{name}: {message}");
            assert!(message.contains(&folder.display().to_string()), "{name}: {message}");
        }
        Ok(())
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() -> Result<()> {
        let folder = tempfile::tempdir()?;
        write_slice(&folder.path().join("0.dcm"), &SliceSpec::axial(0.0, 1, 0))?;
        let broken = folder.path().join("1.dcm");
        std::fs::write(&broken, b"definitely not a DICOM file")?;
        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), ""))?.load(0).err().expect("corrupt")
        );
        assert!(message.contains(&broken.display().to_string()), "{message}");

        let truncated = folder.path().join("1.dcm");
        write_slice(&truncated, &SliceSpec::axial(1.0, 2, 10))?;
        let bytes = std::fs::read(&truncated)?;
        std::fs::write(&truncated, &bytes[..bytes.len() - 5])?;
        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), ""))?
                .load(0)
                .err()
                .expect("truncated")
        );
        assert!(message.contains(&truncated.display().to_string()), "{message}");
        Ok(())
    }

    #[test]
    fn missing_or_empty_folder_and_bad_keys_are_errors_naming_them() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let missing = folder.path().join("absent");
        let message = format!("{:#}", reader(&config_for(&missing, "")).err().expect("missing"));
        assert!(message.contains("data.sources.mri.path") && message.contains(&missing.display().to_string()));
        std::fs::write(folder.path().join("readme.txt"), "no slices here")?;
        let message = format!("{:#}", reader(&config_for(folder.path(), "")).err().expect("empty"));
        assert!(message.contains(&folder.path().display().to_string()), "{message}");
        for (body, key) in [
            ("", "data.sources.mri.path"),
            ("path = \"x\"\nwindow = [0, 0]", "data.sources.mri.window"),
            ("path = \"x\"\nslice_axis = 0", "slice_axis"),
        ] {
            let message = format!("{:#}", reader(body).err().unwrap_or_else(|| panic!("`{body}`")));
            assert!(message.contains(key), "`{body}`: {message}");
        }
        Ok(())
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::datasets().get("dicom")?;
        let section = Section::inline("data.sources.mri", "dicom", &(entry.default_config)())?;
        assert_eq!(section.parse::<DicomConfig>()?, DicomConfig::default());
        Ok(())
    }

    /// The brain MRI study beside the project, when present (../shared/data/README.md:
    /// T1 pre/post, FLAIR and T2 series of 320 x 280 slices, 22-24 a series; the folder
    /// also holds `11_HCropVolume`, a 40-slice crop).
    #[test]
    fn reads_the_shared_dicom_study_when_present() -> Result<()> {
        let study = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/data/dicom/Study3"
        ));
        if !study.is_dir() {
            return Ok(());
        }
        let dataset = reader(&config_for(study, ""))?;
        let names: Vec<String> = (0..dataset.len())
            .map(|i| {
                Path::new(&dataset.describe(i))
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            names,
            [
                "11-T1post-18670",
                "11_HCropVolume",
                "26401-T1prereg-52906",
                "36468-FLAIRreg-58706",
                "37830-T2reg-78532"
            ]
        );
        for (index, name) in names.iter().enumerate() {
            let volume = dataset.load(index)?;
            let size = volume.voxels.size();
            if name == "11_HCropVolume" {
                assert_eq!(size, [40, 50, 34]);
            } else {
                assert!((22..=24).contains(&size[0]), "{name}: {size:?}");
                assert_eq!(size[1..], [320, 280], "{name}");
            }
            assert!(bool::try_from(volume.voxels.isfinite().all())?);
            assert!(volume.voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-4);
            let spacing = volume.spacing.expect("the series record their spacing");
            assert!(spacing.iter().all(|s| *s > 0.1 && *s < 10.0), "{spacing:?}");
        }
        Ok(())
    }
}
