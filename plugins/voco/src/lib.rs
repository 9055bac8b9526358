//! VoCo (Wu et al., CVPR 2024, "VoCo: A Simple-yet-Effective Volume Contrastive Learning
//! Framework for 3D Medical Image Analysis", and its large-scale version in
//! Luffy03/Large-Scale-Medical): a random crop of a region predicts its overlap with a grid
//! of base crops of the same region, by the cosine similarity of their embeddings.

pub mod crops;
pub mod voco;

pub use voco::{VocoConfig, VocoObjective};
