//! Dataset format `nifti`: a folder of NIfTI-1 volumes (`.nii`, `.nii.gz`) or one such file,
//! each one sample.
//!
//! Decoding is [`crate::nifti_file`] (the `nifti` crate; `scl_slope` / `scl_inter` applied),
//! shared with the `decathlon` format; normalisation is [`crate::intensity`]'s, shared with
//! every reader of this crate. Raw intensities vary by orders of magnitude between files
//! (the Decathlon hippocampus MRIs reach about 1.7e6, CTs are in Hounsfield units), so every
//! volume is normalised on its own, by default the nnU-Net way (clip to the 0.5 and 99.5
//! percentiles, then zero mean and unit variance).
//!
//! Files are listed when the source is built (a wrong path fails before training starts)
//! and decoded in `load`, on the loader threads.
//!
//! A 4D file (a time series: fMRI, DCE, diffusion) is refused unless `timepoint` picks one
//! of its 3D volumes (0-based) or asks for their voxel-wise mean (`"mean"`); a timepoint
//! past the end is an error naming the file, its number of timepoints and the key.

use crate::files;
use crate::intensity::{self, Normalization};
use crate::nifti_file::{self, FourthAxis, Timepoint};
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Keys of a `[data.sources.NAME]` section with `format = "nifti"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NiftiConfig {
    /// A folder of `.nii` / `.nii.gz` files (not searched recursively) or one such file;
    /// a relative path resolves against the config file's folder (from `--set` or the
    /// environment: against the working directory). Required.
    pub path: PathBuf,
    /// The NIfTI axis (0, 1 or 2) that becomes the slice axis D; the other two become H and
    /// W in their order. The default 2 slices along the third axis, axial in RAS-oriented
    /// scans.
    pub slice_axis: usize,
    /// `"zscore"`, `"minmax"` or `"none"`.
    pub normalize: Normalization,
    /// For 4D files (fMRI, DCE, diffusion series): the 0-based index of the 3D volume to
    /// read along the fourth axis, or `"mean"` for the voxel-wise mean of all of them. Unset,
    /// a 4D file with more than one volume is refused. A 3D file is one timepoint (0).
    pub timepoint: Option<Timepoint>,
}

impl Default for NiftiConfig {
    fn default() -> Self {
        NiftiConfig {
            path: PathBuf::new(),
            slice_axis: 2,
            normalize: Normalization::ZScore,
            timepoint: None,
        }
    }
}

/// The NIfTI reader: the listed files and how to turn each into a volume.
pub struct NiftiReader {
    files: Vec<PathBuf>,
    slice_axis: usize,
    normalize: Normalization,
    fourth: FourthAxis,
}

impl NiftiReader {
    /// Lists the files of `config.path` (already resolved); `key` is the section's dotted
    /// key, for messages.
    pub fn new(config: NiftiConfig, key: &str) -> Result<NiftiReader> {
        ensure!(
            !config.path.as_os_str().is_empty(),
            "config key `{key}.path` is missing: expected a folder of .nii / .nii.gz files or one such file"
        );
        ensure!(
            config.slice_axis <= 2,
            "config key `{key}.slice_axis` must be 0, 1 or 2 (the NIfTI axis that becomes the slice axis), found {}",
            config.slice_axis
        );
        let files = list_volumes(&config.path).with_context(|| format!("config key `{key}.path`"))?;
        Ok(NiftiReader {
            files,
            slice_axis: config.slice_axis,
            normalize: config.normalize,
            fourth: config.timepoint.map_or(FourthAxis::Refuse, FourthAxis::Timepoint),
        })
    }

    /// The listed files, in the order of their sample indices.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl Dataset for NiftiReader {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn describe(&self, index: usize) -> String {
        match self.files.get(index) {
            Some(path) => path.display().to_string(),
            None => format!("NIfTI sample #{index} (out of range: {} files)", self.files.len()),
        }
    }

    fn load(&self, index: usize) -> Result<Volume> {
        let Some(path) = self.files.get(index) else {
            bail!(
                "NIfTI sample #{index} does not exist: the source has {} files",
                self.files.len()
            );
        };
        let decoded = nifti_file::decode(path, self.slice_axis, self.fourth)
            .with_context(|| format!("cannot decode NIfTI file `{}`", path.display()))?;
        let mut volume = Volume::new(
            intensity::normalize(&decoded.voxels, None, self.normalize, &self.describe(index)),
            decoded.spacing,
        );
        volume.dtype = Some(decoded.dtype);
        Ok(volume)
    }
}

/// The NIfTI files at `path`: the file itself, or the folder's files sorted by name.
fn list_volumes(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        ensure!(
            nifti_file::is_nifti_name(path),
            "`{}` is not a .nii or .nii.gz file",
            path.display()
        );
        return Ok(vec![path.to_path_buf()]);
    }
    files::ensure_folder(path, "a folder of .nii / .nii.gz files or one such file")?;
    let volumes = files::files_in(path, nifti_file::is_nifti_name)?;
    ensure!(
        !volumes.is_empty(),
        "folder `{}` holds no .nii or .nii.gz file",
        path.display()
    );
    Ok(volumes)
}

fn build(section: &Section) -> Result<Box<dyn Dataset>> {
    let mut config: NiftiConfig = section.parse()?;
    if !config.path.as_os_str().is_empty() {
        config.path = section.resolve_path("path", &config.path);
    }
    Ok(Box::new(NiftiReader::new(config, &section.key)?))
}

register!(DATASETS, NIFTI: DatasetEntry = DatasetEntry {
    name: "nifti",
    about: "NIfTI-1 volumes (.nii, .nii.gz): a folder of them sorted by name, or one file",
    default_config: default_toml::<NiftiConfig>,
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::registry;
    use ndarray::{Array3, Array4};
    use nifti::writer::WriterOptions;

    fn reader(body: &str) -> Result<Box<dyn Dataset>> {
        build(&Section::inline("data.sources.scans", "nifti", body)?)
    }

    fn config_for(path: &Path, extra: &str) -> String {
        format!("path = {:?}\n{extra}", path.display().to_string())
    }

    /// A 4 x 5 x 6 float volume whose value encodes its (x, y, z) index: 100x + 10y + z.
    fn indexed_volume() -> Array3<f32> {
        Array3::from_shape_fn((4, 5, 6), |(x, y, z)| (100 * x + 10 * y + z) as f32)
    }

    #[test]
    fn written_volume_reads_back_with_the_slice_axis_first() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("scan.nii.gz");
        WriterOptions::new(&path).write_nifti(&indexed_volume())?;

        let axial = reader(&config_for(&path, "normalize = \"none\""))?;
        assert_eq!(axial.len(), 1);
        assert_eq!(axial.describe(0), path.display().to_string());
        let volume = axial.load(0)?;
        assert_eq!(volume.voxels.size(), [6, 4, 5]);
        assert_eq!(volume.voxels.kind(), Kind::Float);
        // voxels[z, x, y] = 100x + 10y + z
        assert_eq!(volume.voxels.double_value(&[3, 2, 1]), 213.0);
        assert_eq!(volume.spacing, Some([1.0, 1.0, 1.0]));
        assert_eq!(volume.dtype.as_deref(), Some("float32"));

        let sagittal = reader(&config_for(&path, "normalize = \"none\"\nslice_axis = 0"))?.load(0)?;
        assert_eq!(sagittal.voxels.size(), [4, 5, 6]);
        assert_eq!(sagittal.voxels.double_value(&[2, 1, 3]), 213.0);

        let coronal = reader(&config_for(&path, "normalize = \"none\"\nslice_axis = 1"))?.load(0)?;
        assert_eq!(coronal.voxels.size(), [5, 4, 6]);
        assert_eq!(coronal.voxels.double_value(&[1, 2, 3]), 213.0);
        Ok(())
    }

    #[test]
    fn zscore_gives_zero_mean_unit_variance_and_minmax_the_unit_range() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("scan.nii");
        WriterOptions::new(&path).write_nifti(&indexed_volume())?;

        let zscore = reader(&config_for(&path, ""))?.load(0)?.voxels;
        assert!(zscore.mean(Kind::Double).double_value(&[]).abs() < 1e-5);
        assert!((zscore.to_kind(Kind::Double).std(false).double_value(&[]) - 1.0).abs() < 1e-4);

        let minmax = reader(&config_for(&path, "normalize = \"minmax\""))?.load(0)?.voxels;
        assert_eq!(minmax.min().double_value(&[]), 0.0);
        assert_eq!(minmax.max().double_value(&[]), 1.0);
        Ok(())
    }

    #[test]
    fn scale_slope_and_intercept_are_applied() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("scaled.nii");
        let volume = Array3::from_shape_fn((3, 3, 3), |(x, y, z)| (x + 3 * y + 9 * z) as u8);
        WriterOptions::new(&path).write_nifti(&volume)?;
        // The writer always stores slope 1 and intercept 0; set them in the header as a
        // scanner would (NIfTI-1: scl_slope at byte 112, scl_inter at 116).
        let mut bytes = std::fs::read(&path)?;
        assert_eq!(bytes[..4], 348i32.to_le_bytes(), "expected a little-endian header");
        bytes[112..116].copy_from_slice(&2.5f32.to_le_bytes());
        bytes[116..120].copy_from_slice(&(-10f32).to_le_bytes());
        std::fs::write(&path, bytes)?;

        let volume = reader(&config_for(&path, "normalize = \"none\""))?.load(0)?;
        // The stored type, before the rescale.
        assert_eq!(volume.dtype.as_deref(), Some("uint8"));
        // voxels[z, x, y]; the stored value at (x=1, y=2, z=0) is 7.
        assert_eq!(volume.voxels.double_value(&[0, 1, 2]), 7.0 * 2.5 - 10.0);
        Ok(())
    }

    #[test]
    fn folder_lists_nifti_files_sorted_by_name() -> Result<()> {
        let folder = tempfile::tempdir()?;
        for name in ["b.nii.gz", "a.nii", "c.nii"] {
            WriterOptions::new(folder.path().join(name)).write_nifti(&indexed_volume())?;
        }
        std::fs::write(folder.path().join("notes.txt"), "not a volume")?;
        std::fs::write(folder.path().join("._a.nii"), "macOS resource fork")?;
        let dataset = reader(&config_for(folder.path(), ""))?;
        let names: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
        let expected: Vec<String> = ["a.nii", "b.nii.gz", "c.nii"]
            .iter()
            .map(|n| folder.path().join(n).display().to_string())
            .collect();
        assert_eq!(names, expected);
        Ok(())
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("broken.nii.gz");
        std::fs::write(&path, b"this is not gzip, let alone NIfTI")?;
        let truncated = folder.path().join("truncated.nii");
        WriterOptions::new(&truncated).write_nifti(&indexed_volume())?;
        let bytes = std::fs::read(&truncated)?;
        std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;

        let dataset = reader(&config_for(folder.path(), ""))?;
        for index in 0..dataset.len() {
            let error = dataset.load(index).err().expect("a corrupt file must not decode");
            let message = format!("{error:#}");
            assert!(message.contains(&dataset.describe(index)), "{message}");
        }
        Ok(())
    }

    #[test]
    fn header_whose_bitpix_contradicts_its_data_type_is_an_error_not_a_panic() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("bitpix.nii");
        WriterOptions::new(&path).write_nifti(&indexed_volume())?;
        // float32 data that claims 16 bits per voxel (NIfTI-1: bitpix at byte 72); the
        // `nifti` crate would read half the data and then panic converting it.
        let mut bytes = std::fs::read(&path)?;
        bytes[72..74].copy_from_slice(&16i16.to_le_bytes());
        std::fs::write(&path, bytes)?;
        let message = format!(
            "{:#}",
            reader(&config_for(&path, ""))?
                .load(0)
                .err()
                .expect("an inconsistent header")
        );
        assert!(
            message.contains("bitpix") && message.contains(&path.display().to_string()),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn missing_or_empty_folder_is_an_error_naming_it() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let missing = folder.path().join("no-such-folder");
        let message = format!("{:#}", reader(&config_for(&missing, "")).err().expect("missing folder"));
        assert!(message.contains(&missing.display().to_string()), "{message}");
        assert!(message.contains("data.sources.scans.path"), "{message}");

        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), "")).err().expect("empty folder")
        );
        assert!(message.contains(&folder.path().display().to_string()), "{message}");
        Ok(())
    }

    #[test]
    fn missing_path_and_bad_keys_are_errors_naming_the_key() {
        for (body, key) in [
            ("", "data.sources.scans.path"),
            ("path = \"x\"\nslice_axis = 3", "data.sources.scans.slice_axis"),
            ("path = \"x\"\nnormalize = \"histogram\"", "normalize"),
            ("path = \"x\"\nslice_axes = 1", "slice_axes"),
        ] {
            let error = reader(body)
                .err()
                .unwrap_or_else(|| panic!("`{body}` must be rejected"));
            let message = format!("{error:#}");
            assert!(message.contains(key), "`{body}`: {message}");
        }
    }

    #[test]
    fn timepoint_takes_one_volume_or_the_mean_of_a_4d_file() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("bold.nii.gz");
        // Three timepoints of a 2 x 3 x 4 volume; voxel (x, y, z) at time t is 100t + x + y + z.
        let series = Array4::from_shape_fn((2, 3, 4, 3), |(x, y, z, t)| (100 * t + x + y + z) as f32);
        WriterOptions::new(&path).write_nifti(&series)?;

        let refused = format!("{:#}", reader(&config_for(&path, ""))?.load(0).err().expect("4D"));
        assert!(
            refused.contains("timepoint") && refused.contains("bold.nii.gz"),
            "{refused}"
        );
        for (choice, first_voxel) in [("0", 0.0), ("2", 200.0), ("\"mean\"", 100.0)] {
            let body = format!("normalize = \"none\"\ntimepoint = {choice}");
            let volume = reader(&config_for(&path, &body))?.load(0)?;
            assert_eq!(volume.voxels.size(), [4, 2, 3], "timepoint {choice}");
            // voxels[z, x, y]: at (z=1, x=1, y=2) the value is the timepoint's offset + 4.
            assert_eq!(
                volume.voxels.double_value(&[0, 0, 0]),
                first_voxel,
                "timepoint {choice}"
            );
            assert_eq!(
                volume.voxels.double_value(&[1, 1, 2]),
                first_voxel + 4.0,
                "timepoint {choice}"
            );
        }
        let message = format!(
            "{:#}",
            reader(&config_for(&path, "timepoint = 3"))?
                .load(0)
                .err()
                .expect("out of range")
        );
        for part in ["bold.nii.gz", "3 timepoints", "`timepoint` = 3", "0-based"] {
            assert!(message.contains(part), "{part}: {message}");
        }

        // A 3D file is timepoint 0 of a series of one.
        let single = folder.path().join("t1.nii");
        WriterOptions::new(&single).write_nifti(&indexed_volume())?;
        assert_eq!(
            reader(&config_for(&single, "timepoint = 0"))?.load(0)?.voxels.size(),
            [6, 4, 5]
        );
        let message = format!(
            "{:#}",
            reader(&config_for(&single, "timepoint = 1"))?
                .load(0)
                .err()
                .expect("3D")
        );
        assert!(
            message.contains("one timepoint") && message.contains("t1.nii"),
            "{message}"
        );

        for (body, part) in [("timepoint = -1", "0-based"), ("timepoint = \"median\"", "\"mean\"")] {
            let message = format!("{:#}", reader(&config_for(&path, body)).err().expect(body));
            assert!(
                message.contains(part) && message.contains("timepoint"),
                "`{body}`: {message}"
            );
        }
        Ok(())
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::datasets().get("nifti")?;
        let section = Section::inline("data.sources.scans", "nifti", &(entry.default_config)())?;
        assert_eq!(section.parse::<NiftiConfig>()?, NiftiConfig::default());
        Ok(())
    }

    /// The Decathlon hippocampus MRIs beside the project, when present (see
    /// ../shared/data/README.md); they are raw float32 or uint8 with large values.
    #[test]
    fn reads_the_shared_hippocampus_volumes_when_present() -> Result<()> {
        let folder = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/data/hippocampus/imagesTr"
        ));
        if !folder.is_dir() {
            return Ok(());
        }
        let dataset = reader(&config_for(folder, ""))?;
        assert_eq!(dataset.len(), 208);
        let volume = dataset.load(0)?;
        assert!(
            matches!(volume.dtype.as_deref(), Some("float32" | "uint8")),
            "{:?}",
            volume.dtype
        );
        assert_eq!(volume.voxels.dim(), 3);
        assert!(volume.voxels.size().iter().all(|&n| n > 1));
        assert!(bool::try_from(volume.voxels.isfinite().all())?);
        assert!(volume.voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-4);
        Ok(())
    }
}
