//! MONAI's `UnetOutBlock` (`monai/networks/blocks/dynunet_block.py`): a 1x1x1 convolution
//! with a bias (the one convolution of the UNETR-family decoders that has one) from the last
//! decoder stage to the class logits, under `conv.conv`.

use crate::layers;
use tch::{nn, Tensor};

pub struct UnetOutBlock {
    conv: nn::Conv3D,
}

impl UnetOutBlock {
    pub fn new(p: &nn::Path, c_in: i64, classes: i64) -> UnetOutBlock {
        UnetOutBlock {
            conv: layers::conv3d(p / "conv" / "conv", c_in, classes, 1, Default::default()),
        }
    }

    /// `[N, c_in, D, H, W]` to logits `[N, classes, D, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{names_and_shapes, noise};
    use super::*;
    use tch::Device;

    #[test]
    fn a_biased_pointwise_convolution_under_monais_name() {
        let vs = nn::VarStore::new(Device::Cpu);
        let out = UnetOutBlock::new(&(vs.root() / "out"), 4, 3);
        assert_eq!(
            names_and_shapes(&vs),
            [
                ("out.conv.conv.bias".to_string(), vec![3]),
                ("out.conv.conv.weight".to_string(), vec![3, 4, 1, 1, 1]),
            ]
        );
        assert_eq!(out.forward(&noise(2, 4, 3)).size(), [2, 3, 3, 3, 3]);
    }
}
