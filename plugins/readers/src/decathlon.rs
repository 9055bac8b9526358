//! Dataset format `decathlon`: the Medical Segmentation Decathlon layout (Antonelli et al.,
//! Nature Communications 2022), `TASK/imagesTr/NAME.nii.gz` with its mask
//! `TASK/labelsTr/NAME.nii.gz`, paired by file name.
//!
//! Images are normalised as `normalize` says; masks come as int64 class ids `[D, H, W]` in
//! `Volume::mask`, laid out like the image (same `slice_axis`). `ids` selects volumes by file
//! stem (the name without `.nii.gz`), so a config can spell out a train / validation split;
//! empty takes every image. Volumes keep file-name order either way.
//!
//! An image without a mask of the same name is, by `unlabelled`: `"error"` (the default: in
//! a training folder a missing mask is a data-preparation mistake, and silently training on
//! fewer volumes would hide it), `"skip"` (left out of the listing), or `"keep"` (loaded
//! without a mask, for self-supervised pre-training on every image). Masks without an image
//! are ignored.
//!
//! Decoding is [`crate::nifti_file`] (the `nifti` crate; `scl_slope` and `scl_inter`
//! applied), shared with the `nifti` format. Multi-modal tasks store 4D images (BrainTumour: FLAIR, T1w, T1gd, T2w;
//! Prostate: T2, ADC); `channel` picks the modality. Masks must hold whole numbers and the
//! image's spatial shape, else loading fails naming both files.

use crate::files;
use crate::intensity::{self, Normalization, Window};
use crate::nifti_file::{self, nifti_stem, FourthAxis};
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What to do with an image that has no mask.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Unlabelled {
    /// Fail at build, naming the images.
    Error,
    /// Leave the image out.
    Skip,
    /// Load it without a mask.
    Keep,
}

/// Keys of a `[data.sources.NAME]` section with `format = "decathlon"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DecathlonConfig {
    /// The task folder, holding `imagesTr/` and `labelsTr/`; a relative path resolves
    /// against the config file's folder (from `--set` or the environment: against the
    /// working directory). Required.
    pub path: PathBuf,
    /// File stems of the volumes to read (`hippocampus_001`, ...); empty reads them all.
    pub ids: Vec<String>,
    /// An image without a mask: `"error"`, `"skip"` or `"keep"` (without a mask).
    pub unlabelled: Unlabelled,
    /// The NIfTI axis (0, 1 or 2) that becomes the slice axis D.
    pub slice_axis: usize,
    /// Modality of 4D multi-modal images (index along the fourth axis).
    pub channel: usize,
    /// Clip intensities to `[low, high]` before normalising (CT tasks: Hounsfield units);
    /// unset keeps every value.
    pub window: Option<Window>,
    /// `"zscore"`, `"minmax"` or `"none"`.
    pub normalize: Normalization,
}

impl Default for DecathlonConfig {
    fn default() -> Self {
        DecathlonConfig {
            path: PathBuf::new(),
            ids: Vec::new(),
            unlabelled: Unlabelled::Error,
            slice_axis: 2,
            channel: 0,
            window: None,
            normalize: Normalization::ZScore,
        }
    }
}

/// The folders of the layout.
const IMAGES: &str = "imagesTr";
const LABELS: &str = "labelsTr";

/// One listed volume: its image and, where there is one, its mask.
struct Pair {
    image: PathBuf,
    label: Option<PathBuf>,
}

/// The Decathlon reader: the listed image / mask pairs.
pub struct Decathlon {
    pairs: Vec<Pair>,
    slice_axis: usize,
    channel: usize,
    window: Option<Window>,
    normalize: Normalization,
}

impl Decathlon {
    /// Lists and pairs the files under `config.path` (already resolved); `key` is the
    /// section's dotted key, for messages.
    pub fn new(config: DecathlonConfig, key: &str) -> Result<Decathlon> {
        ensure!(
            !config.path.as_os_str().is_empty(),
            "config key `{key}.path` is missing: expected a Decathlon task folder holding {IMAGES}/ and {LABELS}/"
        );
        ensure!(
            config.slice_axis <= 2,
            "config key `{key}.slice_axis` must be 0, 1 or 2 (the NIfTI axis that becomes the slice axis), found {}",
            config.slice_axis
        );
        let pairs = list_pairs(&config.path, config.unlabelled).with_context(|| format!("config key `{key}.path`"))?;
        let pairs = select(pairs, &config.ids).with_context(|| format!("config key `{key}.ids`"))?;
        Ok(Decathlon {
            pairs,
            slice_axis: config.slice_axis,
            channel: config.channel,
            window: config.window,
            normalize: config.normalize,
        })
    }

