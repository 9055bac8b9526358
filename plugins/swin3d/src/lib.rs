//! The 3D Swin transformer encoder (`swin3d`): the `swinViT` of MONAI's SwinUNETR, with
//! MONAI's parameter names, so that weights move to and from MONAI by a strict load.

mod swin3d;
mod windows;

pub use swin3d::{Merging, Swin3d, Swin3dConfig};
