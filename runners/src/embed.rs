//! `medssl embed RUN_DIR --data PATH --out FILE`: a run's frozen features of a set, written
//! for Python (the features themselves are `medssl_core::eval::embed`, eval's own).
//!
//! `FILE.safetensors` holds `embeddings` (`[N, E]` f32) and, where every sample has a class
//! label, `labels` (`[N]` i64); `FILE.npy` holds the embeddings alone. Either way a sidecar
//! `FILE.json` (the output's name with `.json`) lists each row's sample id and label, the
//! level, the set and the checkpoint: safetensors' header metadata holds strings only, and
//! one sidecar for both formats reads the same way.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use medssl_core::checkpoint;
use medssl_core::eval::{self, DataSpec, EmbedOptions, Embeddings, Level};
use medssl_core::precision::Precision;
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, ValueEnum)]
pub enum LevelArg {
    Slice,
    Volume,
}

#[derive(Args)]
pub struct EmbedArgs {
    /// A run directory (its latest checkpoint), a checkpoint folder
    /// (RUN/checkpoints/step-N) or its tensors.safetensors.
    checkpoint: PathBuf,
    /// The run's config (default: the run directory's config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The set to embed: anything a reader reads (labels optional).
    #[arg(long)]
    data: PathBuf,
    /// Split of --data, for readers with splits (default: train).
    #[arg(long)]
    split: Option<String>,
    /// Reader of --data (see `medssl list`; default: recognised from the path, `medmnist`
    /// for .npz).
    #[arg(long)]
    format: Option<String>,
    /// slice: the encoder's pooled embedding of each 2D image or each slice of a volume;
    /// volume: what `medssl eval` uses for a volume. Default: slice for images, volume for
    /// volumes.
    #[arg(long, value_enum)]
    level: Option<LevelArg>,
    /// FILE.safetensors (embeddings and labels) or FILE.npy (embeddings); ids and labels
    /// also go to FILE.json.
    #[arg(long)]
    out: PathBuf,
    /// Samples encoded at once.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, bf16 (CPU or CUDA) or fp16 (CUDA): the encoder's forward pass in autocast.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Print what was written as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let npy = match args.out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => false,
        Some("npy") => true,
        _ => bail!(
            "--out `{}`: expected a `.safetensors` or `.npy` file name",
            args.out.display()
        ),
    };
    let options = EmbedOptions {
        checkpoint: args.checkpoint,
        config: args.config,
        data: DataSpec {
            path: args.data,
            split: args.split,
        },
        format: args.format,
        level: args.level.map(|l| match l {
            LevelArg::Slice => Level::Slice,
            LevelArg::Volume => Level::Volume,
        }),
        batch_size: args.batch_size,
        device: args.device,
        precision: args.precision,
    };
    let embeddings = eval::embed(&options)?;
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating `{}`", parent.display()))?;
    }
    let features = embeddings.features.to_kind(Kind::Float).contiguous();
    if npy {
        write_npy(&args.out, &features)?;
    } else {
        let mut tensors = vec![("embeddings".to_string(), features.shallow_clone())];
        if let Some(labels) = &embeddings.labels {
            tensors.push(("labels".to_string(), Tensor::from_slice(labels)));
        }
        checkpoint::write_safetensors_atomic(&args.out, &tensors)
            .with_context(|| format!("--out `{}`", args.out.display()))?;
    }
    let sidecar = args.out.with_extension("json");
    let summary = describe(&embeddings, &args.out, &sidecar);
    let mut document = summary.clone();
    document["ids"] = json!(embeddings.ids);
    document["labels"] = json!(embeddings.labels);
    checkpoint::write_atomic(&sidecar, serde_json::to_string_pretty(&document)?.as_bytes())
        .with_context(|| format!("the sidecar `{}`", sidecar.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "wrote {} {}-level embeddings of dimension {} to {} (ids and labels: {})",
            summary["rows"],
            summary["level"].as_str().unwrap_or(""),
            summary["dim"],
            args.out.display(),
            sidecar.display()
        );
    }
    Ok(())
}

/// What was written, without the per-row lists.
fn describe(embeddings: &Embeddings, out: &Path, sidecar: &Path) -> serde_json::Value {
    let size = embeddings.features.size();
    json!({
        "out": out.display().to_string(),
        "sidecar": sidecar.display().to_string(),
        "rows": size[0],
        "dim": size.get(1).copied().unwrap_or(0),
        "level": embeddings.level,
        "labelled": embeddings.labels.is_some(),
        "data": embeddings.set,
        "checkpoint": embeddings.checkpoint,
        "step": embeddings.step,
    })
}

/// `features` (`[N, E]` f32) as a NumPy `.npy` file, format 1.0: the magic, the header
/// length, a Python dict literal padded with spaces to a multiple of 64 bytes, the data in
/// C order, little-endian.
fn write_npy(path: &Path, features: &Tensor) -> Result<()> {
    let shape = features.size();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        shape[0],
        shape.get(1).copied().unwrap_or(0)
    );
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in Vec::<f32>::try_from(features.flatten(0, -1))? {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    checkpoint::write_atomic(path, &bytes).with_context(|| format!("--out `{}`", path.display()))
}
