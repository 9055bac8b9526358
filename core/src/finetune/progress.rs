//! Where an interrupted fine-tune stands, so that `medssl finetune ... --resume` continues it
//! exactly: the same losses at every epoch, the same weights and the same report as a
//! fine-tune that never stopped.
//!
//! A fine-tune is a sequence of trials (repeat 0 pretrained, repeat 0 scratch, repeat 1
//! pretrained, ...), each trained for `train.epochs` epochs. After every epoch but a trial's
//! last, a checkpoint (`checkpoints/step-N/`, written as pre-training's are: temporary name,
//! fsync, rename, `latest`) holds the trial's network and optimizer state with this
//! progress; when a trial ends, its weights go to `weights/` and a checkpoint without tensors
//! records it as finished. A trial's randomness is drawn from (seed, epoch, step) alone, so
//! an epoch restarted from its checkpoint draws what it drew before.

use super::report::{Curve, Trial};
use super::Init;
use crate::checkpoint::{self, Checkpoints};
use crate::run_dir::CHECKPOINT_DIR;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

/// Format version of a fine-tune's `state.json`.
pub const FORMAT: u32 = 1;

/// Checkpoint tensor prefixes: the network's variables and the optimizer's state.
pub const MODEL_PREFIX: &str = "model.";
pub const OPTIMIZER_PREFIX: &str = "optim.";

/// A trial that ended, with its learning curve (which the report's JSON leaves out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishedTrial {
    pub trial: Trial,
    pub curve: Curve,
}

/// The trial in progress at a checkpoint, after `epochs_done` epochs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialProgress {
    pub init: Init,
    pub run: usize,
    pub epochs_done: usize,
    /// The trial's optimizer steps so far (its learning-rate schedule's position).
    pub step: usize,
    pub optimizer_steps: i64,
    /// The trial's loss scaler (fp16), so that a resumed trial skips and scales as the
    /// uninterrupted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::loss_scaling::LossScaler>,
    /// The scores of the last evaluation, if any.
    pub scores: BTreeMap<String, f64>,
    pub curve: Curve,
    /// Training time so far, summed over the processes that trained it.
    pub seconds: f64,
}

/// A fine-tune's `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub format: u32,
    /// The resolved config the fine-tune was started with (`--resume` refuses another).
    pub config: String,
    pub finished: Vec<FinishedTrial>,
    pub current: Option<TrialProgress>,
    /// Records in `metrics.jsonl` at this checkpoint; those after it are dropped on resume.
    pub records: usize,
    /// Optimizer steps over all trials: the checkpoint folder's number.
    pub global_step: usize,
}

impl Progress {
    pub fn new(config: String) -> Progress {
        Progress {
            format: FORMAT,
            config,
            finished: Vec::new(),
            current: None,
            records: 0,
            global_step: 0,
        }
    }
}

/// A fine-tune's checkpoint: its progress and the tensors of the trial in progress (none at a
/// trial boundary).
pub struct Checkpoint {
    pub progress: Progress,
    pub tensors: Vec<(String, Tensor)>,
}

/// The checkpoints of fine-tuning directory `out`.
pub fn checkpoints(out: &Path) -> Checkpoints {
    Checkpoints::new(out.join(CHECKPOINT_DIR), 1)
}

/// The latest progress of `out` and its tensors, if a checkpoint was written. A state from
/// another format, or one that does not fit the config (a trial past its epochs, finished
/// trials out of order), is refused naming the file.
pub fn latest(out: &Path, epochs: usize, trials: usize) -> Result<Option<Checkpoint>> {
    let Some(dir) = checkpoints(out).latest()? else {
        return Ok(None);
    };
    let (tensors, progress): (_, Progress) = checkpoint::load_with(&dir)?;
    let file = dir.join(checkpoint::STATE_FILE);
    if progress.format != FORMAT {
        bail!(
            "`{}` has format {}, this medssl reads fine-tune format {FORMAT}",
            file.display(),
            progress.format
        );
    }
    let order = |index: usize| {
        (
            index / 2,
            if index.is_multiple_of(2) {
                Init::Pretrained
            } else {
                Init::Scratch
            },
        )
    };
    for (index, finished) in progress.finished.iter().enumerate() {
        if (finished.trial.run, finished.trial.init) != order(index) {
            bail!(
                "`{}` lists finished trial {index} as repeat {} {}, expected repeat {} {}: the file was edited or is corrupt",
                file.display(),
                finished.trial.run,
                finished.trial.init.name(),
                order(index).0,
                order(index).1.name()
            );
        }
    }
    if progress.finished.len() > trials {
        bail!(
            "`{}` lists {} finished trials, but the config asks for {trials}: the file was edited or is corrupt",
            file.display(),
            progress.finished.len()
        );
    }
    if let Some(current) = &progress.current {
        if (current.run, current.init) != order(progress.finished.len()) || current.epochs_done >= epochs {
            bail!(
                "`{}` has repeat {} {} after {} of {epochs} epochs in progress, which does not follow its {} finished trials: the file was edited or is corrupt",
                file.display(),
                current.run,
                current.init.name(),
                current.epochs_done,
                progress.finished.len()
            );
        }
    }
    Ok(Some(Checkpoint { progress, tensors }))
}
