//! The reproducibility switches round-trip through ATen's global context (one test: they are
//! process-wide, and tests of one binary run in parallel threads).

use medssl_torch_ext::{determinism, set_determinism, Determinism};

#[test]
fn the_switches_are_set_and_read_back_and_the_defaults_are_pytorchs() {
    assert_eq!(
        determinism().unwrap(),
        Determinism::default(),
        "PyTorch's defaults: all off"
    );
    for wanted in [
        Determinism {
            cudnn_deterministic: true,
            cudnn_benchmark: false,
            deterministic_algorithms: true,
            warn_only: true,
        },
        Determinism {
            cudnn_deterministic: false,
            cudnn_benchmark: true,
            deterministic_algorithms: false,
            warn_only: false,
        },
        Determinism::default(),
    ] {
        set_determinism(wanted).unwrap();
        assert_eq!(determinism().unwrap(), wanted);
    }
    // Deterministic mode raises on an op that has no deterministic kernel only on CUDA; on
    // the CPU index_add_ is deterministic and runs.
    set_determinism(Determinism {
        deterministic_algorithms: true,
        ..Default::default()
    })
    .unwrap();
    let sums = tch::Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu)).index_add(
        0,
        &tch::Tensor::from_slice(&[0i64, 1, 0]),
        &tch::Tensor::from_slice(&[1f32, 2., 3.]),
    );
    assert_eq!(Vec::<f32>::try_from(&sums).unwrap(), vec![4.0, 2.0]);
    set_determinism(Determinism::default()).unwrap();
}
