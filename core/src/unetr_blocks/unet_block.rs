//! MONAI's `UnetResBlock` and `UnetBasicBlock` at stride 1 (`monai/networks/blocks/
//! dynunet_block.py`; nnU-Net's convolution block, Isensee et al., Nature Methods 2021): two
//! 3x3x3 convolutions (`conv1`, `conv2`), each followed by instance norm, LeakyReLU after
//! the first. The residual block adds its input before the second activation, through a
//! 1x1x1 convolution and norm (`conv3`) where the width changes; the basic block activates
//! the second norm's output directly.

use super::conv::padded_conv;
use super::norm::instance_norm;
use tch::{nn, Tensor};

/// `UnetResBlock` (`residual`) or `UnetBasicBlock`.
pub struct UnetBlock {
    conv1: nn::Conv3D,
    conv2: nn::Conv3D,
    /// `None` for the basic block; `Some(None)` for a residual block that keeps the width,
    /// `Some(Some(conv3))` for one that projects its input.
    shortcut: Option<Option<nn::Conv3D>>,
}

impl UnetBlock {
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, residual: bool) -> UnetBlock {
        UnetBlock {
            conv1: padded_conv(&(p / "conv1"), c_in, c_out, 3),
            conv2: padded_conv(&(p / "conv2"), c_out, c_out, 3),
            shortcut: residual.then(|| (c_in != c_out).then(|| padded_conv(&(p / "conv3"), c_in, c_out, 1))),
        }
    }

    /// `[N, c_in, D, H, W]` to `[N, c_out, D, H, W]`.
    ///
    /// The activations and the shortcut's sum are in place, as MONAI's (`LeakyReLU(inplace=
    /// True)`, `out += residual`): at full resolution each is a tensor of hundreds of MB (16
    /// channels of 4 windows of 96^3: 226 MB), and a fresh one per op costs more in page
    /// faults than the op itself. Autograd allows it: instance norm's backward reads its
    /// input, LeakyReLU's reads its output. `y` is reassigned, not shadowed, so the first
    /// activation is freed once the second convolution has read it, as Python's rebinding of
    /// `out` frees it (a shadowed binding would live to the end and hold one more tensor at
    /// the peak).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut y = instance_norm(&x.apply(&self.conv1));
        let _ = y.leaky_relu_();
        y = instance_norm(&y.apply(&self.conv2));
        match &self.shortcut {
            None => {}
            Some(None) => y += x,
            Some(Some(projection)) => y += instance_norm(&x.apply(projection)),
        }
        let _ = y.leaky_relu_();
        y
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{names_and_shapes, noise};
    use super::*;
    use tch::Device;

    fn names(vs: &nn::VarStore) -> Vec<String> {
        names_and_shapes(vs).into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn takes_monais_names_conv3_only_where_a_residual_block_changes_the_width() {
        for (c_in, residual, expected) in [
            (
                2,
                true,
                &["b.conv1.conv.weight", "b.conv2.conv.weight", "b.conv3.conv.weight"][..],
            ),
            (4, true, &["b.conv1.conv.weight", "b.conv2.conv.weight"]),
            (2, false, &["b.conv1.conv.weight", "b.conv2.conv.weight"]),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let block = UnetBlock::new(&(vs.root() / "b"), c_in, 4, residual);
            assert_eq!(names(&vs), expected, "c_in {c_in}, residual {residual}");
            assert_eq!(block.forward(&noise(2, c_in, 5)).size(), [2, 4, 5, 5, 5]);
        }
    }

    /// With both convolutions zero the second norm's output is zero, so the residual block
    /// gives LeakyReLU of its input (or of its normed projection) and the basic block zero:
    /// the shortcut is added where MONAI adds it, before the last activation.
    #[test]
    fn the_shortcut_enters_before_the_last_activation() {
        let x = noise(2, 4, 3);
        for (c_in, residual) in [(4, true), (2, true), (4, false)] {
            let vs = nn::VarStore::new(Device::Cpu);
            let block = UnetBlock::new(&(vs.root() / "b"), c_in, 4, residual);
            tch::no_grad(|| {
                let _ = block.conv1.ws.shallow_clone().zero_();
                let _ = block.conv2.ws.shallow_clone().zero_();
            });
            let x = x.narrow(1, 0, c_in);
            let expected = match &block.shortcut {
                Some(Some(projection)) => instance_norm(&x.apply(projection)).leaky_relu(),
                Some(None) => x.leaky_relu(),
                None => x.zeros_like(),
            };
            let y = block.forward(&x);
            assert!(
                y.allclose(&expected, 1e-6, 1e-6, false),
                "c_in {c_in}, residual {residual}"
            );
        }
    }
}
