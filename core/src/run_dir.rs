//! The folders medssl writes into (pre-training run directories, fine-tuning outputs): what
//! makes a folder one of them, creating one afresh, and the lock that keeps one process at
//! a time in it.
//!
//! `--force` replaces only a folder that is recognisably medssl's, so a data folder given
//! by mistake is refused, never deleted. The lock is an advisory exclusive lock on
//! `DIR/.lock` (`flock`, through the standard library), held for the writer's whole life
//! and released by the kernel when the process ends, however it ends; the file holds the
//! holder's pid for the refusal message.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// What medssl writes at the start of every run directory and fine-tuning output.
const CONFIG_FILE: &str = "config.toml";
/// What it writes soon after: one of these sits beside `config.toml`.
const PRODUCTS: [&str; 3] = ["checkpoints", "metrics.jsonl", "weights"];

/// Whether `dir` is recognisably a folder medssl wrote: its `config.toml` beside
/// `checkpoints/`, `metrics.jsonl` or `weights/`.
pub fn is_medssl_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() && PRODUCTS.iter().any(|p| dir.join(p).exists())
}

/// Exclusive use of a run directory while the value lives.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `dir` (which must exist), or refuses with the holder's pid.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file `{}`", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another medssl process".to_string()
                } else {
                    format!("another medssl process (pid {holder})")
                };
                bail!(
                    "`{}` is in use by {who}: one process at a time may write a run directory; wait for it to end or stop it",
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock `{}`", path.display()));
            }
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| write!(file, "{}", std::process::id()))
            .and_then(|_| file.flush())
            .with_context(|| format!("cannot write the lock file `{}`", path.display()))?;
        Ok(RunLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` afresh and locks it. An existing non-empty folder is refused unless
/// `force`, which replaces it only if it is medssl's ([`is_medssl_dir`]) and no process
/// holds it. `keep_it` says how to continue an existing one, for the refusal message.
pub fn create(dir: &Path, force: bool, keep_it: &str) -> Result<RunLock> {
    if dir.exists() || dir.is_symlink() {
        if !dir.is_dir() {
            bail!(
                "`{}` exists and is not a folder: choose another output folder",
                dir.display()
            );
        }
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read `{}`", dir.display()))?
            .next()
            .is_none();
        if !empty {
            if !force {
                bail!(
                    "`{}` already exists; {keep_it}, or --force to replace it",
                    dir.display()
                );
            }
            if !is_medssl_dir(dir) {
                bail!(
                    "refusing to replace `{}` with --force: it is not a medssl run directory (no {CONFIG_FILE} beside {}); remove it yourself or choose another folder",
                    dir.display(),
                    PRODUCTS.join(", ")
                );
            }
            // A live run keeps its folder: the holder is named and nothing is removed.
            let live = RunLock::acquire(dir)?;
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear `{}`", dir.display()))?;
            drop(live);
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    RunLock::acquire(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_and_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(tmp.path()).unwrap();
        let err = RunLock::acquire(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("in use"),
            "{err}"
        );
        drop(lock);
        RunLock::acquire(tmp.path()).unwrap();
    }

    #[test]
    fn force_replaces_only_a_medssl_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("scan.nii"), b"x").unwrap();
        let err = create(&data, true, "resume it").unwrap_err().to_string();
        assert!(err.contains("not a medssl run directory"), "{err}");
        assert!(data.join("scan.nii").exists());
        let err = create(&data, false, "resume it").unwrap_err().to_string();
        assert!(err.contains("already exists") && err.contains("resume it"), "{err}");

        let run = tmp.path().join("run");
        std::fs::create_dir_all(run.join("checkpoints")).unwrap();
        std::fs::write(run.join("config.toml"), b"").unwrap();
        std::fs::write(run.join("old"), b"").unwrap();
        let held = RunLock::acquire(&run).unwrap();
        let err = create(&run, true, "resume it").unwrap_err().to_string();
        assert!(err.contains("in use"), "{err}");
        assert!(run.join("old").exists(), "a live run was cleared");
        drop(held);
        let _lock = create(&run, true, "resume it").unwrap();
        assert!(!run.join("old").exists());
        assert!(run.join(LOCK_FILE).exists());
    }
}
