//! `medssl bench distributed`: what data parallelism buys on this machine. The swav-step
//! workload (`medssl bench swav-step`: ResNet-50, 2 x 96 px + 4 x 48 px crops, 3000
//! prototypes) at one global batch, run as one process with all the threads and as
//! `world` processes with one thread share each, over c10d's Gloo on loopback, as
//! `torchrun --standalone` would launch them. The two runs alternate (`pairs` times) and
//! the medians are reported, so a change in the machine's load hits both alike.

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::process::{Command, Stdio};

use crate::bench_ssl::summarise;

pub struct DistributedBench {
    /// Global batch: one process takes all of it, each of `world` processes a share.
    pub batch: i64,
    pub world: usize,
    /// Threads of the one process; each of the `world` processes gets `threads / world`.
    pub threads: usize,
    pub warmup: usize,
    pub steps: usize,
    pub pairs: usize,
}

#[derive(Debug, Serialize)]
pub struct DistributedReport {
    pub workload: &'static str,
    pub global_batch: i64,
    /// One process, `threads` threads: median over the pairs of its median step.
    pub single: Side,
    /// `world` processes of `threads / world` threads each (rank 0's medians).
    pub parallel: Side,
    /// Samples/s of the processes over samples/s of the one process.
    pub speedup: f64,
    /// The gradients' all-reduce over the whole step, at `world` processes.
    pub allreduce_fraction: f64,
    pub pairs: usize,
    pub steps: usize,
    pub warmup: usize,
}

#[derive(Debug, Serialize)]
pub struct Side {
    pub world_size: usize,
    pub threads_per_process: usize,
    pub batch_per_process: i64,
    pub ms_per_step: f64,
    pub samples_per_s: f64,
    pub allreduce_ms: f64,
    /// Each pair's median step, in run order.
    pub runs_ms: Vec<f64>,
}

/// One swav-step measurement: `medssl bench swav-step --json` as `world` processes; rank 0's
/// (step ms, all-reduce ms).
fn measure(bench: &DistributedBench, world: usize) -> Result<(f64, f64)> {
    let exe = std::env::current_exe().context("finding the medssl executable")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port on 127.0.0.1")?
        .port();
    let threads = (bench.threads / world).max(1);
    let children = (0..world)
        .map(|rank| {
            let mut command = Command::new(&exe);
            command
                .args(["bench", "swav-step", "--json", "--device", "cpu"])
                .args(["--batch", &(bench.batch / world as i64).to_string()])
                .args(["--warmup", &bench.warmup.to_string()])
                .args(["--steps", &bench.steps.to_string()])
                .env("OMP_NUM_THREADS", threads.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if world > 1 {
                command
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string());
            }
            command
                .spawn()
                .with_context(|| format!("starting `{}` as rank {rank} of {world}", exe.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let outputs = children
        .into_iter()
        .map(|c| c.wait_with_output())
        .collect::<std::io::Result<Vec<_>>>()
        .context("waiting for the benchmark's processes")?;
    for (rank, out) in outputs.iter().enumerate() {
        if !out.status.success() {
            bail!(
                "bench distributed: rank {rank} of {world} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let report: serde_json::Value =
        serde_json::from_slice(&outputs[0].stdout).context("bench distributed: rank 0 printed no swav-step JSON")?;
    let field = |v: &serde_json::Value, what: &str| {
        v.as_f64()
            .with_context(|| format!("bench distributed: rank 0's report lacks `{what}`"))
    };
    ensure!(
        report["world_size"].as_u64() == Some(world as u64),
        "bench distributed: rank 0 ran in a world of {}, not {world}",
        report["world_size"]
    );
    Ok((
        field(&report["ms_per_step"], "ms_per_step")?,
        field(&report["phases_ms"]["allreduce"], "phases_ms.allreduce")?,
    ))
}

pub fn run(bench: &DistributedBench) -> Result<DistributedReport> {
    ensure!(bench.world >= 2, "--world must be at least 2, got {}", bench.world);
    ensure!(
        bench.batch >= 2 * bench.world as i64 && bench.batch % bench.world as i64 == 0,
        "--batch {} must split into {} per-process batches of at least 2 (batch norm)",
        bench.batch,
        bench.world
    );
    ensure!(
        bench.pairs >= 1 && bench.steps >= 1,
        "--pairs and --steps must be at least 1"
    );
    let (mut single, mut parallel, mut allreduce) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..bench.pairs {
        let (ms, _) = measure(bench, 1)?;
        single.push(ms);
        let (ms, reduce) = measure(bench, bench.world)?;
        parallel.push(ms);
        allreduce.push(reduce);
        tracing::info!(
            "pair {}: one process {:.0} ms, {} processes {:.0} ms (all-reduce {reduce:.0} ms)",
            pair + 1,
            single[pair],
            bench.world,
            ms
        );
    }
    let side = |world: usize, runs: Vec<f64>, allreduce: &mut [f64]| {
        let ms = summarise(&mut runs.clone()).0;
        Side {
            world_size: world,
            threads_per_process: (bench.threads / world).max(1),
            batch_per_process: bench.batch / world as i64,
            ms_per_step: ms,
            samples_per_s: bench.batch as f64 / (ms / 1e3),
            allreduce_ms: summarise(allreduce).0,
            runs_ms: runs,
        }
    };
    let single = side(1, single, &mut [0.0]);
    let parallel = side(bench.world, parallel, &mut allreduce);
    Ok(DistributedReport {
        workload: "swav-step",
        global_batch: bench.batch,
        speedup: parallel.samples_per_s / single.samples_per_s,
        allreduce_fraction: parallel.allreduce_ms / parallel.ms_per_step,
        single,
        parallel,
        pairs: bench.pairs,
        steps: bench.steps,
        warmup: bench.warmup,
    })
}
