//! A small generated Medical Segmentation Decathlon task folder (NIfTI images and masks), so
//! the tests need no downloaded data.

use ndarray::Array3;
use nifti::writer::WriterOptions;
use std::path::{Path, PathBuf};

/// A Decathlon task folder of `n` volumes of 10 x 20 x 5 voxels (5 slices along the third
/// axis): a bright square of class 1 and a dimmer one of class 2 whose places vary, on
/// noise; `max_class` caps the mask's values (to write an invalid one).
pub fn decathlon(dir: &Path, n: usize, max_class: u8) -> PathBuf {
    let task = dir.join("task");
    for folder in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(task.join(folder)).unwrap();
    }
    for case in 0..n {
        let shift = case % 4;
        let class = |x: usize, y: usize| -> u8 {
            if (2 + shift..6 + shift).contains(&x) && (3..9).contains(&y) {
                1
            } else if (2..6).contains(&x) && (12 + shift..17 + shift).contains(&y) {
                2.min(max_class)
            } else {
                0
            }
        };
        let mask = Array3::from_shape_fn((10, 20, 5), |(x, y, _)| class(x, y));
        let image = Array3::from_shape_fn((10, 20, 5), |(x, y, z)| {
            let noise = ((case * 31 + x * 7 + y * 13 + z * 3) % 11) as f32;
            noise + [0.0, 60.0, 30.0][class(x, y).min(2) as usize]
        });
        let name = format!("case_{:03}.nii.gz", case + 1);
        WriterOptions::new(task.join("imagesTr").join(&name))
            .write_nifti(&image)
            .unwrap();
        WriterOptions::new(task.join("labelsTr").join(&name))
            .write_nifti(&mask)
            .unwrap();
    }
    task
}
