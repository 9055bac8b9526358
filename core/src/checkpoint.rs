//! Checkpoints: tensors in safetensors, everything else in a small JSON file beside them.
//!
//! A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding `tensors.safetensors` and
//! `state.json`. It is written under a temporary name, each file fsynced, then renamed into
//! place, and only then does `checkpoints/latest` (itself replaced by rename) point at it.
//! A crash at any moment leaves the previous checkpoint intact and `latest` naming a
//! complete one. Non-finite tensors are refused before anything is written, so a diverged
//! run never replaces a good checkpoint.

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Format version of `state.json`.
pub const FORMAT: u32 = 1;

/// The non-tensor part of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainingState {
    pub format: u32,
    /// Index of the stage in progress (or the next one, when a stage just ended).
    pub stage: usize,
    /// Optimizer steps completed within that stage; epoch and batch follow from it.
    pub stage_step: usize,
    /// Steps completed over the whole run.
    pub global_step: usize,
    /// Optimizer updates applied (Adam's bias correction).
    pub optimizer_steps: i64,
    /// Each objective's non-tensor state, by objective key.
    pub objectives: BTreeMap<String, serde_json::Value>,
    /// Fingerprint of the parts of the config that shape the model, to refuse a
    /// checkpoint from another architecture with a clear message.
    pub model_fingerprint: String,
    /// The resolved config the run was trained with, so that `resume` can refuse a
    /// `config.toml` edited since (absent in checkpoints written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Processes that trained the run (data-parallel ranks); 1 in checkpoints from before.
    #[serde(default = "one")]
    pub world_size: usize,
    /// `global_step` minus the steps that `stage` and `stage_step` make at `world_size`: 0
    /// unless the run was resumed on another world size, after which the global step goes
    /// on counting the steps actually taken (the log stays in order).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub global_step_offset: i64,
    /// The loss scaler's scale and clean-step count, in runs that scale their loss (fp16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::loss_scaling::LossScaler>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn one() -> usize {
    1
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot store tensors of kind {other:?} in safetensors"),
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

/// Raw little-endian bytes of a tensor (moved to the CPU, made contiguous).
fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let t = tensor.detach().to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(bytes)
}

/// Writes `tensors` to a safetensors file at `path` (not atomically: callers write into a
/// temporary folder). Used for checkpoints and exported weights.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_synced(path, &serialize_tensors(tensors)?)
}

/// [`write_safetensors`] to a file that is replaced atomically ([`write_atomic`]): a crash
/// leaves the old file or the new one, never half of one.
pub fn write_safetensors_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_safetensors_atomic_with(path, tensors, &Metadata::new())
}

/// A safetensors header's `__metadata__`: strings by string (what Python's
/// `safe_open(...).metadata()` returns).
pub type Metadata = BTreeMap<String, String>;

/// [`write_safetensors_atomic`] with `metadata` in the file's header (none when empty).
pub fn write_safetensors_atomic_with(path: &Path, tensors: &[(String, Tensor)], metadata: &Metadata) -> Result<()> {
    let bytes = serialize_tensors(tensors)?;
    let bytes = match metadata.is_empty() {
        true => bytes,
        false => with_metadata(&bytes, metadata)?,
    };
    write_atomic(path, &bytes)
}

/// A serialised safetensors file with `metadata` in its header. safetensors' serialiser
/// takes the metadata as a `HashMap`, whose order changes from process to process; written
/// here in key order, the same tensors and metadata always give the same bytes.
fn with_metadata(bytes: &[u8], metadata: &Metadata) -> Result<Vec<u8>> {
    let length = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let (header, data) = bytes[8..].split_at(length);
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)?;
    header.insert("__metadata__".to_string(), serde_json::to_value(metadata)?);
    let mut header = serde_json::to_vec(&header)?;
    // The format pads the header with spaces to a multiple of 8 bytes, so the data stays aligned.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend((header.len() as u64).to_le_bytes());
    out.extend(header);
    out.extend(data);
    Ok(out)
}

