//! `medssl finetune`: the command-line face of `medssl_core::finetune`.

use anyhow::Result;
use clap::Args;
use medssl_core::finetune::{self, FinetuneOptions};
use std::path::{Path, PathBuf};

/// Fine-tune a pre-trained backbone with a task head, N seeds, beside the same protocol from
/// a random initialisation; prints the table (mean ± std over repeats).
#[derive(Args)]
pub struct FinetuneArgs {
    /// The fine-tuning config (configs/downstream/*.toml).
    config: PathBuf,
    /// The pre-training run directory, a checkpoint folder or its tensors.safetensors.
    #[arg(long)]
    pretrained: PathBuf,
    /// The pre-training run's config (default: found beside the checkpoint).
    #[arg(long = "run-config")]
    run_config: Option<PathBuf>,
    /// The training set's path (sets `data.train.path`).
    #[arg(long)]
    train: Option<PathBuf>,
    /// The evaluation set's path (sets `data.eval.path`).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Repeats, seeds `seed, seed + 1, ...` (sets `runs`).
    #[arg(long)]
    runs: Option<usize>,
    /// Train on this fraction of the training volumes (sets `label_fraction`).
    #[arg(long = "label-fraction")]
    label_fraction: Option<f64>,
    /// Override a config key (repeatable; after the flags above).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The fine-tuning directory (default: runs/finetune/<config name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the fine-tuning directory if it exists.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Continue the interrupted fine-tune in the fine-tuning directory, from its last
    /// checkpoint (after every epoch); give the command and flags it was started with.
    #[arg(long)]
    resume: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn quoted(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    // Paths from the command line resolve against the working directory.
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut overrides = Vec::new();
    if let Some(path) = &args.train {
        overrides.push(format!("data.train.path={}", quoted(&absolute(path))));
    }
    if let Some(path) = &args.eval {
        overrides.push(format!("data.eval.path={}", quoted(&absolute(path))));
    }
    if let Some(runs) = args.runs {
        overrides.push(format!("runs={runs}"));
    }
    if let Some(fraction) = args.label_fraction {
        overrides.push(format!("label_fraction={fraction}"));
    }
    overrides.extend(args.set.iter().cloned());
    let out = args.out.clone().unwrap_or_else(|| {
        Path::new("runs").join("finetune").join(
            args.config
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "finetune".into()),
        )
    });
    let report = finetune::finetune(&FinetuneOptions {
        config: args.config.clone(),
        overrides,
        pretrained: args.pretrained.clone(),
        run_config: args.run_config.clone(),
        out: out.clone(),
        force: args.force,
        resume: args.resume,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.table());
        println!("report, metrics, curves and weights: {}", out.display());
    }
    Ok(())
}