    /// The listed images, in the order of their sample indices.
    pub fn images(&self) -> Vec<&Path> {
        self.pairs.iter().map(|p| p.image.as_path()).collect()
    }
}

impl Dataset for Decathlon {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn describe(&self, index: usize) -> String {
        match self.pairs.get(index) {
            Some(pair) => pair.image.display().to_string(),
            None => format!("Decathlon volume #{index} (out of range: {} volumes)", self.pairs.len()),
        }
    }

    fn load(&self, index: usize) -> Result<Volume> {
        let Some(pair) = self.pairs.get(index) else {
            bail!(
                "Decathlon volume #{index} does not exist: the source has {} volumes",
                self.pairs.len()
            );
        };
        let image = nifti_file::decode(&pair.image, self.slice_axis, FourthAxis::Channel(self.channel))
            .with_context(|| format!("cannot decode NIfTI image `{}`", pair.image.display()))?;
        let mut volume = Volume::new(
            intensity::normalize(&image.voxels, self.window, self.normalize, &self.describe(index)),
            image.spacing,
        );
        volume.dtype = Some(image.dtype);
        if let Some(label) = &pair.label {
            let mask = decode_mask(label, self.slice_axis, &image.voxels.size()).with_context(|| {
                format!(
                    "cannot decode NIfTI mask `{}` (of image `{}`)",
                    label.display(),
                    pair.image.display()
                )
            })?;
            volume.mask = Some(mask);
        }
        Ok(volume)
    }
}

