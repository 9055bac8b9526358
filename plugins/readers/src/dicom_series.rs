//! Dataset format `dicom`: DICOM files, as series volumes, multi-frame volumes and 2D images.
//!
//! `path` is one DICOM file (read as one sample, whatever its name), or a folder: every
//! folder under it (itself included, at most [`MAX_DEPTH`] levels down) that directly holds
//! DICOM files contributes samples, so one-folder-a-series layouts, `patient/study/series/`
//! trees and flat exports all work. In folders, DICOM files are recognised by name:
//! extension `.dcm`, `.dicom` or `.ima` (any case), or no extension at all (as many scanners
//! write them) with the `DICM` marker at byte 128; `DICOMDIR` and hidden files are skipped.
//!
//! What the files of one folder become is decided from their headers when the source is
//! built (the pixel data is not read then):
//! - a multi-frame file (NumberOfFrames > 1) is one volume, its frames the slices in stored
//!   order;
//! - the single-frame files are grouped by SeriesInstanceUID; a group of two or more files
//!   that all carry ImagePositionPatient and share one slice normal (ImageOrientationPatient)
//!   is a series, one volume;
//! - every other single-frame file is a 2D image `[1, H, W]`: X-rays (VinDr-CXR ships one
//!   file an image, each its own series, none with a position), files without a position,
//!   localizers whose views differ in orientation.
//!
//! So a folder of series folders reads as it always did (one volume a folder), a folder of
//! X-rays as one image a file, and a flat export holding both as both. Samples are sorted by
//! folder, then by their first file's name. A series alone in its folder is named by the
//! folder (in messages and `data inspect`), one sharing its folder by the folder and its
//! SeriesInstanceUID, every other sample by its file.
//!
//! Decoding uses `dicom-object` and `dicom-pixeldata`. Transfer syntaxes: the native ones
//! (little and big endian, implicit and explicit VR), deflate, JPEG baseline/extended/
//! lossless, RLE, JPEG 2000 (dicom-pixeldata's `openjp2` feature, a pure-Rust port of
//! OpenJPEG) and JPEG-LS (its `charls` feature: the CharLS C++ library, compiled from the
//! source the `charls-sys` crate ships, with cmake). A file no codec decodes fails naming the
//! file, its transfer syntax and BitsAllocated. The modality LUT (RescaleSlope /
//! RescaleIntercept: Hounsfield units for CT) is applied; VOI windows in the files are not
//! (use `window`), nor is MONOCHROME1 inverted: values are the physical ones. BitsAllocated 8
//! and 16 go through dicom-pixeldata's LUT; 32 (RT dose, some PET and research files), which
//! that LUT refuses, is converted here for whatever the codecs decode (native data always),
//! rescale included; float32 holds those integers exactly up to 2^24 and to 7 significant
//! digits above. BitsAllocated 1 (bitmaps: segmentations) reads as 0 and 1.
//!
//! Series slices are sorted by ImagePositionPatient projected on the slice normal (the cross
//! product of ImageOrientationPatient's row and column directions), so oblique and
//! sagittal stacks sort right and file names do not matter; where slices lack orientation,
//! by InstanceNumber; where one lacks that too, by file name. The spacing is (median
//! distance between consecutive slice positions, PixelSpacing's row spacing, its column
//! spacing) in mm; without orientation the slice distance comes from SpacingBetweenSlices,
//! else SliceThickness; a series missing either gives no spacing.
//!
//! A single file's spacing (multi-frame volume or 2D image) is (slice distance, row, column)
//! in mm: in-plane from PixelSpacing, else the functional groups' PixelMeasuresSequence
//! (shared, then the first frame's), else ImagerPixelSpacing (X-rays); the slice distance
//! from the per-frame PlanePositionSequence positions along the slice normal (median), else
//! SpacingBetweenSlices, else GridFrameOffsetVector (RT dose), else SliceThickness. What none
//! of these give is 1 mm, with a debug log. (A 2D image keeps its one slice under
//! `target_spacing`: core resamples one-slice samples in-plane only.)
//!
//! `Volume::dtype` is the stored sample type before the modality LUT, from BitsAllocated and
//! PixelRepresentation (`int16` for most CT, `uint16` for most MRI); where the slices of a
//! series disagree, the first slice's (in slice order) is reported.
//!
//! Two slices of a series at one position, slices of different sizes and colour images are
//! errors naming the files: each is a volume that would silently come out wrong.

