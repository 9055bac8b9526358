//! Starting an encoder from weights trained elsewhere: `encoder.init = "FILE.safetensors"`,
//! a file whose tensor names are the encoder's own parameter names (a torchvision ResNet's
//! `state_dict`, a MONAI ViT's, or what `medssl export` wrote), loaded before training.
//!
//! The load is strict by default, as PyTorch's `load_state_dict(strict=True)`: every encoder
//! variable must be in the file with its shape, and every tensor of the file must be a
//! variable; a mismatch is an error listing the missing and the unexpected names. With
//! `init_strict = false` the names both sides share are loaded (shapes still checked) and
//! the rest is listed in a warning. `init_prefix` selects a sub-tree of the file, e.g.
//! `"vit."` for a MONAI UNETR checkpoint, whose ViT lives under `vit.`.
//!
//! Where medssl differs on purpose: `num_batches_tracked` tensors (PyTorch batch norm's
//! step counter, which only matters with `momentum = None`, never used here) are skipped
//! instead of counted as unexpected, so a torchvision file loads strictly.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The `[encoder]` keys that core reads beside the encoder's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderInit {
    /// A safetensors file of the encoder's parameter names to start from.
    pub init: Option<PathBuf>,
    /// Only the file's tensors under this prefix, with it removed (e.g. `"vit."`).
    pub init_prefix: String,
    /// Refuse a file that lacks a variable or holds a tensor the encoder lacks.
    #[serde(default = "strict_by_default")]
    pub init_strict: bool,
}

fn strict_by_default() -> bool {
    true
}

/// Core's keys in the `[encoder]` section (split off before the encoder parses the rest).
pub const INIT_KEYS: [&str; 3] = ["init", "init_prefix", "init_strict"];

/// Buffers of PyTorch modules that medssl's modules do not keep.
const FOREIGN_BUFFERS: [&str; 1] = ["num_batches_tracked"];

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub loaded: usize,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
}

/// Names, at most `shown` of them, and how many more.
fn listed(names: &[String], shown: usize) -> String {
    let mut text = names.iter().take(shown).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > shown {
        text.push_str(&format!(" and {} more", names.len() - shown));
    }
    text
}

impl EncoderInit {
    /// Copies the file's tensors into `variables` (the encoder's, named without the
    /// `encoder.` prefix). Nothing is copied unless the whole load is valid.
    pub fn apply(&self, variables: &[(String, Tensor)]) -> Result<Option<InitReport>> {
        let Some(path) = &self.init else {
            return Ok(None);
        };
        load(path, &self.init_prefix, self.init_strict, variables)
            .with_context(|| format!("config key `encoder.init` (`{}`)", path.display()))
            .map(Some)
    }
}

