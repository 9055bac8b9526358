//! Dataset format `image-folder`: the 2D layout of 2D self-supervised learning tools,
//! `ROOT/<dataset>/NNN.png` (or `.jpg`, `.jpeg`), optionally under a split folder
//! (`ROOT/<split>/<dataset>/...`). Each image is one sample `[1, H, W]`.
//!
//! `path` is either one dataset folder (it holds the images) or a root whose subfolders are
//! datasets; with `split`, the folder looked at is `path/split`. Images of a root are listed
//! dataset by dataset (subfolders sorted by name), each dataset's files sorted by name.
//!
//! Decoding uses the `image` crate (PNG and baseline/progressive JPEG, 8 and 16 bit). Grey
//! images keep their stored values; colour images become grey by Rec. 709 luminance,
//! 0.2126 R + 0.7152 G + 0.0722 B on the stored values (what the `image` crate and most
//! toolkits compute, here in float32 without rounding), since the encoders take one channel
//! and X-rays, CT and MRI saved as RGB carry the same grey in all three. Alpha is ignored.

use crate::files;
use crate::intensity::{self, Normalization};
use image::DynamicImage;
use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Keys of a `[data.sources.NAME]` section with `format = "image-folder"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImageFolderConfig {
    /// A dataset folder of images, or a root whose subfolders are datasets; a relative path
    /// resolves against the config file's folder (from `--set` or the environment: against
    /// the working directory). Required.
    pub path: PathBuf,
    /// Subfolder of `path` to read, such as `"train"` or `"valid"`; empty reads `path`.
    pub split: String,
    /// `"zscore"`, `"minmax"` or `"none"` (the stored values: 0-255 or 0-65535).
    pub normalize: Normalization,
}

impl Default for ImageFolderConfig {
    fn default() -> Self {
        ImageFolderConfig {
            path: PathBuf::new(),
            split: String::new(),
            normalize: Normalization::ZScore,
        }
    }
}

/// File extensions taken as images (compared lower-cased).
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The image-folder reader: the listed images.
pub struct ImageFolder {
    files: Vec<PathBuf>,
    normalize: Normalization,
}

impl ImageFolder {
    /// Lists the images of `config.path` (already resolved); `key` is the section's dotted
    /// key, for messages.
    pub fn new(config: ImageFolderConfig, key: &str) -> Result<ImageFolder> {
        ensure!(
            !config.path.as_os_str().is_empty(),
            "config key `{key}.path` is missing: expected a folder of .png / .jpg images or a folder of such folders"
        );
        let folder = if config.split.is_empty() {
            config.path.clone()
        } else {
            config.path.join(&config.split)
        };
        let files = list_images(&folder).with_context(|| {
            if config.split.is_empty() {
                format!("config key `{key}.path`")
            } else {
                format!("config keys `{key}.path` and `{key}.split`")
            }
        })?;
        Ok(ImageFolder {
            files,
            normalize: config.normalize,
        })
    }

    /// The listed images, in the order of their sample indices.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn describe(&self, index: usize) -> String {
        match self.files.get(index) {
            Some(path) => path.display().to_string(),
            None => format!("image #{index} (out of range: {} images)", self.files.len()),
        }
    }

    fn load(&self, index: usize) -> Result<Volume> {
        let Some(path) = self.files.get(index) else {
            bail!(
                "image #{index} does not exist: the source has {} images",
                self.files.len()
            );
        };
        let (grey, dtype) = decode(path).with_context(|| format!("cannot decode image `{}`", path.display()))?;
        let mut volume = Volume::new(
            intensity::normalize(&grey.unsqueeze(0), None, self.normalize, &self.describe(index)),
            None,
        );
        volume.dtype = Some(dtype.to_string());
        Ok(volume)
    }
}

fn is_image_name(path: &Path) -> bool {
    files::extension(path).is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
}

/// The images of `folder` itself or, when it holds none, of its subfolders.
fn list_images(folder: &Path) -> Result<Vec<PathBuf>> {
    files::ensure_folder(folder, "a folder of .png / .jpg images or a folder of such folders")?;
    let direct = files::files_in(folder, is_image_name)?;
    if !direct.is_empty() {
        return Ok(direct);
    }
    let mut images = Vec::new();
    let subfolders = files::subfolders(folder)?;
    for dataset in &subfolders {
        images.extend(files::files_in(dataset, is_image_name)?);
    }
    if images.is_empty() {
        let mut message = format!(
            "folder `{}` holds no .png, .jpg or .jpeg image, neither itself nor in its subfolders",
            folder.display()
        );
        // `ROOT/<split>/<dataset>/` read without `split`: say so.
        let nested = subfolders
            .iter()
            .any(|sub| files::subfolders(sub).is_ok_and(|inner| !inner.is_empty()));
        if nested {
            message.push_str("; its subfolders hold folders: if they are splits, name one with `split`");
        }
        bail!(message);
    }
    Ok(images)
}

/// Decodes an image into float32 `[H, W]` grey values (see the module's doc), with the name
/// of its stored sample type: `uint8`, `uint16` or `float32`, whether grey or colour (the
/// `Volume::dtype` vocabulary has element types only, and the sample is grey either way).
fn decode(path: &Path) -> Result<(Tensor, &'static str)> {
    // The format comes from the content, not the extension: a `.png` that holds a JPEG
    // still decodes.
    let image = image::io::Reader::open(path)?.with_guessed_format()?.decode()?;
    let (width, height) = (i64::from(image.width()), i64::from(image.height()));
    let colour = image.color().has_color();
    let (values, dtype) = match &image {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => {
            let values = if colour {
                Tensor::from_slice(image.to_rgb8().as_raw())
            } else {
                Tensor::from_slice(image.to_luma8().as_raw())
            };
            (values, "uint8")
        }
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let widen = |values: &[u16]| values.iter().map(|&v| i32::from(v)).collect::<Vec<_>>();
            let values = if colour {
                Tensor::from_slice(&widen(image.to_rgb16().as_raw()))
            } else {
                Tensor::from_slice(&widen(image.to_luma16().as_raw()))
            };
            (values, "uint16")
        }
        // Float images (not produced by PNG or JPEG, but the decoder's type allows them).
        _ => {
            let values = if colour {
                Tensor::from_slice(image.to_rgb32f().as_raw())
            } else {
                Tensor::from_slice(image.to_luma32f().as_raw())
            };
            (values, "float32")
        }
    };
    let values = values.to_kind(Kind::Float);
    let grey = if colour {
        intensity::luminance(&values.view([height, width, 3]))
    } else {
        values.view([height, width])
    };
    Ok((grey, dtype))
}

fn build(section: &Section) -> Result<Box<dyn Dataset>> {
    let mut config: ImageFolderConfig = section.parse()?;
    if !config.path.as_os_str().is_empty() {
        config.path = section.resolve_path("path", &config.path);
    }
    Ok(Box::new(ImageFolder::new(config, &section.key)?))
}

register!(DATASETS, IMAGE_FOLDER: DatasetEntry = DatasetEntry {
    name: "image-folder",
    about: "2D images (.png, .jpg; 8/16 bit, grey or RGB to grey): ROOT/<dataset>/*.png, optional split folder",
    default_config: default_toml::<ImageFolderConfig>,
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb};
    use medssl_core::registry;

    fn reader(body: &str) -> Result<Box<dyn Dataset>> {
        build(&Section::inline("data.sources.xrays", "image-folder", body)?)
    }

    fn config_for(path: &Path, extra: &str) -> String {
        format!("path = {:?}\n{extra}", path.display().to_string())
    }

    /// A `width` x `height` 8-bit grey image whose pixel (x, y) is 10y + x.
    fn grey8(width: u32, height: u32) -> ImageBuffer<Luma<u8>, Vec<u8>> {
        ImageBuffer::from_fn(width, height, |x, y| Luma([(10 * y + x) as u8]))
    }

    #[test]
    fn grey_8_and_16_bit_and_rgb_images_read_back_as_one_grey_slice() -> Result<()> {
        let folder = tempfile::tempdir()?;
        grey8(5, 3).save(folder.path().join("a.png"))?;
        ImageBuffer::from_fn(4, 2, |x, y| Luma([(1000 * y + x) as u16 + 60000])).save(folder.path().join("b.png"))?;
        ImageBuffer::from_fn(3, 2, |x, _| Rgb([[200u8, 0, 0], [0, 200, 0], [50, 50, 50]][x as usize]))
            .save(folder.path().join("c.png"))?;
        ImageBuffer::from_fn(3, 1, |x, _| Rgb([[0u16, 0, 40000], [7, 7, 7], [0, 0, 0]][x as usize]))
            .save(folder.path().join("d.png"))?;

        let dataset = reader(&config_for(folder.path(), "normalize = \"none\""))?;
        assert_eq!(dataset.len(), 4);

        let dtypes: Vec<Option<String>> = (0..4)
            .map(|i| dataset.load(i).map(|v| v.dtype))
            .collect::<Result<_>>()?;
        let expected = ["uint8", "uint16", "uint8", "uint16"].map(|t| Some(t.to_string()));
        assert_eq!(dtypes, expected);

        let grey = dataset.load(0)?.voxels;
        assert_eq!(grey.size(), [1, 3, 5]);
        assert_eq!(grey.kind(), Kind::Float);
        assert_eq!(grey.double_value(&[0, 2, 4]), 24.0);

        let deep = dataset.load(1)?.voxels;
        assert_eq!(deep.size(), [1, 2, 4]);
        assert_eq!(deep.double_value(&[0, 1, 3]), 61003.0);

        let colour = dataset.load(2)?.voxels;
        assert_eq!(colour.size(), [1, 2, 3]);
        assert!((colour.double_value(&[0, 0, 0]) - 200.0 * 0.2126).abs() < 1e-3);
        assert!((colour.double_value(&[0, 1, 1]) - 200.0 * 0.7152).abs() < 1e-3);
        assert!((colour.double_value(&[0, 1, 2]) - 50.0).abs() < 1e-3);

        let colour16 = dataset.load(3)?.voxels;
        assert!((colour16.double_value(&[0, 0, 0]) - 40000.0 * 0.0722).abs() < 1e-2);
        assert!((colour16.double_value(&[0, 0, 1]) - 7.0).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn jpeg_decodes_and_normalisation_applies() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("scan.JPG");
        grey8(16, 16).save_with_format(&path, image::ImageFormat::Jpeg)?;
        let dataset = reader(&config_for(folder.path(), ""))?;
        assert_eq!(dataset.describe(0), path.display().to_string());
        let volume = dataset.load(0)?;
        assert_eq!(volume.dtype.as_deref(), Some("uint8"));
        let voxels = volume.voxels;
        assert_eq!(voxels.size(), [1, 16, 16]);
        assert!(voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-5);
        let minmax = reader(&config_for(folder.path(), "normalize = \"minmax\""))?
            .load(0)?
            .voxels;
        assert_eq!(minmax.max().double_value(&[]), 1.0);
        Ok(())
    }

    #[test]
    fn root_lists_dataset_folders_in_order_and_split_selects_a_subfolder() -> Result<()> {
        let root = tempfile::tempdir()?;
        for (split, dataset, names) in [
            ("train", "lungs", vec!["002.png", "001.png"]),
            ("train", "brains", vec!["000.jpeg"]),
            ("valid", "lungs", vec!["000.png"]),
        ] {
            let folder = root.path().join(split).join(dataset);
            std::fs::create_dir_all(&folder)?;
            for name in names {
                grey8(4, 4).save_with_format(folder.join(name), image::ImageFormat::Png)?;
            }
            std::fs::write(folder.join("labels.csv"), "not an image")?;
            std::fs::write(folder.join("._001.png"), "macOS resource fork")?;
        }
        let train = reader(&config_for(root.path(), "split = \"train\""))?;
        let names: Vec<String> = (0..train.len()).map(|i| train.describe(i)).collect();
        let expected: Vec<String> = ["brains/000.jpeg", "lungs/001.png", "lungs/002.png"]
            .iter()
            .map(|n| root.path().join("train").join(n).display().to_string())
            .collect();
        assert_eq!(names, expected);

        assert_eq!(reader(&config_for(&root.path().join("valid"), ""))?.len(), 1);
        assert_eq!(reader(&config_for(&root.path().join("train/lungs"), ""))?.len(), 2);

        // The root itself holds splits, not datasets: the error says to pick a split.
        let message = format!("{:#}", reader(&config_for(root.path(), "")).err().expect("splits"));
        assert!(
            message.contains("split") && message.contains("data.sources.xrays.path"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn missing_or_empty_folder_is_an_error_naming_key_and_folder() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let missing = folder.path().join("nowhere");
        let message = format!("{:#}", reader(&config_for(&missing, "")).err().expect("missing"));
        assert!(message.contains("data.sources.xrays.path"), "{message}");
        assert!(message.contains(&missing.display().to_string()), "{message}");

        let message = format!("{:#}", reader(&config_for(folder.path(), "")).err().expect("empty"));
        assert!(message.contains(&folder.path().display().to_string()), "{message}");

        let message = format!(
            "{:#}",
            reader(&config_for(folder.path(), "split = \"test\""))
                .err()
                .expect("missing split")
        );
        assert!(message.contains("data.sources.xrays.split"), "{message}");
        Ok(())
    }

    #[test]
    fn corrupt_image_is_an_error_naming_it() -> Result<()> {
        let folder = tempfile::tempdir()?;
        std::fs::write(folder.path().join("a.png"), b"not a png at all")?;
        let truncated = folder.path().join("b.png");
        grey8(64, 64).save(&truncated)?;
        let bytes = std::fs::read(&truncated)?;
        std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
        let dataset = reader(&config_for(folder.path(), ""))?;
        for index in 0..dataset.len() {
            let message = format!("{:#}", dataset.load(index).err().expect("corrupt"));
            assert!(message.contains(&dataset.describe(index)), "{message}");
        }
        Ok(())
    }

    #[test]
    fn bad_keys_are_errors_naming_the_key() {
        for (body, key) in [
            ("", "data.sources.xrays.path"),
            ("path = \"x\"\nnormalize = \"histogram\"", "normalize"),
            ("path = \"x\"\nsplits = \"train\"", "splits"),
        ] {
            let message = format!("{:#}", reader(body).err().unwrap_or_else(|| panic!("`{body}`")));
            assert!(message.contains(key), "`{body}`: {message}");
        }
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::datasets().get("image-folder")?;
        let section = Section::inline("data.sources.xrays", "image-folder", &(entry.default_config)())?;
        assert_eq!(section.parse::<ImageFolderConfig>()?, ImageFolderConfig::default());
        Ok(())
    }

    /// The PneumoniaMNIST PNGs beside the project, when present (../shared/data/README.md:
    /// 600 train and 120 valid 28 x 28 8-bit grey images).
    #[test]
    fn reads_the_shared_png_folders_when_present() -> Result<()> {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/png2d"));
        if !root.is_dir() {
            return Ok(());
        }
        let train = reader(&config_for(root, "split = \"train\""))?;
        assert_eq!(train.len(), 600);
        let valid = reader(&config_for(&root.join("valid/pneumoniamnist"), ""))?;
        assert_eq!(valid.len(), 120);
        for index in [0, 599] {
            let volume = train.load(index)?;
            assert_eq!(volume.dtype.as_deref(), Some("uint8"));
            let voxels = volume.voxels;
            assert_eq!(voxels.size(), [1, 28, 28]);
            assert!(voxels.mean(Kind::Double).double_value(&[]).abs() < 1e-4);
        }
        let raw = reader(&config_for(&root.join("train"), "normalize = \"none\""))?
            .load(0)?
            .voxels;
        assert!(raw.max().double_value(&[]) <= 255.0 && raw.min().double_value(&[]) >= 0.0);
        Ok(())
    }
}
