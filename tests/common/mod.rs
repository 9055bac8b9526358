//! Shared helpers of the workspace tests: a tiny config and a way to run the `medssl` binary.
#![allow(dead_code)]

pub mod archive;
pub mod decathlon;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every registered component, by role (as `medssl list --json` names the roles), each
/// role's names sorted: what the plugins linked through `medssl_plugins` register. A plugin
/// left out of that crate, or a binary that does not link it, fails the tests comparing
/// against this.
pub const COMPONENTS: &[(&str, &[&str])] = &[
    ("encoders", &["resnet18", "resnet34", "resnet50", "swin3d", "vit3d"]),
    (
        "aggregators",
        &["attention-pool", "deformable-attention", "full-attention", "mean-pool"],
    ),
    (
        "objectives",
        &[
            "deepcluster-v2",
            "masked-prediction",
            "ntxent",
            "reconstruction",
            "swav",
            "vicreg",
            "voco",
        ],
    ),
    (
        "heads",
        &["faster-rcnn", "swin-unetr", "unet", "unetr", "volume-classifier"],
    ),
    (
        "datasets",
        &[
            "decathlon",
            "dicom",
            "image-folder",
            "medmnist",
            "nifti",
            "npy",
            "phantom",
        ],
    ),
];

/// The components registered in this test binary, by role, in the shape of [`COMPONENTS`].
pub fn registered() -> Vec<(&'static str, Vec<&'static str>)> {
    medssl_core::registry::catalogue()
        .expect("no duplicate names")
        .into_iter()
        .map(|(role, rows)| (role, rows.iter().map(|r| r.name).collect()))
        .collect()
}

/// [`COMPONENTS`] in the shape of [`registered`].
pub fn expected_components() -> Vec<(&'static str, Vec<&'static str>)> {
    COMPONENTS.iter().map(|&(role, names)| (role, names.to_vec())).collect()
}

/// A config that trains a tiny model on 8 generated phantom volumes: two stages, 4 steps
/// each, checkpoint after every step. Fast enough for tests on a 2-core CPU.
pub const TINY: &str = r#"
seed = 1
device = "cpu"

[run]
checkpoint_every = 1
keep_checkpoints = 2
threads = 1

[data.sources.phantom]
format = "phantom"
count = 8
slices = 6
size = 24

[data.views]
slice_size = 24
volume_slices = 4
volume_size = 24

[data.loader]
batch_size = 4
workers = 2

[encoder]
name = "resnet18"
base_width = 4
small_input = true

[aggregator]
name = "mean-pool"

[objectives.slices]
name = "ntxent"
hidden_dim = 16
output_dim = 8

[objectives.volumes]
name = "ntxent"
level = "volume"
hidden_dim = 16
output_dim = 8

[optimizer]
name = "sgd"
lr = 0.05
warmup_epochs = 0.5

[[stages]]
name = "slices"
epochs = 2
train = ["encoder"]
objectives = { slices = 1.0 }

[[stages]]
name = "joint"
epochs = 2
train = ["encoder"]
objectives = { slices = 0.5, volumes = 1.0 }
optimizer = { name = "adamw", lr = 0.001 }
"#;

/// The device of the device-aware tests, from `MEDSSL_TEST_DEVICE` (`cpu`, the default,
/// `cuda` or `cuda:N`); panics naming the variable on another value or an absent CUDA
/// device ([`medssl_core::device::test_device`], which the plugins' unit tests share).
pub fn test_device() -> tch::Device {
    medssl_core::device::test_device()
}

/// [`test_device`] as a config's `device` value.
pub fn test_device_name() -> String {
    match test_device() {
        tch::Device::Cpu => "cpu".to_string(),
        tch::Device::Cuda(index) => format!("cuda:{index}"),
        other => unreachable!("test_device gives the CPU or a CUDA device, not {other:?}"),
    }
}

/// The `medssl` binary, with no `MEDSSL_` variable of this process's environment (config
/// layers, `MEDSSL_TEST_DEVICE`): each test gives the binary what it means to.
pub fn medssl() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medssl"));
    cmd.env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("MEDSSL_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Every record of a run's `metrics.jsonl` without its wall-time field (`samples_per_s`),
/// for comparing two runs that should be the same.
pub fn records(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let mut record: serde_json::Value = serde_json::from_str(line).unwrap();
            record.as_object_mut().unwrap().remove("samples_per_s");
            record
        })
        .collect()
}

/// The bytes of a run's latest checkpoint's tensors.
pub fn final_tensors(run_dir: &Path) -> Vec<u8> {
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    std::fs::read(
        run_dir
            .join("checkpoints")
            .join(latest.trim())
            .join("tensors.safetensors"),
    )
    .unwrap()
}

/// Writes `text` as `name` in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `medssl run CONFIG --run-dir RUN_DIR EXTRA...`, whatever its outcome.
pub fn run(config: &Path, run_dir: &Path, extra: &[&str]) -> Output {
    medssl()
        .arg("run")
        .arg(config)
        .arg("--run-dir")
        .arg(run_dir)
        .args(extra)
        .output()
        .unwrap()
}

/// `medssl run` of `config` (written as `dir/<name>.toml`) into `dir/<name>`, which it returns;
/// the run must succeed.
pub fn pretrain(dir: &Path, name: &str, config: &str) -> PathBuf {
    let run = dir.join(name);
    let out = medssl()
        .arg("run")
        .arg(write(dir, &format!("{name}.toml"), config))
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    run
}

/// `medssl sweep FILE --out OUT`, which must succeed; returns its table (`OUT/<FILE's
/// name>.json`).
pub fn sweep(file: &Path, out_dir: &Path) -> serde_json::Value {
    let out = medssl()
        .arg("sweep")
        .arg(file)
        .arg("--out")
        .arg(out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let table = out_dir.join(file.with_extension("json").file_name().unwrap());
    serde_json::from_str(&std::fs::read_to_string(table).unwrap()).unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a clean failure: non-zero exit, every `needle` in stderr, no panic.
pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success; stderr:\n{err}");
    assert_eq!(out.status.code(), Some(1), "expected exit code 1; stderr:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks `{needle}`:\n{err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("internal failure") && !err.contains("RUST_BACKTRACE"),
        "panic:\n{err}"
    );
}

/// (step, loss) of every record in a metrics file.
pub fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// The number `value` (a score), asserted to lie in [0, 1].
pub fn unit(value: &serde_json::Value, what: &str) -> f64 {
    let v = value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"));
    assert!((0.0..=1.0).contains(&v), "{what} = {v} is outside [0, 1]");
    v
}
