//! The encoder role: images to feature maps at several levels and a pooled embedding.
//!
//! In the paper's notation this is f_intra, the 2D CNN that embeds every slice (Sec. 3.1).
//! An encoder declares its levels and their widths so that aggregators, decoders and
//! detection heads are built from what it says, never from magic numbers.

use crate::section::Section;
use anyhow::Result;
use tch::{nn, Tensor};

/// One feature level of an encoder: its name (`stem`, `layer1`, ...), its channel count and
/// its stride relative to the input.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Level {
    pub name: String,
    pub channels: i64,
    pub stride: i64,
}

/// What an encoder returns: one feature map per declared level, in order, and the pooled
/// embedding of the last level.
pub struct EncoderOutput {
    /// `[N, C_l, H / s_l, W / s_l]` for each level `l`, in the encoder's memory layout
    /// (NHWC strides under `memory_format = "channels_last"`, [`crate::memory_format`]):
    /// readers reshape them with `reshape`, which copies where it must, not `view`.
    pub levels: Vec<Tensor>,
    /// `[N, embedding_dim]`.
    pub pooled: Tensor,
}

pub trait Encoder {
    /// Channels of the images it takes (`[N, C, H, W]`).
    fn in_channels(&self) -> i64;
    /// Its feature levels, shallow to deep.
    fn levels(&self) -> &[Level];
    /// Width of the pooled embedding.
    fn embedding_dim(&self) -> i64;
    /// Embeds `[N, C, H, W]` images; `train` selects batch-norm behaviour.
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
