//! The floating-point kinds computations run in.
//!
//! Losses, their softmaxes and log-sum-exps, Sinkhorn and the soft Dice are computed in fp32
//! whatever kind their inputs come in (half-precision activations included), as SwAV's,
//! solo-learn's and MONAI's code do; f64 input stays f64, so the agreement tests
//! (`tests/agreement.rs`) compare f64 with f64.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// `run.precision`: the floating-point kind of a pre-training run's weights, activations and
/// optimizer state.
///
/// - `fp32` (the default): what every peer trains in without mixed precision.
/// - `fp64`: everything in double, several times slower. For numerical checks rather than
///   training: two computations that should agree (one process with batch 2B and two with
///   batch B each, a resumed run and an uninterrupted one) agree to about 1e-12 in f64, where
///   fp32's rounding (about 1e-7 per operation, summed in a different order) can hide a real
///   difference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp64,
}

impl Precision {
    /// The kind of the run's floating-point variables and of its input batches.
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Fp64 => Kind::Double,
        }
    }
}

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
    fn precision_names_and_kinds() {
        #[derive(Deserialize)]
        struct Run {
            precision: Precision,
        }
        let fp64: Run = toml::from_str("precision = \"fp64\"").unwrap();
        assert_eq!(fp64.precision, Precision::Fp64);
        assert_eq!(fp64.precision.kind(), Kind::Double);
        assert_eq!(Precision::default().kind(), Kind::Float);
        assert!(toml::from_str::<Run>("precision = \"f64\"").is_err());
    }

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
