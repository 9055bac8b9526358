//! The reconstruction SSL of MONAI's ViT tutorial (Project-MONAI/tutorials,
//! self_supervised_pretraining/vit_unetr_ssl): crops corrupted by in-painting, out-painting
//! and local voxel shuffling, which a network learns to restore. For now only the
//! corruptions; the objective comes next.

pub mod corruption;
