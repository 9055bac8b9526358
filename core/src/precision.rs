//! The floating-point kinds computations run in.
//!
//! Losses, their softmaxes and log-sum-exps, Sinkhorn and the soft Dice are computed in fp32
//! whatever kind their inputs come in (half-precision activations included), as SwAV's,
//! solo-learn's and MONAI's code do; f64 input stays f64, so the agreement tests
//! (`tests/agreement.rs`) compare f64 with f64.

use tch::{Kind, Tensor};

/// The kind a loss over `t` is computed in: f64 for f64 input, fp32 for any other.
pub fn loss_kind(t: &Tensor) -> Kind {
    if t.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn f64_stays_f64_and_everything_else_is_fp32() {
        for (kind, want) in [
            (Kind::Double, Kind::Double),
            (Kind::Float, Kind::Float),
            (Kind::Half, Kind::Float),
            (Kind::BFloat16, Kind::Float),
        ] {
            assert_eq!(loss_kind(&Tensor::zeros([1], (kind, Device::Cpu))), want);
        }
    }
}