fn serialize_tensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        owned.push((
            name.clone(),
            dtype_of(t.kind())?,
            t.size().iter().map(|&d| d as usize).collect::<Vec<_>>(),
            tensor_bytes(t)?,
        ));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Reads every tensor of a safetensors file onto the CPU. A truncated or corrupt file is an
/// error naming it.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(read_safetensors_with_metadata(path)?.0)
}

/// [`read_safetensors`] and the header's metadata (empty where it has none).
pub fn read_safetensors_with_metadata(path: &Path) -> Result<(Vec<(String, Tensor)>, Metadata)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let invalid = |e: safetensors::SafeTensorError| {
        anyhow!(
            "`{}` is not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    };
    let parsed = SafeTensors::deserialize(&bytes).map_err(invalid)?;
    let metadata: Metadata = SafeTensors::read_metadata(&bytes)
        .map_err(invalid)?
        .1
        .metadata()
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut out = Vec::new();
    for (name, view) in parsed.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)
            .with_context(|| format!("`{}`: tensor `{name}`", path.display()))?;
        out.push((name, tensor));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, metadata))
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("cannot create `{}`", path.display()))?;
    file.write_all(data)
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot sync `{}`", path.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync folder `{}`", dir.display()))
}

/// Replaces `path` with `data` atomically (temporary file, fsync, rename, fsync folder).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    // A bare file name's parent is "", which cannot be opened to sync: the working folder.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    write_synced(&tmp, data)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move `{}` into place", path.display()))?;
    sync_dir(dir)
}

/// The crash-resume tests' injected failure (the variable is outside the `MEDSSL_` prefix,
/// which belongs to config layers): with `INJECT_MEDSSL_ABORT=POINT:N` the process
/// aborts (no unwinding, no destructors, as a `kill -9`) at that point of global step N:
/// `step` right after the step's update, before its checkpoint; `checkpoint` inside its
/// checkpoint, written under the temporary name and not yet renamed. Unset in normal use.
pub fn abort_if_asked(point: &str, global_step: usize) {
    if std::env::var("INJECT_MEDSSL_ABORT").is_ok_and(|at| at == format!("{point}:{global_step}")) {
        eprintln!("INJECT_MEDSSL_ABORT: aborting at {point} {global_step}");
        std::process::abort();
    }
}

/// A checkpoint folder's tensors and its position in the run.
pub const TENSORS_FILE: &str = "tensors.safetensors";
pub const STATE_FILE: &str = "state.json";
/// The file in the checkpoints folder naming the latest checkpoint.
pub const LATEST_FILE: &str = "latest";

