//! MONAI's `UnetrUpBlock` with `upsample_kernel_size = 2` (`monai/networks/blocks/
//! unetr_block.py`): a transposed convolution (`transp_conv`) doubles the resolution to the
//! skip's, the skip is concatenated after it (upsampled first, skip second, as MONAI's
//! `torch.cat((out, skip), dim=1)`), and a [`UnetBlock`] (`conv_block`) mixes the two. The
//! skip has the block's output width, so the convolution block reads twice that.

use super::conv::transposed_conv;
use super::unet_block::UnetBlock;
use tch::{nn, Tensor};

pub struct UnetrUpBlock {
    transp_conv: nn::ConvTranspose3D,
    conv_block: UnetBlock,
}

impl UnetrUpBlock {
    /// From `c_in` channels to `c_out`, with a skip of `c_out` channels; a residual
    /// (`UnetResBlock`) or basic convolution block, as MONAI's `res_block`.
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, res_block: bool) -> UnetrUpBlock {
        UnetrUpBlock {
            transp_conv: transposed_conv(&(p / "transp_conv"), c_in, c_out),
            conv_block: UnetBlock::new(&(p / "conv_block"), 2 * c_out, c_out, res_block),
        }
    }

    /// `x` `[N, c_in, D, H, W]` and `skip` `[N, c_out, 2D, 2H, 2W]` to `[N, c_out, 2D, 2H, 2W]`.
    pub fn forward(&self, x: &Tensor, skip: &Tensor) -> Tensor {
        // Its own statement, so that the upsampled tensor (a temporary) is freed once it is
        // concatenated, not after the convolution block too.
        let joined = Tensor::cat(&[x.apply(&self.transp_conv), skip.shallow_clone()], 1);
        self.conv_block.forward(&joined)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{names_and_shapes, noise};
    use super::*;
    use tch::Device;

    #[test]
    fn doubles_the_resolution_and_takes_monais_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let block = UnetrUpBlock::new(&(vs.root() / "decoder5"), 6, 3, true);
        assert_eq!(
            names_and_shapes(&vs),
            [
                ("decoder5.conv_block.conv1.conv.weight".to_string(), vec![3, 6, 3, 3, 3]),
                ("decoder5.conv_block.conv2.conv.weight".to_string(), vec![3, 3, 3, 3, 3]),
                ("decoder5.conv_block.conv3.conv.weight".to_string(), vec![3, 6, 1, 1, 1]),
                ("decoder5.transp_conv.conv.weight".to_string(), vec![6, 3, 2, 2, 2]),
            ]
        );
        let y = block.forward(&noise(2, 6, 2), &noise(2, 3, 4));
        assert_eq!(y.size(), [2, 3, 4, 4, 4]);
    }

    /// The skip is the second half of the convolution block's input: with the first half's
    /// weights of `conv1` and `conv3` zero, the transposed convolution cannot change the
    /// output.
    #[test]
    fn the_skip_comes_after_the_upsampled_input() {
        let vs = nn::VarStore::new(Device::Cpu);
        let block = UnetrUpBlock::new(&(vs.root() / "d"), 4, 2, true);
        let vars = vs.variables();
        tch::no_grad(|| {
            for name in ["d.conv_block.conv1.conv.weight", "d.conv_block.conv3.conv.weight"] {
                let _ = vars[name].narrow(1, 0, 2).zero_();
            }
        });
        let (x, skip) = (noise(1, 4, 2), noise(1, 2, 4));
        let before = block.forward(&x, &skip);
        tch::no_grad(|| {
            let _ = vars["d.transp_conv.conv.weight"].shallow_clone().uniform_(-1.0, 1.0);
        });
        assert!(block.forward(&x, &skip).allclose(&before, 1e-6, 1e-6, false));
    }
}
