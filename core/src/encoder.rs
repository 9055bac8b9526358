//! The encoder role: images to feature maps at several levels and a pooled embedding.
//!
//! In the paper's notation this is f_intra, the 2D CNN that embeds every slice (Sec. 3.1).
//! An encoder declares its levels and their widths so that aggregators, decoders and
//! detection heads are built from what it says, never from magic numbers.
//!
//! An encoder also declares how many spatial axes its images have ([`SpatialDims`]). A 2D
//! encoder embeds images and slices, and a volume reaches it as a slice sequence that an
//! aggregator turns into a volume embedding. A 3D encoder (a ViT over 3D patches, a 3D Swin)
//! sees a volume whole: its pooled embedding is the volume embedding, and a run with one
//! has no aggregator.

use crate::section::Section;
use anyhow::Result;
use tch::{nn, Tensor};

/// How many spatial axes the images an encoder takes have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SpatialDims {
    /// `[N, C, H, W]` images (2D images, slices of volumes).
    #[serde(rename = "2d")]
    Two,
    /// `[N, C, D, H, W]` volumes (3D crops).
    #[serde(rename = "3d")]
    Three,
}

impl SpatialDims {
    /// Number of spatial axes.
    pub fn axes(self) -> usize {
        match self {
            SpatialDims::Two => 2,
            SpatialDims::Three => 3,
        }
    }
}

impl std::fmt::Display for SpatialDims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpatialDims::Two => "2D",
            SpatialDims::Three => "3D",
        })
    }
}

/// The library whose parameter names an encoder's variables carry, so that its weights
/// move to and from that library's model with a strict load (`medssl export --format`,
/// `encoder.init`; the formats of weight files are [`crate::weight_format`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceLibrary {
    /// torchvision's `resnet18/34/50` (its `state_dict` without `fc.*`).
    Torchvision,
    /// MONAI's `ViT` / `SwinViT` (the `vit.` / `swinViT.` sub-trees of UNETR / SwinUNETR).
    Monai,
}

impl std::fmt::Display for ReferenceLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReferenceLibrary::Torchvision => "torchvision",
            ReferenceLibrary::Monai => "monai",
        })
    }
}

/// One feature level of an encoder: its name (`stem`, `layer1`, ...), its channel count and
/// its stride relative to the input (the same along every spatial axis; a ViT's patch size).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Level {
    pub name: String,
    pub channels: i64,
    pub stride: i64,
}

/// What an encoder returns: one feature map per declared level, in order, and the pooled
/// embedding of the last level.
pub struct EncoderOutput {
    /// `[N, C_l, H / s_l, W / s_l]` for each level `l` (`[N, C_l, D / s_l, H / s_l, W / s_l]`
    /// for a 3D encoder; a ViT's tokens as their patch grid), in the encoder's memory layout
    /// (NHWC strides under `memory_format = "channels_last"`, [`crate::memory_format`]):
    /// readers reshape them with `reshape`, which copies where it must, not `view`.
    pub levels: Vec<Tensor>,
    /// `[N, embedding_dim]`.
    pub pooled: Tensor,
}

pub trait Encoder {
    /// Channels of the images it takes (`[N, C, H, W]`, or `[N, C, D, H, W]` in 3D).
    fn in_channels(&self) -> i64;
    /// How many spatial axes its images have (2D unless it says otherwise).
    fn spatial_dims(&self) -> SpatialDims {
        SpatialDims::Two
    }
    /// The one spatial size it accepts, for encoders that fix it (a ViT's learned position
    /// embeddings fix its patch grid): `[D, H, W]` or `[H, W]`. `None`: any size.
    fn input_size(&self) -> Option<Vec<i64>> {
        None
    }
    /// Refuses a spatial input size (`[D, H, W]` or `[H, W]`) that it cannot encode, naming
    /// its config key and what it needs; called with the crops a run will feed it before the
    /// first step. Any size by default; a fixed size is [`Encoder::input_size`]'s to declare.
    fn check_input_size(&self, _size: &[i64]) -> Result<()> {
        Ok(())
    }
    /// The library whose parameter names its variables carry, if any.
    fn reference_library(&self) -> Option<ReferenceLibrary> {
        None
    }
    /// Its feature levels, shallow to deep.
    fn levels(&self) -> &[Level];
    /// Width of the pooled embedding.
    fn embedding_dim(&self) -> i64;
    /// Embeds `[N, C, H, W]` images (`[N, C, D, H, W]` volumes in 3D); `train` selects
    /// batch-norm and dropout behaviour.
    fn forward(&self, images: &Tensor, train: bool) -> EncoderOutput;
}

/// Builds an encoder from its config section; its parameters live under `path`.
pub type BuildEncoder = fn(&Section, nn::Path, &EncoderShape) -> Result<Box<dyn Encoder>>;

/// What the rest of the run asks of an encoder.
#[derive(Debug, Clone, Copy)]
pub struct EncoderShape {
    /// Channels of the images the data pipeline produces.
    pub in_channels: i64,
}

pub struct EncoderEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub default_config: fn() -> String,
    /// Small variants of the config (TOML) that build and run fast on a CPU; the
    /// composition test trains one step with each, against every compatible component.
    pub smoke_configs: &'static [&'static str],
    pub build: BuildEncoder,
}
crate::impl_registered!(EncoderEntry);
