//! `medssl embed`: a tiny run's frozen features of generated MedMNIST-style archives, equal
//! bit for bit to the features `medssl eval` probes (`medssl_core::eval::features`).

mod common;

use common::archive::archive;
use medssl_core::checkpoint::read_safetensors;
use medssl_core::eval::{self, DataSpec, EvalOptions};
use medssl_core::precision::Precision;
use medssl_core::probe::knn::KnnConfig;
use medssl_core::probe::Probe;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Tensor;

use medssl_plugins as _;

/// What `medssl eval knn RUN --train SET --eval SET` (train and val splits) would encode.
fn eval_options(run: &Path, set: &Path, mean_pool: bool) -> EvalOptions {
    let spec = |split: &str| DataSpec {
        path: set.to_path_buf(),
        split: Some(split.into()),
    };
    EvalOptions {
        checkpoint: run.to_path_buf(),
        config: None,
        train: spec("train"),
        eval: spec("val"),
        format: None,
        label_fraction: 1.0,
        folds: None,
        seeds: 1,
        seed: 0,
        raw_pixels: false,
        mean_pool,
        batch_size: 64,
        device: "cpu".into(),
        precision: Precision::Fp32,
        probe: Probe::Knn(KnnConfig::default()),
    }
}

/// `medssl embed RUN --data SET --split SPLIT --out OUT EXTRA...`; returns its `--json`.
fn embed(run: &Path, set: &Path, split: &str, out: &Path, extra: &[&str]) -> Value {
    let output = common::medssl()
        .arg("embed")
        .arg(run)
        .arg("--data")
        .arg(set)
        .args(["--split", split, "--device", "cpu", "--json", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", common::stderr(&output));
    serde_json::from_str(&common::stdout(&output)).unwrap()
}

fn tensor(file: &Path, name: &str) -> Tensor {
    read_safetensors(file)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{}: no `{name}`", file.display()))
        .1
}

fn bytes(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn sidecar(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap()).unwrap()
}

#[test]
fn embed_equals_evals_features_for_images_and_volumes_and_slices_average_to_mean_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::pretrain(tmp.path(), "run", &common::TINY.replace("epochs = 2", "epochs = 1"));
    let images = archive(tmp.path(), "images.npz", 0, true);
    let volumes = archive(tmp.path(), "volumes.npz", 5, true);
    let out = |name: &str| -> PathBuf { tmp.path().join(name) };

    for (set, level) in [(&images, "slice"), (&volumes, "volume")] {
        let (train, val) = eval::features(&eval_options(&run, set, false)).unwrap();
        for (split, expected) in [("train", &train), ("val", &val)] {
            let file = out(&format!("{level}-{split}.safetensors"));
            let report = embed(&run, set, split, &file, &[]);
            assert_eq!(report["level"], level, "the default level of the set");
            let embeddings = tensor(&file, "embeddings");
            assert_eq!(embeddings.size(), expected.size());
            assert_eq!(
                bytes(&embeddings).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                bytes(expected).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{level} {split}: embed and eval's features differ"
            );
            let labels = Vec::<i64>::try_from(tensor(&file, "labels")).unwrap();
            let side = sidecar(&file);
            assert_eq!(side["labels"], serde_json::json!(labels));
            assert_eq!(side["ids"].as_array().unwrap().len(), labels.len());
            assert_eq!(
                labels.iter().filter(|&&l| l == 1).count() * 2,
                labels.len(),
                "balanced classes"
            );
        }
    }

    // .npy: the same numbers, read from NumPy's format.
    let npy = out("images.npy");
    embed(&run, &images, "train", &npy, &["--level", "slice"]);
    let file = std::fs::read(&npy).unwrap();
    assert_eq!(&file[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([file[8], file[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0, "the header is padded to 64 bytes");
    let header = std::str::from_utf8(&file[10..10 + header_len]).unwrap();
    let dim = tensor(&out("slice-train.safetensors"), "embeddings").size()[1];
    assert!(header.contains(&format!("'shape': (24, {dim})")), "{header}");
    let values: Vec<f32> = file[10 + header_len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, bytes(&tensor(&out("slice-train.safetensors"), "embeddings")));

    // Slice level on volumes: a row per real slice (5 slices cropped to volume_slices = 4),
    // whose mean over a volume is eval's mean-pool feature of it.
    let slices = out("slices.safetensors");
    let report = embed(&run, &volumes, "train", &slices, &["--level", "slice"]);
    assert_eq!(report["rows"], 24 * 4);
    let per_slice = tensor(&slices, "embeddings");
    let ids = sidecar(&slices)["ids"].as_array().unwrap().clone();
    assert!(ids[1].as_str().unwrap().ends_with("slice 1"), "{}", ids[1]);
    let (mean_pool, _) = eval::features(&eval_options(&run, &volumes, true)).unwrap();
    let means = per_slice.view([24, 4, -1]).mean_dim(1, false, tch::Kind::Float);
    let gap = (&means - &mean_pool).abs().max().double_value(&[]);
    assert!(gap < 1e-5, "slice means differ from mean-pool features by {gap}");

    // Volume level of 2D images is refused, naming the flag.
    let output = common::medssl()
        .arg("embed")
        .arg(&run)
        .arg("--data")
        .arg(&images)
        .args(["--level", "volume", "--device", "cpu", "--out"])
        .arg(out("bad.safetensors"))
        .output()
        .unwrap();
    common::assert_fails_with(&output, &["--level volume", "2D images"]);
}
