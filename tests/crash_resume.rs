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
//!
//! A fine-tune (`medssl finetune ... --resume`) aborted inside a trial, inside an epoch's
//! checkpoint and at a trial boundary likewise ends with the same records, report scores
//! and weights as one that never stopped.

mod common;

use common::decathlon::decathlon;
use common::{assert_fails_with, final_tensors, medssl, records, write, TINY};
use std::path::{Path, PathBuf};

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

fn run(config: &Path, run_dir: &Path, abort_at: Option<&str>) -> std::process::Output {
    let mut command = medssl();
    command.arg("run").arg(config).arg("--run-dir").arg(run_dir);
    if let Some(at) = abort_at {
        command.env("INJECT_MEDSSL_ABORT", at);
    }
    command.output().unwrap()
}

fn crash_and_resume_equal_uninterrupted(config: &str, abort_points: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "joint.toml", config);
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
        &joint(SWAV),
        // Mid stage 0; mid-checkpoint; the first step after each stage boundary; mid-checkpoint
        // in the joint stage, while the prototypes are frozen.
        &["step:2", "checkpoint:4", "step:7", "step:11", "checkpoint:12"],
    );
}

#[test]
fn deepcluster_joint_demo_resumes_exactly_after_a_crash_anywhere() {
    crash_and_resume_equal_uninterrupted(&joint(DEEPCLUSTER), &["step:3", "checkpoint:9", "step:12"]);
}

/// With `encoder.memory_format = "channels_last"`: the weights are NHWC in the process, the
/// checkpoint holds them row-major, and a resumed run copies them back into NHWC weights (and
/// its optimizer state, loaded row-major, updates them element for element as the NHWC state
/// of the uninterrupted run did), so it too ends with the same records and bytes.
#[test]
fn a_channels_last_encoder_resumes_exactly_after_a_crash() {
    // libtorch 2.13's oneDNN writes out of bounds in its AVX2 1x1-convolution backward over
    // NHWC tensors (`jit_avx2_1x1_convolution_bwd_weights_t`, found by valgrind on an AVX2-only
    // AMD EPYC; PyTorch itself corrupts its heap with a 1x1 Conv2d in channels_last there), so
    // on a CPU without AVX-512 channels_last training is not safe to run at all, and medssl
    // refuses the config there (`MemoryFormat::check_device`).
    if !medssl_core::memory_format::cpu_runs_channels_last_safely() {
        eprintln!("skipped: this CPU has no AVX-512, where libtorch's oneDNN channels_last backward corrupts memory");
        return;
    }
    let config = joint(SWAV).replace(
        "small_input = true\n",
        "small_input = true\nmemory_format = \"channels_last\"\n",
    );
    assert!(config.contains("channels_last"));
    crash_and_resume_equal_uninterrupted(&config, &["checkpoint:4", "step:11"]);
}

/// A U-Net fine-tune, 2 repeats x (pretrained, scratch): half of 4 training volumes is 10
/// slices, batches of 4 (3 steps an epoch), 3 epochs: 9 steps a trial, 36 in all.
fn segmentation(task: &Path) -> String {
    format!(
        r#"
seed = 5
threads = 1
runs = 2
classes = 3
label_fraction = 0.5
[data.train]
format = "decathlon"
path = {path:?}
ids = ["case_001", "case_002", "case_003", "case_004"]
[data.eval]
format = "decathlon"
path = {path:?}
ids = ["case_005", "case_006"]
[input]
image_size = 16
workers = 2
[head]
name = "unet"
channels = [8, 8, 8, 8, 8]
[train]
epochs = 3
batch_size = 4
eval_every = 2
[optimizer]
name = "adamw"
lr = 0.01
weight_decay = 1e-2
warmup_epochs = 1
"#,
        path = task.display().to_string(),
    )
}

/// `value` without its wall-time fields (`seconds`, at any depth).
fn without_seconds(mut value: serde_json::Value) -> serde_json::Value {
    match &mut value {
        serde_json::Value::Object(map) => {
            map.remove("seconds");
            for v in map.values_mut() {
                *v = without_seconds(v.take());
            }
        }
        serde_json::Value::Array(items) => {
            for v in items.iter_mut() {
                *v = without_seconds(v.take());
            }
        }
        _ => {}
    }
    value
}

