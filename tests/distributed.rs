//! Data-parallel training over c10d's Gloo on loopback: two processes launched as torchrun
//! launches them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one thread each.
//!
//! - Two ranks with batch B and synced batch norm train as one process with batch 2B, in
//!   f64: the same loss at every step and the same checkpoint at the end, to 1e-9 relative
//!   (reductions run in another order), for NT-Xent (negatives gathered from both ranks),
//!   SwAV (Sinkhorn over both ranks' batches) and DeepCluster-v2 (one memory bank and one
//!   k-means over both ranks' samples). Rank 0 alone writes.
//! - A rank that dies makes the other stop with an error naming it, in seconds.
//! - Ranks given different configs are refused, naming the rank.

mod common;

use common::{medssl, write, TINY};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// TINY on 16 phantom volumes, one stage of slice views (4 steps of the global batch 8),
/// `objective` as its objective, batch norm synced across ranks.
fn config(objective: &str, batch: usize) -> String {
    let stages_at = TINY.find("[[stages]]").unwrap();
    let base = TINY[..stages_at]
        .replace("count = 8", "count = 16")
        .replace("batch_size = 4", &format!("batch_size = {batch}"))
        .replace(
            "[run]\n",
            "[run]\nprecision = \"fp64\"\ndistributed = { sync_batchnorm = true, timeout_s = 30 }\n",
        );
    let objectives_at = base.find("[objectives.slices]").unwrap();
    let optimizer_at = base.find("[optimizer]").unwrap();
    format!(
        "{}[objectives.slices]\n{objective}\n\n{}[[stages]]\nname = \"slices\"\nepochs = 2\ntrain = [\"encoder\"]\nobjectives = {{ slices = 1.0 }}\n",
        &base[..objectives_at],
        &base[optimizer_at..]
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts rank `rank` of 2 of `medssl run CONFIG --run-dir DIR extra...`.
fn rank(rank: usize, port: u16, config: &Path, run_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
    let mut command = medssl();
    command
        .args(["run"])
        .arg(config)
        .arg("--run-dir")
        .arg(run_dir)
        .args(extra);
    launch(rank, port, &mut command, env)
}

/// Starts `command` as rank `rank` of 2, as torchrun would.
fn launch(rank: usize, port: u16, command: &mut std::process::Command, env: &[(&str, &str)]) -> Child {
    command
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().unwrap()
}

/// Rank `rank` of 2 of `medssl resume DIR`.
fn resume(rank: usize, port: u16, run_dir: &Path) -> Child {
    launch(rank, port, medssl().arg("resume").arg(run_dir), &[])
}

fn losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn both(children: [Child; 2]) -> [Output; 2] {
    children.map(|c| c.wait_with_output().unwrap())
}

/// Every tensor of the run's latest checkpoint (model and optimizer), by name.
fn checkpoint(run_dir: &Path) -> Vec<(String, tch::Tensor)> {
    let found = medssl_core::run_dir::locate(run_dir, None).unwrap();
    let mut tensors = medssl_core::checkpoint::read_safetensors(&found.tensors).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn two_ranks_with_batch_b_train_as_one_process_with_batch_2b() {
    // The queue is used in the second epoch.
    let swav = "name = \"swav\"\nhidden_dim = 16\noutput_dim = 8\nprototypes = 6\nfreeze_prototypes_steps = 1\nqueue_length = 8\nqueue_start_epoch = 1";
    let ntxent = "name = \"ntxent\"\nhidden_dim = 16\noutput_dim = 8";
    let deepcluster =
        "name = \"deepcluster-v2\"\nhidden_dim = 16\noutput_dim = 8\nprototypes = [4, 3]\nkmeans_iterations = 3";
    for (name, objective) in [("ntxent", ntxent), ("swav", swav), ("deepcluster-v2", deepcluster)] {
        let tmp = tempfile::tempdir().unwrap();
        let single = write(tmp.path(), "single.toml", &config(objective, 8));
        let out = medssl()
            .args(["run"])
            .arg(&single)
            .arg("--run-dir")
            .arg(tmp.path().join("single"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", common::stderr(&out));
        let expected = losses(&tmp.path().join("single"));
        assert_eq!(expected.len(), 4, "{name}: steps");

        let ranked = write(tmp.path(), "ranked.toml", &config(objective, 4));
        let dir = tmp.path().join("ranked");
        let port = free_port();
        let outs = both([
            rank(0, port, &ranked, &dir, &[], &[]),
            rank(1, port, &ranked, &dir, &[], &[]),
        ]);
        for (r, out) in outs.iter().enumerate() {
            assert!(out.status.success(), "{name}: rank {r}: {}", common::stderr(out));
        }
        assert!(
            common::stderr(&outs[0]).contains("global batch 8"),
            "{}",
            common::stderr(&outs[0])
        );
        let single = tmp.path().join("single");
        same_run(&format!("{name}, world 2"), &dir, &single);

        // Both ranks killed after step 4's update: the last checkpoint is step 3's, whose
        // SwAV queue is filled and whose DeepCluster-v2 bank was clustered at step 3. Resumed
        // on two ranks, it is the same run again.
        let broken = tmp.path().join("broken");
        let port = free_port();
        let abort = [("INJECT_MEDSSL_ABORT", "step:4")];
        let outs = both([
            rank(0, port, &ranked, &broken, &[], &abort),
            rank(1, port, &ranked, &broken, &[], &abort),
        ]);
        assert!(outs.iter().all(|o| !o.status.success()), "{name}: not aborted");
        let port = free_port();
        let outs = both([resume(0, port, &broken), resume(1, port, &broken)]);
        for (r, out) in outs.iter().enumerate() {
            assert!(
                out.status.success(),
                "{name}: resumed rank {r}: {}",
                common::stderr(out)
            );
        }
        same_run(&format!("{name}, world 2 resumed at step 3"), &broken, &single);
    }
}

/// `run` logged the same loss at every step as `reference` and ended with the same
/// checkpoint (parameters, optimizer state, objective buffers), to 1e-9 relative.
/// Measured: at most 1e-12 over these 4 steps.
fn same_run(what: &str, run: &Path, reference: &Path) {
    let (got, expected) = (losses(run), losses(reference));
    assert_eq!(got.len(), expected.len(), "{what}: one record a step, written once");
    for (step, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!(
            ((g - e) / e).abs() < 1e-9,
            "{what}: step {}: loss {g}, one process {e}",
            step + 1
        );
    }
    let (got, expected) = (checkpoint(run), checkpoint(reference));
    assert_eq!(
        got.iter().map(|t| &t.0).collect::<Vec<_>>(),
        expected.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "{what}"
    );
    for ((key, g), (_, e)) in got.iter().zip(&expected) {
        if e.is_floating_point() {
            let scale = e.abs().max().double_value(&[]).max(1e-300);
            let off = (g - e).abs().max().double_value(&[]);
            assert!(off / scale < 1e-9, "{what}: `{key}` differs by {off} (scale {scale})");
        } else {
            assert!(g.equal(e), "{what}: `{key}` differs");
        }
    }
}

#[test]
fn a_rank_that_dies_stops_the_other_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(
        tmp.path(),
        "c.toml",
        &config("name = \"ntxent\"\nhidden_dim = 16\noutput_dim = 8", 4),
    );
    let dir = tmp.path().join("run");
    let port = free_port();
    let started = Instant::now();
    let outs = both([
        rank(0, port, &config, &dir, &[], &[]),
        rank(1, port, &config, &dir, &[], &[("INJECT_MEDSSL_ABORT", "step:2")]),
    ]);
    assert!(!outs[1].status.success(), "rank 1 was not aborted");
    let err = common::stderr(&outs[0]);
    assert!(!outs[0].status.success(), "rank 0 went on without rank 1: {err}");
    assert!(err.contains("rank 0 of 2") && err.contains("lost rank(s) 1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    // What rank 0 had saved is still there.
    assert!(dir.join("checkpoints/latest").is_file());
}

#[test]
fn ranks_given_different_configs_are_refused_naming_the_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(
        tmp.path(),
        "c.toml",
        &config("name = \"ntxent\"\nhidden_dim = 16\noutput_dim = 8", 4),
    );
    let dir = tmp.path().join("run");
    let port = free_port();
    let outs = both([
        rank(0, port, &config, &dir, &[], &[]),
        rank(1, port, &config, &dir, &["--set", "optimizer.lr=0.5"], &[]),
    ]);
    for (r, out) in outs.iter().enumerate() {
        assert!(!out.status.success(), "rank {r} trained");
        let err = common::stderr(out);
        assert!(
            err.contains("rank(s) 1 resolved another config than rank 0"),
            "rank {r}: {err}"
        );
    }
    assert!(!dir.join("metrics.jsonl").exists() || losses(&dir).is_empty());
}

#[test]
fn finetune_and_eval_under_a_launcher_are_refused() {
    for args in [
        &["finetune", "--pretrained", "run", "finetune.toml"][..],
        &["eval", "linear", "run", "--train", "a", "--eval", "b"][..],
    ] {
        let out = medssl()
            .args(args)
            .env("RANK", "1")
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", "1")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", "1")
            .output()
            .unwrap();
        common::assert_fails_with(&out, &["runs in one process", "torchrun started 2", "rank 1"]);
    }
}

/// The benchmark's plumbing at a tiny size (its numbers belong in docs/benchmarks.md).
#[test]
fn bench_distributed_reports_the_speedup_and_the_allreduce_share() {
    let out = medssl()
        .args([
            "bench",
            "distributed",
            "--batch",
            "4",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--pairs",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["parallel"]["world_size"], 2);
    assert_eq!(report["parallel"]["batch_per_process"], 2);
    assert_eq!(report["single"]["allreduce_ms"], 0.0);
    let speedup = report["speedup"].as_f64().unwrap();
    let fraction = report["allreduce_fraction"].as_f64().unwrap();
    assert!(speedup > 0.0 && speedup.is_finite(), "{report}");
    assert!(fraction > 0.0 && fraction < 1.0, "{report}");
}

/// A run of two processes resumed as one continues (it cannot be exact: the batches
/// change), says so, and keeps its log in step order.
#[test]
fn a_run_resumed_on_another_world_size_continues_and_says_it_is_not_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(
        tmp.path(),
        "c.toml",
        &config("name = \"ntxent\"\nhidden_dim = 16\noutput_dim = 8", 4),
    );
    let dir = tmp.path().join("run");
    let port = free_port();
    // Killed after step 2's update: the last checkpoint is step 1's, half-way through the
    // first epoch of 2 steps (8 of its 16 samples seen).
    let abort = [("INJECT_MEDSSL_ABORT", "step:2")];
    let outs = both([
        rank(0, port, &config, &dir, &[], &abort),
        rank(1, port, &config, &dir, &[], &abort),
    ]);
    assert!(outs.iter().all(|o| !o.status.success()), "not aborted");
    let out = medssl().arg("resume").arg(&dir).output().unwrap();
    let err = common::stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("written by 2 process(es), this launch has 1")
            && err.contains("continues at its step 2 of 8 (epoch 0, from step 1 of 4)")
            && err.contains("global batch goes from 8 to 4")
            && err.contains("not an exact resume"),
        "{err}"
    );
    // Step 1 at world 2, then the 6 steps left at world 1, numbered on.
    let steps: Vec<u64> = common::losses(&dir.join("metrics.jsonl"))
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(steps, (1..=7).collect::<Vec<_>>());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            medssl_core::run_dir::locate(&dir, None)
                .unwrap()
                .tensors
                .with_file_name("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 1);
    assert_eq!(state["global_step"], 7);
    assert_eq!(state["global_step_offset"], -1);
}
