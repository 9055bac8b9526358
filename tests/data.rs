//! The data layer through the public entry points: a mix of sources with weights, slices of
//! volumes as 2D samples, per-stage source selection, crop-or-pad depth, and
//! `medssl data inspect`.

mod common;

use medssl_core::config::LoadedConfig;
use medssl_core::train::Run;

use medssl_plugins as _;

const MIX: &str = r#"
seed = 3
[run]
threads = 1
[data.sources.images]
format = "phantom"
dimensions = "2d"
count = 6
size = 24
weight = 2.0
[data.sources.volumes]
format = "phantom"
count = 5
slices = 7
size = 24
[data.sources.volume_slices]
format = "phantom"
count = 2
slices = 7
size = 24
seed = 9
unit = "slices"
slices_per_volume = 3
[data.views]
slice_size = 16
volume_slices = 8
volume_size = 16
depth_mode = "crop_or_pad"
[data.loader]
batch_size = 4
workers = 1
[encoder]
name = "resnet18"
base_width = 4
small_input = true
[aggregator]
name = "mean-pool"
[objectives.slices]
name = "ntxent"
hidden_dim = 8
output_dim = 4
[objectives.volumes]
name = "ntxent"
level = "volume"
hidden_dim = 8
output_dim = 4
[[stages]]
name = "2d"
epochs = 1
train = ["encoder"]
objectives = { slices = 1.0 }
sources = ["images", "volume_slices"]
[[stages]]
name = "3d"
epochs = 1
train = ["encoder", "aggregator"]
objectives = { volumes = 1.0 }
sources = ["volumes"]
"#;

fn prepare(text: &str) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write(dir.path(), "mix.toml", text);
    Run::prepare(LoadedConfig::load(&path, &[])?)
}

#[test]
fn a_mix_of_images_slices_and_volumes_trains_stage_by_stage() {
    let mut run = prepare(MIX).unwrap();
    // The 2D stage: 6 images twice (weight 2) plus 2 x 3 slices = 18 samples, 4 full batches.
    let tmp = tempfile::tempdir().unwrap();
    for stage in 0..2 {
        let probe = run.probe_step(stage).unwrap();
        assert!(probe.loss.is_finite(), "stage {stage}: {}", probe.loss);
    }
    let summary = run.train(tmp.path(), false).unwrap();
    assert_eq!(
        summary.steps,
        4 + 1,
        "2D stage: 18 samples / 4; 3D stage: 5 volumes / 4"
    );
    let report = std::fs::read_to_string(tmp.path().join("report.md")).unwrap();
    assert!(
        report.contains("| 2d | 1 | 4 (4) |") && report.contains("| 3d | 1 | 1 (4) |"),
        "{report}"
    );
}

#[test]
fn unknown_stage_sources_and_bad_source_options_are_named() {
    let err = format!(
        "{:#}",
        prepare(&MIX.replace("sources = [\"volumes\"]", "sources = [\"volumez\"]"))
            .err()
            .unwrap()
    );
    assert!(
        err.contains("stages[1]")
            && err.contains("no data source `volumez`")
            && err.contains("images, volume_slices, volumes"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        prepare(&MIX.replace("weight = 2.0", "weight = -1.0")).err().unwrap()
    );
    assert!(err.contains("data.sources.images.weight"), "{err}");
    let err = format!(
        "{:#}",
        prepare(&MIX.replace("unit = \"slices\"", "unit = \"slabs\""))
            .err()
            .unwrap()
    );
    assert!(
        err.contains("data.sources.volume_slices.unit") && err.contains("slabs"),
        "{err}"
    );
}

#[test]
fn inspect_reports_a_nifti_volume_and_rejects_what_it_cannot_read() {
    let out = common::medssl()
        .args(["data", "inspect", "/nonexistent/volume.nii.gz"])
        .output()
        .unwrap();
    common::assert_fails_with(&out, &["/nonexistent/volume.nii.gz", "does not exist"]);
    let tmp = tempfile::tempdir().unwrap();
    let bad = common::write(tmp.path(), "broken.nii.gz", "not a nifti file");
    let out = common::medssl().arg("data").arg("inspect").arg(&bad).output().unwrap();
    common::assert_fails_with(&out, &["broken.nii.gz"]);

    let real = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/hippocampus/imagesTr/hippocampus_001.nii.gz"
    );
    if !std::path::Path::new(real).exists() {
        return;
    }
    let out = common::medssl().args(["data", "inspect", real]).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["format"], "nifti");
    assert_eq!(json["samples"], 1);
    assert_eq!(json["shapes"][0].as_array().unwrap().len(), 3);
    assert_eq!(json["spacing"], serde_json::json!([1.0, 1.0, 1.0]));
    assert!(json["max"].as_f64().unwrap() > json["min"].as_f64().unwrap());
}

/// Writes `data` as a C-order `.npy` array of `shape`.
fn write_npy<T: npyz::AutoSerialize>(path: &std::path::Path, shape: &[u64], data: impl IntoIterator<Item = T>) {
    use npyz::WriterBuilder;
    let file = std::fs::File::create(path).unwrap();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(file)
        .begin_nd()
        .unwrap();
    w.extend(data).unwrap();
    w.finish().unwrap();
}

/// A folder whose files differ in dtype reports every dtype, not the first file's.
#[test]
fn inspect_reports_every_dtype_of_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    write_npy(&tmp.path().join("a.npy"), &[4, 4, 3], (0..48u8).map(|v| v * 2));
    write_npy(&tmp.path().join("b.npy"), &[4, 4, 2], (0..32).map(|v| v as f32 * 0.5));
    let out = common::medssl()
        .arg("data")
        .arg("inspect")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["format"], "npy");
    assert_eq!(json["inspected"], 2);
    assert_eq!(json["dtype"], "float32, uint8");
}

#[test]
fn bench_loader_passes_every_volume_once_an_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let task = common::decathlon::decathlon(tmp.path(), 3, 2);
    let out = common::medssl()
        .args(["bench", "loader", "--data"])
        .arg(&task)
        .args([
            "--threads",
            "2",
            "--slices",
            "4",
            "--size",
            "8",
            "--warmup",
            "1",
            "--epochs",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["volumes"], 6, "{json}");
    assert_eq!(json["epochs"], 2);
    let rate = json["volumes_per_s"].as_f64().unwrap();
    assert!(rate.is_finite() && rate > 0.0, "{json}");

    let out = common::medssl()
        .args(["bench", "loader", "--data"])
        .arg(&task)
        .args(["--epochs", "0"])
        .output()
        .unwrap();
    common::assert_fails_with(&out, &["--epochs"]);
}