/// What a finished fine-tune leaves: its records, its results and its weights' bytes.
fn finetune_outcome(out: &Path) -> (Vec<serde_json::Value>, serde_json::Value, Vec<Vec<u8>>) {
    let records = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| without_seconds(serde_json::from_str(line).unwrap()))
        .collect();
    let mut results: serde_json::Value =
        without_seconds(serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap());
    // The output folder's own path, which differs by design.
    results["setup"].as_object_mut().unwrap().remove("out");
    let weights = ["pretrained-run0", "scratch-run0", "pretrained-run1", "scratch-run1"]
        .iter()
        .map(|name| std::fs::read(out.join("weights").join(format!("{name}.safetensors"))).unwrap())
        .collect();
    (records, results, weights)
}

fn finetune(
    config: &Path,
    pretrained: &Path,
    out: &Path,
    extra: &[&str],
    abort_at: Option<&str>,
) -> std::process::Output {
    let mut command = medssl();
    command
        .arg("finetune")
        .arg(config)
        .arg("--pretrained")
        .arg(pretrained)
        .arg("--out")
        .arg(out)
        .args(extra);
    if let Some(at) = abort_at {
        command.env("INJECT_MEDSSL_ABORT", at);
    }
    command.output().unwrap()
}

#[test]
fn finetune_resumes_exactly_after_a_crash_inside_a_trial_a_checkpoint_or_between_trials() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrained: PathBuf = common::pretrain(tmp.path(), "pretrain", &TINY.replace("epochs = 2", "epochs = 1"));
    let task = decathlon(tmp.path(), 6, 2);
    let config = write(tmp.path(), "seg.toml", &segmentation(&task));
    let reference = tmp.path().join("reference");
    let out = finetune(&config, &pretrained, &reference, &[], None);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let expected = finetune_outcome(&reference);
    assert_eq!(
        expected.0.len(),
        4 * 3,
        "an epoch record for each of 4 trials x 3 epochs"
    );
    assert_eq!(expected.0[2]["step"], 9, "steps of a trial");

    // Inside trial 0's second epoch; inside its first epoch's checkpoint; inside the
    // checkpoint that records trial 0 finished; inside trial 2 (repeat 1, pretrained).
    for at in ["step:4", "checkpoint:3", "checkpoint:9", "step:25"] {
        let dir = tmp.path().join(at.replace(':', "-"));
        let out = finetune(&config, &pretrained, &dir, &[], Some(at));
        assert!(!out.status.success(), "{at}: the fine-tune was not aborted");
        assert!(
            common::stderr(&out).contains("INJECT_MEDSSL_ABORT: aborting"),
            "{at}: {}",
            common::stderr(&out)
        );
        if at == "step:4" {
            // Resuming under another config is refused, naming the key, and changes nothing.
            let before = std::fs::read(dir.join("metrics.jsonl")).unwrap();
            let changed = finetune(
                &config,
                &pretrained,
                &dir,
                &["--resume", "--set", "optimizer.lr=0.02"],
                None,
            );
            assert_fails_with(&changed, &["--resume", "`optimizer.lr` 0.01 -> 0.02"]);
            assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), before);
        }
        let out = finetune(&config, &pretrained, &dir, &["--resume"], None);
        assert!(out.status.success(), "{at}: resume failed: {}", common::stderr(&out));
        let got = finetune_outcome(&dir);
        assert_eq!(got.0.len(), expected.0.len(), "{at}: records");
        for (g, e) in got.0.iter().zip(&expected.0) {
            assert_eq!(g, e, "{at}: the resumed fine-tune differs");
        }
        assert_eq!(got.1, expected.1, "{at}: results differ");
        assert!(got.2 == expected.2, "{at}: weights differ");
        assert!(dir.join("segmentation.png").is_file() && dir.join("report.md").is_file());
    }

    // Nothing to resume: refused, naming the folder.
    let missing = tmp.path().join("never-started");
    let out = finetune(&config, &pretrained, &missing, &["--resume"], None);
    assert_fails_with(&out, &["--resume", "never-started", "not a fine-tuning directory"]);
}
