//! The normalisation of MONAI's UNETR-family blocks: `norm_name = "instance"`, which MONAI's
//! `get_norm_layer` turns into `torch.nn.InstanceNorm3d` with its defaults (no affine
//! parameters, no running statistics, eps 1e-5), so every sample and channel is normalised
//! by its own statistics in training and evaluation alike, and the norms hold no variables.

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Normalisation of the decoder's convolutions, as MONAI's `norm_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormName {
    /// `torch.nn.InstanceNorm3d` without affine parameters (UNETR's and Swin UNETR's default).
    Instance,
}

/// `torch.nn.InstanceNorm3d(affine=False, track_running_stats=False)` of `x` `[N, C, ...]`.
pub fn instance_norm(x: &Tensor) -> Tensor {
    x.instance_norm(None::<Tensor>, None, None, None, true, 0.1, 1e-5, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn each_sample_and_channel_comes_out_with_mean_zero_and_variance_one() {
        tch::manual_seed(0);
        let x = Tensor::randn([2, 3, 4, 5, 6], (Kind::Double, Device::Cpu)) * 3.0 + 2.0;
        let y = instance_norm(&x).flatten(2, -1);
        let mean = y.mean_dim(2, false, Kind::Double);
        // Biased variance, as the norm divides by it.
        let variance = y.square().mean_dim(2, false, Kind::Double) - mean.square();
        assert!(mean.abs().max().double_value(&[]) < 1e-9);
        // eps 1e-5 against a variance near 9: 1 - 1e-5 / 9 off one.
        assert!((variance - 1.0).abs().max().double_value(&[]) < 1e-5);
    }
}
