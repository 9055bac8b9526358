//! The UNETR segmentation head (Hatamizadeh et al., WACV 2022) over a 3D encoder's levels,
//! with MONAI's parameter names, trained with MONAI's Dice + cross-entropy. Its blocks and
//! loss are core's ([`medssl_core::unetr_blocks`], [`medssl_core::dice_ce`]), shared with
//! `swin-unetr`.

mod unetr;

pub use unetr::{Unetr, UnetrConfig};
