//! DICOM files as users bring them: one file a sample, a folder mixing X-rays (one file an
//! image) with a CT series and a multi-frame file, every transfer syntax the readers decode
//! (JPEG-LS and JPEG 2000 included) against the uncompressed original, 32- and 1-bit pixels,
//! and `medssl data inspect FILE.dcm`.
//!
//! The files are the project's own, in tests/fixtures/dicom (written once by
//! make_fixtures.py there, with pydicom; see its doc for what each holds).

mod common;

use medssl_core::dataset::Dataset;
use medssl_core::registry;
use medssl_core::section::Section;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

use medssl_plugins as _;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/dicom")
        .join(name)
}

/// A `dicom` source reading `path` with raw (rescaled, not normalised) values.
fn dicom(path: &Path) -> Box<dyn Dataset> {
    let body = format!(
        "path = {}\nnormalize = \"none\"",
        toml::Value::String(path.display().to_string())
    );
    let section = Section::inline("data.sources.dicom", "dicom", &body).unwrap();
    (registry::datasets().get("dicom").unwrap().build)(&section).unwrap()
}

fn values(tensor: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(tensor.flatten(0, -1)).unwrap()
}

#[test]
fn every_transfer_syntax_decodes_to_the_pixels_of_the_uncompressed_file() {
    let reference = dicom(&fixture("codecs/explicit_le.dcm"));
    assert_eq!(reference.len(), 1);
    let original = reference.load(0).unwrap();
    // 3 frames of 32 x 40, 12-bit stored values (0..4095) less the intercept 1024.
    assert_eq!(original.voxels.size(), [3, 32, 40]);
    assert_eq!(original.spacing, Some([2.5, 0.5, 0.75]));
    assert_eq!(original.dtype.as_deref(), Some("uint16"));
    let (min, max) = (
        original.voxels.min().double_value(&[]),
        original.voxels.max().double_value(&[]),
    );
    assert!(
        min >= -1024.0 && max <= 4095.0 - 1024.0 && max - min > 3000.0,
        "{min} {max}"
    );
    let original_values = values(&original.voxels);
    for (file, syntax) in [
        ("implicit_le", "Implicit VR Little Endian"),
        ("explicit_be", "Explicit VR Big Endian"),
        ("deflate", "Deflated Explicit VR Little Endian"),
        ("rle", "RLE Lossless"),
        ("jpeg_ls", "JPEG-LS Lossless"),
        ("jpeg2000", "JPEG 2000"),
    ] {
        let dataset = dicom(&fixture(&format!("codecs/{file}.dcm")));
        let attributes = dataset.attributes(0).unwrap();
        let named = attributes["transfer_syntax"].as_str().unwrap_or_default();
        assert!(named.starts_with(syntax), "{file}: {named}");
        let volume = dataset.load(0).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_eq!(volume.voxels.size(), [3, 32, 40], "{file}");
        let differing = values(&volume.voxels)
            .iter()
            .zip(&original_values)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing,
            0,
            "{file}: {differing} of {} pixels differ",
            original_values.len()
        );
        assert_eq!(volume.spacing, original.spacing, "{file}");
        assert_eq!(volume.dtype, original.dtype, "{file}");
    }
}

#[test]
fn a_folder_of_x_rays_a_ct_series_and_a_multi_frame_file_reads_as_images_and_volumes() {
    let folder = fixture("mixed");
    let dataset = dicom(&folder);
    let names: Vec<String> = (0..dataset.len()).map(|i| dataset.describe(i)).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        names[0].starts_with(&folder.display().to_string()) && names[0].ends_with(", 3 files)"),
        "{names:?}"
    );
    let files = ["cxr_a.dcm", "cxr_b.dcm", "multiframe.dcm"].map(|n| folder.join(n).display().to_string());
    assert_eq!(names[1..], files);

    // The CT series: three slices sorted by position (file names run the other way).
    let ct = dataset.load(0).unwrap();
    assert_eq!(ct.voxels.size(), [3, 8, 8]);
    let firsts: Vec<f64> = (0..3).map(|k| ct.voxels.double_value(&[k, 0, 0])).collect();
    assert_eq!(firsts, [50.0, 75.0, 100.0]);
    assert_eq!(ct.spacing, Some([2.5, 0.7, 0.7]));
    assert_eq!(ct.dtype.as_deref(), Some("int16"));

    // Each X-ray is its own 2D image; ImagerPixelSpacing in-plane.
    for (index, base) in [(1, 100.0), (2, 200.0)] {
        let image = dataset.load(index).unwrap();
        assert_eq!(image.voxels.size(), [1, 16, 12]);
        let (min, max) = (
            image.voxels.min().double_value(&[]),
            image.voxels.max().double_value(&[]),
        );
        assert!(min >= base && max < base + 50.0, "{index}: {min} {max}");
        assert_eq!(image.spacing, Some([1.0, 0.2, 0.2]));
    }

    // The multi-frame file: frames in stored order, spacing from SpacingBetweenSlices.
    let volume = dataset.load(3).unwrap();
    assert_eq!(volume.voxels.size(), [4, 6, 5]);
    let expected: Vec<f32> = (0..4 * 6 * 5).map(|v| v as f32).collect();
    assert_eq!(values(&volume.voxels), expected);
    assert_eq!(volume.spacing, Some([3.0, 0.9, 0.8]));
    assert_eq!(dataset.attributes(3).unwrap()["frames"], 4);
}

