//! The reconstruction SSL of MONAI's ViT tutorial (Project-MONAI/tutorials,
//! self_supervised_pretraining/vit_unetr_ssl): crops corrupted by in-painting, out-painting
//! and local voxel shuffling, which the encoder and a small decoder learn to restore.

pub mod corruption;
pub mod reconstruction;

pub use reconstruction::{ReconstructionConfig, ReconstructionObjective};
