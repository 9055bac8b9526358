//! The joint pipeline's mechanics in core: multi-level slice features (Eq. 9), a frozen
//! f_intra in the stage that trains f_inter, and the switches the Table 7 ablations use
//! (objective weight 0, stage epochs 0).

mod common;

use medssl_core::checkpoint;
use medssl_core::config::LoadedConfig;
use medssl_core::run_dir::METRICS_FILE;
use medssl_core::train::{self, Run};

use medssl_plugins as _;

/// Stage `slices` trains f_intra on 2D views; stage `inter` trains only the aggregator on
/// multi-level features of 3D views.
const JOINT: &str = r#"
seed = 3
device = "cpu"

[run]
checkpoint_every = 100
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
workers = 1

[encoder]
name = "resnet18"
base_width = 4
small_input = true

[aggregator]
name = "attention-pool"
levels = ["stem", "layer2", "layer4"]
output_dim = 8
attention_dim = 4

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

[[stages]]
name = "slices"
epochs = 1
train = ["encoder"]
objectives = { slices = 1.0 }

[[stages]]
name = "inter"
epochs = 1
train = ["aggregator"]
objectives = { volumes = 1.0 }
"#;

fn prepare(dir: &std::path::Path, text: &str, set: &[&str]) -> anyhow::Result<Run> {
    let path = common::write(dir, "joint.toml", text);
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    Run::prepare(LoadedConfig::load(&path, &set)?)
}

fn tensors_by_prefix(tensors: &[(String, tch::Tensor)], prefix: &str) -> Vec<(String, tch::Tensor)> {
    tensors
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

#[test]
fn the_stage_that_trains_the_aggregator_leaves_the_encoder_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    // Only the f_inter stage runs, so the encoder at the end must equal its initial state.
    let run = prepare(tmp.path(), JOINT, &["stages.0.epochs=0", "stages.1.epochs=2"]).unwrap();
    let before = run.variables();
    let encoder_before = tensors_by_prefix(&before, "encoder.");
    assert!(
        encoder_before.iter().any(|(n, _)| n.ends_with("running_mean")),
        "batch-norm statistics are among the compared tensors"
    );
    let dir = tmp.path().join("run");
    train::create_run_dir(&dir, false).unwrap();
    run.train(&dir, false).unwrap();
    // The skipped stage shows no loss in the report, not NaN.
    let report = std::fs::read_to_string(dir.join(medssl_core::run_dir::REPORT_FILE)).unwrap();
    assert!(!report.contains("NaN") && report.contains("| — | — |"), "{report}");
    let after = checkpoint::read_safetensors(&medssl_core::run_dir::locate(&dir, None).unwrap().tensors).unwrap();
    let after: Vec<(String, tch::Tensor)> = after
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix("model.").map(|n| (n.to_string(), t)))
        .collect();
    for (name, t) in &encoder_before {
        let (_, a) = after.iter().find(|(n, _)| n == name).unwrap();
        assert!(t.equal(a), "encoder tensor `{name}` changed in the frozen stage");
    }
    let aggregator_before = tensors_by_prefix(&before, "aggregator.");
    let changed = aggregator_before
        .iter()
        .filter(|(name, t)| !after.iter().any(|(n, a)| n == name && t.equal(a)))
        .count();
    assert!(changed > 0, "the aggregator must learn in its stage");
}

#[test]
fn zero_weights_and_zero_epochs_switch_parts_off() {
    let tmp = tempfile::tempdir().unwrap();
    let text = JOINT.replace(
        "objectives = { volumes = 1.0 }",
        "objectives = { volumes = 1.0, slices = 0.0 }",
    );
    let run = prepare(tmp.path(), &text, &["stages.0.epochs=0"]).unwrap();
    let dir = tmp.path().join("run");
    train::create_run_dir(&dir, false).unwrap();
    run.train(&dir, false).unwrap();
    let metrics = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
    let records: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 2, "only stage `inter` runs: 8 volumes / batch 4");
    for r in &records {
        assert_eq!(r["stage"], "inter");
        assert!(r.get("loss/volumes").is_some());
        assert!(
            r.get("loss/slices").is_none(),
            "a zero-weight objective is not computed: {r}"
        );
        let std = r["health/volume_embedding_std"].as_f64().unwrap();
        assert!(std > 0.0 && std <= 1.0, "{r}");
    }
}

#[test]
fn joint_config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let err = prepare(tmp.path(), JOINT, &["aggregator.levels=[\"stem\", \"layer9\"]"])
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("aggregator.levels") && msg.contains("layer9") && msg.contains("layer4"),
        "{msg}"
    );
    // Checked before any data is opened: a source that does not exist is not what fails.
    let err = prepare(
        tmp.path(),
        JOINT,
        &[
            "aggregator.levels=[\"layer9\"]",
            "data.sources.phantom.format=\"nifti\"",
            "data.sources.phantom.path=\"/no/such/folder\"",
        ],
    )
    .err()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("layer9") && !msg.contains("/no/such/folder"), "{msg}");
    let err = prepare(tmp.path(), JOINT, &["stages.1.objectives.volumes=-1"])
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("weight -1"), "{err:#}");
    let err = prepare(tmp.path(), JOINT, &["stages.1.objectives.volumes=0"])
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("epochs = 0"), "{err:#}");
}
