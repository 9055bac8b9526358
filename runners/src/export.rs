//! `medssl export RUN_DIR|CHECKPOINT --format torchvision|monai|medssl --part
//! encoder|backbone|all --out FILE.safetensors`: a checkpoint's weights under a naming
//! convention ([`medssl_core::weight_format`]), for a strict `load_state_dict` elsewhere or
//! `encoder.init` here.
//!
//! - `--part encoder` (the default): the encoder's tensors; `backbone`: the encoder and the
//!   aggregator (the same as the encoder for a run without one, a 3D encoder's); `all`:
//!   every tensor of the checkpoint's model (objectives' projectors, prototypes, queues ...),
//!   never the optimizer's.
//! - `--format monai`: a `vit3d` encoder's tensors are exactly a MONAI `ViT`'s `state_dict`,
//!   a `swin3d`'s a `SwinViT`'s; with `--prefix vit.` (`swinViT.`) they are that sub-tree of
//!   a MONAI `UNETR` (`SwinUNETR`), whose decoder is new (`strict=False` there).
//! - `--format torchvision`: a ResNet's tensors are a torchvision `resnet18/34/50`'s
//!   `state_dict` without `fc.*` (set `model.fc = torch.nn.Identity()` and load strictly), or,
//!   with `--with-fc`, with a freshly initialised `fc` as `torch.nn.Linear` initialises it
//!   (`--fc-classes`, 1000 by default), so `resnet50(num_classes=N)` loads strictly as it is.
//!   Each batch norm gains the `num_batches_tracked` counter PyTorch keeps; medssl does not
//!   track it, so it is written as 0 (PyTorch reads it only for `momentum=None`).
//! - `--format medssl`: the checkpoint's own names (`model.encoder.conv1.weight`, ...), which
//!   name every part; `encoder.init_format = "medssl"` reads its encoder back.
//!
//! The reference formats name the encoder only: a part holding anything else is refused,
//! naming its first such tensor. The file's header metadata says what it is: medssl's
//! version, the format, part and prefix, the encoder's name and config, the run's config,
//! the run directory, the checkpoint and where in the run it was written.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use medssl_core::assemble::Backbone;
use medssl_core::checkpoint::{self, Metadata};
use medssl_core::config::LoadedConfig;
use medssl_core::rng::{self, domain};
use medssl_core::run_dir::{self, RunCheckpoint, STATE_FILE};
use medssl_core::weight_format::{WeightFormat, ENCODER_PREFIX, MODEL_PREFIX};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// Which of a checkpoint's tensors to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Encoder,
    Backbone,
    All,
}

impl Part {
    /// The checkpoint prefixes of the part's tensors.
    fn prefixes(self) -> &'static [&'static str] {
        match self {
            Part::Encoder => &[ENCODER_PREFIX],
            Part::Backbone => &[ENCODER_PREFIX, "model.aggregator."],
            Part::All => &[MODEL_PREFIX],
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Encoder => "encoder",
            Part::Backbone => "backbone",
            Part::All => "all",
        })
    }
}

#[derive(Args)]
pub struct ExportArgs {
    /// A run directory (its latest checkpoint), a checkpoint folder
    /// (RUN/checkpoints/step-N) or its tensors.safetensors.
    checkpoint: PathBuf,
    /// The run's config (default: the run directory's config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// torchvision or monai (the encoder's reference library's names), or medssl (the
    /// checkpoint's own names, for every part).
    #[arg(long)]
    format: String,
    /// encoder, backbone (encoder and aggregator) or all (every tensor of the model).
    #[arg(long, value_enum, default_value_t = Part::Encoder)]
    part: Part,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    /// Put every name under this prefix (e.g. `vit.` for MONAI's UNETR).
    #[arg(long, default_value = "")]
    prefix: String,
    /// torchvision: also write a freshly initialised classifier `fc`, so that the file loads
    /// strictly into `torchvision.models.resnetNN(num_classes=N)` as it is.
    #[arg(long)]
    with_fc: bool,
    /// The classes of `--with-fc`'s classifier (torchvision's default: ImageNet's 1000).
    #[arg(long, default_value_t = 1000, requires = "with_fc")]
    fc_classes: i64,
    /// Print what was written as JSON.
    #[arg(long)]
    json: bool,
}

