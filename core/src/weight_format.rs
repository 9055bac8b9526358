//! The naming conventions of weight files, shared by `medssl export --format` (writing) and
//! `encoder.init_format` (reading):
//!
//! - `torchvision` / `monai`: a reference library's names for the encoder alone, the names
//!   its variables carry ([`ReferenceLibrary`]): `conv1.weight`, `layer1.0.bn1.running_mean`
//!   for a ResNet, `patch_embedding.patch_embeddings.weight` for a ViT.
//! - `medssl`: medssl's checkpoint names, `model.` and the variable's path in the run's
//!   model: `model.encoder.conv1.weight`, `model.aggregator.…`, `model.objectives.KEY.…`. A
//!   checkpoint's own `tensors.safetensors` is such a file, and so is every
//!   `medssl export --format medssl`, whatever part it holds.
//!
//! Also: recognising from a file's names which convention and prefix its encoder tensors
//! follow, so that a load that finds none, or the wrong ones, says which setting would.

use crate::encoder::ReferenceLibrary;
use anyhow::Result;
use std::collections::{BTreeMap, HashSet};

/// A weight file's naming convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    Torchvision,
    Monai,
    /// medssl's checkpoint names (`model.encoder.…`).
    Medssl,
}

/// Where a checkpoint keeps the model's variables.
pub const MODEL_PREFIX: &str = "model.";
/// Where a checkpoint keeps the encoder's variables.
pub const ENCODER_PREFIX: &str = "model.encoder.";

impl WeightFormat {
    /// The reference library the format is, `None` for medssl's own names.
    pub fn library(self) -> Option<ReferenceLibrary> {
        match self {
            WeightFormat::Torchvision => Some(ReferenceLibrary::Torchvision),
            WeightFormat::Monai => Some(ReferenceLibrary::Monai),
            WeightFormat::Medssl => None,
        }
    }
}

impl From<ReferenceLibrary> for WeightFormat {
    fn from(library: ReferenceLibrary) -> Self {
        match library {
            ReferenceLibrary::Torchvision => WeightFormat::Torchvision,
            ReferenceLibrary::Monai => WeightFormat::Monai,
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "torchvision" => Ok(WeightFormat::Torchvision),
            "monai" => Ok(WeightFormat::Monai),
            "medssl" => Ok(WeightFormat::Medssl),
            other => anyhow::bail!("unknown weight format `{other}`; known: torchvision, monai, medssl"),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::Torchvision => "torchvision",
            WeightFormat::Monai => "monai",
            WeightFormat::Medssl => "medssl",
        })
    }
}

