//! Starting an encoder from weights trained elsewhere: `encoder.init = "FILE.safetensors"`,
//! loaded before training. `init_format` says how the file names the encoder's tensors
//! ([`crate::weight_format`]): unset, by the encoder's own parameter names, which are its
//! reference library's (a torchvision ResNet's `state_dict`, a MONAI ViT's, what
//! `medssl export --format torchvision|monai` wrote); `"torchvision"` or `"monai"`, the same
//! names, checked to be the encoder's library, with what that library's files hold beside
//! the encoder left out (torchvision's classifier `fc.*`); `"medssl"`, medssl's checkpoint
//! names (`model.encoder.conv1.weight`: a run's `tensors.safetensors` or any
//! `medssl export --format medssl`), where only the `model.encoder.` tensors are read and
//! the rest of the file (aggregator, objectives, optimizer) is not the encoder's.
//!
//! The load is strict by default, as PyTorch's `load_state_dict(strict=True)`: every encoder
//! variable must be in the file with its shape, and every encoder tensor of the file must be
//! a variable; a mismatch is an error listing the missing and the unexpected names, and,
//! where another `init_format` or `init_prefix` would find the encoder's names, saying
//! which. With `init_strict = false` the names both sides share are loaded (shapes still
//! checked) and the rest is listed in a warning. `init_prefix` selects a sub-tree of the
//! file, e.g. `"vit."` for a MONAI UNETR checkpoint, whose ViT lives under `vit.`.
//!
//! A stem whose file weights take more input channels than the encoder's one (an ImageNet
//! ResNet's `conv1.weight` `[64, 3, 7, 7]` into `[64, 1, 7, 7]`) is refused, naming it,
//! unless `init_stem = "sum"`, which sums them over the input channels as timm's
//! `adapt_input_conv` does for 1-channel models: on a grey image the same function as the
//! 3-channel stem fed the image three times.
//!
//! Where medssl differs on purpose: `num_batches_tracked` tensors (PyTorch batch norm's
//! step counter, which only matters with `momentum = None`, never used here) are skipped
//! instead of counted as unexpected, so a torchvision file loads strictly.

use crate::encoder::ReferenceLibrary;
use crate::weight_format::{better_setting, WeightFormat, ENCODER_PREFIX};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What to do with a stem whose file weights take more input channels than the encoder's.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StemInit {
    /// An error naming the tensor and both shapes.
    #[default]
    Refuse,
    /// Sum the weights over the input channels.
    Sum,
}

impl StemInit {
    fn is_refuse(&self) -> bool {
        *self == StemInit::Refuse
    }
}

/// The `[encoder]` keys that core reads beside the encoder's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderInit {
    /// A safetensors file of the encoder's weights to start from.
    pub init: Option<PathBuf>,
    /// Only the file's tensors under this prefix, with it removed (e.g. `"vit."`).
    pub init_prefix: String,
    /// Refuse a file that lacks a variable or holds a tensor the encoder lacks.
    #[serde(default = "strict_by_default")]
    pub init_strict: bool,
    /// How the file names the tensors: `torchvision`, `monai` or `medssl`; none: the
    /// encoder's own names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_format: Option<WeightFormat>,
    /// A stem of more input channels than the encoder's: `refuse` or `sum`. Left out of the
    /// resolved config at its default, as `init_format` unset, so that a run that set
    /// `init` before these keys existed resumes under an unchanged config.
    #[serde(skip_serializing_if = "StemInit::is_refuse")]
    pub init_stem: StemInit,
}

fn strict_by_default() -> bool {
    true
}

/// Core's keys in the `[encoder]` section (split off before the encoder parses the rest).
pub const INIT_KEYS: [&str; 5] = ["init", "init_prefix", "init_strict", "init_format", "init_stem"];

/// Buffers of PyTorch modules that medssl's modules do not keep.
const FOREIGN_BUFFERS: [&str; 1] = ["num_batches_tracked"];

