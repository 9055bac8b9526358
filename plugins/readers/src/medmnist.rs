//! Dataset format `medmnist`: one split of a MedMNIST archive (Yang et al., Scientific Data
//! 2023), an `.npz` holding `{split}_images` and `{split}_labels` for the splits `train`,
//! `val` and `test`.
//!
//! Images are `[N, H, W]` (2D grey), `[N, H, W, 3]` (2D colour: grey by Rec. 709 luminance,
//! as the `image-folder` format does) or `[N, D, H, W]` (3D); a sample is `[1, H, W]` or
//! `[D, H, W]`. Labels `[N]` or `[N, 1]` become each sample's `Volume::label`; multi-label
//! arrays `[N, K]` (ChestMNIST's 14 findings) have no place in a single class id, so those
//! samples come without a label. An archive without `{split}_labels` is read unlabelled.
//!
//! The archive is read with `npyz` (its `npz` feature, over the `zip` crate). Members are
//! deflate-compressed, so one image cannot be reached without inflating those before it:
//! listing (at build) reads only the headers and the labels, and the first `load` inflates
//! the split's whole image array once, in its stored dtype (uint8 for MedMNIST: 3.7 MB for
//! PneumoniaMNIST's train split, 311 MB for AdrenalMNIST3D at 64^3), kept for the reader's
//! lifetime, as MedMNIST's own loader does.