/// How many of `variables` each prefix of `file` holds: for every file name that is a
/// prefix and a variable's name (the prefix empty or ending in `.`).
fn variables_by_prefix(file: &[String], variables: &[String]) -> BTreeMap<String, usize> {
    let variables: HashSet<&str> = variables.iter().map(String::as_str).collect();
    let mut counts = BTreeMap::new();
    for name in file {
        let cuts = std::iter::once(0).chain(name.match_indices('.').map(|(i, _)| i + 1));
        for cut in cuts {
            if variables.contains(&name[cut..]) {
                *counts.entry(name[..cut].to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// The setting that would find more of the encoder's `variables` among the `file`'s names
/// than `format` (`None`: the encoder's own names) with `prefix` does, as a sentence for an
/// error message; `None` when the given setting is the best there is. `library` is the
/// encoder's reference library.
pub fn better_setting(
    file: &[String],
    variables: &[String],
    format: Option<WeightFormat>,
    prefix: &str,
    library: Option<ReferenceLibrary>,
) -> Option<String> {
    let counts = variables_by_prefix(file, variables);
    let current = match format {
        Some(WeightFormat::Medssl) => format!("{prefix}{ENCODER_PREFIX}"),
        _ => prefix.to_string(),
    };
    let found_now = counts.get(&current).copied().unwrap_or(0);
    // The most variables; among equals the shortest prefix.
    let (best, found) = counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.len().cmp(&a.0.len())))?;
    if *found <= found_now {
        return None;
    }
    let prefix_hint = |wanted: &str| match wanted {
        "" if prefix.is_empty() => String::new(),
        "" => " and remove encoder.init_prefix".to_string(),
        p => format!(" and set encoder.init_prefix = \"{p}\""),
    };
    Some(match best.strip_suffix(ENCODER_PREFIX) {
        Some(outer) if format != Some(WeightFormat::Medssl) => format!(
            "this looks like a medssl checkpoint ({found} of the encoder's names under `{best}`): set encoder.init_format = \"medssl\"{}",
            prefix_hint(outer)
        ),
        Some(outer) => format!(
            "the file holds {found} of the encoder's names under `{best}`: set encoder.init_prefix = \"{outer}\""
        ),
        None if format == Some(WeightFormat::Medssl) => {
            let format = match library {
                Some(library) => format!("set encoder.init_format = \"{library}\" (or remove it)"),
                None => "remove encoder.init_format".to_string(),
            };
            format!(
                "the file holds {found} of the encoder's names without medssl's `{ENCODER_PREFIX}` (a library's state_dict, not a medssl checkpoint): {format}{}",
                prefix_hint(best)
            )
        }
        None if best.is_empty() => format!(
            "the file holds {found} of the encoder's names at its top level: remove encoder.init_prefix (or set it to \"\")"
        ),
        None => format!(
            "the file holds {found} of the encoder's names under `{best}`: set encoder.init_prefix = \"{best}\""
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn formats_parse_and_print_as_their_config_names() {
        for format in [WeightFormat::Torchvision, WeightFormat::Monai, WeightFormat::Medssl] {
            assert_eq!(format.to_string().parse::<WeightFormat>().unwrap(), format);
        }
        let err = "timm".parse::<WeightFormat>().unwrap_err().to_string();
        assert!(err.contains("torchvision, monai, medssl"), "{err}");
        assert_eq!(
            WeightFormat::from(ReferenceLibrary::Monai).library(),
            Some(ReferenceLibrary::Monai)
        );
        assert_eq!(WeightFormat::Medssl.library(), None);
    }

    #[test]
    fn the_setting_that_finds_the_encoders_names_is_suggested() {
        let vars = names(&["conv1.weight", "bn1.bias", "layer1.0.conv1.weight"]);
        let tv = Some(WeightFormat::Torchvision);
        let lib = Some(ReferenceLibrary::Torchvision);
        let checkpoint = names(&[
            "model.encoder.conv1.weight",
            "model.encoder.bn1.bias",
            "model.encoder.layer1.0.conv1.weight",
            "model.aggregator.w",
            "optim.model.encoder.conv1.weight.exp_avg",
        ]);
        let hint = better_setting(&checkpoint, &vars, tv, "", lib).unwrap();
        assert!(
            hint.contains("looks like a medssl checkpoint") && hint.contains("init_format = \"medssl\""),
            "{hint}"
        );
        assert!(!hint.contains("init_prefix"), "{hint}");
        assert_eq!(
            better_setting(&checkpoint, &vars, Some(WeightFormat::Medssl), "", lib),
            None
        );

        let torchvision = names(&["conv1.weight", "bn1.bias", "layer1.0.conv1.weight", "fc.weight"]);
        let hint = better_setting(&torchvision, &vars, Some(WeightFormat::Medssl), "", lib).unwrap();
        assert!(hint.contains("init_format = \"torchvision\""), "{hint}");
        assert_eq!(better_setting(&torchvision, &vars, tv, "", lib), None);

        let unetr = names(&["vit.conv1.weight", "vit.bn1.bias", "decoder.conv1.weight"]);
        let hint = better_setting(&unetr, &vars, None, "", None).unwrap();
        assert!(hint.contains("init_prefix = \"vit.\""), "{hint}");
        let hint = better_setting(&names(&["conv1.weight"]), &vars, None, "vit.", None).unwrap();
        assert!(hint.contains("top level: remove encoder.init_prefix"), "{hint}");
        assert_eq!(better_setting(&names(&["x.y"]), &vars, None, "", None), None);
    }
}
