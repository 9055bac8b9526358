//! The head role: a downstream task on top of the backbone's features (U-Net decoder,
//! 3D classifier, Faster R-CNN): its training loss and its predictions.
//!
//! The paper judges pre-training by three downstream tasks (Nguyen et al., AAAI 2023,
//! Sec. 4): f_intra as the encoder of a 2D U-Net whose slice predictions are merged into
//! volumes, f_intra + f_inter + two FC layers for 3D classification, and f_intra as the
//! backbone of Faster R-CNN. A head says which task it serves ([`Task`]); the fine-tuning
//! loop (`medssl finetune`) feeds it that task's inputs and scores its predictions with that
//! task's metrics. A head is built from what the backbone declares ([`HeadShape`]: the
//! encoder's levels and widths, the aggregator's width), never from magic numbers.

use crate::detection::{Detections, ImageTargets};
use crate::encoder::{EncoderOutput, Level, SpatialDims};
use crate::section::Section;
use anyhow::Result;
use tch::{nn, Tensor};

/// What a head predicts: which inputs a fine-tune gives it, what its targets are and how it
/// is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Per-pixel class logits `[N, K, H, W]` of 2D images (a volume's slices), from the
    /// encoder's levels. Targets: `[N, H, W]` int64 class ids. Scored by per-volume 3D IoU and
    /// Dice after the slice predictions are merged back into their volumes.
    Segmentation,
    /// Class logits `[B, K]` of volumes, from the aggregator's volume embedding. Targets:
    /// `[B]` int64 class ids. Scored by AUC and accuracy.
    VolumeClassification,
    /// Boxes, scores and labels of objects in 2D images (a volume's slices), from the
    /// encoder's levels. Targets: each image's boxes and labels 1..=C ([`ImageTargets`]; C
    /// object categories, `num_classes = C + 1` counting the background). Scored by AP at IoU
    /// 0.5 per category and its mean.
    Detection,
    /// Per-voxel class logits `[N, K, D, H, W]` of 3D crops, from a 3D encoder's levels (and
    /// the crops themselves, [`HeadInput::images`]). Targets: `[N, D, H, W]` int64 class ids.
    /// Trained on random crops; scored by per-class 3D Dice of whole volumes predicted by
    /// sliding-window inference.
    VolumeSegmentation,
}

impl Task {
    /// Whether the head reads the aggregator's volume embedding, so that a backbone with a
    /// 2D encoder needs an aggregator (a 3D encoder's pooled embedding is the volume
    /// embedding).
    pub fn needs_aggregator(self) -> bool {
        self == Task::VolumeClassification
    }

    /// The encoders whose features the task reads: `None` where either kind serves.
    pub fn spatial_dims(self) -> Option<SpatialDims> {
        match self {
            Task::Segmentation | Task::Detection => Some(SpatialDims::Two),
            Task::VolumeSegmentation => Some(SpatialDims::Three),
            Task::VolumeClassification => None,
        }
    }
}

/// The backbone's features of one batch, as a head reads them.
pub struct HeadInput<'a> {
    /// The encoder's output on the batch's images: `[N, C_l, H / s_l, W / s_l]` per level
    /// (for volume tasks, over every slice of every volume, `N = B * T`).
    pub encoder: &'a EncoderOutput,
    /// The volume embeddings `[B, F]` (volume tasks only).
    pub volume: Option<&'a Tensor>,
    /// The batch's input as the encoder saw it (`[N, C, D, H, W]` crops for
    /// [`Task::VolumeSegmentation`], whose decoders read the input itself, as UNETR's first
    /// skip connection does); `None` for the 2D tasks.
    pub images: Option<&'a Tensor>,
    /// Height and width of the input images, the size dense predictions come back at.
    pub image_size: [i64; 2],
}

/// A batch's training targets, as the head's [`Task`] says.
pub enum Targets {
    /// int64 class ids: `[N, H, W]` (segmentation), `[N, D, H, W]` (volume segmentation) or
    /// `[B]` (volume classification).
    Classes(Tensor),
    /// One entry per image (detection).
    Boxes(Vec<ImageTargets>),
}

impl Targets {
    /// The class ids, or an error naming `head` where the batch carries boxes.
    pub fn classes(&self, head: &str) -> Result<&Tensor> {
        match self {
            Targets::Classes(t) => Ok(t),
            Targets::Boxes(_) => anyhow::bail!("head `{head}` trains on class ids, but the batch carries boxes"),
        }
    }

    /// The per-image boxes, or an error naming `head` where the batch carries class ids.
    pub fn boxes(&self, head: &str) -> Result<&[ImageTargets]> {
        match self {
            Targets::Boxes(b) => Ok(b),
            Targets::Classes(_) => anyhow::bail!("head `{head}` trains on boxes, but the batch carries class ids"),
        }
    }
}

/// A head's predictions of a batch.
pub enum Prediction {
    /// Class logits: `[N, K, H, W]` (segmentation), `[N, K, D, H, W]` (volume segmentation)
    /// or `[B, K]` (volume classification).
    Logits(Tensor),
    /// One entry per image, boxes in input pixels (detection).
    Detections(Vec<Detections>),
}

pub trait Head {
    /// The task it serves.
    fn task(&self) -> Task;
    /// Training loss (a scalar) of a batch against its targets, in training mode (batch
    /// norm and dropout). `seed` fixes the head's own random draws (a detector's anchor and
    /// region sampling), so a step is reproducible.
    fn loss(&self, input: &HeadInput, targets: &Targets, seed: u64) -> Result<Tensor>;
    /// Predictions of a batch in evaluation mode.
    fn predict(&self, input: &HeadInput) -> Result<Prediction>;
    /// The head's own requirement on the spatial size of its input (`[D, H, W]` of a 3D
    /// crop), beyond what the encoder declares: an error saying what it takes where `size`
    /// does not suit it. A 3D segmentation fine-tune checks the run's crop size with it before
    /// it reads any data (training crops and sliding windows both have that size). MONAI's
    /// SwinUNETR, for one, takes only sides divisible by 32. The default takes every size.
    fn check_input_size(&self, _size: &[i64]) -> Result<()> {
        Ok(())
    }
}

/// What a head is built against: the backbone's declared levels and widths, and the
/// number of classes of the task.
#[derive(Debug, Clone)]
pub struct HeadShape {
    /// Channels of the encoder's input images.
    pub in_channels: i64,
    /// Spatial axes of the encoder's input ([`crate::encoder::Encoder::spatial_dims`]).
    pub spatial_dims: SpatialDims,
    /// The encoder's levels, shallow to deep.
    pub levels: Vec<Level>,
    /// Width of the encoder's pooled embedding.
    pub embedding_dim: i64,
    /// Width of the volume embedding: the aggregator's, or a 3D encoder's pooled embedding
    /// (`None`: a 2D encoder without an aggregator).
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
