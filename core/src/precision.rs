//! The floating-point kinds computations run in, and mixed precision.
//!
//! Under `bf16` and `fp16`, the encoder and the aggregator run inside an autocast region (as
//! `torch.autocast(device_type, dtype)`: convolutions, matrix products and linear layers in
//! the low-precision kind, weights kept fp32); their embeddings come out of it cast to fp32,
//! and everything after (projection heads, prototypes, Sinkhorn, k-means, every loss) runs
//! in fp32 outside autocast. The references run their projection heads under autocast too
//! (SwAV through apex O1, solo-learn and lightly through Lightning); medssl keeps them fp32
//! on purpose: they are a few percent of a step, and it leaves no objective, present or
//! plug-in, to guard its softmax, exp(score/ε) or log-sum-exp by hand (CPU autocast does
//! not even keep softmax in fp32: see torch-ext's tests). docs/precision.md has the table.
//!
//! Losses, their softmaxes and log-sum-exps, Sinkhorn and the soft Dice are computed in fp32
//! whatever kind their inputs come in (half-precision activations included), as SwAV's,
//! solo-learn's and MONAI's code do; f64 input stays f64, so the agreement tests
//! (`tests/agreement.rs`) compare f64 with f64.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use torch_ext::{AutocastDevice, AutocastRegion};

/// `run.precision`: the floating-point kind of a run's activations; weights, optimizer state
/// and checkpoints stay fp32 (f64 under `fp64`).
///
/// - `fp32` (the default): what every peer trains in without mixed precision.
/// - `bf16`: mixed precision, as Lightning's `precision = "bf16-mixed"`: the encoder and the
///   aggregator under bf16 autocast, on the CPU (oneDNN; fast where the CPU has AVX512-BF16
///   or AMX) and on CUDA. bf16 keeps fp32's range, so no loss scaling is needed.
/// - `fp16`: mixed precision in fp16 with dynamic loss scaling (`run.loss_scaling`), as
///   `"16-mixed"`; CUDA only.
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
    Bf16,
    Fp16,
    Fp64,
}

impl Precision {
    /// The kind of the run's floating-point variables, of its input batches and of the
    /// embeddings the objectives see: fp32 under mixed precision (master weights).
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 | Precision::Bf16 | Precision::Fp16 => Kind::Float,
            Precision::Fp64 => Kind::Double,
        }
    }

    /// The kind autocast lowers to, under mixed precision.
    pub fn autocast_kind(self) -> Option<Kind> {
        match self {
            Precision::Bf16 => Some(Kind::BFloat16),
            Precision::Fp16 => Some(Kind::Half),
            Precision::Fp32 | Precision::Fp64 => None,
        }
    }

    /// The name in the config.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp64 => "fp64",
        }
    }

    /// Refuses a precision the device cannot run; `key` is the config key it came from.
    pub fn check_device(self, device: Device, key: &str) -> Result<()> {
        // A flag (`--precision`) is named as it is typed, a config key as such.
        let key = match key.starts_with("--") {
            true => format!("`{key}`"),
            false => format!("config key `{key}`"),
        };
        match (self, device) {
            (Precision::Fp16, Device::Cpu) => bail!(
                "{key} is \"fp16\", which is for CUDA (fp16 autocast with loss scaling), but the device is the CPU: use \"bf16\" for mixed precision on the CPU, or \"fp32\""
            ),
            (Precision::Bf16 | Precision::Fp16, Device::Cuda(_) | Device::Cpu) => Ok(()),
            (Precision::Bf16 | Precision::Fp16, other) => bail!(
                "{key} is \"{}\", but mixed precision runs on the CPU and CUDA only, and the device is {other:?}: use \"fp32\"",
                self.name()
            ),
            (Precision::Fp32 | Precision::Fp64, _) => Ok(()),
        }
    }

    /// Opens this precision's autocast region on `device` for the current thread (`None`
    /// under fp32 and fp64); the region lasts until the value is dropped.
    pub fn autocast(self, device: Device) -> Result<Option<AutocastRegion>> {
        let Some(kind) = self.autocast_kind() else {
            return Ok(None);
        };
        let target = AutocastDevice::of(device)
            .with_context(|| format!("`run.precision = \"{}\"`: no autocast on {device:?}", self.name()))?;
        Ok(Some(AutocastRegion::enable(target, kind).with_context(|| {
            format!("`run.precision = \"{}\"`: opening the autocast region", self.name())
        })?))
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// The config's names, for command-line flags (`--precision bf16`).
    fn from_str(name: &str) -> std::result::Result<Self, String> {
        [Precision::Fp32, Precision::Bf16, Precision::Fp16, Precision::Fp64]
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| format!("`{name}` is not a precision: use fp32, bf16, fp16 or fp64"))
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
        for (name, precision, kind, autocast) in [
            ("fp32", Precision::Fp32, Kind::Float, None),
            ("bf16", Precision::Bf16, Kind::Float, Some(Kind::BFloat16)),
            ("fp16", Precision::Fp16, Kind::Float, Some(Kind::Half)),
            ("fp64", Precision::Fp64, Kind::Double, None),
        ] {
            let run: Run = toml::from_str(&format!("precision = \"{name}\"")).unwrap();
            assert_eq!(run.precision, precision);
            assert_eq!(
                (precision.name(), precision.kind(), precision.autocast_kind()),
                (name, kind, autocast)
            );
        }
        assert_eq!(Precision::default(), Precision::Fp32);
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert!("half"
            .parse::<Precision>()
            .unwrap_err()
            .contains("fp32, bf16, fp16 or fp64"));
        assert!(toml::from_str::<Run>("precision = \"f64\"").is_err());
    }

    #[test]
    fn fp16_is_for_cuda_and_mixed_precision_for_the_cpu_and_cuda() {
        let error = Precision::Fp16
            .check_device(Device::Cpu, "run.precision")
            .unwrap_err()
            .to_string();
        assert!(error.contains("`run.precision`") && error.contains("bf16"), "{error}");
        assert!(Precision::Fp16.check_device(Device::Cuda(0), "run.precision").is_ok());
        assert!(Precision::Bf16.check_device(Device::Cpu, "run.precision").is_ok());
        assert!(Precision::Bf16.check_device(Device::Mps, "run.precision").is_err());
        assert!(Precision::Fp64.check_device(Device::Mps, "run.precision").is_ok());
    }

    #[test]
    fn the_bf16_region_lowers_matmuls_until_it_closes() {
        let (a, b) = (
            Tensor::randn([4, 4], (Kind::Float, Device::Cpu)),
            Tensor::randn([4, 4], (Kind::Float, Device::Cpu)),
        );
        assert!(Precision::Fp32.autocast(Device::Cpu).unwrap().is_none());
        let region = Precision::Bf16.autocast(Device::Cpu).unwrap();
        assert_eq!(a.matmul(&b).kind(), Kind::BFloat16);
        drop(region);
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
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
