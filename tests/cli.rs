//! The `medssl` command end to end on tiny generated data: a run leaves a complete run
//! directory, and every kind of bad input fails with a clear message, a non-zero exit, no
//! panic and nothing overwritten.

mod common;

use common::{assert_fails_with, medssl, run, write, TINY};

#[test]
fn a_run_leaves_config_metrics_checkpoints_plot_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "tiny.toml", TINY);
    let run_dir = tmp.path().join("run");
    let out = run(&config, &run_dir, &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::stdout(&out).contains("finished 8 steps"),
        "{}",
        common::stdout(&out)
    );
    for file in [
        "config.toml",
        "metrics.jsonl",
        "loss.png",
        "report.md",
        "checkpoints/latest",
    ] {
        assert!(run_dir.join(file).exists(), "missing {file}");
    }
    // The resolved config has every component's defaults filled in and reloads as is.
    let resolved: toml::Table = toml::from_str(&std::fs::read_to_string(run_dir.join("config.toml")).unwrap()).unwrap();
    assert_eq!(resolved["encoder"]["input_channels"].as_integer(), Some(1));
    assert_eq!(resolved["objectives"]["slices"]["temperature"].as_float(), Some(0.1));
    let losses = common::losses(&run_dir.join("metrics.jsonl"));
    assert_eq!(
        losses.iter().map(|l| l.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    for key in [
        "stage",
        "epoch",
        "step",
        "loss",
        "loss/slices",
        "loss/volumes",
        "lr",
        "samples_per_s",
    ] {
        assert!(line.get(key).is_some(), "metrics line lacks `{key}`: {line}");
    }
    let report = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(
        report.contains("| slices |")
            && report.contains("| joint |")
            && report.contains("![losses and health signals by step](loss.png)"),
        "{report}"
    );
    let png = std::fs::read(run_dir.join("loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
}

#[test]
fn a_module_no_stage_trains_is_a_warning_or_under_strict_training_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "tiny.toml", TINY);
    // Both stages say `train = ["encoder"]`; the joint stage runs the aggregator, whose
    // parameters would stay at their random initialisation.
    let with_parameters = "aggregator.name=attention-pool";
    let run_dir = tmp.path().join("warned");
    let out = run(&config, &run_dir, &["--set", with_parameters]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let warning = "the aggregator (`attention-pool`";
    assert!(common::stderr(&out).contains(warning), "{}", common::stderr(&out));
    let report = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(
        report.contains("warning: the aggregator (`attention-pool`") && report.contains("trained by no stage"),
        "{report}"
    );

    let strict = run(
        &config,
        &tmp.path().join("strict"),
        &["--set", with_parameters, "--set", "run.strict_training=true"],
    );
    assert_fails_with(&strict, &[warning, "strict_training"]);
    assert!(!tmp.path().join("strict").join("checkpoints").exists());

    // The mean-pool aggregator has no parameters: nothing to warn about.
    let out = run(
        &config,
        &tmp.path().join("quiet"),
        &["--set", "run.strict_training=true"],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        !common::stderr(&out).contains("trained by no stage"),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn check_probes_each_stage_without_training() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "tiny.toml", TINY);
    let out = medssl().arg("check").arg(&config).output().unwrap();
    let text = common::stdout(&out);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        text.contains("stage 0: loss") && text.contains("stage 1: loss") && text.contains("objectives.volumes"),
        "{text}"
    );
    assert!(!tmp.path().join("runs").exists());
}

#[test]
fn a_missing_config_file_is_named() {
    let out = medssl().args(["run", "/nonexistent/demo.toml"]).output().unwrap();
    assert_fails_with(&out, &["config file `/nonexistent/demo.toml` does not exist"]);
}

#[test]
fn malformed_toml_names_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "bad.toml", "seed = 1\n[encoder\nname = \"resnet18\"\n");
    let out = run(&config, &tmp.path().join("run"), &[]);
    assert_fails_with(&out, &["bad.toml", "is not valid TOML", "line 2"]);
    assert!(!tmp.path().join("run").exists());
}

#[test]
fn a_wrong_type_names_the_key_the_value_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(
        tmp.path(),
        "c.toml",
        &TINY.replace("base_width = 4", "base_width = \"four\""),
    );
    let out = run(&config, &tmp.path().join("run"), &[]);
    assert_fails_with(&out, &["encoder.base_width", "\"four\"", "c.toml"]);
    let config = write(tmp.path(), "d.toml", &TINY.replace("seed = 1", "seed = true"));
    let out = run(&config, &tmp.path().join("run"), &[]);
    assert_fails_with(&out, &["key `seed`", "bool true", "expected u64", "d.toml"]);
}

#[test]
fn unknown_keys_are_named_with_the_expected_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(
        tmp.path(),
        "c.toml",
        &TINY.replace("small_input = true", "small_inputs = true"),
    );
    let out = run(&config, &tmp.path().join("run"), &[]);
    assert_fails_with(&out, &["encoder.small_inputs", "small_input", "c.toml"]);
    let config = write(tmp.path(), "d.toml", &format!("sede = 3\n{TINY}"));
    let out = run(&config, &tmp.path().join("run"), &[]);
    assert_fails_with(&out, &["sede", "d.toml"]);
}

#[test]
fn an_unknown_component_lists_the_registered_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(
        tmp.path(),
        "c.toml",
        &TINY.replace("name = \"mean-pool\"", "name = \"transformer\""),
    );
    let out = run(&config, &tmp.path().join("run"), &[]);
    assert_fails_with(
        &out,
        &["unknown aggregator `transformer`", "mean-pool", "aggregator.name"],
    );
}