/// What was written.
#[derive(Debug, serde::Serialize)]
pub struct Exported {
    pub format: String,
    pub part: Part,
    pub encoder: String,
    pub checkpoint: String,
    /// The checkpoint's global step, where its state says.
    pub step: Option<usize>,
    pub out: String,
    pub tensors: usize,
    /// Numbers written in all (parameters, buffers, counters, the classifier).
    pub elements: i64,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let exported = export(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&exported)?);
    } else {
        println!(
            "wrote {} tensors ({} numbers), {} of a `{}` run under {}'s names, to {}",
            exported.tensors,
            exported.elements,
            match exported.part {
                Part::Encoder => "the encoder",
                Part::Backbone => "the backbone",
                Part::All => "the whole model",
            },
            exported.encoder,
            exported.format,
            exported.out
        );
    }
    Ok(())
}

/// A path as the file records it: absolute where it can be made so.
fn recorded(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

fn export(args: &ExportArgs) -> Result<Exported> {
    let format: WeightFormat = args.format.parse().context("--format")?;
    let located = run_dir::locate(&args.checkpoint, args.config.as_deref()).context("RUN_DIR")?;
    let cfg = LoadedConfig::load_resolved(&located.config)
        .with_context(|| format!("the run's config `{}`", located.config.display()))?;
    let backbone = Backbone::build(&cfg, Device::Cpu).context("building the run's encoder from its config")?;
    let encoder = cfg.section("encoder", "name")?.name;
    if let Some(wanted) = format.library() {
        match backbone.encoder.reference_library() {
            Some(library) if library == wanted => {}
            Some(library) => bail!(
                "encoder `{encoder}` carries {library}'s parameter names, not {wanted}'s: use `--format {library}` (or `--format medssl`, medssl's own names)"
            ),
            None => bail!(
                "encoder `{encoder}` follows no reference library's parameter names, so it cannot be exported as {wanted}: use `--format medssl`"
            ),
        }
    }
    if args.with_fc && format != WeightFormat::Torchvision {
        bail!("--with-fc writes torchvision's ResNet classifier `fc`; --format {format} has none");
    }
    anyhow::ensure!(
        args.fc_classes >= 1,
        "--fc-classes {}: expected at least 1",
        args.fc_classes
    );
    let tensors = checkpoint::read_safetensors(&located.tensors)?;
    // The encoder and aggregator are checked against the config: a checkpoint of another
    // architecture is refused here, not written under the wrong names.
    backbone.load(&tensors, &located.tensors)?;
    let mut exported: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in tensors {
        if !args.part.prefixes().iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let name = match format {
            WeightFormat::Medssl => name,
            _ => match name.strip_prefix(ENCODER_PREFIX) {
                Some(inner) => inner.to_string(),
                None => bail!(
                    "--format {format} names the encoder's tensors only, but --part {} also holds `{name}`: use `--format medssl` for that part",
                    args.part
                ),
            },
        };
        exported.push((format!("{}{name}", args.prefix), t));
    }
    if format == WeightFormat::Torchvision {
        let counters: Vec<(String, Tensor)> = exported
            .iter()
            .filter_map(|(name, _)| name.strip_suffix("running_mean"))
            .map(|stem| (format!("{stem}num_batches_tracked"), Tensor::from(0i64)))
            .collect();
        exported.extend(counters);
    }
    if args.with_fc {
        let kind = exported
            .iter()
            .find(|(_, t)| t.is_floating_point())
            .map_or(Kind::Float, |(_, t)| t.kind());
        let classifier = fresh_classifier(&backbone, cfg.run.seed, args.fc_classes, kind);
        exported.extend(
            classifier
                .into_iter()
                .map(|(name, t)| (format!("{}{name}", args.prefix), t)),
        );
    }
    exported.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = metadata(args, format, &encoder, &backbone, &located, &cfg)?;
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating `{}`", parent.display()))?;
    }
    checkpoint::write_safetensors_atomic_with(&args.out, &exported, &metadata)
        .with_context(|| format!("--out `{}`", args.out.display()))?;
    Ok(Exported {
        format: format.to_string(),
        part: args.part,
        encoder,
        checkpoint: located.tensors.display().to_string(),
        step: located.step,
        out: args.out.display().to_string(),
        tensors: exported.len(),
        elements: exported.iter().map(|(_, t)| t.numel() as i64).sum(),
    })
}

