//! `medssl eval linear|knn`: frozen-feature evaluation of a pre-training run (the protocol
//! itself is `medssl_core::eval`).

use anyhow::Result;
use clap::{Args, Subcommand};
use medssl_core::eval::{self, DataSpec, EvalOptions};
use medssl_core::precision::Precision;
use medssl_core::probe::knn::KnnConfig;
use medssl_core::probe::logistic::LogisticConfig;
use medssl_core::probe::Probe;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Linear probe: multinomial logistic regression on standardised frozen features
    /// (full-batch Adam, L2 penalty).
    Linear {
        #[command(flatten)]
        common: Common,
        /// Full-batch training steps of the probe.
        #[arg(long, default_value_t = LogisticConfig::default().epochs)]
        epochs: usize,
        /// Adam's learning rate.
        #[arg(long, default_value_t = LogisticConfig::default().lr)]
        lr: f64,
        /// L2 penalty on the probe's weights.
        #[arg(long, default_value_t = LogisticConfig::default().weight_decay)]
        weight_decay: f64,
    },
    /// kNN probe: cosine similarity, the k nearest training samples vote with weight
    /// exp(similarity / temperature) (Wu et al. 2018).
    Knn {
        #[command(flatten)]
        common: Common,
        /// Neighbours that vote.
        #[arg(long, default_value_t = KnnConfig::default().k)]
        k: usize,
        /// Temperature of the vote weights.
        #[arg(long, default_value_t = KnnConfig::default().temperature)]
        temperature: f64,
    },
}

/// Flags both protocols take.
#[derive(Args)]
pub struct Common {
    /// A run directory (its latest checkpoint), a checkpoint folder
    /// (RUN/checkpoints/step-N) or its tensors.safetensors.
    checkpoint: PathBuf,
    /// The run's config (default: the run directory's config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Labelled set the probe is trained on.
    #[arg(long)]
    train: PathBuf,
    /// Split of --train, for readers with splits (default: train).
    #[arg(long)]
    train_split: Option<String>,
    /// Labelled set the probe is scored on.
    #[arg(long)]
    eval: PathBuf,
    /// Split of --eval, for readers with splits (default: val).
    #[arg(long)]
    eval_split: Option<String>,
    /// Reader of both sets (see `medssl list`; default: recognised from the path,
    /// `medmnist` for .npz).
    #[arg(long)]
    format: Option<String>,
    /// Train the probe on a seeded, class-stratified fraction of the training labels, in
    /// (0, 1].
    #[arg(long, default_value_t = 1.0)]
    label_fraction: f64,
    /// Score by stratified K-fold cross-validation over --train and --eval pooled (each seed
    /// deals its own folds; the label fraction applies to each fit's training folds) instead
    /// of training on --train and scoring on --eval.
    #[arg(long)]
    folds: Option<usize>,
    /// Repeat with this many seeds (label draw and probe init) and report mean ± std.
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Add a row for the probe on the flattened, resized input intensities.
    #[arg(long)]
    raw_pixels: bool,
    /// Volumes: ignore the run's aggregator and average the slices' pooled encoder
    /// embeddings (the 2D encoder + mean pooling baseline).
    #[arg(long)]
    mean_pool: bool,
    /// Samples encoded at once.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, bf16 (CPU or CUDA) or fp16 (CUDA): the encoder's forward pass in autocast.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Print JSON: {"pretrained": {"acc", "auc", ...}, "random_init": {...}, ...}.
    #[arg(long)]
    json: bool,
}

pub fn run(command: EvalCommand) -> Result<()> {
    let (common, probe) = match command {
        EvalCommand::Linear {
            common,
            epochs,
            lr,
            weight_decay,
        } => (
            common,
            Probe::Linear(LogisticConfig {
                epochs,
                lr,
                weight_decay,
            }),
        ),
        EvalCommand::Knn { common, k, temperature } => (common, Probe::Knn(KnnConfig { k, temperature })),
    };
    let options = EvalOptions {
        checkpoint: common.checkpoint,
        config: common.config,
        train: DataSpec {
            path: common.train,
            split: common.train_split,
        },
        eval: DataSpec {
            path: common.eval,
            split: common.eval_split,
        },
        format: common.format,
        label_fraction: common.label_fraction,
        folds: common.folds,
        seeds: common.seeds,
        seed: common.seed,
        raw_pixels: common.raw_pixels,
        mean_pool: common.mean_pool,
        batch_size: common.batch_size,
        device: common.device,
        precision: common.precision,
        probe,
    };
    let report = eval::evaluate(&options)?;
    if common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