#[test]
fn a_single_file_is_a_sample() {
    let image = dicom(&fixture("mixed/cxr_b.dcm"));
    assert_eq!(image.len(), 1);
    assert_eq!(image.load(0).unwrap().voxels.size(), [1, 16, 12]);
    let volume = dicom(&fixture("codecs/jpeg_ls.dcm"));
    assert_eq!(volume.load(0).unwrap().voxels.size(), [3, 32, 40]);
}

#[test]
fn thirty_two_bit_and_one_bit_pixels_read_with_their_values() {
    // BitsAllocated 32 (dicom-pixeldata's LUT takes only 8 and 16): stored 6e7 i, slope 0.5.
    let words = dicom(&fixture("bits/uint32.dcm")).load(0).unwrap();
    assert_eq!(words.voxels.size(), [1, 6, 7]);
    assert_eq!(words.dtype.as_deref(), Some("uint32"));
    let expected: Vec<f32> = (0..42u64).map(|i| (i as f64 * 6e7 * 0.5) as f32).collect();
    assert_eq!(values(&words.voxels), expected);
    // Past 2^31 stored: read as signed or as 16 bits this would be negative or small.
    assert!(words.voxels.max().double_value(&[]) > 1.2e9);

    // The same pixels RLE-compressed: the RLE decoder takes 8 and 16 bits only.
    let rle = fixture("bits/uint32_rle.dcm");
    let message = format!("{:#}", dicom(&rle).load(0).err().expect("32-bit RLE"));
    for part in ["BitsAllocated 32", "RLE Lossless", &rle.display().to_string()] {
        assert!(message.contains(part), "{part}: {message}");
    }

    // BitsAllocated 1, a bitmap segmentation: 0 and 1 (an 18-pixel rectangle).
    let mask = dicom(&fixture("bits/bitmap.dcm")).load(0).unwrap();
    assert_eq!(mask.voxels.size(), [1, 8, 8]);
    assert_eq!(mask.dtype.as_deref(), Some("bool"));
    assert_eq!(mask.voxels.sum(Kind::Double).double_value(&[]), 18.0);
    assert_eq!(mask.voxels.double_value(&[0, 3, 4]), 1.0);
    assert_eq!(mask.voxels.max().double_value(&[]), 1.0);
}

#[test]
fn inspect_reports_one_dicom_file_without_the_decoders_chatter() {
    let file = fixture("codecs/jpeg2000.dcm");
    let out = common::medssl().args(["data", "inspect"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["format"], "dicom");
    assert_eq!(json["samples"], 1);
    assert_eq!(json["shapes"], serde_json::json!([[3, 32, 40]]));
    assert_eq!(json["spacing"], serde_json::json!([2.5, 0.5, 0.75]));
    assert_eq!(json["dtype"], "uint16");
    let attributes = &json["attributes"];
    assert_eq!(attributes["frames"], 3);
    assert_eq!(attributes["bits_allocated"], 16);
    assert_eq!(attributes["bits_stored"], 12);
    assert_eq!(attributes["photometric"], "MONOCHROME2");
    assert!(
        attributes["transfer_syntax"]
            .as_str()
            .is_some_and(|s| s.contains("JPEG 2000")),
        "{attributes}"
    );
    assert!(json["min"].as_f64().unwrap() >= -1024.0 && json["max"].as_f64().unwrap() <= 3071.0);
    // The JPEG 2000 decoder's info lines stay off the console at the default level.
    let err = common::stderr(&out);
    assert!(!err.to_lowercase().contains("header"), "{err}");

    let folder = fixture("mixed");
    let out = common::medssl()
        .args(["data", "inspect"])
        .arg(&folder)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["format"], "dicom");
    assert_eq!(json["samples"], 4);
    assert_eq!(json["attributes"]["files"], 3);
}
