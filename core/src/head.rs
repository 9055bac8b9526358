//! The head role: a downstream task on top of the backbone's features (U-Net decoder,
//! 3D classifier, Faster R-CNN), with its training loss.
//!
//! The paper judges pre-training by three downstream tasks (Nguyen et al., AAAI 2023,
//! Sec. 4): f_intra as the encoder of a 2D U-Net whose slice predictions are merged into
//! volumes, f_intra + f_inter + two FC layers for 3D classification, and f_intra as the
//! backbone of Faster R-CNN. A head says which task it serves ([`Task`]); the fine-tuning
//! loop (`medssl finetune`) feeds it that task's inputs and scores its predictions with that
//! task's metrics. A head is built from what the backbone declares ([`HeadShape`]: the
//! encoder's levels and widths, the aggregator's width), never from magic numbers.

use crate::config::Section;
use crate::encoder::{EncoderOutput, Level};
use anyhow::Result;
use tch::{nn, Tensor};

/// What a head predicts: which inputs a fine-tune gives it, what its targets are and how it
/// is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Per-pixel class logits `[N, K, H, W]` of 2D images (a volume's slices), from the
    /// encoder's levels. Targets: `[N, H, W]` int64 class ids. Scored by per-volume 3D IoU and
    /// Dice after the slice predictions are merged back into their volumes.
    Segmentation,
    /// Class logits `[B, K]` of volumes, from the aggregator's volume embedding. Targets:
    /// `[B]` int64 class ids. Scored by AUC and accuracy.
    VolumeClassification,
}

impl Task {
    /// Whether the head reads the aggregator's volume embedding (so the backbone needs an
    /// aggregator).
    pub fn needs_aggregator(self) -> bool {
        self == Task::VolumeClassification
    }
}

/// The backbone's features of one batch, as a head reads them.
pub struct HeadInput<'a> {
    /// The encoder's output on the batch's images: `[N, C_l, H / s_l, W / s_l]` per level
    /// (for volume tasks, over every slice of every volume, `N = B * T`).
    pub encoder: &'a EncoderOutput,
    /// The volume embeddings `[B, F]` (volume tasks only).
    pub volume: Option<&'a Tensor>,
    /// Height and width of the input images, the size dense predictions come back at.
    pub image_size: [i64; 2],
}

pub trait Head {
    /// The task it serves.
    fn task(&self) -> Task;
    /// Logits from the backbone's features; `train` selects batch-norm and dropout
    /// behaviour.
    fn forward(&self, input: &HeadInput, train: bool) -> Tensor;
    /// Training loss (a scalar) of `logits` against `targets` (int64 class ids, shaped as
    /// [`Task`] says).
    fn loss(&self, logits: &Tensor, targets: &Tensor) -> Tensor;
}

/// What a head is built against: the backbone's declared levels and widths, and the
/// number of classes of the task.
#[derive(Debug, Clone)]
pub struct HeadShape {
    /// The encoder's levels, shallow to deep.
    pub levels: Vec<Level>,
    /// Width of the encoder's pooled embedding.
    pub embedding_dim: i64,
    /// Width of the aggregator's volume embedding (`None`: the backbone has no aggregator).
    pub volume_dim: Option<i64>,
    /// Classes to predict (background included for segmentation).
    pub num_classes: i64,
}

pub type BuildHead = fn(&Section, nn::Path, &HeadShape) -> Result<Box<dyn Head>>;

pub struct HeadEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub default_config: fn() -> String,
    /// Small variants of the config (TOML) that build and run fast on a CPU; the
    /// composition test trains one step with each, on every compatible backbone.
    pub smoke_configs: &'static [&'static str],
    pub build: BuildHead,
}
crate::impl_registered!(HeadEntry);
