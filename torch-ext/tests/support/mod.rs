//! Runs one test as several ranks: the test binary re-runs itself, once per rank, with only
//! that test selected and the rank in its environment.
//!
//! In the parent, [`run_ranks`] spawns the children and waits for them (killing them past a
//! deadline); in a child, it runs the test's body for its rank and leaves a marker file when
//! the body returns. The parent requires the marker, so a child that selected no test (a
//! misspelt name) cannot pass silently.

#![allow(dead_code)] // each test file uses its own part of this module

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const RANK: &str = "MEDSSL_TORCH_EXT_TEST_RANK";
const WORLD: &str = "MEDSSL_TORCH_EXT_TEST_WORLD";
const DIR: &str = "MEDSSL_TORCH_EXT_TEST_DIR";
const PORT: &str = "MEDSSL_TORCH_EXT_TEST_PORT";

/// Multi-process tests run one at a time: the machine may have two cores, and the timing
/// test should not share them.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What a child sees.
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    /// A temp dir shared by all ranks of this run (FileStore, result files).
    pub dir: PathBuf,
    /// A port that was free when the parent looked (for rank 0's TCPStore server), or the
    /// port of a store the parent serves.
    pub port: u16,
}

/// How one child ended.
pub struct Outcome {
    pub status: ExitStatus,
    /// Whether the body returned (the child then left its marker).
    pub finished: bool,
    pub log: String,
}

/// What the parent got back from all ranks.
pub struct Run {
    pub outcomes: Vec<Outcome>,
    pub dir: tempfile::TempDir,
}

impl Run {
    /// Panics, with every rank's output, unless every rank finished and exited 0.
    pub fn assert_all_finished(&self) {
        if self.outcomes.iter().all(|o| o.finished && o.status.success()) {
            return;
        }
        panic!("some rank failed:\n{}", self.report());
    }

    pub fn report(&self) -> String {
        let mut text = String::new();
        for (rank, o) in self.outcomes.iter().enumerate() {
            text.push_str(&format!(
                "--- rank {rank}: {}, finished: {}\n{}\n",
                o.status, o.finished, o.log
            ));
        }
        text
    }
}

/// In a child started by [`run_ranks`]: its rank. `None` in the parent.
pub fn this_rank() -> Option<Rank> {
    let rank = std::env::var(RANK).ok()?.parse().expect("rank");
    Some(Rank {
        rank,
        world: std::env::var(WORLD).expect("world").parse().expect("world"),
        dir: PathBuf::from(std::env::var(DIR).expect("dir")),
        port: std::env::var(PORT).expect("port").parse().expect("port"),
    })
}

/// A port free at the moment of asking (the OS picks it; the listener is closed again).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Runs `body` as `world` ranks of test `test` (its exact name, as libtest knows it).
/// In a child this runs the body for the child's rank and returns `None`; in the parent it
/// returns every rank's outcome. `port` is handed to the children (see [`Rank::port`]).
pub fn run_ranks(test: &str, world: usize, port: u16, deadline: Duration, body: impl FnOnce(&Rank)) -> Option<Run> {
    if let Some(rank) = this_rank() {
        body(&rank);
        std::fs::write(marker(&rank.dir, rank.rank), test).expect("write marker");
        return None;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("test binary");
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            let log = std::fs::File::create(log_path(dir.path(), rank)).expect("log file");
            Command::new(&exe)
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env(RANK, rank.to_string())
                .env(WORLD, world.to_string())
                .env(DIR, dir.path())
                .env(PORT, port.to_string())
                .env("OMP_NUM_THREADS", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    let start = Instant::now();
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; world];
    while statuses.iter().any(Option::is_none) {
        for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = child.try_wait().expect("wait for rank");
            }
        }
        if start.elapsed() > deadline {
            for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
                if status.is_none() {
                    child.kill().expect("kill rank");
                    *status = Some(child.wait().expect("reap rank"));
                }
            }
            let logs: Vec<String> = (0..world).map(|r| read(&log_path(dir.path(), r))).collect();
            panic!(
                "{test}: ranks still running after {deadline:?}, killed:\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let outcomes = statuses
        .into_iter()
        .enumerate()
        .map(|(rank, status)| Outcome {
            status: status.expect("every rank ended"),
            finished: std::fs::read_to_string(marker(dir.path(), rank)).is_ok_and(|name| name == test),
            log: read(&log_path(dir.path(), rank)),
        })
        .collect();
    Some(Run { outcomes, dir })
}

fn marker(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank{rank}.finished"))
}

fn log_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank{rank}.log"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<no log: {e}>"))
}