/// Whether `name` is a checkpoint folder's name: `step-` and at least 8 digits.
fn is_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("step-")
        .is_some_and(|digits| digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The checkpoint folder of a run.
pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

impl Checkpoints {
    pub fn new(dir: PathBuf, keep: usize) -> Self {
        Checkpoints { dir, keep: keep.max(1) }
    }

    /// Writes a checkpoint for `state` and makes it the latest. Refuses non-finite tensors
    /// without touching anything on disk.
    pub fn save(&self, tensors: &[(String, Tensor)], state: &TrainingState) -> Result<PathBuf> {
        self.save_at(state.global_step, tensors, state)
    }

    /// [`Checkpoints::save`] of any serialisable state (the fine-tune's progress), in the
    /// folder of `global_step`.
    pub fn save_at<S: Serialize>(
        &self,
        global_step: usize,
        tensors: &[(String, Tensor)],
        state: &S,
    ) -> Result<PathBuf> {
        for (name, t) in tensors {
            if t.is_floating_point() && !bool::try_from(t.isfinite().all())? {
                bail!("refusing to checkpoint: tensor `{name}` has NaN or infinite values; the last good checkpoint is kept");
            }
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create `{}`", self.dir.display()))?;
        let name = format!("step-{global_step:08}");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp)?;
        write_safetensors(&tmp.join(TENSORS_FILE), tensors)?;
        write_synced(&tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())?;
        sync_dir(&tmp)?;
        abort_if_asked("checkpoint", global_step);
        let target = self.dir.join(&name);
        if target.exists() {
            std::fs::remove_dir_all(&target)?;
        }
        std::fs::rename(&tmp, &target)?;
        sync_dir(&self.dir)?;
        write_atomic(&self.dir.join(LATEST_FILE), name.as_bytes())?;
        self.prune(&name)?;
        Ok(target)
    }

    /// Removes all but the newest `keep` checkpoints (never the latest).
    fn prune(&self, latest: &str) -> Result<()> {
        let names = self.checkpoint_names()?;
        let excess = names.len().saturating_sub(self.keep);
        for name in names.into_iter().take(excess).filter(|n| n != latest) {
            std::fs::remove_dir_all(self.dir.join(name))?;
        }
        Ok(())
    }

    /// The latest complete checkpoint, if any: the one `latest` names, or, where `latest`
    /// is missing or names a folder that is gone (a kill between a checkpoint's rename and
    /// the pointer's update), the newest `step-*` folder, with a warning. Every `step-*`
    /// folder is complete: checkpoints are written under a temporary name and renamed. A
    /// pointer naming anything but a `step-NNNNNNNN` folder of this directory (`../../x`)
    /// is refused.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let pointer = self.dir.join(LATEST_FILE);
        if pointer.exists() {
            let text =
                std::fs::read_to_string(&pointer).with_context(|| format!("cannot read `{}`", pointer.display()))?;
            let name = text.trim();
            if !is_checkpoint_name(name) {
                bail!(
                    "`{}` names `{name}`, which is not a checkpoint of this folder (expected `step-` and 8 digits): the file was edited or is corrupt",
                    pointer.display()
                );
            }
            let path = self.dir.join(name);
            if path.is_dir() {
                return Ok(Some(path));
            }
            let newest = self.newest()?;
            match &newest {
                Some(found) => tracing::warn!(
                    "`{}` names `{name}`, which does not exist: using the newest complete checkpoint, `{}`",
                    pointer.display(),
                    found.display()
                ),
                None => bail!(
                    "`{}` names `{name}`, which does not exist, and no other checkpoint is left",
                    pointer.display()
                ),
            }
            return Ok(newest);
        }
        let newest = self.newest()?;
        if let Some(found) = &newest {
            tracing::warn!(
                "`{}` is missing: using the newest complete checkpoint, `{}`",
                pointer.display(),
                found.display()
            );
        }
        Ok(newest)
    }

    /// The newest `step-*` folder, if any.
    fn newest(&self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoint_names()?.pop().map(|n| self.dir.join(n)))
    }

    /// The names of the `step-*` folders, oldest (lowest step) first.
    fn checkpoint_names(&self) -> Result<Vec<String>> {
        if !self.dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot read `{}`", self.dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_checkpoint_name(n) && self.dir.join(n).is_dir())
            .collect();
        names.sort_by_key(|n| n["step-".len()..].parse::<u64>().unwrap_or(0));
        Ok(names)
    }
}

/// Loads a checkpoint folder (`run_dir::locate` finds a run directory's latest one).
pub fn load(dir: &Path) -> Result<(Vec<(String, Tensor)>, TrainingState)> {
    let (tensors, state): (_, TrainingState) = load_with(dir)?;
    if state.format != FORMAT {
        bail!(
            "checkpoint `{}` has format {}, this medssl reads format {FORMAT}",
            dir.display(),
            state.format
        );
    }
    Ok((tensors, state))
}

