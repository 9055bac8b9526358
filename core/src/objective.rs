//! The objective role: the loss of one self-supervised task over a batch of views.
//!
//! An objective declares what it consumes, so the runner computes each forward pass once
//! per step and hands it to every objective of the stage. It owns its state (projectors,
//! prototypes, queues, memory banks): tensors live in the run's variable store under the
//! objective's path (checkpointed with the model; buffers are created non-trainable), and
//! anything else is returned by [`Objective::state`] and restored by
//! [`Objective::load_state`].

use crate::aggregator::Aggregator;
use crate::encoder::{EncoderOutput, Level, SpatialDims};
use crate::section::Section;
use anyhow::Result;
use tch::{nn, Tensor};

/// The inputs an objective can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Consumes {
    /// Pooled encoder embeddings of 2D views of slices or images: one `[N, E]` per view.
    SliceViews,
    /// Volume embeddings of 3D views: one `[B, F]` per view, from the aggregator.
    VolumeViews,
    /// The un-augmented sequence of slice embeddings `[B, n, E]` with the aggregator, for
    /// objectives that transform the sequence themselves (masked prediction).
    SliceSequence,
    /// The 3D crops themselves `[B, C, D, H, W]` with a 3D encoder to run on them, for
    /// objectives that corrupt their input before encoding it (MONAI's ViT reconstruction).
    VolumeCrops,
}

impl Consumes {
    /// The encoders that can supply this input: slice inputs need a 2D encoder, crops a 3D
    /// one; volume views come from either (through an aggregator in 2D).
    pub fn spatial_dims(self) -> Option<SpatialDims> {
        match self {
            Consumes::SliceViews | Consumes::SliceSequence => Some(SpatialDims::Two),
            Consumes::VolumeCrops => Some(SpatialDims::Three),
            Consumes::VolumeViews => None,
        }
    }
}

/// Which embeddings a view-based objective compares: 2D views of slices through the
/// encoder (the paper's L_intra) or 3D views of volumes through the aggregator (L_inter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewLevel {
    Slice,
    Volume,
}

impl ViewLevel {
    /// What the objective consumes at this level and the width of those embeddings; a
    /// volume level without an aggregator is an error naming `objective`.
    pub fn resolve(self, shape: &ObjectiveShape, objective: &str) -> anyhow::Result<(Consumes, i64)> {
        match (self, shape.volume_dim) {
            (ViewLevel::Slice, _) => Ok((Consumes::SliceViews, shape.slice_dim)),
            (ViewLevel::Volume, Some(dim)) => Ok((Consumes::VolumeViews, dim)),
            (ViewLevel::Volume, None) => {
                anyhow::bail!("{objective} with level = \"volume\" needs an [aggregator] section (or a 3D encoder)")
            }
        }
    }

    /// How many views a sample has at this level whose embeddings are comparable targets
    /// (SwAV's codes, a memory bank): the global 2D views, or every 3D view.
    pub fn global_views(self, shape: &ObjectiveShape) -> usize {
        match self {
            ViewLevel::Slice => shape.global_slice_views,
            ViewLevel::Volume => shape.volume_views,
        }
    }

    /// The config key that sets [`ViewLevel::global_views`], for messages.
    pub fn global_views_key(self) -> &'static str {
        match self {
            ViewLevel::Slice => "data.views.slice_views",
            ViewLevel::Volume => "data.views.volume_views",
        }
    }

    /// This step's views at this level.
    pub fn views<'a>(self, input: &StepInput<'a>, objective: &str) -> anyhow::Result<&'a [Tensor]> {
        let views = match self {
            ViewLevel::Slice => input.slice_views,
            ViewLevel::Volume => input.volume_views,
        };
        let views = views.ok_or_else(|| anyhow::anyhow!("{objective}: the runner supplied no {self:?} views"))?;
        anyhow::ensure!(
            views.len() >= 2,
            "{objective} needs at least 2 views, got {} (data.views)",
            views.len()
        );
        Ok(views)
    }
}

/// A sequence of slice embeddings and the aggregator to run over it.
pub struct SliceSequence<'a> {
    /// `[B, n, E]`.
    pub embeddings: &'a Tensor,
    /// `[B, n]` bool: real slices (false for padding).
    pub valid: &'a Tensor,
    pub aggregator: &'a dyn Aggregator,
    pub train: bool,
}

/// This step's 3D crops and the encoder to run on them.
pub struct VolumeCrops<'a> {
    /// One `[B, C, D, H, W]` (fp32, on the run's device) per crop of each volume
    /// (`data.views.volume_views`), augmented but not otherwise transformed.
    pub crops: &'a [Tensor],
    /// The run's 3D encoder on a `[N, C, D, H, W]` input, in the stage's training mode and
    /// the run's precision (autocast), its outputs in fp32 ([`crate::precision`]).
    pub encode: &'a dyn Fn(&Tensor) -> Result<EncoderOutput>,
}

/// Everything the runner computed this step; each objective reads what it declared.
pub struct StepInput<'a> {
    /// Global sample id of each row (unique across every dataset of the run).
    pub ids: &'a Tensor,
    /// Embeddings `[N, E]` of each 2D view: the global views first, then the local ones.
    pub slice_views: Option<&'a [Tensor]>,
    /// How many of `slice_views` are global (SwAV computes codes from these only).
    pub global_slice_views: usize,
    pub volume_views: Option<&'a [Tensor]>,
    pub slice_sequence: Option<SliceSequence<'a>>,
    pub volume_crops: Option<VolumeCrops<'a>>,
}

