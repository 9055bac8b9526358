//! The head role: a downstream task on top of an encoder's features (linear classifier,
//! U-Net decoder, Faster R-CNN, 3D classifier), with its loss and its metric.

use crate::config::Section;
use crate::encoder::Level;
use anyhow::Result;
use tch::{nn, Tensor};

pub trait Head {
    /// Predictions from the encoder's feature levels (and pooled embedding).
    fn forward(&self, levels: &[Tensor], pooled: &Tensor, train: bool) -> Tensor;
    /// Training loss of `predictions` against `targets`.
    fn loss(&self, predictions: &Tensor, targets: &Tensor) -> Tensor;
}

/// What a head is built against: the encoder's declared levels and embedding width.
#[derive(Debug, Clone)]
pub struct HeadShape {
    pub levels: Vec<Level>,
    pub embedding_dim: i64,
    pub num_classes: i64,
}

pub type BuildHead = fn(&Section, nn::Path, &HeadShape) -> Result<Box<dyn Head>>;

pub struct HeadEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub default_config: fn() -> String,
    pub build: BuildHead,
}
crate::impl_registered!(HeadEntry);
