//! Dataset format `npy`: a folder of NumPy `.npy` volumes (or one such file), each one
//! sample, stored H x W x C with the slices last, as the paper's code writes them.
//!
//! Decoding uses the `npyz` crate; any numeric dtype is read (see [`crate::numpy`]), in C or
//! Fortran order. `slice_axis` picks the array axis that becomes D (default 2, the slices of
//! an H x W x C volume); the other two become H and W in their order. A 2D array is one
//! slice `[1, H, W]`. NPY records no voxel spacing, so volumes come without one.
//!
//! For CT in Hounsfield units, `window = [low, high]` clips before normalisation (e.g.
//! `[-1000, 1000]` keeps air to bone and drops metal and the scanner's padding values).

use crate::files;
use crate::intensity::{self, Normalization, Window};
use crate::numpy;
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Keys of a `[data.sources.NAME]` section with `format = "npy"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NpyConfig {
    /// A folder of `.npy` files (not searched recursively) or one such file; a relative path
    /// resolves against the config file's folder (from `--set` or the environment: against
    /// the working directory). Required.
    pub path: PathBuf,
    /// The array axis (0, 1 or 2) that becomes the slice axis D; the default 2 takes the
    /// slices of H x W x C volumes.
    pub slice_axis: usize,
    /// Clip intensities to `[low, high]` before normalising (CT: Hounsfield units); unset
    /// keeps every value.
    pub window: Option<Window>,
    /// `"zscore"`, `"minmax"` or `"none"`.
    pub normalize: Normalization,
}

impl Default for NpyConfig {
    fn default() -> Self {
        NpyConfig {
            path: PathBuf::new(),
            slice_axis: 2,
            window: None,
            normalize: Normalization::ZScore,
        }
    }
}

/// The NPY reader: the listed files and how to turn each into a volume.
pub struct NpyVolumes {
    files: Vec<PathBuf>,
    slice_axis: usize,
    window: Option<Window>,
    normalize: Normalization,
}

impl NpyVolumes {
    /// Lists the files of `config.path` (already resolved); `key` is the section's dotted
    /// key, for messages.
    pub fn new(config: NpyConfig, key: &str) -> Result<NpyVolumes> {
        ensure!(
            !config.path.as_os_str().is_empty(),
            "config key `{key}.path` is missing: expected a folder of .npy files or one such file"
        );
        ensure!(
            config.slice_axis <= 2,
            "config key `{key}.slice_axis` must be 0, 1 or 2 (the array axis that becomes the slice axis), found {}",
            config.slice_axis
        );
        let files = list_arrays(&config.path).with_context(|| format!("config key `{key}.path`"))?;
        Ok(NpyVolumes {
            files,
            slice_axis: config.slice_axis,
            window: config.window,
            normalize: config.normalize,
        })
    }

    /// The listed files, in the order of their sample indices.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl Dataset for NpyVolumes {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn describe(&self, index: usize) -> String {
        match self.files.get(index) {
            Some(path) => path.display().to_string(),
            None => format!("NPY sample #{index} (out of range: {} files)", self.files.len()),
        }
    }

    fn load(&self, index: usize) -> Result<Volume> {
        let Some(path) = self.files.get(index) else {
            bail!(
                "NPY sample #{index} does not exist: the source has {} files",
                self.files.len()
            );
        };
        let (voxels, dtype) =
            decode(path, self.slice_axis).with_context(|| format!("cannot decode NPY file `{}`", path.display()))?;
        let mut volume = Volume::new(
            intensity::normalize(&voxels, self.window, self.normalize, &self.describe(index)),
            None,
        );
        volume.dtype = dtype;
        Ok(volume)
    }
}

fn is_npy_name(path: &Path) -> bool {
    files::extension(path).as_deref() == Some("npy")
}

/// The `.npy` files at `path`: the file itself, or the folder's files sorted by name.
fn list_arrays(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        ensure!(is_npy_name(path), "`{}` is not a .npy file", path.display());
        return Ok(vec![path.to_path_buf()]);
    }
    files::ensure_folder(path, "a folder of .npy files or one such file")?;
    let arrays = files::files_in(path, is_npy_name)?;
    ensure!(!arrays.is_empty(), "folder `{}` holds no .npy file", path.display());
    Ok(arrays)
}

/// Reads `path` and lays its axes out as `[slice_axis, other, other]`; also gives the stored
/// dtype's name.
fn decode(path: &Path, slice_axis: usize) -> Result<(Tensor, Option<String>)> {
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    let npy = npyz::NpyFile::new(&mut file)?;
    let header = numpy::describe_header(&npy);
    let dtype = numpy::dtype_name(&npy);
    let array = numpy::read_tensor(npy)?;
    // npyz stops after the last element: bytes beyond it mean the header's shape or dtype
    // does not describe the file (a wrong header, or two arrays glued together).
    let trailing = std::io::copy(&mut file, &mut std::io::sink())?;
    ensure!(
        trailing == 0,
        "{trailing} bytes follow the array's data ({header}): the header does not describe the file; expected it to end with the array"
    );
    // Trailing axes of one element (a channel axis of 1) are dropped.
    let mut shape = array.size();
    while shape.len() > 3 && shape.last() == Some(&1) {
        shape.pop();
    }
    let voxels = match shape.len() {
        2 => array.reshape([1, shape[0], shape[1]]),
        3 => {
            let [a, b] = match slice_axis {
                0 => [1, 2],
                1 => [0, 2],
                _ => [0, 1],
            };
            array
                .reshape(shape.as_slice())
                .permute([slice_axis as i64, a, b])
                .contiguous()
        }
        _ => bail!("the array has {header}; expected 2 or 3 axes (H x W x C volumes)"),
    };
    Ok((voxels, dtype))
}

fn build(section: &Section) -> Result<Box<dyn Dataset>> {
    let mut config: NpyConfig = section.parse()?;
    if !config.path.as_os_str().is_empty() {
        config.path = section.resolve_path("path", &config.path);
    }
    Ok(Box::new(NpyVolumes::new(config, &section.key)?))
}

register!(DATASETS, NPY: DatasetEntry = DatasetEntry {
    name: "npy",
    about: "NumPy .npy volumes H x W x C (slices last), any numeric dtype: a folder of them sorted by name, or one file",
    default_config: default_toml::<NpyConfig>,
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numpy::tests::write_npy;
    use medssl_core::registry;

    fn reader(body: &str) -> Result<Box<dyn Dataset>> {
        build(&Section::inline("data.sources.ct", "npy", body)?)
    }

    fn config_for(path: &Path, extra: &str) -> String {
        format!("path = {:?}\n{extra}", path.display().to_string())
    }

    /// A 4 x 5 x 6 (H x W x C) int16 volume whose value encodes its index: 100h + 10w + c.
    fn indexed_volume() -> Vec<i16> {
        (0..4)
            .flat_map(|h| (0..5).flat_map(move |w| (0..6).map(move |c| 100 * h + 10 * w + c)))
            .collect()
    }

    #[test]
    fn volume_reads_back_with_the_slice_axis_first() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("001.npy");
        write_npy(&path, &[4, 5, 6], &indexed_volume())?;

        let dataset = reader(&config_for(&path, "normalize = \"none\""))?;
        assert_eq!(dataset.len(), 1);
        assert_eq!(dataset.describe(0), path.display().to_string());
        let volume = dataset.load(0)?;
        assert_eq!(volume.voxels.size(), [6, 4, 5]);
        assert_eq!(volume.voxels.kind(), Kind::Float);
        assert_eq!(volume.spacing, None);
        assert_eq!(volume.dtype.as_deref(), Some("int16"));
        // voxels[c, h, w] = 100h + 10w + c
        assert_eq!(volume.voxels.double_value(&[3, 2, 1]), 213.0);

        let first = reader(&config_for(&path, "normalize = \"none\"\nslice_axis = 0"))?
            .load(0)?
            .voxels;
        assert_eq!(first.size(), [4, 5, 6]);
        assert_eq!(first.double_value(&[2, 1, 3]), 213.0);
        let middle = reader(&config_for(&path, "normalize = \"none\"\nslice_axis = 1"))?
            .load(0)?
            .voxels;
        assert_eq!(middle.size(), [5, 4, 6]);
        assert_eq!(middle.double_value(&[1, 2, 3]), 213.0);
        Ok(())
    }

    #[test]
    fn float_and_unsigned_volumes_and_2d_arrays_read() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let values: Vec<f64> = (0..24).map(|v| v as f64 * 0.5).collect();
        write_npy(&folder.path().join("a.npy"), &[2, 3, 4], &values)?;
        let words: Vec<u16> = (0..12).map(|v| 65000 + v).collect();
        write_npy(&folder.path().join("b.npy"), &[3, 4], &words)?;
        let dataset = reader(&config_for(folder.path(), "normalize = \"none\""))?;
        let a = dataset.load(0)?;
        assert_eq!(a.dtype.as_deref(), Some("float64"));
        let a = a.voxels;
        assert_eq!(a.size(), [4, 2, 3]);
        assert_eq!(a.double_value(&[3, 1, 2]), 11.5);
        let b = dataset.load(1)?;
        // Read through an int32 tensor, reported as stored.
        assert_eq!(b.dtype.as_deref(), Some("uint16"));
        let b = b.voxels;
        assert_eq!(b.size(), [1, 3, 4]);
        assert_eq!(b.double_value(&[0, 2, 3]), 65011.0);
        Ok(())
    }

    #[test]
    fn window_clips_hounsfield_units_before_normalising() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("ct.npy");
        let hu: Vec<i16> = [-3024i16, -1000, 0, 40, 1000, 3071].repeat(4);
        write_npy(&path, &[2, 2, 6], &hu)?;
        let clipped = reader(&config_for(&path, "normalize = \"none\"\nwindow = [-1000, 1000]"))?
            .load(0)?
            .voxels;
        assert_eq!(clipped.min().double_value(&[]), -1000.0);
        assert_eq!(clipped.max().double_value(&[]), 1000.0);
        let unit = reader(&config_for(&path, "normalize = \"minmax\"\nwindow = [-1000, 1000]"))?
            .load(0)?
            .voxels;
        // 0 HU sits in the middle of the window.
        assert_eq!(unit.double_value(&[2, 0, 0]), 0.5);
        Ok(())
    }

    #[test]
    fn folder_lists_npy_files_sorted_by_name() -> Result<()> {
        let folder = tempfile::tempdir()?;
        for name in ["b.npy", "a.npy", "c.NPY"] {
            write_npy(&folder.path().join(name), &[2, 2, 2], &[0u8; 8])?;
        }
        std::fs::write(folder.path().join("meta.json"), "{}")?;
        std::fs::write(folder.path().join("._a.npy"), "macOS resource fork")?;
        let dataset = reader(&config_for(folder.path(), ""))?;
        let names: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
        let expected: Vec<String> = ["a.npy", "b.npy", "c.NPY"]
            .iter()
            .map(|n| folder.path().join(n).display().to_string())
            .collect();
        assert_eq!(names, expected);
        Ok(())
    }

    #[test]
    fn corrupt_or_unsupported_files_are_errors_naming_them() -> Result<()> {
        let folder = tempfile::tempdir()?;
        std::fs::write(folder.path().join("a.npy"), b"\x93NUMPY garbage")?;
        let truncated = folder.path().join("b.npy");
        write_npy(&truncated, &[4, 5, 6], &indexed_volume())?;
        let bytes = std::fs::read(&truncated)?;
        std::fs::write(&truncated, &bytes[..bytes.len() - 7])?;
        write_npy(&folder.path().join("c.npy"), &[2, 2, 2, 2], &[0u8; 16])?;
        let dataset = reader(&config_for(folder.path(), ""))?;
        assert_eq!(dataset.len(), 3);
        for index in 0..dataset.len() {
            let message = format!("{:#}", dataset.load(index).err().expect("a bad file must not decode"));
            assert!(message.contains(&dataset.describe(index)), "{message}");
        }
        let message = format!("{:#}", dataset.load(2).err().expect("4 axes"));
        assert!(message.contains("[2, 2, 2, 2]"), "{message}");
        Ok(())
    }

    #[test]
    fn missing_or_empty_folder_and_bad_keys_are_errors_naming_them() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let missing = folder.path().join("no-such-folder");
        let message = format!("{:#}", reader(&config_for(&missing, "")).err().expect("missing"));
        assert!(message.contains(&missing.display().to_string()), "{message}");
        assert!(message.contains("data.sources.ct.path"), "{message}");
        let message = format!("{:#}", reader(&config_for(folder.path(), "")).err().expect("empty"));
        assert!(message.contains(&folder.path().display().to_string()), "{message}");

        for (body, key) in [
            ("", "data.sources.ct.path"),
            ("path = \"x\"\nslice_axis = 3", "data.sources.ct.slice_axis"),
            ("path = \"x\"\nwindow = [100, -100]", "data.sources.ct.window"),
            ("path = \"x\"\nwindow = [1, 2, 3]", "window"),
            ("path = \"x\"\nnormalise = \"none\"", "normalise"),
        ] {
            let message = format!("{:#}", reader(body).err().unwrap_or_else(|| panic!("`{body}`")));
            assert!(message.contains(key), "`{body}`: {message}");
        }
        Ok(())
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::datasets().get("npy")?;
        let section = Section::inline("data.sources.ct", "npy", &(entry.default_config)())?;
        assert_eq!(section.parse::<NpyConfig>()?, NpyConfig::default());
        Ok(())
    }

    /// The head CT beside the project, when present (../shared/data/README.md: 256 x 256 x
    /// 108 int16 Hounsfield units).
    #[test]
    fn reads_the_shared_head_ct_when_present() -> Result<()> {
        let folder = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/data/npy_volumes/cranium_ct"
        ));
        if !folder.is_dir() {
            return Ok(());
        }
        let raw = reader(&config_for(folder, "normalize = \"none\""))?;
        assert_eq!(raw.len(), 1);
        let volume = raw.load(0)?;
        assert_eq!(volume.dtype.as_deref(), Some("int16"));
        let hu = volume.voxels;
        assert_eq!(hu.size(), [108, 256, 256]);
        // Air is about -1000 HU and bone well above 1000.
        assert!(hu.min().double_value(&[]) <= -900.0, "{}", hu.min().double_value(&[]));
        assert!(hu.max().double_value(&[]) >= 1000.0, "{}", hu.max().double_value(&[]));

        let voxels = reader(&config_for(folder, "window = [-1000, 1000]"))?.load(0)?.voxels;
        assert!(voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-4);
        Ok(())
    }
}
