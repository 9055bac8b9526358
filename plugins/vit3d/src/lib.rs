//! The 3D Vision Transformer encoder (`vit3d`) with MONAI's ViT parameter names, so that
//! weights move to and from MONAI by a strict load.

mod vit3d;

pub use vit3d::{ViT3d, ViT3dConfig};
