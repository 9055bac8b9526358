//! Small generated MedMNIST-style `.npz` archives (2D images or volumes, with labels), so
//! the tests need no downloaded data.

use npyz::npz::NpzWriter;
use npyz::WriterBuilder;
use std::path::{Path, PathBuf};

fn add<W: std::io::Write + std::io::Seek>(npz: &mut NpzWriter<W>, name: &str, shape: &[u64], data: &[u8]) {
    let options = npyz::zip::write::FileOptions::default().compression_method(npyz::zip::CompressionMethod::Deflated);
    let mut writer = npz
        .array::<u8>(name, options)
        .unwrap()
        .default_dtype()
        .shape(shape)
        .begin_nd()
        .unwrap();
    for value in data {
        writer.push(value).unwrap();
    }
    writer.finish().unwrap();
}

/// `n` samples of `depth` x 12 x 12 (depth 0: 2D images) and their labels: class 1 has a
/// bright square whose place varies, class 0 only noise.
pub fn samples(n: usize, depth: usize, offset: usize) -> (Vec<u8>, Vec<u8>) {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let label = (i % 2) as u8;
        let corner = (i + offset) % 5;
        for _ in 0..depth.max(1) {
            for y in 0..12 {
                for x in 0..12 {
                    let noise = ((i * 131 + y * 17 + x * 7 + offset) % 23) as u8;
                    let inside = (corner..corner + 6).contains(&y) && (corner..corner + 6).contains(&x);
                    images.push(if label == 1 && inside { 200 + noise } else { noise });
                }
            }
        }
        labels.push(label);
    }
    (images, labels)
}

/// A MedMNIST-style archive with `train` and `val` splits; without labels if `labelled`
/// is false.
pub fn archive(dir: &Path, name: &str, depth: usize, labelled: bool) -> PathBuf {
    let path = dir.join(name);
    let mut npz = NpzWriter::create(&path).unwrap();
    for (split, n, offset) in [("train", 24, 0), ("val", 12, 3)] {
        let (images, labels) = samples(n, depth, offset);
        let mut shape = vec![n as u64];
        if depth > 0 {
            shape.push(depth as u64);
        }
        shape.extend([12, 12]);
        add(&mut npz, &format!("{split}_images"), &shape, &images);
        if labelled {
            add(&mut npz, &format!("{split}_labels"), &[n as u64, 1], &labels);
        }
    }
    path
}
