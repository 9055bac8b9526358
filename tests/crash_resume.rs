//! Crash and resume over the joint demo's three stages (phantom data, tiny sizes): a run
//! aborted at a step, in the middle of writing a checkpoint, or right after a stage
//! boundary, then resumed, logs the same record at every step and ends with the same bytes
//! of every tensor as a run that never stopped. The abort is injected
//! (`INJECT_MEDSSL_ABORT=step:N` or `checkpoint:N`, see `checkpoint::abort_if_asked`): the
//! process dies as under `kill -9`, at exactly the point asked.
//!
//! The joint stage follows two stages that froze and trained different modules, with
//! AdamW's weight decay on and SwAV's prototypes frozen for the first steps of every stage:
//! the case where resume used to diverge (a frozen module kept being decayed in the
//! uninterrupted process only). The DeepCluster-v2 variant carries a memory bank and
//! cluster assignments across the abort.

mod common;

use common::{medssl, write};
use std::path::Path;

/// The joint demo's stages at test size: 8 phantom volumes, batches of 4, so stage 0 has 6
/// steps, stage 1 4 and stage 2 4 (14 in all), a checkpoint after every step.
fn joint(intra: &str) -> String {
    format!(
        r#"
seed = 3
device = "cpu"
[run]
checkpoint_every = 1
keep_checkpoints = 3
threads = 1
[data.sources.phantom]
format = "phantom"
count = 8
slices = 6
size = 24
[data.views]
slice_views = 2
slice_size = 16
local_views = 1
local_size = 8
volume_views = 2
volume_slices = 4
volume_size = 16
[data.loader]
batch_size = 4
workers = 2
[encoder]
name = "resnet18"
base_width = 4
small_input = true
[aggregator]
name = "deformable-attention"
levels = ["layer3", "layer4"]
width = 16
layers = 1
heads = 2
ffn_dim = 16
reference_stride = 1
offset_groups = 2
[objectives.intra]
{intra}
[objectives.mask]
name = "masked-prediction"
mask_ratio = 0.5
[objectives.inter]
name = "swav"
level = "volume"
hidden_dim = 16
output_dim = 8
prototypes = 6
freeze_prototypes_steps = 2
queue_length = 8
queue_start_epoch = 1
[optimizer]
name = "adamw"
lr = 1e-3
weight_decay = 1e-2
warmup_epochs = 1
[[stages]]
name = "intra"
epochs = 3
train = ["encoder"]
objectives = {{ intra = 1.0 }}
[[stages]]
name = "mask"
epochs = 2
train = ["aggregator"]
objectives = {{ mask = 1.0 }}
[[stages]]
name = "joint"
epochs = 2
train = ["encoder", "aggregator"]
objectives = {{ inter = 1.0, intra = 0.5, mask = 0.5 }}
optimizer = {{ lr = 5e-4, warmup_epochs = 0 }}
"#
    )
}

const SWAV: &str =
    "name = \"swav\"\nlevel = \"slice\"\nhidden_dim = 16\noutput_dim = 8\nprototypes = 6\nfreeze_prototypes_steps = 3";
const DEEPCLUSTER: &str =
    "name = \"deepcluster-v2\"\nlevel = \"slice\"\nhidden_dim = 16\noutput_dim = 8\nprototypes = [3, 4]\nkmeans_iterations = 3";

/// Every record of `metrics.jsonl` without its wall-time field.
fn records(run_dir: &Path) -> Vec<serde_json::Value> {
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

/// The bytes of the final checkpoint's tensors.
fn final_tensors(run_dir: &Path) -> Vec<u8> {
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    std::fs::read(
        run_dir
            .join("checkpoints")
            .join(latest.trim())
            .join("tensors.safetensors"),
    )
    .unwrap()
}

fn run(config: &Path, run_dir: &Path, abort_at: Option<&str>) -> std::process::Output {
    let mut command = medssl();
    command.arg("run").arg(config).arg("--run-dir").arg(run_dir);
    if let Some(at) = abort_at {
        command.env("INJECT_MEDSSL_ABORT", at);
    }
    command.output().unwrap()
}

fn crash_and_resume_equal_uninterrupted(intra: &str, abort_points: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "joint.toml", &joint(intra));
    let reference = tmp.path().join("reference");
    let out = run(&config, &reference, None);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let expected = records(&reference);
    assert_eq!(expected.len(), 14, "steps of the three stages");
    let expected_tensors = final_tensors(&reference);

    for at in abort_points {
        let dir = tmp.path().join(at.replace(':', "-"));
        let out = run(&config, &dir, Some(at));
        assert!(!out.status.success(), "{at}: the run was not aborted");
        assert!(
            common::stderr(&out).contains("INJECT_MEDSSL_ABORT: aborting"),
            "{at}: {}",
            common::stderr(&out)
        );
        let out = medssl().arg("resume").arg(&dir).output().unwrap();
        assert!(out.status.success(), "{at}: resume failed: {}", common::stderr(&out));
        let got = records(&dir);
        assert_eq!(got.len(), expected.len(), "{at}: steps logged");
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g, e, "{at}: the resumed run differs at step {}", e["step"]);
        }
        assert!(final_tensors(&dir) == expected_tensors, "{at}: final tensors differ");
    }
}

#[test]
fn swav_joint_demo_resumes_exactly_after_a_crash_anywhere() {
    crash_and_resume_equal_uninterrupted(
        SWAV,
        // Mid stage 0; mid-checkpoint; the first step after each stage boundary; mid-checkpoint
        // in the joint stage, while the prototypes are frozen.
        &["step:2", "checkpoint:4", "step:7", "step:11", "checkpoint:12"],
    );
}

#[test]
fn deepcluster_joint_demo_resumes_exactly_after_a_crash_anywhere() {
    crash_and_resume_equal_uninterrupted(DEEPCLUSTER, &["step:3", "checkpoint:9", "step:12"]);
}
