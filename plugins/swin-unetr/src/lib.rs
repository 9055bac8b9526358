//! The Swin UNETR segmentation head (Hatamizadeh et al., BrainLes 2021) over a 3D Swin
//! encoder's levels, with MONAI's parameter names, trained with MONAI's Dice + cross-entropy.
//! Its blocks and loss are core's ([`medssl_core::unetr_blocks`], [`medssl_core::dice_ce`]),
//! shared with `unetr`.

mod swin_unetr;

pub use swin_unetr::{SwinUnetr, SwinUnetrConfig};