/// See [`EncoderInit::apply`].
pub fn load(path: &Path, prefix: &str, strict: bool, variables: &[(String, Tensor)]) -> Result<InitReport> {
    let tensors = crate::checkpoint::read_safetensors(path)?;
    let file: std::collections::BTreeMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n.to_string(), t)))
        .filter(|(name, _)| !FOREIGN_BUFFERS.iter().any(|b| name.ends_with(b)))
        .collect();
    if file.is_empty() {
        bail!("the file holds no tensor under the prefix `{prefix}` (config key `encoder.init_prefix`)");
    }
    let names: std::collections::BTreeSet<&str> = variables.iter().map(|(n, _)| n.as_str()).collect();
    let missing: Vec<String> = variables
        .iter()
        .filter(|(n, _)| !file.contains_key(n))
        .map(|(n, _)| n.clone())
        .collect();
    let mut missing = missing;
    missing.sort();
    let unexpected: Vec<String> = file.keys().filter(|n| !names.contains(n.as_str())).cloned().collect();
    if strict && !(missing.is_empty() && unexpected.is_empty()) {
        bail!(
            "the file does not match the encoder's variables: {} missing ({}); {} unexpected ({}); fix the names (`encoder.init_prefix` selects a sub-tree) or set `encoder.init_strict = false` to load the names both share",
            missing.len(),
            listed(&missing, 8),
            unexpected.len(),
            listed(&unexpected, 8)
        );
    }
    let mut wrong_shapes = Vec::new();
    for (name, variable) in variables {
        if let Some(t) = file.get(name) {
            if t.size() != variable.size() {
                wrong_shapes.push(format!("{name}: file {:?}, encoder {:?}", t.size(), variable.size()));
            }
        }
    }
    if !wrong_shapes.is_empty() {
        bail!(
            "{} tensors have another shape than the encoder's: {}",
            wrong_shapes.len(),
            wrong_shapes.join("; ")
        );
    }
    let mut loaded = 0;
    tch::no_grad(|| {
        for (name, variable) in variables {
            if let Some(t) = file.get(name) {
                let mut variable = variable.shallow_clone();
                variable.copy_(&t.to_kind(variable.kind()).to_device(variable.device()));
                loaded += 1;
            }
        }
    });
    if !missing.is_empty() || !unexpected.is_empty() {
        tracing::warn!(
            "encoder.init `{}`: loaded {loaded} tensors; {} encoder variables kept their initialisation ({}); {} tensors of the file were not used ({})",
            path.display(),
            missing.len(),
            listed(&missing, 8),
            unexpected.len(),
            listed(&unexpected, 8)
        );
    }
    Ok(InitReport {
        loaded,
        missing,
        unexpected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn variables() -> Vec<(String, Tensor)> {
        vec![
            ("conv1.weight".into(), Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))),
            (
                "bn1.running_mean".into(),
                Tensor::zeros([2], (Kind::Float, Device::Cpu)),
            ),
        ]
    }

    fn file(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join("w.safetensors");
        let owned: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.shallow_clone()))
            .collect();
        crate::checkpoint::write_safetensors(&path, &owned).unwrap();
        path
    }

    #[test]
    fn a_matching_file_loads_strictly_and_foreign_buffers_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(
            dir.path(),
            &[
                ("vit.conv1.weight", Tensor::ones([2, 3], (Kind::Double, Device::Cpu))),
                (
                    "vit.bn1.running_mean",
                    Tensor::full([2], 3.0, (Kind::Float, Device::Cpu)),
                ),
                ("vit.bn1.num_batches_tracked", Tensor::from(7i64)),
                ("decoder.weight", Tensor::ones([1], (Kind::Float, Device::Cpu))),
            ],
        );
        let vars = variables();
        let report = load(&path, "vit.", true, &vars).unwrap();
        assert_eq!(report.loaded, 2);
        assert_eq!(vars[0].1.sum(Kind::Double).double_value(&[]), 6.0);
        assert_eq!(vars[0].1.kind(), Kind::Float, "the variable keeps its kind");
        assert_eq!(vars[1].1.sum(Kind::Double).double_value(&[]), 6.0);
    }

    #[test]
    fn a_mismatch_lists_missing_and_unexpected_names_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(
            dir.path(),
            &[
                ("conv1.weight", Tensor::ones([2, 3], (Kind::Float, Device::Cpu))),
                ("fc.weight", Tensor::ones([4], (Kind::Float, Device::Cpu))),
            ],
        );
        let vars = variables();
        let err = format!("{:#}", load(&path, "", true, &vars).unwrap_err());
        assert!(
            err.contains("1 missing (bn1.running_mean)") && err.contains("1 unexpected (fc.weight)"),
            "{err}"
        );
        assert_eq!(vars[0].1.sum(Kind::Double).double_value(&[]), 0.0);
        let report = load(&path, "", false, &vars).unwrap();
        assert_eq!(
            (report.loaded, report.missing, report.unexpected),
            (1, vec!["bn1.running_mean".to_string()], vec!["fc.weight".to_string()])
        );
        assert_eq!(vars[0].1.sum(Kind::Double).double_value(&[]), 6.0);
    }

    #[test]
    fn a_wrong_shape_or_an_empty_prefix_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(
            dir.path(),
            &[
                ("conv1.weight", Tensor::ones([3, 2], (Kind::Float, Device::Cpu))),
                ("bn1.running_mean", Tensor::ones([2], (Kind::Float, Device::Cpu))),
            ],
        );
        let err = format!("{:#}", load(&path, "", true, &variables()).unwrap_err());
        assert!(err.contains("conv1.weight: file [3, 2], encoder [2, 3]"), "{err}");
        let err = format!("{:#}", load(&path, "vit.", true, &variables()).unwrap_err());
        assert!(err.contains("no tensor under the prefix `vit.`"), "{err}");
    }
}