/// torchvision's ResNet classifier, which a torchvision `state_dict` holds beside the encoder.
const TORCHVISION_CLASSIFIER: [&str; 2] = ["fc.weight", "fc.bias"];

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub loaded: usize,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// The file's tensors that its format says are not the encoder's (batch-norm counters,
    /// torchvision's `fc`).
    pub left_out: Vec<String>,
    /// Stems summed over their input channels (`init_stem = "sum"`).
    pub summed_stems: Vec<String>,
}

/// Names, at most `shown` of them, and how many more.
fn listed(names: &[String], shown: usize) -> String {
    let mut text = names.iter().take(shown).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > shown {
        text.push_str(&format!(" and {} more", names.len() - shown));
    }
    text
}

/// Whether `file` is a stem's weights `[O, C, k...]` for the encoder's `[O, 1, k...]`, C > 1:
/// a convolution over more input channels, every other axis equal.
fn is_wider_stem(file: &[i64], encoder: &[i64]) -> bool {
    file.len() >= 3
        && file.len() == encoder.len()
        && encoder[1] == 1
        && file[1] > 1
        && file
            .iter()
            .zip(encoder)
            .enumerate()
            .all(|(axis, (f, e))| axis == 1 || f == e)
}

impl EncoderInit {
    /// Copies the file's tensors into `variables` (the encoder's, named without the
    /// `encoder.` prefix); `library` is the encoder's reference library. Nothing is copied
    /// unless the whole load is valid.
    pub fn apply(
        &self,
        variables: &[(String, Tensor)],
        library: Option<ReferenceLibrary>,
    ) -> Result<Option<InitReport>> {
        let Some(path) = &self.init else {
            return Ok(None);
        };
        self.load(path, variables, library)
            .with_context(|| format!("config key `encoder.init` (`{}`)", path.display()))
            .map(Some)
    }

    /// [`EncoderInit::apply`] of `path`.
    pub fn load(
        &self,
        path: &Path,
        variables: &[(String, Tensor)],
        library: Option<ReferenceLibrary>,
    ) -> Result<InitReport> {
        if let Some(wanted) = self.init_format.and_then(WeightFormat::library) {
            if library != Some(wanted) {
                let carried = match library {
                    Some(library) => format!(
                        "the encoder carries {library}'s: set encoder.init_format = \"{library}\" (or \"medssl\" for a medssl checkpoint)"
                    ),
                    None => "the encoder follows no library's names: set encoder.init_format = \"medssl\" for a medssl checkpoint, or remove it".to_string(),
                };
                bail!("encoder.init_format = \"{wanted}\" reads {wanted}'s parameter names, but {carried}");
            }
        }
        let tensors = crate::checkpoint::read_safetensors(path)?;
        let prefix = &self.init_prefix;
        let hint = || {
            let file: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
            let names: Vec<String> = variables.iter().map(|(n, _)| n.clone()).collect();
            better_setting(&file, &names, self.init_format, prefix, library)
                .map(|h| format!("; {h}"))
                .unwrap_or_default()
        };
        let selected = match self.init_format {
            Some(WeightFormat::Medssl) => format!("{prefix}{ENCODER_PREFIX}"),
            _ => prefix.clone(),
        };
        let mut left_out = Vec::new();
        let mut file: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, t) in &tensors {
            let Some(name) = name.strip_prefix(selected.as_str()) else {
                continue;
            };
            let classifier =
                self.init_format == Some(WeightFormat::Torchvision) && TORCHVISION_CLASSIFIER.contains(&name);
            if classifier || FOREIGN_BUFFERS.iter().any(|b| name.ends_with(b)) {
                left_out.push(name.to_string());
            } else {
                file.insert(name.to_string(), t.shallow_clone());
            }
        }
        if file.is_empty() {
            match self.init_format {
                Some(WeightFormat::Medssl) => bail!(
                    "the file holds no tensor under `{selected}` (medssl's checkpoint names for the encoder, read under `encoder.init_format = \"medssl\"`){}",
                    hint()
                ),
                _ => bail!(
                    "the file holds no tensor under the prefix `{prefix}` (config key `encoder.init_prefix`){}",
                    hint()
                ),
            }
        }
        let mut missing: Vec<String> = variables
            .iter()
            .filter(|(n, _)| !file.contains_key(n))
            .map(|(n, _)| n.clone())
            .collect();
        missing.sort();
        let names: std::collections::BTreeSet<&str> = variables.iter().map(|(n, _)| n.as_str()).collect();
        let unexpected: Vec<String> = file.keys().filter(|n| !names.contains(n.as_str())).cloned().collect();
        if self.init_strict && !(missing.is_empty() && unexpected.is_empty()) {
            bail!(
                "the file does not match the encoder's variables: {} missing ({}); {} unexpected ({}); fix the names (`encoder.init_prefix` selects a sub-tree, `encoder.init_format` says how the file names them) or set `encoder.init_strict = false` to load the names both share{}",
                missing.len(),
                listed(&missing, 8),
                unexpected.len(),
                listed(&unexpected, 8),
                hint()
            );
        }
        let (mut wrong_shapes, mut wider_stems, mut summed_stems) = (Vec::new(), Vec::new(), Vec::new());
        for (name, variable) in variables {
            let Some(t) = file.get(name) else { continue };
            let (shape, wanted) = (t.size(), variable.size());
            if shape == wanted {
                continue;
            }
            if is_wider_stem(&shape, &wanted) && self.init_stem == StemInit::Sum {
                let summed = t.sum_dim_intlist(1, true, t.kind());
                file.insert(name.clone(), summed);
                summed_stems.push(name.clone());
                continue;
            }
            if is_wider_stem(&shape, &wanted) {
                wider_stems.push(format!(
                    "`{name}` takes {} input channels in the file, 1 in the encoder",
                    shape[1]
                ));
            }
            wrong_shapes.push(format!("{name}: file {shape:?}, encoder {wanted:?}"));
        }
        if !wrong_shapes.is_empty() {
            let stems = match wider_stems.is_empty() {
                true => String::new(),
                false => format!(
                    "; {}: set encoder.init_stem = \"sum\" to sum the stem's weights over its input channels (as timm does for 1-channel models), or give the encoder 3 input channels where it has the option (resnet's `input_channels = 3`)",
                    wider_stems.join(", ")
                ),
            };
            bail!(
                "{} tensors have another shape than the encoder's: {}{stems}",
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
        if !summed_stems.is_empty() {
            tracing::info!(
                "encoder.init `{}`: summed {} over the input channels (encoder.init_stem = \"sum\")",
                path.display(),
                summed_stems.join(", ")
            );
        }
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
            left_out,
            summed_stems,
        })
    }
}

