//! MONAI's building blocks of the UNETR family of 3D segmentation decoders
//! (`monai/networks/blocks/dynunet_block.py` and `unetr_block.py`, MONAI 1.6), with MONAI's
//! submodule names, so that a MONAI network's state_dict maps one-to-one onto medssl's
//! variables. The `unetr` head (MONAI's `UNETR`) and the `swin-unetr` head (MONAI's
//! `SwinUNETR`) are built from them.
//!
//! Every block is 3D, with MONAI's defaults for both decoders: 3x3x3 convolutions padded to
//! keep the size, 2x2x2 stride-2 transposed convolutions, instance norm without affine
//! parameters, LeakyReLU with slope 0.01, no convolution bias but the output block's
//! (MONAI's `get_conv_layer` builds the others without). Initialisation is PyTorch's default
//! for every convolution ([`crate::layers`]): MONAI sets none of its own in these blocks.
//!
//! - [`UnetBlock`]: `UnetResBlock` or `UnetBasicBlock`, two convolutions with norms;
//! - [`UnetrBasicBlock`]: that block under `layer` (the encoders of both networks);
//! - [`UnetrUpBlock`]: a transposed convolution, the skip concatenated, a [`UnetBlock`];
//! - [`UnetOutBlock`]: the 1x1x1 convolution to class logits;
//! - [`padded_conv`], [`transposed_conv`], [`instance_norm`]: the layers they are made of,
//!   for blocks only one network has (UNETR's `UnetrPrUpBlock`).

mod conv;
mod norm;
mod unet_block;
mod unet_out_block;
mod unetr_basic_block;
mod unetr_up_block;

pub use conv::{padded_conv, transposed_conv};
pub use norm::{instance_norm, NormName};
pub use unet_block::UnetBlock;
pub use unet_out_block::UnetOutBlock;
pub use unetr_basic_block::UnetrBasicBlock;
pub use unetr_up_block::UnetrUpBlock;

#[cfg(test)]
mod test_support {
    use tch::{nn, Device, Kind, Tensor};

    /// Every variable of `vs` as (name, shape), sorted by name.
    pub fn names_and_shapes(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
        let mut all: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        all.sort();
        all
    }

    /// Seeded noise `[n, c, d, d, d]`.
    pub fn noise(n: i64, c: i64, d: i64) -> Tensor {
        tch::manual_seed(3);
        Tensor::randn([n, c, d, d, d], (Kind::Float, Device::Cpu))
    }
}
