//! Exact resume: a run killed with SIGKILL mid-training and resumed logs the same losses,
//! step for step, as a run that never stopped.

mod common;

use common::{medssl, run, write, TINY};
use std::time::{Duration, Instant};

/// Longer than TINY so the kill lands mid-run: 3 epochs a stage.
fn config() -> String {
    TINY.replace("epochs = 2", "epochs = 3")
}

/// `medssl run CONFIG --run-dir DIR`, started in the background and returned once it has
/// logged `steps` steps (the test fails if it ends first or takes over two minutes).
fn run_until_logged(config: &std::path::Path, dir: &std::path::Path, steps: usize) -> std::process::Child {
    let mut child = medssl()
        .arg("run")
        .arg(config)
        .arg("--run-dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < steps
    {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step {steps}");
        assert!(Instant::now() < deadline, "the run did not reach step {steps} in time");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn killed_and_resumed_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "c.toml", &config());

    let reference = tmp.path().join("reference");
    let out = run(&path, &reference, &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let expected = common::losses(&reference.join("metrics.jsonl"));
    assert_eq!(expected.len(), 12);

    // Start the same run and kill it with SIGKILL once it has logged step 5 (mid-stage 1).
    let killed = tmp.path().join("killed");
    let metrics = killed.join("metrics.jsonl");
    let mut child = run_until_logged(&path, &killed, 5);
    child.kill().unwrap(); // SIGKILL on Unix: no chance to clean up.
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child must have been killed, not finished");
    // Whole records only: a kill can land in the middle of one (resume drops it).
    let logged = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count();
    assert!(logged < 12, "killed after {logged} steps: too late to test resume");

    let out = medssl().arg("resume").arg(&killed).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let resumed = common::losses(&metrics);
    assert_eq!(resumed.len(), expected.len(), "{resumed:?}");
    for ((step_a, a), (step_b, b)) in expected.iter().zip(&resumed) {
        assert_eq!(step_a, step_b);
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "step {step_a}: {a} uninterrupted vs {b} resumed"
        );
    }
}

#[test]
fn resuming_a_finished_run_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "c.toml", TINY);
    let run_dir = tmp.path().join("run");
    assert!(medssl()
        .arg("run")
        .arg(&path)
        .arg("--run-dir")
        .arg(&run_dir)
        .status()
        .unwrap()
        .success());
    let before = common::losses(&run_dir.join("metrics.jsonl"));
    let out = medssl().arg("resume").arg(&run_dir).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(common::losses(&run_dir.join("metrics.jsonl")), before);
}

#[test]
fn resume_of_a_folder_that_is_no_run_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = medssl().arg("resume").arg(tmp.path()).output().unwrap();
    common::assert_fails_with(&out, &["config.toml", "is missing", "run directory"]);
}