/// Loads `path`'s tensors under `prefix`, by the encoder's own names, into `variables`
/// ([`EncoderInit::load`] with no `init_format`, stems refused).
pub fn load(path: &Path, prefix: &str, strict: bool, variables: &[(String, Tensor)]) -> Result<InitReport> {
    let init = EncoderInit {
        init: Some(path.to_path_buf()),
        init_prefix: prefix.to_string(),
        init_strict: strict,
        ..EncoderInit::default()
    };
    init.load(path, variables, None)
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

    fn init(path: &Path, body: &str) -> EncoderInit {
        let mut init: EncoderInit = toml::from_str(body).unwrap();
        init.init = Some(path.to_path_buf());
        init
    }

    #[test]
    fn torchvision_files_lose_their_classifier_and_medssl_files_give_their_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let ones = |shape: &[i64]| Tensor::ones(shape, (Kind::Float, Device::Cpu));
        let torchvision = file(
            dir.path(),
            &[
                ("conv1.weight", ones(&[2, 3])),
                ("bn1.running_mean", ones(&[2])),
                ("bn1.num_batches_tracked", Tensor::from(3i64)),
                ("fc.weight", ones(&[1000, 2])),
                ("fc.bias", ones(&[1000])),
            ],
        );
        let vars = variables();
        let tv = Some(ReferenceLibrary::Torchvision);
        let err = format!(
            "{:#}",
            init(&torchvision, "").load(&torchvision, &vars, tv).unwrap_err()
        );
        assert!(err.contains("2 unexpected (fc.bias, fc.weight)"), "{err}");
        let report = init(&torchvision, "init_format = \"torchvision\"")
            .load(&torchvision, &vars, tv)
            .unwrap();
        assert_eq!(report.loaded, 2);
        assert_eq!(report.left_out, ["bn1.num_batches_tracked", "fc.bias", "fc.weight"]);
        let err = format!(
            "{:#}",
            init(&torchvision, "init_format = \"monai\"")
                .load(&torchvision, &vars, tv)
                .unwrap_err()
        );
        assert!(err.contains("init_format = \"torchvision\""), "{err}");

        let medssl = dir.path().join("checkpoint.safetensors");
        crate::checkpoint::write_safetensors(
            &medssl,
            &[
                (
                    "model.encoder.conv1.weight".to_string(),
                    Tensor::full([2, 3], 2.0, (Kind::Float, Device::Cpu)),
                ),
                ("model.encoder.bn1.running_mean".to_string(), ones(&[2])),
                ("model.aggregator.weight".to_string(), ones(&[4])),
                ("optim.model.encoder.conv1.weight.exp_avg".to_string(), ones(&[2, 3])),
            ],
        )
        .unwrap();
        let err = format!("{:#}", init(&medssl, "").load(&medssl, &vars, tv).unwrap_err());
        assert!(
            err.contains("looks like a medssl checkpoint") && err.contains("init_format = \"medssl\""),
            "{err}"
        );
        let report = init(&medssl, "init_format = \"medssl\"")
            .load(&medssl, &vars, tv)
            .unwrap();
        assert_eq!((report.loaded, report.unexpected.len()), (2, 0));
        assert_eq!(vars[0].1.sum(Kind::Double).double_value(&[]), 12.0);
        let err = format!(
            "{:#}",
            init(&torchvision, "init_format = \"medssl\"")
                .load(&torchvision, &vars, tv)
                .unwrap_err()
        );
        assert!(
            err.contains("no tensor under `model.encoder.`") && err.contains("init_format = \"torchvision\""),
            "{err}"
        );
    }

    #[test]
    fn a_wider_stem_is_refused_naming_it_or_summed_over_its_channels() {
        let dir = tempfile::tempdir().unwrap();
        let stem = Tensor::arange(2 * 3 * 2 * 2, (Kind::Float, Device::Cpu)).view([2, 3, 2, 2]);
        let path = file(dir.path(), &[("conv1.weight", stem.shallow_clone())]);
        let vars = vec![(
            "conv1.weight".to_string(),
            Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu)),
        )];
        let err = format!("{:#}", init(&path, "").load(&path, &vars, None).unwrap_err());
        assert!(
            err.contains("conv1.weight: file [2, 3, 2, 2], encoder [2, 1, 2, 2]")
                && err.contains("`conv1.weight` takes 3 input channels")
                && err.contains("init_stem = \"sum\""),
            "{err}"
        );
        let report = init(&path, "init_stem = \"sum\"").load(&path, &vars, None).unwrap();
        assert_eq!(report.summed_stems, ["conv1.weight"]);
        assert!(vars[0].1.equal(&stem.sum_dim_intlist(1, true, Kind::Float)));
        // Only the input channels may differ: another output width stays an error.
        let vars = vec![(
            "conv1.weight".to_string(),
            Tensor::zeros([4, 1, 2, 2], (Kind::Float, Device::Cpu)),
        )];
        let err = format!(
            "{:#}",
            init(&path, "init_stem = \"sum\"").load(&path, &vars, None).unwrap_err()
        );
        assert!(err.contains("another shape") && !err.contains("init_stem"), "{err}");
    }

    #[test]
    fn the_resolved_config_gains_no_key_at_the_defaults() {
        let init = init(Path::new("w.safetensors"), "");
        let toml::Value::Table(table) = toml::Value::try_from(&init).unwrap() else {
            panic!("a table");
        };
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["init", "init_prefix", "init_strict"],
            "a run from before resumes unchanged"
        );
        let set = self::init(
            Path::new("w.safetensors"),
            "init_format = \"medssl\"\ninit_stem = \"sum\"",
        );
        let text = toml::to_string(&set).unwrap();
        assert!(
            text.contains("init_format = \"medssl\"") && text.contains("init_stem = \"sum\""),
            "{text}"
        );
    }
}
