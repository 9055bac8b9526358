//! Autocast regions on the CPU (and CUDA's state, which can be set without a GPU): which ops
//! change kind inside them, nesting, the thread-locality, and that closing restores.

use medssl_torch_ext::{autocast_dtype, autocast_enabled, AutocastDevice, AutocastRegion};
use tch::{Device, Kind, Tensor};

const CPU: AutocastDevice = AutocastDevice::Cpu;

fn fp32(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

#[test]
fn outside_any_region_autocast_is_off_with_aten_defaults() {
    assert!(!autocast_enabled(CPU).unwrap());
    assert!(!autocast_enabled(AutocastDevice::Cuda).unwrap());
    assert_eq!(autocast_dtype(CPU).unwrap(), Kind::BFloat16);
    assert_eq!(autocast_dtype(AutocastDevice::Cuda).unwrap(), Kind::Half);
    assert_eq!(fp32(&[4, 3]).matmul(&fp32(&[3, 2])).kind(), Kind::Float);
}

#[test]
fn a_bf16_region_lowers_matmuls_and_convolutions_and_keeps_losses_fp32() {
    let (a, b) = (fp32(&[8, 16]), fp32(&[16, 4]));
    let weight = fp32(&[5, 3, 3, 3]).set_requires_grad(true);
    let image = fp32(&[2, 3, 8, 8]);
    {
        let _region = AutocastRegion::enable(CPU, Kind::BFloat16).unwrap();
        assert!(autocast_enabled(CPU).unwrap());
        let product = a.matmul(&b);
        assert_eq!(product.kind(), Kind::BFloat16);
        // Within bf16's 8 bits of mantissa of the fp32 product.
        let exact = a.to_kind(Kind::Double).matmul(&b.to_kind(Kind::Double));
        let error = (product.to_kind(Kind::Double) - &exact).abs().max().double_value(&[]);
        assert!(
            error < 0.05 * exact.abs().max().double_value(&[]),
            "bf16 matmul off by {error}"
        );
        // CPU autocast's fp32 list has the losses (mse_loss here) but not softmax, which runs
        // in its input's kind: why medssl computes its objectives outside autocast.
        let target = fp32(&[8, 4]);
        assert_eq!(product.mse_loss(&target, tch::Reduction::Mean).kind(), Kind::Float);
        assert_eq!(product.softmax(-1, None::<Kind>).kind(), Kind::BFloat16);

        let features = image.conv2d(&weight, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        assert_eq!(features.kind(), Kind::BFloat16);
        features.to_kind(Kind::Float).sum(Kind::Float).backward();
    }
    // The master weight and its gradient stay fp32.
    assert_eq!(weight.kind(), Kind::Float);
    assert_eq!(weight.grad().kind(), Kind::Float);
    assert!(weight.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!(!autocast_enabled(CPU).unwrap());
    assert_eq!(a.matmul(&b).kind(), Kind::Float);
}

#[test]
fn a_disabled_region_inside_an_enabled_one_runs_in_the_inputs_kind() {
    let (a, b) = (fp32(&[4, 4]), fp32(&[4, 4]));
    let _outer = AutocastRegion::enable(CPU, Kind::BFloat16).unwrap();
    {
        let _inner = AutocastRegion::disable(CPU).unwrap();
        assert!(!autocast_enabled(CPU).unwrap());
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        assert_eq!(autocast_dtype(CPU).unwrap(), Kind::BFloat16);
    }
    assert!(autocast_enabled(CPU).unwrap());
    assert_eq!(a.matmul(&b).kind(), Kind::BFloat16);
}

#[test]
fn a_region_applies_to_its_own_thread_only() {
    let _region = AutocastRegion::enable(CPU, Kind::BFloat16).unwrap();
    let other = std::thread::spawn(|| {
        (
            autocast_enabled(AutocastDevice::Cpu).unwrap(),
            fp32(&[2, 2]).matmul(&fp32(&[2, 2])).kind(),
        )
    })
    .join()
    .unwrap();
    assert_eq!(other, (false, Kind::Float));
    assert!(autocast_enabled(CPU).unwrap());
}

#[test]
fn a_dtype_autocast_cannot_use_is_refused_and_changes_nothing() {
    let error = AutocastRegion::enable(CPU, Kind::Double).unwrap_err().to_string();
    assert!(
        error.contains("BFloat16, Half or Float") && error.contains("Double"),
        "{error}"
    );
    assert!(!autocast_enabled(CPU).unwrap());
    assert_eq!(autocast_dtype(CPU).unwrap(), Kind::BFloat16);
}

#[test]
fn the_cuda_state_is_separate_and_settable_without_a_gpu() {
    {
        let _region = AutocastRegion::enable(AutocastDevice::Cuda, Kind::Half).unwrap();
        assert!(autocast_enabled(AutocastDevice::Cuda).unwrap());
        assert!(!autocast_enabled(CPU).unwrap());
        // CPU ops consult the CPU's state only.
        assert_eq!(fp32(&[2, 2]).matmul(&fp32(&[2, 2])).kind(), Kind::Float);
    }
    assert!(!autocast_enabled(AutocastDevice::Cuda).unwrap());
}

#[test]
fn each_outermost_region_casts_the_weights_afresh() {
    // Cast copies of weights are cached within the outermost region; a weight updated
    // between two regions (an optimizer step) must be seen by the second.
    let x = fp32(&[3, 4]);
    let weight = fp32(&[4, 2]).set_requires_grad(true);
    let first = {
        let _region = AutocastRegion::enable(CPU, Kind::BFloat16).unwrap();
        x.matmul(&weight).to_kind(Kind::Float)
    };
    tch::no_grad(|| {
        let mut w = weight.shallow_clone();
        let _ = w.g_add_scalar_(1.0);
    });
    let second = {
        let _region = AutocastRegion::enable(CPU, Kind::BFloat16).unwrap();
        x.matmul(&weight).to_kind(Kind::Float)
    };
    let expected = x.matmul(&weight.detach());
    let error = (&second - &expected).abs().max().double_value(&[]);
    assert!(
        error < 0.05 * expected.abs().max().double_value(&[]) + 1e-3,
        "stale cast: {error}"
    );
    assert!((&second - &first).abs().max().double_value(&[]) > 0.1);
}