use crate::intensity::{self, Normalization};
use crate::numpy;
use medssl_core::prelude::*;
use npyz::npz::NpzArchive;
use npyz::zip::read::ZipFile;
use npyz::zip::result::ZipError;
use npyz::NpyFile;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Keys of a `[data.sources.NAME]` section with `format = "medmnist"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MedMnistConfig {
    /// The `.npz` archive; a relative path resolves against the config file's folder (from
    /// `--set` or the environment: against the working directory). Required.
    pub path: PathBuf,
    /// The split to read: the archive's arrays `{split}_images` and `{split}_labels`
    /// (`train`, `val` or `test` in MedMNIST).
    pub split: String,
    /// `"zscore"`, `"minmax"` or `"none"` (the stored values, 0-255 for MedMNIST).
    pub normalize: Normalization,
}

impl Default for MedMnistConfig {
    fn default() -> Self {
        MedMnistConfig {
            path: PathBuf::new(),
            split: "train".into(),
            normalize: Normalization::ZScore,
        }
    }
}

/// How the image array's axes map to samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `[N, H, W]` or `[N, H, W, 1]`.
    Grey2d,
    /// `[N, H, W, 3]`.
    Colour2d,
    /// `[N, D, H, W]`.
    Volume3d,
}

/// A split's images, inflated: native-endian bytes of the stored kind, C order.
struct Images {
    bytes: Vec<u8>,
    kind: Kind,
}

/// The MedMNIST reader: one split of one archive.
pub struct MedMnist {
    path: PathBuf,
    split: String,
    count: usize,
    /// Shape of one sample as stored (without the sample axis).
    item_shape: Vec<i64>,
    layout: Layout,
    labels: Option<Vec<i64>>,
    /// The image array's stored dtype (`uint8` in MedMNIST).
    dtype: Option<String>,
    normalize: Normalization,
    /// The split's images, inflated by the first `load` (an error message if that failed).
    images: OnceLock<std::result::Result<Images, String>>,
}

impl MedMnist {
    /// Reads the archive's directory, the split's image header and its labels; `key` is the
    /// section's dotted key, for messages.
    pub fn new(config: MedMnistConfig, key: &str) -> Result<MedMnist> {
        ensure!(
            !config.path.as_os_str().is_empty(),
            "config key `{key}.path` is missing: expected a MedMNIST .npz file"
        );
        if let Some(what) = medssl_core::paths::not_a_file_or_folder(&config.path) {
            bail!(
                "config key `{key}.path`: `{}` {what}; expected a MedMNIST .npz file",
                config.path.display()
            );
        }
        ensure!(
            config.path.is_file(),
            "config key `{key}.path`: `{}` is a folder; expected a MedMNIST .npz file",
            config.path.display()
        );
        let path = config.path;
        let split = config.split;
        let Index {
            count,
            item_shape,
            layout,
            labels,
            dtype,
        } = read_index(&path, &split, key).with_context(|| format!("MedMNIST archive `{}`", path.display()))?;
        Ok(MedMnist {
            path,
            split,
            count,
            item_shape,
            layout,
            labels,
            dtype,
            normalize: config.normalize,
            images: OnceLock::new(),
        })
    }

    /// The sample's label, where the split has single-class labels.
    pub fn label(&self, index: usize) -> Option<i64> {
        self.labels.as_ref().and_then(|labels| labels.get(index).copied())
    }

    fn images(&self) -> Result<&Images> {
        self.images
            .get_or_init(|| inflate_images(&self.path, &self.split).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|message| anyhow::anyhow!("{message}"))
    }
}

impl Dataset for MedMnist {
    fn len(&self) -> usize {
        self.count
    }

    fn describe(&self, index: usize) -> String {
        format!("{} ({}_images[{index}])", self.path.display(), self.split)
    }

    fn load(&self, index: usize) -> Result<Volume> {
        ensure!(
            index < self.count,
            "MedMNIST sample #{index} does not exist: split `{}` of `{}` has {} images",
            self.split,
            self.path.display(),
            self.count
        );
        let images = self
            .images()
            .with_context(|| format!("cannot decode `{}_images` of `{}`", self.split, self.path.display()))?;
        let item_bytes = images.bytes.len() / self.count;
        let bytes = &images.bytes[index * item_bytes..(index + 1) * item_bytes];
        let item = Tensor::from_data_size(bytes, &self.item_shape, images.kind).to_kind(Kind::Float);
        let voxels = match self.layout {
            Layout::Grey2d => item.reshape([1, self.item_shape[0], self.item_shape[1]]),
            Layout::Colour2d => intensity::luminance(&item).unsqueeze(0),
            Layout::Volume3d => item,
        };
        let mut volume = Volume::new(
            intensity::normalize(&voxels, None, self.normalize, &self.describe(index)),
            None,
        );
        volume.label = self.label(index);
        volume.dtype = self.dtype.clone();
        Ok(volume)
    }
}

type Archive = NpzArchive<BufReader<File>>;

/// The member `name` of the archive, buffered (npyz reads element by element).
fn member<'a>(archive: &'a mut Archive, name: &str) -> Result<Option<BufReader<ZipFile<'a>>>> {
    let file_name = npyz::npz::file_name_from_array_name(name);
    match archive.zip_archive().by_name(&file_name) {
        Ok(file) => Ok(Some(BufReader::new(file))),
        Err(ZipError::FileNotFound) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot open member `{file_name}`")),
    }
}

/// The whole array `name`, if the archive has it. The member is read to its end, where the
/// `zip` crate checks its CRC-32: npyz stops after the last element, and damaged data in a
/// stored (incompressible) deflate block would otherwise pass unnoticed.
fn read_array(archive: &mut Archive, name: &str) -> Result<Option<Tensor>> {
    let Some(mut reader) = member(archive, name)? else {
        return Ok(None);
    };
    let tensor = numpy::read_tensor(NpyFile::new(&mut reader)?).with_context(|| format!("cannot decode `{name}`"))?;
    std::io::copy(&mut reader, &mut std::io::sink()).with_context(|| format!("cannot decode `{name}`"))?;
    Ok(Some(tensor))
}

/// What listing learns of a split: its size, sample shape, layout, labels and stored dtype.
struct Index {
    count: usize,
    item_shape: Vec<i64>,
    layout: Layout,
    labels: Option<Vec<i64>>,
    dtype: Option<String>,
}

/// The split's sample count, sample shape, layout, labels and stored dtype.
fn read_index(path: &Path, split: &str, key: &str) -> Result<Index> {
    let mut archive =
        NpzArchive::open(path).with_context(|| format!("config key `{key}.path`: not a readable .npz archive"))?;
    let images_name = format!("{split}_images");
    let Some(mut reader) = member(&mut archive, &images_name)? else {
        let mut splits: Vec<&str> = archive
            .array_names()
            .filter_map(|name| name.strip_suffix("_images"))
            .collect();
        splits.sort_unstable();
        bail!(
            "config key `{key}.split` = \"{split}\": the archive has no array `{images_name}`; splits present: {}",
            if splits.is_empty() {
                "none".to_string()
            } else {
                splits.join(", ")
            }
        );
    };
    let images = NpyFile::new(&mut reader).with_context(|| format!("cannot read the header of `{images_name}`"))?;
    let shape: Vec<i64> = images.shape().iter().map(|&n| n as i64).collect();
    let header = numpy::describe_header(&images);
    let dtype = numpy::dtype_name(&images);
    drop(images);
    drop(reader);
    let layout = match shape.as_slice() {
        [_, _, _] => Layout::Grey2d,
        [_, _, _, 1] => Layout::Grey2d,
        [_, _, _, 3] => Layout::Colour2d,
        [_, _, _, _] => Layout::Volume3d,
        _ => bail!("`{images_name}` has {header}; expected [N, H, W], [N, H, W, 3] or [N, D, H, W]"),
    };
    ensure!(
        shape.iter().all(|&n| n > 0),
        "`{images_name}` has {header}: no images or an empty axis"
    );
    let count = shape[0] as usize;
    let item_shape = shape[1..].to_vec();

    let labels_name = format!("{split}_labels");
    let labels = match read_array(&mut archive, &labels_name)? {
        None => None,
        Some(labels) => {
            let size = labels.size();
            ensure!(
                size.first() == Some(&(count as i64)),
                "`{labels_name}` has shape {size:?} but `{images_name}` has {count} images"
            );
            match size.as_slice() {
                [_] | [_, 1] => {
                    let values = labels.to_kind(Kind::Double).flatten(0, -1);
                    let values = Vec::<f64>::try_from(&values)?;
                    ensure!(
                        values.iter().all(|v| v.fract() == 0.0),
                        "`{labels_name}` holds non-integer values; expected class ids"
                    );
                    Some(values.into_iter().map(|v| v as i64).collect())
                }
                // Multi-label: one class id cannot hold it (see the module's doc).
                _ => None,
            }
        }
    };
    Ok(Index {
        count,
        item_shape,
        layout,
        labels,
        dtype,
    })
}

/// Inflates the split's whole image array.
fn inflate_images(path: &Path, split: &str) -> Result<Images> {
    let mut archive = NpzArchive::open(path)?;
    let name = format!("{split}_images");
    let tensor = read_array(&mut archive, &name)?.with_context(|| format!("the archive lost its array `{name}`"))?;
    let kind = tensor.kind();
    let numel = tensor.numel();
    let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
    tensor.f_copy_data_u8(&mut bytes, numel)?;
    Ok(Images { bytes, kind })
}

fn build(section: &Section) -> Result<Box<dyn Dataset>> {
    let mut config: MedMnistConfig = section.parse()?;
    if !config.path.as_os_str().is_empty() {
        config.path = section.resolve_path("path", &config.path);
    }
    Ok(Box::new(MedMnist::new(config, &section.key)?))
}

register!(DATASETS, MEDMNIST: DatasetEntry = DatasetEntry {
    name: "medmnist",
    about: "MedMNIST .npz archives: one split's 2D or 3D images with their class labels",
    default_config: default_toml::<MedMnistConfig>,
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::registry;
    use npyz::npz::NpzWriter;
    use npyz::WriterBuilder;

    fn reader(body: &str) -> Result<Box<dyn Dataset>> {
        build(&Section::inline("data.sources.mnist", "medmnist", body)?)
    }

    fn config_for(path: &Path, extra: &str) -> String {
        format!("path = {:?}\n{extra}", path.display().to_string())
    }

    /// Adds a uint8 array to an archive being written (deflated, as `np.savez_compressed`).
    fn add<W: std::io::Write + std::io::Seek>(
        npz: &mut NpzWriter<W>,
        name: &str,
        shape: &[u64],
        data: &[u8],
    ) -> Result<()> {
        add_as(npz, name, shape, data, npyz::zip::CompressionMethod::Deflated)
    }

    fn add_as<W: std::io::Write + std::io::Seek>(
        npz: &mut NpzWriter<W>,
        name: &str,
        shape: &[u64],
        data: &[u8],
        method: npyz::zip::CompressionMethod,
    ) -> Result<()> {
        let options = npyz::zip::write::FileOptions::default().compression_method(method);
        let mut writer = npz
            .array::<u8>(name, options)?
            .default_dtype()
            .shape(shape)
            .begin_nd()?;
        for value in data {
            writer.push(value)?;
        }
        writer.finish()?;
        Ok(())
    }

    /// An archive with 2D train images [3, 2, 4] (value 10n + 4h + w), labels [3, 1], and
    /// val images without labels.
    fn write_2d(path: &Path) -> Result<()> {
        let mut npz = NpzWriter::create(path)?;
        let train: Vec<u8> = (0..3).flat_map(|n| (0..8).map(move |i| 10 * n + i)).collect();
        add(&mut npz, "train_images", &[3, 2, 4], &train)?;
        add(&mut npz, "train_labels", &[3, 1], &[1, 0, 1])?;
        add(&mut npz, "val_images", &[1, 2, 4], &[7; 8])?;
        Ok(())
    }

    #[test]
    fn grey_2d_split_reads_images_and_labels() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("tiny.npz");
        write_2d(&path)?;
        let dataset = reader(&config_for(&path, "normalize = \"none\""))?;
        assert_eq!(dataset.len(), 3);
        assert!(dataset.describe(2).contains(&path.display().to_string()));
        assert!(dataset.describe(2).contains("train_images[2]"));
        let labels: Vec<Option<i64>> = (0..3)
            .map(|i| dataset.load(i).map(|v| v.label))
            .collect::<Result<_>>()?;
        assert_eq!(labels, [Some(1), Some(0), Some(1)]);
        let sample = dataset.load(2)?;
        assert_eq!(sample.voxels.size(), [1, 2, 4]);
        assert_eq!(sample.voxels.kind(), Kind::Float);
        assert_eq!(sample.voxels.double_value(&[0, 1, 3]), 27.0);
        assert_eq!(sample.spacing, None);
        assert_eq!(sample.dtype.as_deref(), Some("uint8"));

        let val = reader(&config_for(&path, "split = \"val\""))?;
        assert_eq!(val.len(), 1);
        let sample = val.load(0)?;
        assert_eq!(sample.label, None);
        // A constant image normalises to zeros rather than NaN.
        assert_eq!(sample.voxels.abs().max().double_value(&[]), 0.0);
        Ok(())
    }

    #[test]
    fn colour_and_3d_images_become_grey_slices_and_volumes() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("mixed.npz");
        let mut npz = NpzWriter::create(&path)?;
        // Two 1 x 2 colour images: a pure red pixel and a grey one.
        add(
            &mut npz,
            "train_images",
            &[2, 1, 2, 3],
            &[200, 0, 0, 9, 9, 9, 0, 0, 0, 0, 0, 0],
        )?;
        add(&mut npz, "train_labels", &[2], &[3, 4])?;
        let volume: Vec<u8> = (0..2 * 3 * 4 * 5).map(|v| v as u8).collect();
        add(&mut npz, "test_images", &[2, 3, 4, 5], &volume)?;
        add(&mut npz, "test_labels", &[2, 14], &[0; 28])?;
        drop(npz);

        let colour = reader(&config_for(&path, "normalize = \"none\""))?;
        let sample = colour.load(0)?;
        assert_eq!(sample.voxels.size(), [1, 1, 2]);
        assert!((sample.voxels.double_value(&[0, 0, 0]) - 200.0 * 0.2126).abs() < 1e-3);
        assert!((sample.voxels.double_value(&[0, 0, 1]) - 9.0).abs() < 1e-4);
        assert_eq!(sample.label, Some(3));

        let volumes = reader(&config_for(&path, "normalize = \"none\"\nsplit = \"test\""))?;
        let sample = volumes.load(1)?;
        assert_eq!(sample.voxels.size(), [3, 4, 5]);
        assert_eq!(sample.voxels.double_value(&[2, 3, 4]), 119.0);
        assert_eq!(sample.dtype.as_deref(), Some("uint8"));
        // Multi-label arrays give no single class.
        assert_eq!(sample.label, None);
        Ok(())
    }

    #[test]
    fn missing_split_is_an_error_listing_the_splits_present() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("tiny.npz");
        write_2d(&path)?;
        let message = format!(
            "{:#}",
            reader(&config_for(&path, "split = \"test\""))
                .err()
                .expect("no test split")
        );
        assert!(message.contains("data.sources.mnist.split"), "{message}");
        assert!(message.contains("splits present: train, val"), "{message}");
        Ok(())
    }

    #[test]
    fn mismatched_labels_and_bad_shapes_are_errors() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("bad.npz");
        let mut npz = NpzWriter::create(&path)?;
        add(&mut npz, "train_images", &[2, 2, 2], &[0; 8])?;
        add(&mut npz, "train_labels", &[3], &[0; 3])?;
        add(&mut npz, "val_images", &[4, 2], &[0; 8])?;
        drop(npz);
        let message = format!(
            "{:#}",
            reader(&config_for(&path, "")).err().expect("3 labels for 2 images")
        );
        assert!(
            message.contains("train_labels") && message.contains(&path.display().to_string()),
            "{message}"
        );
        let message = format!(
            "{:#}",
            reader(&config_for(&path, "split = \"val\"")).err().expect("2 axes")
        );
        assert!(message.contains("[4, 2]"), "{message}");
        Ok(())
    }

    #[test]
    fn missing_or_corrupt_archives_are_errors_naming_them() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let missing = folder.path().join("absent.npz");
        let message = format!("{:#}", reader(&config_for(&missing, "")).err().expect("missing"));
        assert!(message.contains("data.sources.mnist.path") && message.contains(&missing.display().to_string()));

        let garbage = folder.path().join("garbage.npz");
        std::fs::write(&garbage, b"PK but not really a zip archive")?;
        let message = format!("{:#}", reader(&config_for(&garbage, "")).err().expect("garbage"));
        assert!(message.contains(&garbage.display().to_string()), "{message}");

        // Damage the image data only (the entry is stored, not deflated, so what a deflate
        // backend makes of noise does not matter): the directory and headers read, and the
        // CRC-32 check fails in `load`.
        let damaged = folder.path().join("damaged.npz");
        let mut npz = NpzWriter::create(&damaged)?;
        let noise: Vec<u8> = (0..4000u32).map(|v| (v.wrapping_mul(2654435761) >> 24) as u8).collect();
        add_as(
            &mut npz,
            "train_images",
            &[10, 20, 20],
            &noise,
            npyz::zip::CompressionMethod::Stored,
        )?;
        drop(npz);
        let mut bytes = std::fs::read(&damaged)?;
        for byte in &mut bytes[400..1200] {
            *byte = !*byte;
        }
        std::fs::write(&damaged, bytes)?;
        let dataset = reader(&config_for(&damaged, ""))?;
        let message = format!("{:#}", dataset.load(3).err().expect("damaged data"));
        assert!(message.contains(&damaged.display().to_string()), "{message}");
        // The failure is remembered, not retried into a different answer.
        assert!(dataset.load(4).is_err());
        Ok(())
    }

    #[test]
    fn bad_keys_are_errors_naming_the_key() {
        for (body, key) in [
            ("", "data.sources.mnist.path"),
            ("path = \"x.npz\"\nnormalize = \"histogram\"", "normalize"),
            ("path = \"x.npz\"\nsplits = \"val\"", "splits"),
        ] {
            let message = format!("{:#}", reader(body).err().unwrap_or_else(|| panic!("`{body}`")));
            assert!(message.contains(key), "`{body}`: {message}");
        }
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::datasets().get("medmnist")?;
        let section = Section::inline("data.sources.mnist", "medmnist", &(entry.default_config)())?;
        assert_eq!(section.parse::<MedMnistConfig>()?, MedMnistConfig::default());
        Ok(())
    }

    /// The MedMNIST archives beside the project, when present (../shared/data/README.md:
    /// PneumoniaMNIST train 4708 = 1214 normal + 3494 pneumonia, val 524, 28 x 28;
    /// AdrenalMNIST3D train 1188 = 929 + 259, val 98 = 76 + 22, 28^3 and 64^3).
    #[test]
    fn reads_the_shared_medmnist_archives_when_present() -> Result<()> {
        let folder = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/medmnist"));
        if !folder.is_dir() {
            return Ok(());
        }
        let count_labels = |dataset: &dyn Dataset| -> Result<[usize; 2]> {
            let mut counts = [0, 0];
            for index in 0..dataset.len() {
                counts[dataset.load(index)?.label.expect("labelled") as usize] += 1;
            }
            Ok(counts)
        };

        let pneumonia = folder.join("pneumoniamnist.npz");
        let train = reader(&config_for(&pneumonia, ""))?;
        assert_eq!(train.len(), 4708);
        let sample = train.load(0)?;
        assert_eq!(sample.voxels.size(), [1, 28, 28]);
        assert_eq!(sample.dtype.as_deref(), Some("uint8"));
        assert!(sample.voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-4);
        assert_eq!(count_labels(train.as_ref())?, [1214, 3494]);
        assert_eq!(reader(&config_for(&pneumonia, "split = \"val\""))?.len(), 524);
        let message = format!(
            "{:#}",
            reader(&config_for(&pneumonia, "split = \"test\""))
                .err()
                .expect("no test")
        );
        assert!(message.contains("splits present: train, val"), "{message}");

        let adrenal = folder.join("adrenalmnist3d.npz");
        let train = reader(&config_for(&adrenal, ""))?;
        assert_eq!(train.len(), 1188);
        assert_eq!(train.load(0)?.voxels.size(), [28, 28, 28]);
        assert_eq!(count_labels(train.as_ref())?, [929, 259]);
        let val = reader(&config_for(&adrenal, "split = \"val\""))?;
        assert_eq!(count_labels(val.as_ref())?, [76, 22]);

        let large = reader(&config_for(&folder.join("adrenalmnist3d_64.npz"), "split = \"val\""))?;
        assert_eq!(large.len(), 98);
        assert_eq!(large.load(97)?.voxels.size(), [64, 64, 64]);
        Ok(())
    }
}
