//! Exact resume: a run killed with SIGKILL mid-training and resumed logs the same losses,
//! step for step, as a run that never stopped.

mod common;

use common::{medssl, write, TINY};
use std::time::{Duration, Instant};

/// Longer than TINY so the kill lands mid-run: 3 epochs a stage.
fn config() -> String {
    TINY.replace("epochs = 2", "epochs = 3")
}

#[test]
fn killed_and_resumed_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "c.toml", &config());

    let reference = tmp.path().join("reference");
    let out = medssl()
        .arg("run")
        .arg(&path)
        .arg("--run-dir")
        .arg(&reference)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let expected = common::losses(&reference.join("metrics.jsonl"));
    assert_eq!(expected.len(), 12);

    // Start the same run and kill it with SIGKILL once it has logged step 5 (mid-stage 1).
    let killed = tmp.path().join("killed");
    let mut child = medssl()
        .arg("run")
        .arg(&path)
        .arg("--run-dir")
        .arg(&killed)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = killed.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let steps = std::fs::read_to_string(&metrics)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if steps >= 5 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "the run did not reach step 5 in time");
        std::thread::sleep(Duration::from_millis(5));
    }
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