impl<'a> StepInput<'a> {
    /// A step whose only input is 3D crops with the encoder to run on them, as the
    /// objectives that cut or corrupt their own crops (reconstruction, VoCo) read it outside
    /// a run (benchmarks, tests).
    pub fn volume_crops(
        ids: &'a Tensor,
        crops: &'a [Tensor],
        encode: &'a dyn Fn(&Tensor) -> Result<EncoderOutput>,
    ) -> StepInput<'a> {
        StepInput {
            ids,
            slice_views: None,
            global_slice_views: 0,
            volume_views: None,
            slice_sequence: None,
            volume_crops: Some(VolumeCrops { crops, encode }),
        }
    }
}

/// Where the run is.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub epoch: usize,
    /// Step within the stage (0-based).
    pub step: usize,
    pub steps_per_epoch: usize,
}

/// One objective's losses: the weighted sum trains; each named term is logged.
pub struct Loss {
    pub total: Tensor,
    /// Loss terms and baselines on the loss's own scale, logged as `loss/<objective>/<name>`
    /// and drawn beside the loss.
    pub terms: Vec<(String, f64)>,
    /// Signals that are not losses (a code entropy, prototypes or clusters used, a count of
    /// masked slices), logged as `health/<objective>/<name>` and drawn each on its own axis:
    /// a count never shares an axis with a loss.
    pub health: Vec<(String, f64)>,
}

pub trait Objective {
    fn consumes(&self) -> Consumes;
    /// The spatial size of what it feeds a 3D encoder, given the crops the data path delivers
    /// (`data.views.crop_size`), so that the encoder can refuse a size it cannot encode
    /// ([`crate::encoder::Encoder::check_input_size`]) before the first step. The delivered
    /// size by default; an objective that cuts its own crops (VoCo's base crops) says theirs,
    /// or refuses a delivered size it cannot cut.
    fn encoder_input_size(&self, delivered: &[i64]) -> Result<Vec<i64>> {
        Ok(delivered.to_vec())
    }
    /// The loss over this step's inputs.
    fn loss(&mut self, input: &StepInput, progress: &Progress) -> Result<Loss>;
    /// Called before the first step of each epoch.
    fn on_epoch_start(&mut self, _progress: &Progress) -> Result<()> {
        Ok(())
    }
    /// Whether the objective wants a pass over the coming epoch's batches before it starts
    /// (no gradients, every module in eval mode), e.g. to fill a memory bank before the first
    /// clustering. Each batch goes to [`Objective::observe`]; then `on_epoch_start` runs.
    fn needs_memory_pass(&self, _progress: &Progress) -> bool {
        false
    }
    /// Receives one batch of the memory pass.
    fn observe(&mut self, _input: &StepInput, _progress: &Progress) -> Result<()> {
        Ok(())
    }
    /// Called after each optimizer step (prototype normalisation, queue updates, ...).
    fn on_step_end(&mut self, _progress: &Progress) -> Result<()> {
        Ok(())
    }
    /// Non-tensor state to checkpoint.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores what [`Objective::state`] returned.
    fn load_state(&mut self, _state: serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// What the rest of the run tells an objective when building it.
#[derive(Debug, Clone)]
pub struct ObjectiveShape {
    /// Spatial axes of the run's encoder.
    pub spatial_dims: SpatialDims,
    /// Channels of the encoder's input.
    pub in_channels: i64,
    /// Channels and stride of the encoder's deepest level (a ViT's hidden width and patch
    /// size), for objectives that decode it back to the input (reconstruction).
    pub deepest_level: (i64, i64),
    /// The encoder's levels, shallow to deep, for objectives that read several of them
    /// (VoCo pools a chosen set into one embedding).
    pub levels: Vec<Level>,
    /// The one spatial size the encoder accepts, where it fixes one (a ViT's `img_size`,
    /// [`crate::encoder::Encoder::input_size`]), for objectives that cut their own crops.
    pub input_size: Option<Vec<i64>>,
    /// Width of the slice embeddings (a 2D encoder's pooled output; a 3D encoder's too).
    pub slice_dim: i64,
    /// Width of the volume embeddings: the aggregator's output, or a 3D encoder's pooled
    /// one; `None` for a 2D encoder without an aggregator.
    pub volume_dim: Option<i64>,
    /// Width of the slice features in [`StepInput::slice_sequence`] (the aggregator's input,
    /// Eq. 9), if the run has an aggregator.
    pub sequence_dim: Option<i64>,
    /// Number of samples in the run, for memory banks indexed by global id.
    pub num_samples: usize,
    /// Global 2D views per sample (`data.views.slice_views`); they come first in
    /// [`StepInput::slice_views`].
    pub global_slice_views: usize,
    /// Local 2D views per sample (`data.views.local_views`), after the global ones.
    pub local_slice_views: usize,
    /// 3D views per volume (`data.views.volume_views`): slice stacks for a 2D encoder, 3D
    /// crops for a 3D one.
    pub volume_views: usize,
    /// The run's seed, for objectives that draw their own randomness (derive from it with
    /// [`crate::rng::derive`] so runs stay reproducible and resumable).
    pub seed: u64,
}

pub type BuildObjective = fn(&Section, nn::Path, &ObjectiveShape) -> Result<Box<dyn Objective>>;

pub struct ObjectiveEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub default_config: fn() -> String,
    /// Small variants of the config (TOML) that build and run fast on a CPU; the
    /// composition test trains one step with each, against every compatible component.
    pub smoke_configs: &'static [&'static str],
    pub build: BuildObjective,
}
crate::impl_registered!(ObjectiveEntry);