/// A finished TINY run in `dir/run`: 8 steps, a checkpoint after each, the last two kept.
fn finished_run(dir: &std::path::Path) -> std::path::PathBuf {
    let path = write(dir, "c.toml", TINY);
    let run_dir = dir.join("run");
    let out = run(&path, &run_dir, &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    run_dir
}

fn checkpoint_bytes(run_dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(run_dir.join("checkpoints")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            for file in ["tensors.safetensors", "state.json"] {
                files.push((
                    format!("{}/{file}", path.display()),
                    std::fs::read(path.join(file)).unwrap(),
                ));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_deleted_latest_resumes_from_the_newest_checkpoint_not_from_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = finished_run(tmp.path());
    let metrics = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();
    std::fs::remove_file(run_dir.join("checkpoints/latest")).unwrap();
    let out = medssl().arg("resume").arg(&run_dir).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("newest complete checkpoint") && common::stderr(&out).contains("step-00000008"),
        "{}",
        common::stderr(&out)
    );
    assert_eq!(
        std::fs::read(run_dir.join("metrics.jsonl")).unwrap(),
        metrics,
        "the run restarted"
    );
}

#[test]
fn a_latest_pointing_outside_the_checkpoints_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = finished_run(tmp.path());
    let before = checkpoint_bytes(&run_dir);
    std::fs::create_dir_all(tmp.path().join("x")).unwrap();
    for name in ["../../x", "/tmp", "step-8"] {
        std::fs::write(run_dir.join("checkpoints/latest"), name).unwrap();
        let out = medssl().arg("resume").arg(&run_dir).output().unwrap();
        common::assert_fails_with(&out, &["checkpoints/latest", name, "not a checkpoint of this folder"]);
    }
    assert_eq!(checkpoint_bytes(&run_dir), before);
}

#[test]
fn a_state_this_config_cannot_have_written_is_refused() {
    for (key, value, words) in [
        ("stage_step", "999999", "999999 steps into stage"),
        ("stage", "9", "stage index 9"),
        ("global_step", "7", "global step 7"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = finished_run(tmp.path());
        let state_path = run_dir.join("checkpoints/step-00000008/state.json");
        let mut state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
        state[key] = serde_json::from_str(value).unwrap();
        std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
        let before = checkpoint_bytes(&run_dir);
        let out = medssl().arg("resume").arg(&run_dir).output().unwrap();
        common::assert_fails_with(&out, &["step-00000008/state.json", words]);
        assert_eq!(checkpoint_bytes(&run_dir), before, "{key}");
    }
}

#[test]
fn force_replaces_a_run_directory_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "c.toml", TINY);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("volume.nii"), b"precious").unwrap();
    let out = run(&path, &data, &["--force"]);
    common::assert_fails_with(&out, &["refusing to replace", "not a medssl run directory"]);
    assert_eq!(std::fs::read(data.join("volume.nii")).unwrap(), b"precious");

    // A file in the way is no folder to run in, forced or not.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = run(&path, &file, &["--force"]);
    common::assert_fails_with(&out, &["is not a folder"]);

    // A real run directory is replaced.
    let run_dir = finished_run(tmp.path());
    std::fs::write(run_dir.join("stale"), b"x").unwrap();
    let out = run(&path, &run_dir, &["--force"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(!run_dir.join("stale").exists());
}

#[test]
fn a_live_run_directory_refuses_a_second_writer_with_the_holders_pid() {
    let tmp = tempfile::tempdir().unwrap();
    // Long enough to outlast the second writers' start-up; it is killed at the end.
    let path = write(tmp.path(), "c.toml", &TINY.replace("epochs = 2", "epochs = 500"));
    let run_dir = tmp.path().join("live");
    let mut child = run_until_logged(&path, &run_dir, 1);
    let pid = format!("pid {}", child.id());
    let resume = medssl().arg("resume").arg(&run_dir).output().unwrap();
    let forced = run(&path, &run_dir, &["--force"]);
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(still_running, "the run ended before the second writers were tried");
    common::assert_fails_with(&resume, &["in use", &pid]);
    common::assert_fails_with(&forced, &["in use", &pid]);
    assert!(run_dir.join("config.toml").exists(), "--force cleared a live run");
}

#[test]
fn an_edited_config_is_refused_on_resume_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = finished_run(tmp.path());
    let config = run_dir.join("config.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let mut table: toml::Table = toml::from_str(&original).unwrap();
    let set = |table: &mut toml::Table, section: Option<&str>, key: &str, value: toml::Value| {
        let target = match section {
            Some(s) => table.get_mut(s).and_then(toml::Value::as_table_mut).unwrap(),
            None => table,
        };
        target.insert(key.to_string(), value);
    };
    set(&mut table, Some("optimizer"), "lr", toml::Value::Float(0.5));
    set(&mut table, None, "seed", toml::Value::Integer(7));
    // `[run]` may change freely: where and how often the run writes.
    set(&mut table, Some("run"), "log_every", toml::Value::Integer(3));
    std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
    let before = checkpoint_bytes(&run_dir);
    let out = medssl().arg("resume").arg(&run_dir).output().unwrap();
    common::assert_fails_with(
        &out,
        &[
            "config.toml",
            "`optimizer.lr` 0.05 -> 0.5",
            "`seed` 1 -> 7",
            "--allow-config-change",
        ],
    );
    assert!(!common::stderr(&out).contains("log_every"), "{}", common::stderr(&out));
    assert_eq!(checkpoint_bytes(&run_dir), before);

    let out = medssl()
        .arg("resume")
        .arg(&run_dir)
        .arg("--allow-config-change")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("no longer an exact resume"),
        "{}",
        common::stderr(&out)
    );

    // Untouched, a resume is quiet.
    let second = tmp.path().join("second");
    std::fs::create_dir_all(&second).unwrap();
    let run_dir = finished_run(&second);
    let out = medssl().arg("resume").arg(&run_dir).output().unwrap();
    assert!(
        out.status.success() && !common::stderr(&out).contains("differs"),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn intervals_of_zero_and_one_sample_batches_are_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "c.toml", TINY);
    for (set, words) in [
        ("run.checkpoint_every=0", &["run.checkpoint_every", "at least 1"][..]),
        ("run.log_every=0", &["run.log_every", "at least 1"][..]),
        (
            "data.loader.batch_size=1",
            &["batch of 1 sample", "batch norm", "batch_size"][..],
        ),
    ] {
        let dir = tmp.path().join(set.replace(['.', '='], "_"));
        let out = run(&path, &dir, &["--set", set]);
        common::assert_fails_with(&out, words);
        assert!(!dir.join("checkpoints").exists(), "{set}: something was written");
    }
}

#[test]
fn divergence_stops_the_run_naming_stage_step_lr_and_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "c.toml", TINY);
    let dir = tmp.path().join("diverged");
    // An absurd learning rate: the weights, then the loss or batch norm's statistics, leave
    // the finite numbers within a few steps. No checkpoint before the stage's end.
    let out = run(
        &path,
        &dir,
        &[
            "--set",
            "optimizer.lr=1e30",
            "--set",
            "optimizer.warmup_epochs=0",
            "--set",
            "run.checkpoint_every=100",
        ],
    );
    common::assert_fails_with(
        &out,
        &[
            "stage `slices`, step 2 (lr 8.536e29)",
            "became",
            "stopping",
            "no checkpoint was written yet",
        ],
    );
}