#[test]
fn set_overrides_need_an_equals_sign_and_are_named_in_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "c.toml", TINY);
    let out = run(&config, &tmp.path().join("run"), &["--set", "optimizer.lr"]);
    assert_fails_with(&out, &["--set `optimizer.lr`", "KEY=VALUE"]);
    let out = run(&config, &tmp.path().join("run"), &["--set", "encoder.base_width=wide"]);
    assert_fails_with(&out, &["encoder.base_width", "--set encoder.base_width=wide"]);
}

#[test]
fn an_existing_run_directory_is_refused_and_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "c.toml", TINY);
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    write(&run_dir, "precious.txt", "keep me");
    let out = run(&config, &run_dir, &[]);
    assert_fails_with(&out, &["already exists", "medssl resume", "--force"]);
    assert_eq!(
        std::fs::read_to_string(run_dir.join("precious.txt")).unwrap(),
        "keep me"
    );
}

#[test]
fn cuda_where_there_is_none_fails_at_start() {
    if tch::Cuda::is_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = write(
        tmp.path(),
        "c.toml",
        &TINY.replace("device = \"cpu\"", "device = \"cuda\""),
    );
    let out = run(&config, &tmp.path().join("run"), &[]);
    assert_fails_with(&out, &["device", "no CUDA device is available"]);
    assert!(!tmp.path().join("run").exists());
}

#[test]
fn a_truncated_or_incompatible_checkpoint_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "c.toml", TINY);
    let run_dir = tmp.path().join("run");
    assert!(run(&config, &run_dir, &[]).status.success());
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    let tensors = run_dir
        .join("checkpoints")
        .join(latest.trim())
        .join("tensors.safetensors");
    let good = std::fs::read(&tensors).unwrap();

    std::fs::write(&tensors, &good[..good.len() / 3]).unwrap();
    let out = medssl().arg("resume").arg(&run_dir).output().unwrap();
    assert_fails_with(&out, &["tensors.safetensors", "truncated or corrupt"]);
    assert_eq!(
        std::fs::read(&tensors).unwrap().len(),
        good.len() / 3,
        "the checkpoint must not be rewritten"
    );

    // Same checkpoint, but the run's config now asks for a wider encoder.
    std::fs::write(&tensors, &good).unwrap();
    let resolved = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    std::fs::write(
        run_dir.join("config.toml"),
        resolved.replace("base_width = 4", "base_width = 8"),
    )
    .unwrap();
    let out = medssl().arg("resume").arg(&run_dir).output().unwrap();
    assert_fails_with(&out, &["incompatible"]);
    assert_eq!(std::fs::read(&tensors).unwrap(), good);
}

#[test]
fn a_closed_pipe_ends_quietly_and_a_full_disk_is_an_ordinary_error() {
    use std::io::Read;
    let mut child = medssl()
        .args(["list", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap(); // then closed, as `head -c 10`
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(common::stderr(&out).is_empty(), "{}", common::stderr(&out));

    if std::path::Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let out = medssl().args(["list", "--json"]).stdout(full).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = common::stderr(&out);
        assert!(
            err.contains("cannot write to standard output") && !err.contains("internal failure"),
            "{err}"
        );
    }
}

#[test]
fn running_out_of_memory_names_the_stage_and_what_to_lower() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "tiny.toml", TINY);
    // 4 x 32 ResNet channels at 300000 x 300000 pixels: far beyond any machine.
    let out = run(
        &config,
        &tmp.path().join("run"),
        &["--set", "data.views.slice_size=300000"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(!err.contains("internal failure"), "{err}");
    assert!(err.contains("out of memory") && err.contains("batch_size"), "{err}");
    assert!(
        !err.contains("frame #"),
        "libtorch's C++ stack is not the user's: {err}"
    );
}

/// A fixed-pipeline benchmark's sizes are its flags, so its out-of-memory message names those
/// rather than config keys.
#[test]
fn a_benchmark_out_of_memory_names_its_flags() {
    // Regions of 4096 x 8192 x 8192 voxels: 2 TB of input, refused at the first allocation.
    let out = common::medssl()
        .args([
            "bench",
            "voco-step",
            "--crop",
            "4096",
            "--grid",
            "2",
            "--feature-size",
            "12",
        ])
        .args(["--warmup", "0", "--steps", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(err.contains("out of memory") && err.contains("--crop"), "{err}");
    assert!(!err.contains("data.loader") && !err.contains("frame #"), "{err}");
}

#[test]
fn devices_reports_what_libtorch_sees() {
    let out = medssl().args(["devices", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let devices: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    let cuda = devices["cuda_devices"].as_i64().unwrap();
    assert_eq!(
        cuda,
        if tch::Cuda::is_available() {
            tch::Cuda::device_count()
        } else {
            0
        }
    );
    assert_eq!(
        devices["cudnn"].as_bool(),
        Some(cuda > 0 && tch::Cuda::cudnn_is_available())
    );
    assert!(
        devices["nccl_built"].is_boolean() && devices["cpu_bf16"].is_boolean(),
        "{devices}"
    );
    assert!(devices["cpu_threads"].as_i64().unwrap() >= 1, "{devices}");
    let table = common::stdout(&medssl().arg("devices").output().unwrap());
    assert!(
        table.contains("CUDA devices") && table.contains("NCCL built"),
        "{table}"
    );
}
