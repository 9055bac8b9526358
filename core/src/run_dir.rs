//! The folders medssl writes into (pre-training run directories, fine-tuning outputs): the
//! names of their files, what makes a folder one of them, creating one afresh, the lock that
//! keeps one process at a time in it, finding a run's checkpoint and config, and loading
//! named tensors strictly.
//!
//! `--force` replaces only a folder that is recognisably medssl's, so a data folder given
//! by mistake is refused, never deleted. The lock is an advisory exclusive lock on
//! `DIR/.lock` (`flock`, through the standard library), held for the writer's whole life
//! and released by the kernel when the process ends, however it ends; the file holds the
//! holder's pid for the refusal message.

use crate::checkpoint::Checkpoints;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The resolved config, written before anything else (pre-training and fine-tuning).
pub const CONFIG_FILE: &str = "config.toml";
/// One JSON record a logged step.
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.png";
pub const REPORT_FILE: &str = "report.md";
/// Pre-training checkpoints: `checkpoints/step-NNNNNNNN/` and the `latest` pointer.
pub const CHECKPOINT_DIR: &str = "checkpoints";
pub use crate::checkpoint::{LATEST_FILE, STATE_FILE, TENSORS_FILE};
/// Fine-tuned weights.
pub const WEIGHTS_DIR: &str = "weights";
/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// What medssl writes soon after `config.toml`: one of these sits beside it.
const PRODUCTS: [&str; 3] = [CHECKPOINT_DIR, METRICS_FILE, WEIGHTS_DIR];

/// Whether `dir` is recognisably a folder medssl wrote: its `config.toml` beside
/// `checkpoints/`, `metrics.jsonl` or `weights/`.
pub fn is_medssl_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() && PRODUCTS.iter().any(|p| dir.join(p).exists())
}

/// Exclusive use of a run directory while the value lives.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
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
        Ok(RunLock { _file: file })
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

/// Where a run's checkpoint and config are.
#[derive(Debug, Clone)]
pub struct RunCheckpoint {
    pub config: PathBuf,
    pub tensors: PathBuf,
    /// The checkpoint's global step, where its `state.json` says.
    pub step: Option<usize>,
}

/// Finds the tensors and the config of `path`: a run directory (its latest checkpoint), a
/// checkpoint folder, or a `tensors.safetensors` file.
pub fn locate(path: &Path, config: Option<&Path>) -> Result<RunCheckpoint> {
    let (folder, tensors) = if path.is_file() {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        )
    } else if path.join(CHECKPOINT_DIR).is_dir() {
        let latest = Checkpoints::new(path.join(CHECKPOINT_DIR), 1)
            .latest()?
            .ok_or_else(|| anyhow!("run directory `{}` has no checkpoint yet", path.display()))?;
        let tensors = latest.join(TENSORS_FILE);
        (latest, tensors)
    } else if path.join(TENSORS_FILE).is_file() {
        (path.to_path_buf(), path.join(TENSORS_FILE))
    } else if !path.exists() {
        bail!("`{}` does not exist", path.display());
    } else {
        bail!(
            "`{}` is neither a run directory (with `{CONFIG_FILE}` and `{CHECKPOINT_DIR}/`), a checkpoint folder (`{CHECKPOINT_DIR}/step-N/` with `{TENSORS_FILE}`) nor a `.safetensors` file",
            path.display()
        );
    };
    let config = match config {
        Some(config) => config.to_path_buf(),
        None if path.join(CHECKPOINT_DIR).is_dir() => path.join(CONFIG_FILE),
        // checkpoints/step-N/ lies two folders below the run directory.
        None => folder
            .parent()
            .and_then(Path::parent)
            .map(|run| run.join(CONFIG_FILE))
            .filter(|c| c.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "cannot find the run's `{CONFIG_FILE}` for checkpoint `{}` (looked two folders up); pass --config",
                    path.display()
                )
            })?,
    };
    let step = std::fs::read_to_string(folder.join(STATE_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|state| state.get("global_step")?.as_u64())
        .map(|s| s as usize);
    Ok(RunCheckpoint { config, tensors, step })
}

/// Copies stored tensors into `variables` by name, strictly: each variable `name` takes the
/// stored tensor `{prefix}{name}`, which must be there with its shape, and every stored tensor
/// under `prefix` (and, where `groups` is not empty, under one of `groups` after it) must be
/// one of the variables. The first tensor that breaks this is the error, naming `source`:
/// a checkpoint of another architecture is refused rather than half loaded.
pub fn load_variables(
    variables: &[(String, Tensor)],
    stored: &[(String, Tensor)],
    prefix: &str,
    groups: &[&str],
    source: &Path,
) -> Result<()> {
    let stored: HashMap<&str, &Tensor> = stored
        .iter()
        .filter_map(|(name, t)| {
            let name = name.strip_prefix(prefix)?;
            (groups.is_empty() || groups.iter().any(|g| name.starts_with(g))).then_some((name, t))
        })
        .collect();
    let mut variables: Vec<&(String, Tensor)> = variables.iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, variable) in &variables {
        let Some(found) = stored.get(name.as_str()) else {
            bail!(
                "checkpoint `{}` has no tensor `{prefix}{name}` (shape {:?}), which the config builds: the checkpoint is from another architecture (an incompatible config)",
                source.display(),
                variable.size()
            );
        };
        ensure!(
            found.size() == variable.size(),
            "checkpoint tensor `{prefix}{name}` in `{}` has shape {:?}, but the config builds {:?}: the checkpoint is from another architecture (an incompatible config)",
            source.display(),
            found.size(),
            variable.size()
        );
    }
    let known: BTreeSet<&str> = variables.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&&str> = stored.keys().filter(|n| !known.contains(**n)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        bail!(
            "checkpoint tensor `{prefix}{name}` (shape {:?}) in `{}` has no counterpart in the model built from the config: the checkpoint is from another architecture (an incompatible config)",
            stored[**name].size(),
            source.display()
        );
    }
    tch::no_grad(|| {
        for (name, variable) in &variables {
            let mut target = variable.shallow_clone();
            target.copy_(stored[name.as_str()]);
        }
    });
    Ok(())
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

    #[test]
    fn locate_names_what_it_expected() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("neither a run directory"), "{err}");
        let err = locate(&dir.path().join("absent"), None).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::create_dir_all(dir.path().join("run/checkpoints")).unwrap();
        let err = locate(&dir.path().join("run"), None).unwrap_err().to_string();
        assert!(err.contains("no checkpoint yet"), "{err}");
        let tensors = dir.path().join("loose.safetensors");
        std::fs::write(&tensors, b"").unwrap();
        let err = locate(&tensors, None).unwrap_err().to_string();
        assert!(err.contains("--config"), "{err}");
    }
}
