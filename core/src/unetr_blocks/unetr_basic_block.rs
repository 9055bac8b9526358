//! MONAI's `UnetrBasicBlock` at stride 1 (`monai/networks/blocks/unetr_block.py`): a
//! [`UnetBlock`] under `layer`. UNETR's `encoder1` and Swin UNETR's `encoder1` to `encoder4`
//! and `encoder10`, the convolutions on the input and on each encoder level before it
//! becomes a skip.

use super::unet_block::UnetBlock;
use tch::{nn, Tensor};

pub struct UnetrBasicBlock {
    layer: UnetBlock,
}

impl UnetrBasicBlock {
    /// A residual (`UnetResBlock`) or basic (`UnetBasicBlock`) block, as MONAI's `res_block`.
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, res_block: bool) -> UnetrBasicBlock {
        UnetrBasicBlock {
            layer: UnetBlock::new(&(p / "layer"), c_in, c_out, res_block),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.layer.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{names_and_shapes, noise};
    use super::*;
    use tch::Device;

    #[test]
    fn wraps_the_block_under_layer() {
        let vs = nn::VarStore::new(Device::Cpu);
        let block = UnetrBasicBlock::new(&(vs.root() / "encoder1"), 1, 3, true);
        assert_eq!(
            names_and_shapes(&vs),
            [
                ("encoder1.layer.conv1.conv.weight".to_string(), vec![3, 1, 3, 3, 3]),
                ("encoder1.layer.conv2.conv.weight".to_string(), vec![3, 3, 3, 3, 3]),
                ("encoder1.layer.conv3.conv.weight".to_string(), vec![3, 1, 1, 1, 1]),
            ]
        );
        assert_eq!(block.forward(&noise(1, 1, 4)).size(), [1, 3, 4, 4, 4]);
    }
}
