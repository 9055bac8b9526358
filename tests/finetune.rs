//! `medssl finetune` end to end: a tiny run pre-trained for a few steps, fine-tuned for
//! segmentation on a generated Decathlon-layout folder and for volume classification on a
//! generated MedMNIST-style archive, and the errors a user can cause.

mod common;

use common::archive::archive;
use common::decathlon::decathlon;
use common::{assert_fails_with, medssl, unit, write, TINY};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// TINY trained for one epoch a stage.
fn pretrain(dir: &Path) -> PathBuf {
    common::pretrain(dir, "pretrain", &TINY.replace("epochs = 2", "epochs = 1"))
}

fn segmentation_config(task: &Path, train: &[usize], eval: &[usize], classes: i64) -> String {
    let ids = |v: &[usize]| {
        v.iter()
            .map(|i| format!("\"case_{i:03}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"
seed = 3
threads = 1
runs = 2
classes = {classes}

[data.train]
format = "decathlon"
path = {path:?}
ids = [{train}]

[data.eval]
format = "decathlon"
path = {path:?}
ids = [{eval}]

[input]
image_size = 16
workers = 2

[head]
name = "unet"
channels = [8, 8, 8, 8, 8]

[train]
epochs = 2
batch_size = 4
eval_every = 1

[optimizer]
name = "adamw"
lr = 0.01
"#,
        path = task.display().to_string(),
        train = ids(train),
        eval = ids(eval),
    )
}

fn finetune(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut cmd = medssl();
    cmd.arg("finetune");
    for a in args {
        cmd.arg(a);
    }
    cmd.output().unwrap()
}

/// Checks a report's rows: pretrained then scratch, `runs` repeats each, the primary
/// metric's mean equal to the mean of its runs.
fn check_rows(json: &Value, metric: &str, runs: usize) {
    assert_eq!(json["metric"], metric, "{json}");
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, init) in rows.iter().zip(["pretrained", "scratch"]) {
        assert_eq!(row["init"], init);
        let values: Vec<f64> = row["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| unit(v, metric))
            .collect();
        assert_eq!(values.len(), runs, "{row}");
        let mean = values.iter().sum::<f64>() / runs as f64;
        assert!((unit(&row["mean"], "mean") - mean).abs() < 1e-9, "{row}");
        assert!(row["std"].as_f64().unwrap() >= 0.0);
        assert_eq!(row["metrics"][metric]["runs"].as_array().unwrap().len(), runs);
    }
}

#[test]
fn segmentation_finetune_reports_pretrained_and_scratch_and_writes_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = pretrain(tmp.path());
    let task = decathlon(tmp.path(), 6, 2);
    let config = write(
        tmp.path(),
        "seg.toml",
        &segmentation_config(&task, &[1, 2, 3, 4], &[5, 6], 3),
    );
    let out_dir = tmp.path().join("ft");
    let out = finetune(&[
        &config,
        &"--pretrained",
        &run,
        &"--out",
        &out_dir,
        &"--label-fraction",
        &"0.5",
        &"--json",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_rows(&json, "dice_3d", 2);
    let pretrained = &json["rows"][0];
    for metric in ["iou_3d", "dice_2d", "dice_3d/1", "dice_3d/2", "iou_3d/1"] {
        assert!(pretrained["metrics"][metric].is_object(), "no {metric}: {pretrained}");
    }
    // Half of the four training volumes, by volume: two volumes of five slices.
    for trial in pretrained["trials"].as_array().unwrap() {
        assert_eq!(trial["train_units"], 2, "{trial}");
        assert_eq!(trial["train_samples"], 10, "{trial}");
    }
    assert_eq!(json["setup"]["eval"]["volumes"], 2);
    for file in [
        "config.toml",
        "metrics.jsonl",
        "report.md",
        "results.json",
        "learning_curves.png",
        "segmentation.png",
        "weights/pretrained-run0.safetensors",
        "weights/scratch-run1.safetensors",
    ] {
        assert!(out_dir.join(file).is_file(), "missing {file}");
    }
    let report = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(
        report.contains("| pretrained |")
            && report.contains("| scratch |")
            && report.contains("](learning_curves.png)")
            && report.contains("](segmentation.png)"),
        "{report}"
    );
    // One line an epoch for each of the 2 x 2 trials, each with the evaluation's metrics.
    let lines = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let records: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 2 * 2 * 2);
    assert!(records
        .iter()
        .all(|r| r["eval/dice_3d"].is_number() && r["loss"].is_number()));

    // The folder exists now: refused without --force.
    let again = finetune(&[&config, &"--pretrained", &run, &"--out", &out_dir]);
    assert_fails_with(&again, &["already exists", "--force"]);
}

/// The scratch row is the same network whatever the pre-training's aggregator: a U-Net uses
/// the encoder only, so two runs that differ only in their aggregator must give a scratch
/// row with the same head initialisation and hence the same scores.
#[test]
fn the_scratch_row_does_not_depend_on_the_pretraining_runs_aggregator() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = TINY.replace("epochs = 2", "epochs = 1");
    let mean_pool = common::pretrain(tmp.path(), "mean-pool", &tiny);
    let attention = common::pretrain(
        tmp.path(),
        "attention-pool",
        &tiny.replace(
            "name = \"mean-pool\"",
            "name = \"attention-pool\"\noutput_dim = 16\nattention_dim = 8",
        ),
    );
    let task = decathlon(tmp.path(), 4, 2);
    let config = write(
        tmp.path(),
        "seg.toml",
        &segmentation_config(&task, &[1, 2, 3], &[4], 3).replace("runs = 2", "runs = 1"),
    );
    let scratch = |run: &Path, out: &str| {
        let out = finetune(&[
            &config,
            &"--pretrained",
            &run,
            &"--out",
            &tmp.path().join(out),
            &"--json",
        ]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["rows"][1]["init"], "scratch");
        json["rows"][1]["metrics"].clone()
    };
    assert_eq!(scratch(&mean_pool, "ft-a"), scratch(&attention, "ft-b"));
}

#[test]
fn volume_classification_finetune_reports_auc() {
    let tmp = tempfile::tempdir().unwrap();
    let run = pretrain(tmp.path());
    let volumes = archive(tmp.path(), "volumes.npz", 5, true);
    let config = write(
        tmp.path(),
        "cls.toml",
        &format!(
            r#"
threads = 1
runs = 2
classes = 2
[data.train]
format = "medmnist"
path = {path:?}
split = "train"
[data.eval]
format = "medmnist"
path = {path:?}
split = "val"
[head]
name = "volume-classifier"
hidden_dim = 16
[train]
epochs = 2
batch_size = 6
eval_every = 2
"#,
            path = volumes.display().to_string()
        ),
    );
    let out_dir = tmp.path().join("ft");
    let out = finetune(&[&config, &"--pretrained", &run, &"--out", &out_dir, &"--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_rows(&json, "auc", 2);
    assert!(json["rows"][1]["metrics"]["acc"].is_object());
    assert_eq!(json["setup"]["train"]["volumes"], 24);
    assert!(out_dir.join("learning_curves.png").is_file());
    assert!(!out_dir.join("segmentation.png").exists());
}

#[test]
fn finetune_errors_name_what_is_wrong_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let run = pretrain(tmp.path());
    let task = decathlon(tmp.path(), 4, 2);
    let out_dir = tmp.path().join("ft");
    let attempt = |config: &str| {
        let path = write(tmp.path(), "bad.toml", config);
        finetune(&[&path, &"--pretrained", &run, &"--out", &out_dir])
    };

    // Mask values outside the configured classes: the file and the values are named.
    let out = attempt(&segmentation_config(&task, &[1, 2], &[3, 4], 2));
    assert_fails_with(&out, &["case_001", "mask values [0, 1, 2]", "`classes` = 2"]);
    assert!(!out_dir.exists(), "nothing is written before the checks pass");

    // A volume in both sets.
    let out = attempt(&segmentation_config(&task, &[1, 2, 3], &[3, 4], 3));
    assert_fails_with(&out, &["in both [data.train] and [data.eval]", "case_003"]);

    // A head the backbone cannot feed, and an unknown head.
    let volume_head = segmentation_config(&task, &[1, 2], &[3, 4], 3).replace("name = \"unet\"", "name = \"nonesuch\"");
    assert_fails_with(&attempt(&volume_head), &["unknown head `nonesuch`", "unet"]);

    // A checkpoint from another architecture: the first mismatching tensor is named.
    let wider = write(
        tmp.path(),
        "wider.toml",
        &std::fs::read_to_string(run.join("config.toml"))
            .unwrap()
            .replace("base_width = 4", "base_width = 8"),
    );
    let config = write(tmp.path(), "ok.toml", &segmentation_config(&task, &[1, 2], &[3, 4], 3));
    let out = finetune(&[
        &config,
        &"--pretrained",
        &run,
        &"--run-config",
        &wider,
        &"--out",
        &out_dir,
    ]);
    assert_fails_with(&out, &["checkpoint tensor", "has shape", "another architecture"]);

    // Config values.
    let out = finetune(&[
        &config,
        &"--pretrained",
        &run,
        &"--out",
        &out_dir,
        &"--label-fraction",
        &"0",
    ]);
    assert_fails_with(&out, &["label_fraction", "(0, 1]"]);
    let out = finetune(&[
        &config,
        &"--pretrained",
        &run,
        &"--out",
        &out_dir,
        &"--set",
        &"train.epochs=zero",
    ]);
    assert_fails_with(&out, &["train.epochs", "--set train.epochs=zero"]);
    let out = finetune(&[&config, &"--pretrained", &tmp.path().join("absent"), &"--out", &out_dir]);
    assert_fails_with(&out, &["--pretrained", "does not exist"]);
    assert!(!out_dir.exists());
}

#[test]
fn a_sweep_judges_each_variant_by_a_finetune() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "base.toml", &TINY.replace("epochs = 2", "epochs = 1"));
    let task = decathlon(tmp.path(), 4, 2);
    write(
        tmp.path(),
        "seg.toml",
        &segmentation_config(&task, &[1, 2], &[3, 4], 3).replace("epochs = 2", "epochs = 1"),
    );
    let sweep = write(
        tmp.path(),
        "sweep.toml",
        r#"
base = "base.toml"
[evaluation]
protocol = "finetune"
config = "seg.toml"
seeds = 1
[[variants]]
name = "full"
[[variants]]
name = "lower lr"
set = ["optimizer.lr=0.01"]
"#,
    );
    let out_dir = tmp.path().join("sweep");
    let table = common::sweep(&sweep, &out_dir);
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row["metric"], "dice_3d");
        unit(&row["pretrained"]["value"], "pretrained dice");
        unit(&row["scratch"]["value"], "scratch dice");
    }
    assert!(out_dir.join("lower-lr/finetune/report.md").is_file());
    let md = std::fs::read_to_string(out_dir.join("sweep.md")).unwrap();
    assert!(
        md.contains("dice_3d (pre-trained)") && md.contains("| lower lr | `optimizer.lr=0.01` |"),
        "{md}"
    );
}