/// Loads a checkpoint folder whose `state.json` is an `S` (checking its format is the
/// caller's).
pub fn load_with<S: DeserializeOwned>(dir: &Path) -> Result<(Vec<(String, Tensor)>, S)> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "`{}` is not a checkpoint: cannot read `{}`",
            dir.display(),
            state_path.display()
        )
    })?;
    let state: S = serde_json::from_str(&text)
        .map_err(|e| anyhow!("checkpoint state `{}` is corrupt: {e}", state_path.display()))?;
    let tensors = read_safetensors(&dir.join(TENSORS_FILE))?;
    Ok((tensors, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainingState {
        TrainingState {
            format: FORMAT,
            stage: 0,
            stage_step: step,
            global_step: step,
            optimizer_steps: step as i64,
            objectives: BTreeMap::from([("x".to_string(), serde_json::json!({"k": 1}))]),
            model_fingerprint: "abc".into(),
            config: None,
            world_size: 1,
            global_step_offset: 0,
            loss_scaler: None,
        }
    }

    #[test]
    fn round_trip_keeps_every_tensor_and_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Checkpoints::new(dir.path().join("checkpoints"), 2);
        let tensors = vec![
            ("a".to_string(), Tensor::randn([3, 4], (Kind::Float, Device::Cpu))),
            ("b".to_string(), Tensor::from_slice(&[1i64, 2, 3])),
            ("c".to_string(), Tensor::from_slice(&[true, false])),
        ];
        store.save(&tensors, &state(5)).unwrap();
        let (loaded, st) = load(&store.latest().unwrap().unwrap()).unwrap();
        assert_eq!(st, state(5));
        for ((n1, t1), (n2, t2)) in tensors.iter().zip(&loaded) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{n1}");
        }
    }

    #[test]
    fn only_the_newest_are_kept_and_a_nan_never_replaces_a_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Checkpoints::new(dir.path().join("checkpoints"), 2);
        let good = vec![("w".to_string(), Tensor::ones([2], (Kind::Float, Device::Cpu)))];
        for step in 1..=3 {
            store.save(&good, &state(step)).unwrap();
        }
        let bad = vec![("w".to_string(), Tensor::from_slice(&[f32::NAN, 1.0]))];
        let err = store.save(&bad, &state(4)).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("NaN"), "{err}");
        assert_eq!(store.latest().unwrap().unwrap().file_name().unwrap(), "step-00000003");
        let kept: Vec<_> = std::fs::read_dir(dir.path().join("checkpoints"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(kept.len(), 3, "two checkpoints and the latest pointer: {kept:?}");
    }

    #[test]
    fn metadata_reads_back_and_the_same_input_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![
            ("a".to_string(), Tensor::randn([3, 5], (Kind::Float, Device::Cpu))),
            ("b".to_string(), Tensor::from_slice(&[1i64, 2])),
        ];
        let metadata: Metadata = (0..20).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let (first, second) = (dir.path().join("1.safetensors"), dir.path().join("2.safetensors"));
        write_safetensors_atomic_with(&first, &tensors, &metadata).unwrap();
        write_safetensors_atomic_with(&second, &tensors, &metadata).unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap());
        let (read, read_metadata) = read_safetensors_with_metadata(&first).unwrap();
        assert_eq!(read_metadata, metadata);
        for ((n1, t1), (n2, t2)) in tensors.iter().zip(&read) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{n1}");
        }
        let bytes = std::fs::read(&first).unwrap();
        let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(length % 8, 0, "the header keeps the data 8-byte aligned");
        let plain = dir.path().join("3.safetensors");
        write_safetensors_atomic(&plain, &tensors).unwrap();
        assert!(read_safetensors_with_metadata(&plain).unwrap().1.is_empty());
    }

    #[test]
    fn truncated_or_corrupt_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Checkpoints::new(dir.path().join("checkpoints"), 2);
        let path = store
            .save(
                &[("w".to_string(), Tensor::ones([64], (Kind::Float, Device::Cpu)))],
                &state(1),
            )
            .unwrap();
        let file = path.join("tensors.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(
            err.contains("tensors.safetensors") && err.contains("truncated or corrupt"),
            "{err}"
        );
        std::fs::write(path.join("state.json"), "{ not json").unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("state.json") && err.contains("corrupt"), "{err}");
    }
}
