//! `medssl export RUN_DIR --format monai|torchvision --out FILE.safetensors`: a run's encoder
//! weights under the reference library's names, for a strict `load_state_dict` there.
//!
//! - `monai`: a `vit3d` encoder's tensors are exactly a MONAI `ViT`'s `state_dict`; with
//!   `--prefix vit.` they are the `vit.` sub-tree of a MONAI `UNETR` (load it with
//!   `strict=False`, the decoder being new, or into `unetr.vit` strictly).
//! - `torchvision`: a ResNet's tensors are a torchvision `resnet18/34/50`'s `state_dict`
//!   without `fc.*` (set `model.fc = torch.nn.Identity()` and load strictly). Each batch norm
//!   gains the `num_batches_tracked` counter PyTorch keeps; medssl does not track it, so it is
//!   written as 0 (PyTorch reads it only for `momentum=None`).
//!
//! The other direction is `encoder.init = "FILE.safetensors"` in a run's config
//! ([`medssl_core::encoder_init`]).

use anyhow::{bail, Context, Result};
use medssl_core::assemble::Backbone;
use medssl_core::checkpoint;
use medssl_core::config::LoadedConfig;
use medssl_core::encoder::ReferenceLibrary;
use medssl_core::run_dir;
use std::path::Path;
use tch::{Device, Tensor};

/// What was written.
#[derive(Debug, serde::Serialize)]
pub struct Exported {
    pub format: String,
    pub encoder: String,
    pub checkpoint: String,
    pub out: String,
    pub tensors: usize,
    /// Numbers in all (parameters and batch-norm statistics).
    pub elements: i64,
}

pub fn export(run: &Path, format: ReferenceLibrary, prefix: &str, out: &Path) -> Result<Exported> {
    let located = run_dir::locate(run, None).context("RUN_DIR")?;
    let cfg = LoadedConfig::load_resolved(&located.config)
        .with_context(|| format!("the run's config `{}`", located.config.display()))?;
    let backbone = Backbone::build(&cfg, Device::Cpu).context("building the run's encoder from its config")?;
    let encoder = cfg.section("encoder", "name")?.name;
    match backbone.encoder.reference_library() {
        Some(library) if library == format => {}
        Some(library) => {
            bail!("encoder `{encoder}` carries {library}'s parameter names, not {format}'s: use `--format {library}`")
        }
        None => bail!(
            "encoder `{encoder}` follows no reference library's parameter names, so it cannot be exported as {format}"
        ),
    }
    let tensors = checkpoint::read_safetensors(&located.tensors)?;
    backbone.load(&tensors, &located.tensors)?;
    let mut exported: Vec<(String, Tensor)> = backbone
        .vs
        .variables()
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix("encoder.").map(|n| (format!("{prefix}{n}"), t)))
        .collect();
    let elements = exported.iter().map(|(_, t)| t.numel() as i64).sum();
    if format == ReferenceLibrary::Torchvision {
        let counters: Vec<(String, Tensor)> = exported
            .iter()
            .filter_map(|(name, _)| name.strip_suffix("running_mean"))
            .map(|stem| (format!("{stem}num_batches_tracked"), Tensor::from(0i64)))
            .collect();
        exported.extend(counters);
    }
    exported.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating `{}`", parent.display()))?;
    }
    checkpoint::write_safetensors_atomic(out, &exported).with_context(|| format!("--out `{}`", out.display()))?;
    Ok(Exported {
        format: format.to_string(),
        encoder,
        checkpoint: located.tensors.display().to_string(),
        out: out.display().to_string(),
        tensors: exported.len(),
        elements,
    })
}