use crate::files;
use crate::intensity::{self, Normalization, Window};
use dicom_dictionary_std::tags;
use dicom_object::{open_file, DefaultDicomObject, InMemDicomObject, OpenFileOptions, Tag};
use dicom_pixeldata::{DecodedPixelData, PixelDecoder, PixelRepresentation};
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Keys of a `[data.sources.NAME]` section with `format = "dicom"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DicomConfig {
    /// A DICOM file, or a folder of DICOM files and/or of folders of them (at any depth up
    /// to 8): series folders, X-ray folders, flat exports. A relative path resolves against
    /// the config file's folder (from `--set` or the environment: against the working
    /// directory). Required.
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

/// How many folder levels below `path` are searched for DICOM files.
pub const MAX_DEPTH: usize = 8;

/// Two slices share a slice normal when the cosine of their angle exceeds this (2.6
/// degrees): registered series carry rounding noise in ImageOrientationPatient, a
/// localizer's views differ by 90 degrees.
const SAME_NORMAL: f64 = 0.999;

/// One sample of a DICOM source.
enum Sample {
    /// Single-frame files of one series in one folder, stacked into a volume. `alone`: the
    /// only sample of its folder, named by the folder.
    Series {
        folder: PathBuf,
        uid: Option<String>,
        files: Vec<PathBuf>,
        alone: bool,
    },
    /// One file: a 2D image if it holds one frame, a volume if several.
    File(PathBuf),
}

impl Sample {
    fn first_file(&self) -> &Path {
        match self {
            Sample::Series { files, .. } => &files[0],
            Sample::File(path) => path,
        }
    }

    fn folder(&self) -> &Path {
        match self {
            Sample::Series { folder, .. } => folder,
            Sample::File(path) => path.parent().unwrap_or(Path::new("")),
        }
    }
}

/// The DICOM reader: the listed samples.
pub struct DicomReader {
    samples: Vec<Sample>,
    window: Option<Window>,
    normalize: Normalization,
}

impl DicomReader {
    /// Lists the samples under `config.path` (already resolved); `key` is the section's
    /// dotted key, for messages.
    pub fn new(config: DicomConfig, key: &str) -> Result<DicomReader> {
        ensure!(
            !config.path.as_os_str().is_empty(),
            "config key `{key}.path` is missing: expected a DICOM file, a series folder or a folder of them"
        );
        let samples = list_samples(&config.path).with_context(|| format!("config key `{key}.path`"))?;
        Ok(DicomReader {
            samples,
            window: config.window,
            normalize: config.normalize,
        })
    }
}

impl Dataset for DicomReader {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn describe(&self, index: usize) -> String {
        match self.samples.get(index) {
            Some(Sample::Series {
                folder, alone: true, ..
            }) => folder.display().to_string(),
            Some(Sample::Series { folder, uid, files, .. }) => format!(
                "{} (series {}, {} files)",
                folder.display(),
                uid.as_deref().unwrap_or("without SeriesInstanceUID"),
                files.len()
            ),
            Some(Sample::File(path)) => path.display().to_string(),
            None => format!("DICOM sample #{index} (out of range: {} samples)", self.samples.len()),
        }
    }

    fn load(&self, index: usize) -> Result<Volume> {
        let Some(sample) = self.samples.get(index) else {
            bail!(
                "DICOM sample #{index} does not exist: the source has {} samples",
                self.samples.len()
            );
        };
        let stack = match sample {
            Sample::Series { files, .. } => {
                read_series(files).with_context(|| format!("cannot read DICOM series `{}`", self.describe(index)))?
            }
            Sample::File(path) => {
                read_file(path).with_context(|| format!("cannot decode DICOM file `{}`", path.display()))?
            }
        };
        let mut volume = Volume::new(
            intensity::normalize(&stack.voxels, self.window, self.normalize, &self.describe(index)),
            stack.spacing,
        );
        volume.dtype = stack.dtype;
        Ok(volume)
    }

    fn attributes(&self, index: usize) -> Result<serde_json::Map<String, serde_json::Value>> {
        let Some(sample) = self.samples.get(index) else {
            return Ok(Default::default());
        };
        let path = sample.first_file();
        let object = read_header(path)?;
        let mut attributes = header_attributes(&object);
        if let Sample::Series { files, .. } = sample {
            attributes.insert("files".into(), files.len().into());
        }
        Ok(attributes)
    }
}

/// What `data inspect` shows of a file's header.
fn header_attributes(object: &DefaultDicomObject) -> serde_json::Map<String, serde_json::Value> {
    let text = |tag: Tag| {
        object
            .get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
    };
    let int = |tag: Tag| object.get(tag).and_then(|e| e.to_int::<i64>().ok());
    let mut attributes = serde_json::Map::new();
    let mut put = |name: &str, value: Option<serde_json::Value>| {
        if let Some(value) = value {
            attributes.insert(name.into(), value);
        }
    };
    put("modality", text(tags::MODALITY).map(Into::into));
    put("frames", Some(int(tags::NUMBER_OF_FRAMES).unwrap_or(1).into()));
    put("rows", int(tags::ROWS).map(Into::into));
    put("columns", int(tags::COLUMNS).map(Into::into));
    put("bits_allocated", int(tags::BITS_ALLOCATED).map(Into::into));
    put("bits_stored", int(tags::BITS_STORED).map(Into::into));
    put("pixel_representation", int(tags::PIXEL_REPRESENTATION).map(Into::into));
    put("photometric", text(tags::PHOTOMETRIC_INTERPRETATION).map(Into::into));
    put("transfer_syntax", Some(transfer_syntax_name(object).into()));
    attributes
}

/// The file's transfer syntax as "name (UID)", or its UID where the registry lacks it.
fn transfer_syntax_name(object: &DefaultDicomObject) -> String {
    let uid = object.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    match TransferSyntaxRegistry.get(uid) {
        Some(syntax) => format!("{} ({uid})", syntax.name()),
        None => format!("unknown transfer syntax {uid}"),
    }
}

/// Whether `path` is named like a DICOM file (see the module's doc). A name without
/// extension is only a guess, so such a regular file must carry the `DICM` marker; what is
/// no regular file is left to [`files::files_in`], which skips folders and reports the
/// rest (FIFOs, broken links), and is never opened here (opening a FIFO would block).
fn is_dicom_name(path: &Path) -> bool {
    if path
        .file_name()
        .is_some_and(|name| name.eq_ignore_ascii_case("DICOMDIR"))
    {
        return false;
    }
    match files::extension(path) {
        None => !path.is_file() || has_dicom_marker(path),
        Some(extension) => matches!(extension.as_str(), "dcm" | "dicom" | "ima"),
    }
}

/// Whether bytes 128..132 of `path` are `DICM`, the marker after the preamble.
fn has_dicom_marker(path: &Path) -> bool {
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut head))
        .is_ok_and(|()| &head[128..] == b"DICM")
}

/// The header of `path`, up to the pixel data.
fn read_header(path: &Path) -> Result<DefaultDicomObject> {
    OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .with_context(|| format!("cannot decode DICOM file `{}`", path.display()))
}

/// What listing needs of a file.
struct Header {
    path: PathBuf,
    series_uid: Option<String>,
    frames: u32,
    position: Option<[f64; 3]>,
    normal: Option<[f64; 3]>,
}

impl Header {
    fn read(path: &Path) -> Result<Header> {
        let object = read_header(path)?;
        Ok(Header {
            path: path.to_path_buf(),
            series_uid: series_uid(&object),
            frames: frame_count(&object),
            position: floats(&object, tags::IMAGE_POSITION_PATIENT),
            normal: floats(&object, tags::IMAGE_ORIENTATION_PATIENT)
                .as_ref()
                .and_then(slice_normal),
        })
    }
}

fn series_uid(object: &InMemDicomObject) -> Option<String> {
    object
        .get(tags::SERIES_INSTANCE_UID)
        .and_then(|e| e.to_str().ok())
        .map(|uid| uid.trim_end_matches(['\0', ' ']).to_string())
        .filter(|uid| !uid.is_empty())
}

fn frame_count(object: &InMemDicomObject) -> u32 {
    object
        .get(tags::NUMBER_OF_FRAMES)
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// The samples at `path`: the file itself, or what the folders under it hold, sorted by
/// folder and first file.
fn list_samples(path: &Path) -> Result<Vec<Sample>> {
    if path.is_file() {
        read_header(path)?;
        return Ok(vec![Sample::File(path.to_path_buf())]);
    }
    files::ensure_folder(path, "a DICOM file, a DICOM series folder or a folder of them")?;
    let mut samples = Vec::new();
    collect_samples(path, 0, &mut samples)?;
    ensure!(
        !samples.is_empty(),
        "folder `{}` holds no DICOM file (.dcm, .dicom, .ima or no extension), neither itself nor in its \
         subfolders (searched {MAX_DEPTH} levels deep)",
        path.display()
    );
    samples.sort_by(|a, b| {
        a.folder()
            .cmp(b.folder())
            .then_with(|| a.first_file().cmp(b.first_file()))
    });
    Ok(samples)
}

fn collect_samples(folder: &Path, depth: usize, samples: &mut Vec<Sample>) -> Result<()> {
    let files = files::files_in(folder, is_dicom_name)?;
    if !files.is_empty() {
        samples.extend(folder_samples(folder, &files)?);
    }
    if depth < MAX_DEPTH {
        for sub in files::subfolders(folder)? {
            collect_samples(&sub, depth + 1, samples)?;
        }
    }
    Ok(())
}

/// The samples of the DICOM files directly in `folder` (the module's doc gives the rule).
fn folder_samples(folder: &Path, paths: &[PathBuf]) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let mut groups: BTreeMap<Option<String>, Vec<Header>> = BTreeMap::new();
    for path in paths {
        let header = Header::read(path)?;
        if header.frames > 1 {
            samples.push(Sample::File(header.path));
        } else {
            groups.entry(header.series_uid.clone()).or_default().push(header);
        }
    }
    for (uid, headers) in groups {
        if forms_series(&headers) {
            samples.push(Sample::Series {
                folder: folder.to_path_buf(),
                uid,
                files: headers.into_iter().map(|h| h.path).collect(),
                alone: false,
            });
        } else {
            samples.extend(headers.into_iter().map(|h| Sample::File(h.path)));
        }
    }
    if let [Sample::Series { alone, .. }] = samples.as_mut_slice() {
        *alone = true;
    }
    Ok(samples)
}

/// Whether single-frame files of one SeriesInstanceUID stack into a volume: two or more,
/// each with a position, all with one slice normal (or all without orientation, ordered by
/// InstanceNumber then).
fn forms_series(headers: &[Header]) -> bool {
    if headers.len() < 2 || headers.iter().any(|h| h.position.is_none()) {
        return false;
    }
    match headers[0].normal {
        None => headers.iter().all(|h| h.normal.is_none()),
        Some(first) => headers.iter().all(|h| {
            h.normal
                .is_some_and(|n| n.iter().zip(first).map(|(a, b)| a * b).sum::<f64>() > SAME_NORMAL)
        }),
    }
}

/// A decoded sample before normalisation: float32 `[D, H, W]`, the spacing in mm where
/// known, the stored sample type.
struct Stack {
    voxels: Tensor,
    spacing: Option<[f64; 3]>,
    dtype: Option<String>,
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
    /// The spacing of this file read alone (see the module's doc).
    file_spacing: [f64; 3],
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
fn floats<const N: usize>(object: &InMemDicomObject, tag: Tag) -> Option<[f64; N]> {
    let values = object.get(tag)?.to_multi_float64().ok()?;
    let values: [f64; N] = values.get(..N)?.try_into().ok()?;
    values.iter().all(|v| v.is_finite()).then_some(values)
}

/// The items of a sequence attribute (none where it is absent or not a sequence).
fn items(object: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    object.get(tag).and_then(|e| e.items()).unwrap_or_default()
}

/// The first item of `tag` in `object`.
fn first_item(object: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    items(object, tag).first()
}

/// The pixel values as float32, after the modality LUT (see the module's doc).
fn pixel_values(decoded: &DecodedPixelData<'_>) -> Result<Vec<f32>> {
    match decoded.bits_allocated() {
        8 | 16 => Ok(decoded.to_vec()?),
        // dicom-pixeldata expands bitmaps to one byte of 0 or 255 a pixel.
        1 => Ok(decoded.data().iter().map(|&v| f32::from(u8::from(v != 0))).collect()),
        32 => {
            let bits = u32::from(decoded.bits_stored().clamp(1, 32));
            let signed = decoded.pixel_representation() == PixelRepresentation::Signed;
            // Only the BitsStored low bits hold the value; signed values extend their sign bit.
            let value = |word: u32| -> f64 {
                let shift = 32 - bits;
                if signed {
                    f64::from(((word << shift) as i32) >> shift)
                } else {
                    f64::from((word << shift) >> shift)
                }
            };
            let rescale = decoded.rescale()?;
            let frame_pixels = (decoded.rows() as usize * decoded.columns() as usize).max(1);
            let data = decoded.data();
            Ok(data
                .chunks_exact(4)
                .enumerate()
                .map(|(i, bytes)| {
                    let word = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    let r = rescale.get(i / frame_pixels).or(rescale.first());
                    let v = value(word);
                    r.map_or(v, |r| v * r.slope + r.intercept) as f32
                })
                .collect())
        }
        other => bail!("BitsAllocated {other} is not supported; expected 1, 8, 16 or 32"),
    }
}

fn decode_slice(path: &Path) -> Result<Slice> {
    let object = open_file(path)?;
    let bits_allocated = object.get(tags::BITS_ALLOCATED).and_then(|e| e.to_int::<u16>().ok());
    let bits = || bits_allocated.map_or("absent".to_string(), |b| b.to_string());
    let decoded = object.decode_pixel_data().with_context(|| {
        format!(
            "cannot decode the pixel data (transfer syntax {}, BitsAllocated {})",
            transfer_syntax_name(&object),
            bits()
        )
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
    let values = pixel_values(&decoded).with_context(|| {
        format!(
            "cannot convert the pixel values (BitsAllocated {}, transfer syntax {})",
            bits(),
            transfer_syntax_name(&object)
        )
    })?;
    ensure!(
        values.len() as i64 == shape.iter().product::<i64>(),
        "the pixel data holds {} values, not frames x rows x columns = {shape:?} (BitsAllocated {})",
        values.len(),
        bits()
    );
    let instance = object.get(tags::INSTANCE_NUMBER).and_then(|e| e.to_int::<i64>().ok());
    let slice_gap = [tags::SPACING_BETWEEN_SLICES, tags::SLICE_THICKNESS]
        .into_iter()
        .find_map(|tag| positive(&object, tag));
    let frames = decoded.number_of_frames();
    Ok(Slice {
        path: path.to_path_buf(),
        pixels: Tensor::from_slice(&values).view(shape),
        position: floats(&object, tags::IMAGE_POSITION_PATIENT),
        orientation: floats(&object, tags::IMAGE_ORIENTATION_PATIENT),
        instance,
        pixel_spacing: floats(&object, tags::PIXEL_SPACING).filter(|s| s.iter().all(|v| *v > 0.0)),
        slice_gap,
        file_spacing: file_spacing(&object, frames, path),
        dtype: sample_type(decoded.bits_allocated(), decoded.pixel_representation()),
    })
}

/// A single positive number of `tag` (absolute value: some scanners write negative
/// SpacingBetweenSlices).
fn positive(object: &InMemDicomObject, tag: Tag) -> Option<f64> {
    floats::<1>(object, tag).map(|[v]| v.abs()).filter(|v| *v > 0.0)
}

/// The spacing of one file read alone (the module's doc gives the order of the sources).
fn file_spacing(object: &InMemDicomObject, frames: u32, path: &Path) -> [f64; 3] {
    let per_frame = items(object, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    // The functional groups that describe every frame, then those of the first frame.
    let groups: Vec<&InMemDicomObject> = first_item(object, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
        .into_iter()
        .chain(per_frame.first())
        .collect();
    let measures: Vec<&InMemDicomObject> = groups
        .iter()
        .filter_map(|g| first_item(g, tags::PIXEL_MEASURES_SEQUENCE))
        .collect();
    let in_all = |tag: Tag| {
        std::iter::once(object)
            .chain(measures.iter().copied())
            .find_map(|o| positive(o, tag))
    };
    let in_plane = std::iter::once(object)
        .chain(measures.iter().copied())
        .find_map(|o| floats::<2>(o, tags::PIXEL_SPACING))
        .or_else(|| floats::<2>(object, tags::IMAGER_PIXEL_SPACING))
        .filter(|s| s.iter().all(|v| *v > 0.0));
    let orientation = floats::<6>(object, tags::IMAGE_ORIENTATION_PATIENT).or_else(|| {
        groups
            .iter()
            .filter_map(|g| first_item(g, tags::PLANE_ORIENTATION_SEQUENCE))
            .find_map(|o| floats::<6>(o, tags::IMAGE_ORIENTATION_PATIENT))
    });
    let positions: Option<Vec<[f64; 3]>> = per_frame
        .iter()
        .map(|frame| {
            first_item(frame, tags::PLANE_POSITION_SEQUENCE).and_then(|p| floats::<3>(p, tags::IMAGE_POSITION_PATIENT))
        })
        .collect();
    let between_positions = match (positions, orientation.as_ref().and_then(slice_normal)) {
        (Some(positions), Some(normal)) if frames > 1 && positions.len() == frames as usize => {
            let depths: Vec<f64> = positions.iter().map(|p| dot(p, &normal)).collect();
            median_step(&depths)
        }
        _ => None,
    };
    let grid_offsets = || {
        let offsets = object.get(tags::GRID_FRAME_OFFSET_VECTOR)?.to_multi_float64().ok()?;
        (offsets.len() == frames as usize && frames > 1)
            .then(|| median_step(&offsets))
            .flatten()
    };
    let slice = between_positions
        .or_else(|| in_all(tags::SPACING_BETWEEN_SLICES))
        .or_else(grid_offsets)
        .or_else(|| in_all(tags::SLICE_THICKNESS));
    if slice.is_none() {
        tracing::debug!(
            "`{}`: no slice distance recorded (per-frame positions, SpacingBetweenSlices, GridFrameOffsetVector, SliceThickness); assuming 1 mm",
            path.display()
        );
    }
    if in_plane.is_none() {
        tracing::debug!(
            "`{}`: no pixel spacing recorded (PixelSpacing, PixelMeasuresSequence, ImagerPixelSpacing); assuming 1 mm",
            path.display()
        );
    }
    let [rows, columns] = in_plane.unwrap_or([1.0, 1.0]);
    [slice.unwrap_or(1.0), rows, columns]
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// The median absolute step between consecutive values, if it is positive.
fn median_step(values: &[f64]) -> Option<f64> {
    let mut steps: Vec<f64> = values.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
    steps.sort_by(f64::total_cmp);
    steps.get(steps.len() / 2).copied().filter(|s| *s > 1e-6)
}

/// The unit normal of an ImageOrientationPatient (row direction x column direction).
fn slice_normal(orientation: &[f64; 6]) -> Option<[f64; 3]> {
    let [r0, r1, r2, c0, c1, c2] = *orientation;
    let normal = [r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0];
    let norm = normal.iter().map(|v| v * v).sum::<f64>().sqrt();
    (norm > 1e-6).then(|| normal.map(|v| v / norm))
}

/// Decodes one file as a sample: its frames as slices, with [`file_spacing`].
fn read_file(path: &Path) -> Result<Stack> {
    let slice = decode_slice(path)?;
    Ok(Stack {
        voxels: slice.pixels,
        spacing: Some(slice.file_spacing),
        dtype: slice.dtype,
    })
}

/// Decodes a series' single-frame files and stacks them in slice order: float32
/// `[D, H, W]`, the spacing in mm, where the files give it, and the first slice's stored
/// sample type.
fn read_series(paths: &[PathBuf]) -> Result<Stack> {
    let mut slices = paths
        .iter()
        .map(|path| decode_slice(path).with_context(|| format!("cannot decode DICOM file `{}`", path.display())))
        .collect::<Result<Vec<_>>>()?;

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
    // Listing reads NumberOfFrames; a file whose pixel data holds more frames than that
    // says is caught here.
    if let Some(multi) = slices.iter().find(|s| s.pixels.size()[0] > 1) {
        bail!(
            "`{}` holds {} frames in a series of {} files; expected single-frame slices",
            multi.path.display(),
            multi.pixels.size()[0],
            slices.len()
        );
    }

    // Slice order and the distance between slices.
    let normal = slices[0].orientation.as_ref().and_then(slice_normal);
    let located = slices.iter().all(|s| s.position.is_some() && s.orientation.is_some());
    let slice_distance = match normal {
        Some(normal) if located => {
            let depth = |s: &Slice| dot(&s.position.unwrap_or_default(), &normal);
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
    Ok(Stack {
        voxels: Tensor::cat(&frames, 0),
        spacing,
        dtype,
    })
}

fn build(section: &Section) -> Result<Box<dyn Dataset>> {
    let mut config: DicomConfig = section.parse()?;
    if !config.path.as_os_str().is_empty() {
        config.path = section.resolve_path("path", &config.path);
    }
    Ok(Box::new(DicomReader::new(config, &section.key)?))
}

register!(DATASETS, DICOM: DatasetEntry = DatasetEntry {
    name: "dicom",
    about: "DICOM files: series folders as volumes, multi-frame files as volumes, single X-rays as 2D images (rescale applied; JPEG, JPEG-LS, JPEG 2000, RLE)",
    default_config: default_toml::<DicomConfig>,
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::value::{DataSetSequence, PrimitiveValue};
    use dicom_core::{dicom_value, DataElement, VR};
    use dicom_dictionary_std::uids;
    use dicom_object::mem::InMemElement;
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
    fn files_without_position_are_2d_images_sorted_by_name() -> Result<()> {
        let folder = tempfile::tempdir()?;
        // One series, no ImagePositionPatient: X-ray views, not slices of a volume.
        for (name, instance, base) in [("x.dcm", 2, 100), ("y.dcm", 1, 0), ("z.dcm", 3, 200)] {
            let spec = SliceSpec {
                position: None,
                ..SliceSpec::axial(0.0, instance, base)
            };
            write_slice(&folder.path().join(name), &spec)?;
        }
        let dataset = reader(&config_for(folder.path(), "normalize = \"none\""))?;
        let names: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
        let expected: Vec<String> = ["x.dcm", "y.dcm", "z.dcm"]
            .iter()
            .map(|n| folder.path().join(n).display().to_string())
            .collect();
        assert_eq!(names, expected);
        let firsts: Vec<f64> = (0..3)
            .map(|i| {
                let volume = dataset.load(i)?;
                assert_eq!(volume.voxels.size(), [1, 2, 3]);
                Ok(volume.voxels.double_value(&[0, 0, 0]))
            })
            .collect::<Result<_>>()?;
        assert_eq!(firsts, [-800.0, -1000.0, -600.0]);
        // PixelSpacing in-plane; no SliceThickness: 1 mm along the (single) slice axis.
        assert_eq!(dataset.load(0)?.spacing, Some([1.0, 0.5, 0.75]));
        Ok(())
    }

    #[test]
    fn positions_without_orientation_order_the_slices_by_instance_number() -> Result<()> {
        let folder = tempfile::tempdir()?;
        for (name, instance, base) in [("x.dcm", 2, 100), ("y.dcm", 1, 0), ("z.dcm", 3, 200)] {
            let spec = SliceSpec {
                orientation: None,
                ..SliceSpec::axial(5.0 - instance as f64, instance, base)
            };
            write_slice(&folder.path().join(name), &spec)?;
        }
        let dataset = reader(&config_for(folder.path(), "normalize = \"none\""))?;
        assert_eq!(dataset.len(), 1);
        let volume = dataset.load(0)?;
        let firsts: Vec<f64> = (0..3).map(|k| volume.voxels.double_value(&[k, 0, 0])).collect();
        assert_eq!(firsts, [-1000.0, -800.0, -600.0]);
        // No orientation and no SliceThickness: no slice distance, so no spacing.
        assert_eq!(volume.spacing, None);
        Ok(())
    }

    #[test]
    fn folder_of_series_lists_each_series_folder_in_order() -> Result<()> {
        let root = tempfile::tempdir()?;
        for (series, count) in [("t2", 2), ("t1", 3), ("deep/er/flair", 2)] {
            let folder = root.path().join(series);
            std::fs::create_dir_all(&folder)?;
            for i in 0..count {
                write_slice(
                    &folder.join(format!("{i}.dcm")),
                    &SliceSpec::axial(i as f64, i, 10 * i as u16),
                )?;
            }
        }
        // A folder holding one slice holds one 2D image, named by its file.
        std::fs::create_dir_all(root.path().join("u"))?;
        write_slice(&root.path().join("u/only.dcm"), &SliceSpec::axial(0.0, 1, 0))?;
        std::fs::create_dir_all(root.path().join("empty"))?;
        std::fs::write(root.path().join("DICOMDIR"), "an index, not a slice")?;
        let dataset = reader(&config_for(root.path(), ""))?;
        let folders: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
        let expected: Vec<String> = ["deep/er/flair", "t1", "t2", "u/only.dcm"]
            .iter()
            .map(|s| root.path().join(s).display().to_string())
            .collect();
        assert_eq!(folders, expected);
        let depths: Vec<i64> = (0..4)
            .map(|i| dataset.load(i).map(|v| v.voxels.size()[0]))
            .collect::<Result<_>>()?;
        assert_eq!(depths, [2, 3, 2, 1]);
        let voxels = dataset.load(1)?.voxels;
        assert!(voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn one_folder_of_several_series_and_images_gives_each_its_sample() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let file = |name: &str| folder.path().join(name);
        // Two 2-slice series and a localizer series whose two views are orthogonal.
        write_slice(&file("a1.dcm"), &SliceSpec::axial(1.0, 1, 0))?;
        write_slice(&file("a2.dcm"), &SliceSpec::axial(2.0, 2, 10))?;
        for (name, z, base) in [("b1.dcm", 4.0, 20), ("b2.dcm", 3.0, 30)] {
            let spec = SliceSpec {
                series: "9.9",
                ..SliceSpec::axial(z, 1, base)
            };
            write_slice(&file(name), &spec)?;
        }
        for (name, orientation) in [
            ("loc_ap.dcm", [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]),
            ("loc_lat.dcm", [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]),
        ] {
            let spec = SliceSpec {
                series: "7.7",
                orientation: Some(orientation),
                ..SliceSpec::axial(0.0, 1, 40)
            };
            write_slice(&file(name), &spec)?;
        }
        let dataset = reader(&config_for(folder.path(), "normalize = \"none\""))?;
        let names: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
        let root = folder.path().display().to_string();
        assert_eq!(
            names,
            [
                format!("{root} (series 1.2.3.4, 2 files)"),
                format!("{root} (series 9.9, 2 files)"),
                file("loc_ap.dcm").display().to_string(),
                file("loc_lat.dcm").display().to_string(),
            ]
        );
        let depths: Vec<i64> = (0..4)
            .map(|i| dataset.load(i).map(|v| v.voxels.size()[0]))
            .collect::<Result<_>>()?;
        assert_eq!(depths, [2, 2, 1, 1]);
        // Series 9.9 sorts by position: b2 (z = 3) first.
        assert_eq!(dataset.load(1)?.voxels.double_value(&[0, 0, 0]), 2.0 * 30.0 - 1000.0);
        Ok(())
    }

    #[test]
    fn a_file_path_is_one_sample() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("IM0001");
        write_slice(&path, &SliceSpec::axial(0.0, 1, 7))?;
        let dataset = reader(&config_for(&path, "normalize = \"none\""))?;
        assert_eq!(dataset.len(), 1);
        assert_eq!(dataset.describe(0), path.display().to_string());
        let volume = dataset.load(0)?;
        assert_eq!(volume.voxels.size(), [1, 2, 3]);
        assert_eq!(volume.voxels.double_value(&[0, 1, 2]), 2.0 * 12.0 - 1000.0);
        assert_eq!(volume.dtype.as_deref(), Some("uint16"));
        let attributes = dataset.attributes(0)?;
        assert_eq!(attributes["frames"], 1);
        assert_eq!(attributes["bits_allocated"], 16);
        assert_eq!(attributes["photometric"], "MONOCHROME2");
        assert!(
            attributes["transfer_syntax"]
                .as_str()
                .is_some_and(|s| s.starts_with("Explicit VR Little Endian")),
            "{attributes:?}"
        );

        let text = folder.path().join("notes.dcm");
        std::fs::write(&text, "not DICOM")?;
        let message = format!("{:#}", reader(&config_for(&text, "")).err().expect("not DICOM"));
        assert!(
            message.contains("data.sources.mri.path") && message.contains("notes.dcm"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn extensionless_files_need_the_dicom_marker() -> Result<()> {
        let folder = tempfile::tempdir()?;
        write_slice(&folder.path().join("IM0001"), &SliceSpec::axial(0.0, 1, 0))?;
        std::fs::write(folder.path().join("LOCKFILE"), "not DICOM")?;
        let dataset = reader(&config_for(folder.path(), ""))?;
        assert_eq!(dataset.len(), 1);
        assert_eq!(dataset.describe(0), folder.path().join("IM0001").display().to_string());
        Ok(())
    }

    /// Writes a 3-frame file of 2 x 3 pixels (frame k holds stored values 10k + pixel
    /// index): with `groups`, its geometry lives only in the functional groups (enhanced
    /// CT / MR style, frames 1.25 mm apart along an oblique normal), else only in
    /// SliceThickness and no pixel spacing at all.
    fn write_multiframe(path: &Path, groups: bool) -> Result<()> {
        let pixels: Vec<u16> = (0..3u16).flat_map(|k| (0..6).map(move |i| 10 * k + i)).collect();
        let mut object = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2.1"),
            ),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("1.2.3.9")),
            DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, PrimitiveValue::from("1.2.3.10")),
            DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from("3")),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, dicom_value!(U16, 1)),
            DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from("MONOCHROME2"),
            ),
            DataElement::new(tags::ROWS, VR::US, dicom_value!(U16, 2)),
            DataElement::new(tags::COLUMNS, VR::US, dicom_value!(U16, 3)),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, dicom_value!(U16, 16)),
            DataElement::new(tags::BITS_STORED, VR::US, dicom_value!(U16, 16)),
            DataElement::new(tags::HIGH_BIT, VR::US, dicom_value!(U16, 15)),
            DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, dicom_value!(U16, 0)),
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
        ]);
        if groups {
            // Rows along x, columns along (0, 0.6, 0.8): the normal is (0, -0.8, 0.6).
            let orientation = [1.0, 0.0, 0.0, 0.0, 0.6, 0.8];
            let normal = [0.0, -0.8, 0.6];
            let item = |elements: Vec<InMemElement>| InMemDicomObject::from_element_iter(elements);
            let sequence =
                |tag, items: Vec<InMemDicomObject>| DataElement::new(tag, VR::SQ, DataSetSequence::from(items));
            let shared = item(vec![
                sequence(
                    tags::PIXEL_MEASURES_SEQUENCE,
                    vec![item(vec![
                        DataElement::new(tags::PIXEL_SPACING, VR::DS, decimal_strings(&[0.4, 0.6])),
                        DataElement::new(tags::SLICE_THICKNESS, VR::DS, decimal_strings(&[5.0])),
                    ])],
                ),
                sequence(
                    tags::PLANE_ORIENTATION_SEQUENCE,
                    vec![item(vec![DataElement::new(
                        tags::IMAGE_ORIENTATION_PATIENT,
                        VR::DS,
                        decimal_strings(&orientation),
                    )])],
                ),
            ]);
            let frames: Vec<InMemDicomObject> = (0..3)
                .map(|k| {
                    let depth = 1.25 * k as f64;
                    let position = [7.0, 2.0 + depth * normal[1], -3.0 + depth * normal[2]];
                    item(vec![sequence(
                        tags::PLANE_POSITION_SEQUENCE,
                        vec![item(vec![DataElement::new(
                            tags::IMAGE_POSITION_PATIENT,
                            VR::DS,
                            decimal_strings(&position),
                        )])],
                    )])
                })
                .collect();
            object.put(sequence(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));
            object.put(sequence(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frames));
        } else {
            object.put(DataElement::new(tags::SLICE_THICKNESS, VR::DS, decimal_strings(&[2.0])));
        }
        object
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))?
            .write_to_file(path)?;
        Ok(())
    }

    #[test]
    fn a_multi_frame_file_is_a_volume_with_the_spacing_its_functional_groups_give() -> Result<()> {
        let folder = tempfile::tempdir()?;
        write_multiframe(&folder.path().join("enhanced.dcm"), true)?;
        write_multiframe(&folder.path().join("plain.dcm"), false)?;
        let dataset = reader(&config_for(folder.path(), "normalize = \"none\""))?;
        assert_eq!(dataset.len(), 2);
        for index in 0..2 {
            let volume = dataset.load(index)?;
            assert_eq!(volume.voxels.size(), [3, 2, 3]);
            // Frames in stored order: frame 2, row 1, column 2 holds 20 + 5.
            assert_eq!(volume.voxels.double_value(&[2, 1, 2]), 25.0);
        }
        let enhanced = dataset.load(0)?.spacing.expect("a file's spacing");
        for (got, want) in enhanced.iter().zip([1.25, 0.4, 0.6]) {
            assert!((got - want).abs() < 1e-9, "{enhanced:?}");
        }
        // No pixel spacing anywhere: 1 mm in-plane.
        assert_eq!(dataset.load(1)?.spacing, Some([2.0, 1.0, 1.0]));
        assert_eq!(dataset.attributes(0)?["frames"], 3);
        Ok(())
    }

    #[test]
    fn inconsistent_series_are_errors_naming_the_files() -> Result<()> {
        let root = tempfile::tempdir()?;
        let cases: [(&str, Vec<SliceSpec>, &str); 2] = [
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
        // Headers are read when the source is built: a file that is no DICOM fails then.
        let broken = folder.path().join("1.dcm");
        std::fs::write(&broken, b"definitely not a DICOM file")?;
        let message = format!("{:#}", reader(&config_for(folder.path(), "")).err().expect("corrupt"));
        assert!(
            message.contains(&broken.display().to_string()) && message.contains("data.sources.mri.path"),
            "{message}"
        );

        // Damaged pixel data shows when the slices are decoded.
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
