//! The UNETR segmentation head (Hatamizadeh et al., WACV 2022) over a 3D encoder's levels,
//! with MONAI's parameter names, trained with MONAI's Dice + cross-entropy.

mod dice_ce;
mod unetr;

pub use dice_ce::{dice_ce_loss, DiceCeConfig};
pub use unetr::{NormName, Unetr, UnetrConfig};
