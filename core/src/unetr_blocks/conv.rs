//! The convolutions of MONAI's UNETR-family blocks, as `get_conv_layer(..., conv_only=True)`
//! builds them (`monai/networks/blocks/dynunet_block.py`): without bias, under `.conv`.

use crate::layers;
use tch::nn;

/// A stride-1 convolution of odd `kernel`, padded to keep the size.
pub fn padded_conv(p: &nn::Path, c_in: i64, c_out: i64, kernel: i64) -> nn::Conv3D {
    let config = layers::Conv {
        padding: (kernel - 1) / 2,
        bias: false,
        ..Default::default()
    };
    layers::conv3d(p / "conv", c_in, c_out, kernel, config)
}

/// A 2x2x2 stride-2 transposed convolution, which doubles every side (MONAI's
/// `upsample_kernel_size = 2`: padding and output padding 0).
pub fn transposed_conv(p: &nn::Path, c_in: i64, c_out: i64) -> nn::ConvTranspose3D {
    let config = layers::ConvTranspose {
        stride: 2,
        bias: false,
        ..Default::default()
    };
    layers::conv_transpose3d(p / "conv", c_in, c_out, 2, config)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{names_and_shapes, noise};
    use super::*;
    use tch::Device;

    #[test]
    fn padded_conv_keeps_the_size_and_transposed_conv_doubles_it() {
        let vs = nn::VarStore::new(Device::Cpu);
        let same = padded_conv(&(vs.root() / "a"), 2, 5, 3);
        let up = transposed_conv(&(vs.root() / "b"), 2, 4);
        let x = noise(1, 2, 3);
        assert_eq!(x.apply(&same).size(), [1, 5, 3, 3, 3]);
        assert_eq!(x.apply(&up).size(), [1, 4, 6, 6, 6]);
        assert_eq!(
            names_and_shapes(&vs),
            [
                ("a.conv.weight".to_string(), vec![5, 2, 3, 3, 3]),
                ("b.conv.weight".to_string(), vec![2, 4, 2, 2, 2]),
            ]
        );
    }
}
