//! `medssl eval linear|knn` end to end: a tiny run pre-trained for a few steps, evaluated on
//! small generated MedMNIST-style archives (2D and 3D), and the errors a user can cause.

mod common;

use common::archive::archive;
use common::{assert_fails_with, medssl, unit, write, TINY};
use medssl_core::assemble::{Backbone, Model};
use medssl_core::config::LoadedConfig;
use medssl_core::rng::{self, domain};
use serde_json::Value;

use medssl_plugins as _;

/// TINY trained for one epoch a stage: 4 steps.
fn config() -> String {
    TINY.replace("epochs = 2", "epochs = 1")
}

fn eval(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut cmd = medssl();
    cmd.arg("eval");
    for a in args {
        cmd.arg(a);
    }
    cmd.output().unwrap()
}

#[test]
fn eval_reports_pretrained_random_init_and_raw_pixels_for_images_and_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::pretrain(tmp.path(), "run", &config());
    let images = archive(tmp.path(), "images.npz", 0, true);
    let volumes = archive(tmp.path(), "volumes.npz", 5, true);

    // 2D images, linear probe, two seeds on half the labels, raw-pixel baseline.
    let out = eval(&[
        &"linear",
        &run,
        &"--train",
        &images,
        &"--train-split",
        &"train",
        &"--eval",
        &images,
        &"--eval-split",
        &"val",
        &"--label-fraction",
        &"0.5",
        &"--seeds",
        &"2",
        &"--raw-pixels",
        &"--epochs",
        &"50",
        &"--device",
        &"cpu",
        &"--json",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let report: Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    for row in ["pretrained", "random_init", "raw_pixels"] {
        for key in ["acc", "auc", "acc_std", "auc_std"] {
            unit(&report[row][key], &format!("{row}.{key}"));
        }
        let runs = report[row]["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{row}: one entry a seed");
        let mean = runs.iter().map(|r| unit(&r["acc"], "acc")).sum::<f64>() / 2.0;
        assert!(
            (mean - report[row]["acc"].as_f64().unwrap()).abs() < 1e-9,
            "{row}: acc is the mean"
        );
        // Half of 12 samples a class: 6 + 6.
        assert_eq!(runs[0]["train_labels"], 12);
    }
    assert_eq!(report["setup"]["step"], 4);
    assert_eq!(report["setup"]["raw_dim"], 24 * 24, "images resized to slice_size 24");
    assert_eq!(report["setup"]["train"]["class_counts"], serde_json::json!([12, 12]));

    // Volumes through the aggregator, kNN, from the checkpoint folder; one seed: no std.
    let checkpoint = run.join("checkpoints/step-00000004");
    let out = eval(&[
        &"knn",
        &checkpoint,
        &"--train",
        &volumes,
        &"--eval",
        &volumes,
        &"--k",
        &"3",
        &"--device",
        &"cpu",
        &"--json",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let report: Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    for row in ["pretrained", "random_init"] {
        unit(&report[row]["acc"], "acc");
        unit(&report[row]["auc"], "auc");
        assert!(report[row].get("acc_std").is_none() && report[row].get("runs").is_none());
    }
    assert!(report.get("raw_pixels").is_none());
    assert!(
        report["setup"]["embedding"].as_str().unwrap().contains("mean-pool"),
        "{}",
        report["setup"]
    );
    assert_eq!(report["setup"]["eval"]["split"], "val");
    assert!(report["setup"].get("folds").is_none());

    // Cross-validation over train and val pooled (24 + 12 volumes, 18 a class): each seed
    // scores every volume once over its 3 folds, each fit on the other two folds' labels.
    let out = eval(&[
        &"linear",
        &run,
        &"--train",
        &volumes,
        &"--eval",
        &volumes,
        &"--folds",
        &"3",
        &"--seeds",
        &"2",
        &"--epochs",
        &"20",
        &"--device",
        &"cpu",
        &"--json",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let report: Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    assert_eq!(report["setup"]["folds"], 3);
    for row in ["pretrained", "random_init"] {
        for run in report[row]["runs"].as_array().unwrap() {
            let folds = run["folds"].as_array().unwrap();
            assert_eq!(folds.len(), 3, "{row}: one entry a fold");
            let scored: u64 = folds.iter().map(|f| f["eval_samples"].as_u64().unwrap()).sum();
            assert_eq!(scored, 36, "{row}: every volume scored once a seed");
            assert!(folds.iter().all(|f| f["train_labels"] == 24 && f["eval_samples"] == 12));
            let mean = folds.iter().map(|f| unit(&f["auc"], "fold auc")).sum::<f64>() / 3.0;
            assert!(
                (mean - run["auc"].as_f64().unwrap()).abs() < 1e-9,
                "{row}: a seed's AUC is its folds' mean"
            );
        }
    }
    let out = eval(&[
        &"knn",
        &run,
        &"--train",
        &volumes,
        &"--eval",
        &volumes,
        &"--eval-split",
        &"train",
        &"--folds",
        &"3",
    ]);
    assert_fails_with(&out, &["--folds pools", "pass two different sets or splits"]);
    let out = eval(&[
        &"knn", &run, &"--train", &volumes, &"--eval", &volumes, &"--folds", &"19",
    ]);
    assert_fails_with(&out, &["--folds 19", "has 18 samples"]);

    // The human-readable table names every row.
    let out = eval(&[
        &"knn",
        &run,
        &"--train",
        &images,
        &"--eval",
        &images,
        &"--device",
        &"cpu",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let table = common::stdout(&out);
    assert!(
        table.contains("pretrained") && table.contains("random init") && table.contains("AUC"),
        "{table}"
    );

    // Errors: a fraction outside (0, 1], an unlabelled set, a missing split, a checkpoint
    // from another architecture.
    let base: [&dyn AsRef<std::ffi::OsStr>; 6] = [&"linear", &run, &"--train", &images, &"--eval", &images];
    let with = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = base.to_vec();
        args.extend_from_slice(extra);
        eval(&args)
    };
    assert_fails_with(&with(&[&"--label-fraction", &"1.5"]), &["--label-fraction", "(0, 1]"]);
    let unlabelled = archive(tmp.path(), "unlabelled.npz", 0, false);
    let out = eval(&[&"knn", &run, &"--train", &unlabelled, &"--eval", &images]);
    assert_fails_with(&out, &["no class label", "--train"]);
    assert_fails_with(
        &with(&[&"--eval-split", &"test"]),
        &["--eval-split test", "splits present: train, val"],
    );
    let other = run.join("config.toml");
    let wider = write(
        tmp.path(),
        "wider.toml",
        &std::fs::read_to_string(&other)
            .unwrap()
            .replace("base_width = 4", "base_width = 8"),
    );
    let out = with(&[&"--config", &wider]);
    assert_fails_with(&out, &["model.encoder.", "has shape", "another architecture"]);
    let err = common::stderr(&out);
    assert!(err.contains("[4") && err.contains("[8"), "both shapes: {err}");
}

/// The backbone is built as the run's model builds its encoder and aggregator: same
/// variable names, and under the run's initialisation seed the same values, so the
/// random-init row is the run's own starting point.
#[test]
fn the_backbone_is_the_models_encoder_and_aggregator() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = LoadedConfig::load(&write(tmp.path(), "c.toml", &config()), &[]).unwrap();
    let seed = rng::derive(cfg.run.seed, &[domain::INIT]) as i64;
    tch::manual_seed(seed);
    let model = Model::build(&cfg, Backbone::build(&cfg, tch::Device::Cpu).unwrap(), 8).unwrap();
    tch::manual_seed(seed);
    let backbone = Backbone::build(&cfg, tch::Device::Cpu).unwrap();
    let model_vars = model.backbone.vs.variables();
    let mut names: Vec<String> = backbone.vs.variables().into_keys().collect();
    names.sort();
    assert!(names.iter().any(|n| n.starts_with("encoder.")));
    for name in &names {
        let a = &backbone.vs.variables()[name];
        let b = model_vars
            .get(name)
            .unwrap_or_else(|| panic!("`{name}` is not a model variable"));
        assert!(a.equal(b), "`{name}` differs");
    }
    let backbone_parts = model_vars
        .keys()
        .filter(|n| n.starts_with("encoder.") || n.starts_with("aggregator."))
        .count();
    assert_eq!(backbone_parts, names.len());
}

/// `--mean-pool` scores a joint run's encoder alone: the checkpoint's aggregator (here an
/// attention pool with weights) is set aside and each volume is the mean of its slices'
/// pooled embeddings, for the pre-trained and the random-init encoder alike.
#[test]
fn mean_pool_sets_the_runs_aggregator_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config().replace(
        "[aggregator]\nname = \"mean-pool\"",
        "[aggregator]\nname = \"attention-pool\"\nlevels = [\"layer4\"]\noutput_dim = 8\nattention_dim = 4",
    );
    assert!(cfg.contains("attention-pool"), "TINY's aggregator section moved");
    let run = common::pretrain(tmp.path(), "run", &cfg);
    let volumes = archive(tmp.path(), "volumes.npz", 5, true);
    let report = |extra: &[&str]| -> Value {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"knn", &run, &"--train", &volumes, &"--eval", &volumes, &"--k", &"3", &"--json",
        ];
        for e in extra {
            args.push(e);
        }
        let out = eval(&args);
        assert!(out.status.success(), "{}", common::stderr(&out));
        serde_json::from_str(&common::stdout(&out)).unwrap()
    };
    let aggregated = report(&[]);
    assert!(aggregated["setup"]["embedding"]
        .as_str()
        .unwrap()
        .contains("attention-pool"));
    assert_eq!(aggregated["setup"]["feature_dim"], 8);
    let pooled = report(&["--mean-pool"]);
    let embedding = pooled["setup"]["embedding"].as_str().unwrap();
    assert!(embedding.contains("no aggregator"), "{embedding}");
    // ResNet-18 at base width 4: a 32-wide pooled embedding.
    assert_eq!(pooled["setup"]["feature_dim"], 32);
    for row in ["pretrained", "random_init"] {
        unit(&pooled[row]["acc"], "acc");
        unit(&pooled[row]["auc"], "auc");
    }
}

#[test]
fn a_sweep_with_pretraining_seeds_trains_each_variant_once_a_seed_and_averages() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "base.toml", &config());
    let images = archive(tmp.path(), "images.npz", 0, true);
    let sweep = write(
        tmp.path(),
        "sweep.toml",
        &format!(
            r#"
base = "base.toml"
pretraining_seeds = [4, 5]
[evaluation]
protocol = "knn"
train = "{images}"
eval = "{images}"
format = "medmnist"
args = ["--k", "3", "--device", "cpu"]
[[variants]]
name = "full"
"#,
            images = images.display()
        ),
    );
    let out_dir = tmp.path().join("sweep");
    let table = common::sweep(&sweep, &out_dir);
    let row = &table["rows"][0];
    assert_eq!(row["pretraining_seeds"], serde_json::json!([4, 5]));
    let per_seed = row["pretrained"]["per_pretraining_seed"].as_array().unwrap();
    assert_eq!(per_seed.len(), 2);
    let mean = (unit(&per_seed[0]["auc"], "seed 4 auc") + unit(&per_seed[1]["auc"], "seed 5 auc")) / 2.0;
    assert!((mean - row["pretrained"]["auc"].as_f64().unwrap()).abs() < 1e-12);
    unit(&row["random_init"]["auc_std"], "random-init std over pre-trainings");
    for seed in [4, 5] {
        let dir = out_dir.join(format!("full/seed-{seed}"));
        let resolved = std::fs::read_to_string(dir.join("config.toml")).unwrap();
        assert!(resolved.contains(&format!("seed = {seed}")), "{resolved}");
        assert!(dir.join("eval.json").is_file());
    }
    let md = std::fs::read_to_string(out_dir.join("sweep.md")).unwrap();
    assert!(md.contains("pre-trained with seeds [4, 5]"), "{md}");

    // A second sweep of the same variants with another evaluation shares the directory: it
    // reuses the pre-trainings (their checkpoints stay untouched) and writes its own table.
    let checkpoints = out_dir.join("full/seed-4/checkpoints");
    let checkpoint = checkpoints.join(std::fs::read_to_string(checkpoints.join("latest")).unwrap().trim());
    let before = std::fs::read(checkpoint.join("tensors.safetensors")).unwrap();
    let text = std::fs::read_to_string(&sweep).unwrap();
    let linear = write(
        tmp.path(),
        "linear.toml",
        &text
            .replace("protocol = \"knn\"", "protocol = \"linear\"")
            .replace("\"--k\", \"3\", ", "\"--epochs\", \"20\", "),
    );
    let table = common::sweep(&linear, &out_dir);
    assert_eq!(table["evaluation"]["protocol"], "linear");
    assert!(out_dir.join("sweep.md").is_file() && out_dir.join("linear.md").is_file());
    assert_eq!(before, std::fs::read(checkpoint.join("tensors.safetensors")).unwrap());

    // A variant whose overrides differ from what trained its directory is refused.
    let other = write(
        tmp.path(),
        "other.toml",
        &text.replace("name = \"full\"", "name = \"full\"\nset = [\"optimizer.lr=0.5\"]"),
    );
    let out = common::medssl()
        .arg("sweep")
        .arg(&other)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_fails_with(&out, &["full/seed-4", "optimizer.lr = 0.5", "--force"]);
}