/// torchvision's `fc = nn.Linear(512 * expansion, classes)` as PyTorch initialises it
/// (weight `kaiming_uniform_(a=sqrt(5))`, bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn
/// from the run's seed, so exporting again writes the same file.
fn fresh_classifier(backbone: &Backbone, seed: u64, classes: i64, kind: Kind) -> Vec<(String, Tensor)> {
    tch::manual_seed(rng::derive(seed, &[domain::EXPORT]) as i64);
    let store = nn::VarStore::new(Device::Cpu);
    let _fc = medssl_core::layers::linear(store.root() / "fc", backbone.encoder.embedding_dim(), classes);
    let mut classifier: Vec<(String, Tensor)> = store
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().to_kind(kind)))
        .collect();
    classifier.sort_by(|a, b| a.0.cmp(&b.0));
    classifier
}

/// The header metadata: what the file is and where it came from. `format = "pt"` is what
/// Hugging Face's libraries write and check in a PyTorch safetensors file's metadata.
fn metadata(
    args: &ExportArgs,
    format: WeightFormat,
    encoder: &str,
    backbone: &Backbone,
    located: &RunCheckpoint,
    cfg: &LoadedConfig,
) -> Result<Metadata> {
    let encoder_config = backbone
        .resolved
        .iter()
        .find(|(key, _)| key == "encoder")
        .map(|(_, table)| toml::to_string(table))
        .transpose()?
        .unwrap_or_default();
    let config = std::fs::read_to_string(&located.config)
        .with_context(|| format!("cannot read `{}`", located.config.display()))?;
    let mut metadata: Metadata = [
        ("format", "pt".to_string()),
        ("medssl.version", env!("CARGO_PKG_VERSION").to_string()),
        ("medssl.format", format.to_string()),
        ("medssl.part", args.part.to_string()),
        ("medssl.prefix", args.prefix.clone()),
        ("medssl.encoder", encoder.to_string()),
        ("medssl.encoder_config", encoder_config),
        ("medssl.config", config),
        (
            "medssl.run_dir",
            recorded(located.config.parent().unwrap_or(Path::new("."))),
        ),
        ("medssl.checkpoint", recorded(&located.tensors)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if args.with_fc {
        metadata.insert("medssl.fc_classes".into(), args.fc_classes.to_string());
    }
    // Where in the run the checkpoint was written, as its state records it (a loose
    // tensors file has none). The epoch is not recorded: it follows from `stage_step` and
    // the stage's steps per epoch.
    let state_file = located.tensors.parent().map(|dir| dir.join(STATE_FILE));
    let state: Option<serde_json::Value> = state_file
        .and_then(|file| std::fs::read_to_string(file).ok())
        .and_then(|text| serde_json::from_str(&text).ok());
    if let Some(state) = state {
        for key in ["global_step", "stage", "stage_step"] {
            if let Some(value) = state.get(key).and_then(|v| v.as_u64()) {
                metadata.insert(format!("medssl.{key}"), value.to_string());
            }
        }
        let stage = state.get("stage").and_then(|v| v.as_u64());
        if let Some(stage) = stage.and_then(|i| cfg.run.stages.get(i as usize)) {
            metadata.insert("medssl.stage_name".into(), stage.name.clone());
        }
    }
    Ok(metadata)
}