#[test]
fn boxes_from_masks_writes_a_coco_file_of_every_slice() {
    let tmp = tempfile::tempdir().unwrap();
    let task = decathlon(tmp.path(), 2, 2);
    let out_file = tmp.path().join("boxes.json");
    let out = medssl()
        .args(["data", "boxes-from-masks"])
        .arg(&task)
        .args(["--axis", "2", "--classes", "1=anterior,2=posterior", "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let coco: Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    // 2 volumes x 5 slices, each slice with one box of each class.
    assert_eq!(coco["images"].as_array().unwrap().len(), 10);
    assert_eq!(coco["annotations"].as_array().unwrap().len(), 20);
    assert_eq!(coco["categories"][1]["name"], "posterior");
    assert_eq!(coco["images"][0]["file_name"], "imagesTr/case_001.nii.gz");
    // case_001 (shift 0): class 1 covers NIfTI x 2..6 (the slice's rows) and y 3..9 (its
    // columns): COCO [x, y, width, height] = [3, 2, 6, 4].
    let first = &coco["annotations"][0];
    assert_eq!(first["category_id"], 1);
    assert_eq!(first["bbox"], serde_json::json!([3.0, 2.0, 6.0, 4.0]));

    let out = medssl()
        .args(["data", "boxes-from-masks"])
        .arg(&task)
        .args(["--classes", "one", "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert_fails_with(&out, &["--classes `one`", "VALUE=NAME"]);
}

/// A detection config on the generated task, its boxes in `boxes.json` beside the config.
fn detection_config(task: &Path, train: &[usize], eval: &[usize], classes: i64) -> String {
    segmentation_config(task, train, eval, classes)
        .replace("ids = [", "boxes = \"boxes.json\"\nids = [")
        .replace("image_size = 16", "image_size = 24")
        .replace(
            "[head]\nname = \"unet\"\nchannels = [8, 8, 8, 8, 8]",
            "[head]\nname = \"faster-rcnn\"\n[head.fpn]\nwidth = 8\n[head.anchors]\nsizes = [[4.0], [6.0], [8.0], [12.0], [16.0]]\n[head.rpn]\npre_nms_top_n_train = 100\npost_nms_top_n_train = 50\npre_nms_top_n_test = 100\npost_nms_top_n_test = 50\nbatch_size_per_image = 64\n[head.roi]\nbatch_size_per_image = 32\nrepresentation_size = 16",
        )
}

fn boxes_from_masks(task: &Path, out_file: &Path) {
    let out = medssl()
        .args(["data", "boxes-from-masks"])
        .arg(task)
        .args(["--axis", "2", "--classes", "1=anterior,2=posterior", "--out"])
        .arg(out_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
}

#[test]
fn detection_finetune_reports_ap50_per_category_from_a_coco_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run = pretrain(tmp.path());
    let task = decathlon(tmp.path(), 6, 2);
    boxes_from_masks(&task, &tmp.path().join("boxes.json"));
    let config = write(
        tmp.path(),
        "det.toml",
        &detection_config(&task, &[1, 2, 3, 4], &[5, 6], 3),
    );
    let out_dir = tmp.path().join("ft");
    let out = finetune(&[&config, &"--pretrained", &run, &"--out", &out_dir, &"--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_rows(&json, "ap50", 2);
    assert_eq!(json["setup"]["task"], "detection");
    for row in json["rows"].as_array().unwrap() {
        for metric in ["ap50/anterior", "ap50/posterior"] {
            assert!(row["metrics"][metric].is_object(), "no {metric}: {row}");
        }
        // Every slice of the four training volumes is a training image.
        for trial in row["trials"].as_array().unwrap() {
            assert_eq!(trial["train_units"], 4, "{trial}");
            assert_eq!(trial["train_samples"], 20, "{trial}");
        }
    }
    assert_eq!(json["setup"]["eval"]["slices"], 10);
    for file in [
        "config.toml",
        "results.json",
        "learning_curves.png",
        "precision_recall_pretrained.png",
        "precision_recall_scratch.png",
        "weights/pretrained-run1.safetensors",
    ] {
        assert!(out_dir.join(file).is_file(), "missing {file}");
    }
    // The recorded config names the boxes file by its absolute path.
    let recorded = std::fs::read_to_string(out_dir.join("config.toml")).unwrap();
    let boxes = tmp.path().join("boxes.json").display().to_string();
    assert!(recorded.contains(&boxes), "{recorded}");
    let lines = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    assert!(lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .all(|r| r["eval/ap50"].is_number()));
}

#[test]
fn detection_errors_name_the_boxes_file_and_what_disagrees() {
    let tmp = tempfile::tempdir().unwrap();
    let run = pretrain(tmp.path());
    let task = decathlon(tmp.path(), 4, 2);
    let args = |config: &Path| {
        finetune(&[
            &config.to_path_buf(),
            &"--pretrained",
            &run,
            &"--out",
            &tmp.path().join("ft"),
        ])
    };

    // No boxes file named.
    let config = write(
        tmp.path(),
        "no_boxes.toml",
        &detection_config(&task, &[1, 2], &[3, 4], 3).replace("boxes = \"boxes.json\"\n", ""),
    );
    assert_fails_with(&args(&config), &["data.train.boxes", "COCO"]);
    // A boxes file that does not exist.
    let config = write(
        tmp.path(),
        "missing.toml",
        &detection_config(&task, &[1, 2], &[3, 4], 3),
    );
    assert_fails_with(&args(&config), &["data.train.boxes", "boxes.json"]);

    // Categories against `classes`.
    boxes_from_masks(&task, &tmp.path().join("boxes.json"));
    let config = write(
        tmp.path(),
        "classes.toml",
        &detection_config(&task, &[1, 2], &[3, 4], 4),
    );
    assert_fails_with(
        &args(&config),
        &["2 categories", "anterior, posterior", "`classes` = 4"],
    );

    // A boxes file of other volumes.
    let other = decathlon(&tmp.path().join("other"), 2, 2);
    boxes_from_masks(&other, &tmp.path().join("boxes.json"));
    let config = write(tmp.path(), "other.toml", &detection_config(&task, &[1, 2, 3], &[4], 3));
    assert_fails_with(&args(&config), &["case_003.nii.gz", "has no image in the boxes file"]);
    assert!(
        !tmp.path().join("ft").exists(),
        "nothing is written before the sets check out"
    );
}
