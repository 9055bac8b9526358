//! The U-Net segmentation head: a decoder over the levels of any encoder (Ronneberger et
//! al., MICCAI 2015), the paper's 2D segmentation downstream with f_intra as its encoder
//! (Nguyen et al., AAAI 2023, Sec. 4), trained with cross-entropy plus soft Dice.

mod soft_dice;
mod unet;

pub use soft_dice::soft_dice_loss;
pub use unet::{UNet, UNetConfig};
