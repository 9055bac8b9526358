//! Tensor operations that core and the plugins share.

use tch::Tensor;

/// `x / ||x||_2` along the last axis, the norm clamped at 1e-12 so that a zero row stays zero
/// (`torch.nn.functional.normalize(x, dim=-1)`).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn rows_of_the_last_axis_get_unit_norm_and_zero_rows_stay_zero() {
        let x = Tensor::from_slice(&[3f32, 4.0, 0.0, 0.0, -1.0, 0.0]).view([1, 3, 2]);
        let y = l2_normalize(&x);
        let want = Tensor::from_slice(&[0.6f32, 0.8, 0.0, 0.0, -1.0, 0.0]).view([1, 3, 2]);
        assert!(y.allclose(&want, 1e-6, 1e-7, false), "{y}");
        tch::manual_seed(1);
        let x = Tensor::randn([4, 5, 7], (Kind::Double, Device::Cpu));
        let norms = l2_normalize(&x).norm_scalaropt_dim(2, [-1], false);
        assert!(norms.allclose(&Tensor::ones([4, 5], (Kind::Double, Device::Cpu)), 1e-12, 1e-12, false));
        assert_eq!(l2_normalize(&x).kind(), Kind::Double);
    }
}