/// The images of `task/imagesTr` with their masks from `task/labelsTr`.
fn list_pairs(task: &Path, unlabelled: Unlabelled) -> Result<Vec<Pair>> {
    files::ensure_folder(
        task,
        &format!("a Decathlon task folder holding {IMAGES}/ and {LABELS}/"),
    )?;
    let images_folder = task.join(IMAGES);
    ensure!(
        images_folder.is_dir(),
        "`{}` has no {IMAGES}/ folder; expected a Decathlon task folder ({IMAGES}/ and {LABELS}/)",
        task.display()
    );
    let images = files::files_in(&images_folder, nifti_file::is_nifti_name)?;
    ensure!(
        !images.is_empty(),
        "folder `{}` holds no .nii or .nii.gz file",
        images_folder.display()
    );
    let labels_folder = task.join(LABELS);
    let labels: BTreeSet<String> = if labels_folder.is_dir() {
        files::files_in(&labels_folder, nifti_file::is_nifti_name)?
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect()
    } else {
        BTreeSet::new()
    };

    let mut pairs = Vec::new();
    let mut missing = Vec::new();
    for image in images {
        let name = image
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if labels.contains(&name) {
            pairs.push(Pair {
                label: Some(labels_folder.join(&name)),
                image,
            });
        } else {
            match unlabelled {
                Unlabelled::Error => missing.push(name),
                Unlabelled::Skip => {}
                Unlabelled::Keep => pairs.push(Pair { image, label: None }),
            }
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        bail!(
            "{} image(s) in `{}` have no mask of the same name in `{}`: {}{}; set `unlabelled = \"skip\"` to \
             leave them out or \"keep\" to load them without a mask",
            missing.len(),
            images_folder.display(),
            labels_folder.display(),
            shown.join(", "),
            if missing.len() > shown.len() { ", ..." } else { "" }
        );
    }
    ensure!(
        !pairs.is_empty(),
        "no image in `{}` has a mask in `{}`",
        images_folder.display(),
        labels_folder.display()
    );
    Ok(pairs)
}

/// The pairs whose image stems are in `ids` (all when `ids` is empty), in listing order.
fn select(pairs: Vec<Pair>, ids: &[String]) -> Result<Vec<Pair>> {
    if ids.is_empty() {
        return Ok(pairs);
    }
    let wanted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    ensure!(wanted.len() == ids.len(), "lists an id more than once");
    let listed: BTreeSet<&str> = pairs.iter().filter_map(|p| nifti_stem(&p.image)).collect();
    let unknown: Vec<&str> = wanted.difference(&listed).copied().collect();
    ensure!(
        unknown.is_empty(),
        "{} id(s) match no listed volume (file name without .nii.gz): {}",
        unknown.len(),
        unknown.iter().take(5).copied().collect::<Vec<_>>().join(", ")
    );
    Ok(pairs
        .into_iter()
        .filter(|p| nifti_stem(&p.image).is_some_and(|stem| wanted.contains(stem)))
        .collect())
}

/// Reads a mask as int64 class ids laid out like its image, whose `[D, H, W]` is `shape`.
fn decode_mask(path: &Path, slice_axis: usize, shape: &[i64]) -> Result<Tensor> {
    let mask = nifti_file::decode(path, slice_axis, FourthAxis::Channel(0))?.voxels;
    ensure!(
        mask.size() == shape,
        "the mask has shape {:?} but its image {shape:?} (after moving slice_axis first)",
        mask.size()
    );
    let rounded = mask.round();
    let off = (&mask - &rounded).abs().max().double_value(&[]);
    ensure!(
        off < 1e-3,
        "the mask holds values that are not whole numbers (off by up to {off}); expected class ids"
    );
    Ok(rounded.to_kind(Kind::Int64))
}

fn build(section: &Section) -> Result<Box<dyn Dataset>> {
    let mut config: DecathlonConfig = section.parse()?;
    if !config.path.as_os_str().is_empty() {
        config.path = section.resolve_path("path", &config.path);
    }
    Ok(Box::new(Decathlon::new(config, &section.key)?))
}

register!(DATASETS, DECATHLON: DatasetEntry = DatasetEntry {
    name: "decathlon",
    about: "Medical Segmentation Decathlon task folders: imagesTr/ NIfTI images with labelsTr/ masks, optional ids",
    default_config: default_toml::<DecathlonConfig>,
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::registry;
    use ndarray::{Array3, Array4};
    use nifti::writer::WriterOptions;

    fn reader(body: &str) -> Result<Box<dyn Dataset>> {
        build(&Section::inline("data.sources.hippo", "decathlon", body)?)
    }

    fn config_for(path: &Path, extra: &str) -> String {
        format!("path = {:?}\n{extra}", path.display().to_string())
    }

    /// A 4 x 5 x 6 image whose value encodes its (x, y, z) index: 100x + 10y + z.
    fn image() -> Array3<f32> {
        Array3::from_shape_fn((4, 5, 6), |(x, y, z)| (100 * x + 10 * y + z) as f32)
    }

    /// Its mask: class 1 where x = 1, class 2 where x = 2 and z = 5, else 0.
    fn mask() -> Array3<u8> {
        Array3::from_shape_fn((4, 5, 6), |(x, _, z)| match (x, z) {
            (2, 5) => 2,
            (1, _) => 1,
            _ => 0,
        })
    }

    /// A task folder with images `case_NNN` for `images` and masks for `labels`.
    fn task(images: &[u32], labels: &[u32]) -> Result<tempfile::TempDir> {
        let folder = tempfile::tempdir()?;
        std::fs::create_dir_all(folder.path().join(IMAGES))?;
        std::fs::create_dir_all(folder.path().join(LABELS))?;
        for n in images {
            WriterOptions::new(folder.path().join(IMAGES).join(format!("case_{n:03}.nii.gz"))).write_nifti(&image())?;
        }
        for n in labels {
            WriterOptions::new(folder.path().join(LABELS).join(format!("case_{n:03}.nii.gz"))).write_nifti(&mask())?;
        }
        // macOS resource forks, as the Decathlon archives carry them.
        std::fs::write(folder.path().join(IMAGES).join("._case_001.nii.gz"), "resource fork")?;
        Ok(folder)
    }

    #[test]
    fn pairs_read_back_with_masks_laid_out_like_their_images() -> Result<()> {
        let folder = task(&[2, 1], &[1, 2])?;
        let dataset = reader(&config_for(folder.path(), "normalize = \"none\""))?;
        assert_eq!(dataset.len(), 2);
        let image_path = folder.path().join(IMAGES).join("case_001.nii.gz");
        assert_eq!(dataset.describe(0), image_path.display().to_string());
        let volume = dataset.load(0)?;
        assert_eq!(volume.voxels.size(), [6, 4, 5]);
        // voxels[z, x, y] = 100x + 10y + z
        assert_eq!(volume.voxels.double_value(&[3, 2, 1]), 213.0);
        assert_eq!(volume.spacing, Some([1.0, 1.0, 1.0]));
        assert_eq!(volume.dtype.as_deref(), Some("float32"));
        let mask = volume.mask.expect("a mask");
        assert_eq!(mask.kind(), Kind::Int64);
        assert_eq!(mask.size(), [6, 4, 5]);
        assert_eq!(mask.int64_value(&[0, 1, 3]), 1);
        assert_eq!(mask.int64_value(&[5, 2, 0]), 2);
        assert_eq!(mask.int64_value(&[4, 2, 0]), 0);
        assert_eq!(mask.sum(Kind::Int64).int64_value(&[]), 30 + 2 * 5);

        let sagittal = reader(&config_for(folder.path(), "slice_axis = 0"))?.load(1)?;
        assert_eq!(sagittal.voxels.size(), [4, 5, 6]);
        assert_eq!(sagittal.mask.expect("a mask").int64_value(&[2, 0, 5]), 2);
        assert!(sagittal.voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn ids_select_volumes_by_file_stem() -> Result<()> {
        let folder = task(&[1, 2, 3], &[1, 2, 3])?;
        let dataset = reader(&config_for(folder.path(), "ids = [\"case_003\", \"case_001\"]"))?;
        let names: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
        let expected: Vec<String> = ["case_001", "case_003"]
            .iter()
            .map(|s| {
                folder
                    .path()
                    .join(IMAGES)
                    .join(format!("{s}.nii.gz"))
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, expected);

        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), "ids = [\"case_001\", \"case_009\"]"))
                .err()
                .expect("unknown id")
        );
        assert!(
            message.contains("data.sources.hippo.ids") && message.contains("case_009"),
            "{message}"
        );
        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), "ids = [\"case_001\", \"case_001\"]"))
                .err()
                .expect("twice")
        );
        assert!(message.contains("more than once"), "{message}");
        Ok(())
    }

    #[test]
    fn unlabelled_images_are_an_error_or_skipped_or_kept_as_configured() -> Result<()> {
        let folder = task(&[1, 2, 3], &[1, 3, 7])?;
        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), ""))
                .err()
                .expect("case_002 has no mask")
        );
        assert!(
            message.contains("case_002.nii.gz") && message.contains("data.sources.hippo.path"),
            "{message}"
        );

        let skipped = reader(&config_for(folder.path(), "unlabelled = \"skip\""))?;
        assert_eq!(skipped.len(), 2);
        assert!(skipped.describe(1).ends_with("case_003.nii.gz"));

        let kept = reader(&config_for(folder.path(), "unlabelled = \"keep\""))?;
        assert_eq!(kept.len(), 3);
        assert!(kept.load(1)?.mask.is_none());
        assert!(kept.load(2)?.mask.is_some());
        Ok(())
    }

    #[test]
    fn dtype_is_the_image_files_data_type_not_the_masks() -> Result<()> {
        let folder = task(&[], &[1, 2])?;
        let images = folder.path().join(IMAGES);
        WriterOptions::new(images.join("case_001.nii.gz")).write_nifti(&image().mapv(|v| v as i16))?;
        WriterOptions::new(images.join("case_002.nii.gz")).write_nifti(&image().mapv(|v| v as u16))?;
        let dataset = reader(&config_for(folder.path(), ""))?;
        // The masks are uint8.
        assert_eq!(dataset.load(0)?.dtype.as_deref(), Some("int16"));
        assert_eq!(dataset.load(1)?.dtype.as_deref(), Some("uint16"));
        Ok(())
    }

    #[test]
    fn multi_modal_images_pick_a_channel() -> Result<()> {
        let folder = task(&[], &[1])?;
        let channels = Array4::from_shape_fn((4, 5, 6, 2), |(x, y, z, c)| (1000 * c + 100 * x + 10 * y + z) as f32);
        WriterOptions::new(folder.path().join(IMAGES).join("case_001.nii.gz")).write_nifti(&channels)?;
        let second = reader(&config_for(folder.path(), "normalize = \"none\"\nchannel = 1"))?.load(0)?;
        assert_eq!(second.voxels.size(), [6, 4, 5]);
        assert_eq!(second.voxels.double_value(&[3, 2, 1]), 1213.0);
        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), "channel = 2"))?
                .load(0)
                .err()
                .expect("no third channel")
        );
        assert!(
            message.contains("channel") && message.contains("case_001.nii.gz"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn bad_masks_and_corrupt_files_are_errors_naming_them() -> Result<()> {
        let folder = task(&[1, 2, 3], &[1, 2, 3])?;
        // A mask of the wrong shape, one with fractional values, and a corrupt image.
        WriterOptions::new(folder.path().join(LABELS).join("case_001.nii.gz"))
            .write_nifti(&Array3::<u8>::zeros((4, 5, 7)))?;
        WriterOptions::new(folder.path().join(LABELS).join("case_002.nii.gz"))
            .write_nifti(&Array3::from_elem((4, 5, 6), 0.5f32))?;
        std::fs::write(folder.path().join(IMAGES).join("case_003.nii.gz"), b"not gzip")?;
        let dataset = reader(&config_for(folder.path(), ""))?;
        for (index, (file, what)) in [(LABELS, "shape"), (LABELS, "whole numbers"), (IMAGES, "case_003")]
            .into_iter()
            .enumerate()
        {
            let message = format!("{:#}", dataset.load(index).err().expect("a bad pair"));
            let path = folder.path().join(file).join(format!("case_{:03}.nii.gz", index + 1));
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains(what), "{message}");
        }
        Ok(())
    }

    #[test]
    fn missing_folders_and_bad_keys_are_errors_naming_them() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let missing = folder.path().join("Task99");
        let message = format!("{:#}", reader(&config_for(&missing, "")).err().expect("missing"));
        assert!(message.contains("data.sources.hippo.path") && message.contains(&missing.display().to_string()));
        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), "")).err().expect("no imagesTr")
        );
        assert!(
            message.contains(IMAGES) && message.contains(&folder.path().display().to_string()),
            "{message}"
        );
        std::fs::create_dir_all(folder.path().join(IMAGES))?;
        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), "")).err().expect("empty imagesTr")
        );
        assert!(
            message.contains(&folder.path().join(IMAGES).display().to_string()),
            "{message}"
        );

        for (body, key) in [
            ("", "data.sources.hippo.path"),
            ("path = \"x\"\nslice_axis = 3", "data.sources.hippo.slice_axis"),
            ("path = \"x\"\nunlabelled = \"ignore\"", "unlabelled"),
            ("path = \"x\"\nwindow = [3, 1]", "data.sources.hippo.window"),
            ("path = \"x\"\nid = [\"a\"]", "id"),
        ] {
            let message = format!("{:#}", reader(body).err().unwrap_or_else(|| panic!("`{body}`")));
            assert!(message.contains(key), "`{body}`: {message}");
        }
        Ok(())
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::datasets().get("decathlon")?;
        let section = Section::inline("data.sources.hippo", "decathlon", &(entry.default_config)())?;
        assert_eq!(section.parse::<DecathlonConfig>()?, DecathlonConfig::default());
        Ok(())
    }

    /// The Decathlon hippocampus task beside the project, when present
    /// (../shared/data/README.md: 208 complete pairs, about 35 x 50 x 36 voxels of 1 mm,
    /// masks 0 background, 1 anterior, 2 posterior).
    #[test]
    fn reads_the_shared_hippocampus_task_when_present() -> Result<()> {
        let task = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/hippocampus"));
        if !task.is_dir() {
            return Ok(());
        }
        let dataset = reader(&config_for(task, ""))?;
        assert_eq!(dataset.len(), 208);
        for index in [0, 207] {
            let volume = dataset.load(index)?;
            let size = volume.voxels.size();
            assert_eq!(size.len(), 3);
            assert!(size.iter().all(|&n| (20..=70).contains(&n)), "{size:?}");
            assert!(volume.voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-4);
            let mask = volume.mask.expect("every pair has a mask");
            assert_eq!(mask.size(), size);
            let classes = Vec::<i64>::try_from(&mask.flatten(0, -1).unique_dim(0, true, false, false).0)?;
            assert_eq!(classes, [0, 1, 2]);
            // The task's images are float32 or uint8, file by file.
            let dtype = volume.dtype.as_deref();
            assert!(matches!(dtype, Some("float32" | "uint8")), "{dtype:?}");
            let spacing = volume.spacing.expect("NIfTI records spacing");
            assert!(spacing.iter().all(|s| (s - 1.0).abs() < 1e-3), "{spacing:?}");
        }
        let split = reader(&config_for(task, "ids = [\"hippocampus_001\", \"hippocampus_003\"]"))?;
        assert_eq!(split.len(), 2);
        Ok(())
    }
}
