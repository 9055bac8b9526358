//! What one process can check on its own: a world of one, errors that must come back as
//! errors (not aborts), and stores.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use medssl_torch_ext::{Error, GlooDevice, ProcessGroup, Store, TcpStoreOptions};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(10);

fn world_of_one() -> (tempfile::TempDir, ProcessGroup) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::file(&dir.path().join("store"), 1, TIMEOUT).expect("FileStore");
    let loopback = GlooDevice::Hostname("127.0.0.1".into());
    let pg = ProcessGroup::gloo_with_device(&store, 0, 1, TIMEOUT, &loopback).expect("Gloo group of one");
    (dir, pg)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("values")
}

#[test]
fn a_world_of_one_is_the_identity() {
    let (_dir, pg) = world_of_one();
    assert_eq!((pg.rank(), pg.world_size()), (0, 1));
    let x = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1]);
    let mut reduced = [x.copy()];
    pg.all_reduce_sum(&mut reduced).expect("all_reduce_sum");
    assert_eq!(values(&reduced[0]), values(&x));
    assert_eq!(values(&pg.all_gather(&x).expect("all_gather")), values(&x));
    let mut b = x.copy();
    pg.broadcast(&mut b, 0).expect("broadcast");
    assert_eq!(values(&b), values(&x));
    pg.barrier().expect("barrier");

    // The differentiable ops pass gradients straight through in a world of one.
    let leaf = x.to_kind(Kind::Double).set_requires_grad(true);
    let loss = (pg.differentiable_all_gather(&leaf).expect("gather") * 3.0).sum(Kind::Double)
        + pg.differentiable_all_reduce_sum(&leaf)
            .expect("reduce")
            .pow_tensor_scalar(2)
            .sum(Kind::Double);
    loss.backward();
    let want: Vec<f64> = values(&x).iter().map(|v| 3.0 + 2.0 * v).collect();
    assert_eq!(values(&leaf.grad()), want);
}

#[test]
fn bad_arguments_come_back_as_errors() {
    let (_dir, pg) = world_of_one();
    let mut mixed = [
        Tensor::ones([2], (Kind::Float, Device::Cpu)),
        Tensor::ones([2], (Kind::Double, Device::Cpu)),
    ];
    let error = pg.all_reduce_sum(&mut mixed).expect_err("mixed dtypes").to_string();
    assert!(error.contains("one dtype"), "{error}");
    assert!(
        error.starts_with("all_reduce_sum of 2 tensors on rank 0 of 1"),
        "{error}"
    );

    let error = pg
        .all_gather(&Tensor::from(1.0f32))
        .expect_err("0-dim gather")
        .to_string();
    assert!(error.contains("at least one dimension"), "{error}");

    let error = pg
        .broadcast(&mut Tensor::ones([2], (Kind::Float, Device::Cpu)), 3)
        .expect_err("root 3 of 1");
    assert!(matches!(error, Error::Torch { .. }), "{error}");
}

#[test]
fn tcp_store_on_a_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut options = TcpStoreOptions::server("127.0.0.1", port, 1);
    options.timeout = Duration::from_secs(5);
    let error = Store::tcp(&options).expect_err("port in use").to_string();
    eprintln!("{error}");
    assert!(
        error.starts_with(&format!("TCPStore server on 127.0.0.1:{port}: ")),
        "{error}"
    );
    assert!(error.to_lowercase().contains("address already in use"), "{error}");
    assert!(!error.contains("frame #"), "no C++ backtrace: {error}");
}

#[test]
fn store_values_round_trip_and_missing_keys_time_out() {
    let mut options = TcpStoreOptions::server("127.0.0.1", 0, 1);
    options.timeout = Duration::from_millis(300);
    let store = Store::tcp(&options).expect("TCPStore");
    assert_ne!(store.port(), Some(0));
    let bytes: Vec<u8> = (0..=255).collect();
    store.set("bytes", &bytes).expect("set");
    store.set("empty", b"").expect("set empty");
    assert_eq!(store.get("bytes").expect("get"), bytes);
    assert_eq!(store.get("empty").expect("get empty"), b"");
    assert!(store.check("bytes").expect("check a set key"));
    let start = Instant::now();
    assert!(!store.check("never-set").expect("check a missing key"));
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "check waited {:?}",
        start.elapsed()
    );

    let start = Instant::now();
    let error = store.get("never-set").expect_err("missing key").to_string();
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(error.contains("never-set"), "{error}");
}

/// Built without the CUDA headers (build.rs warned): NCCL says so. CI (.ci/run) sets
/// MEDSSL_REQUIRE_NCCL=1, where such a build is a failure: NCCL must build without a GPU.
#[cfg(not(medssl_nccl))]
#[test]
fn nccl_without_its_headers_says_so() {
    if std::env::var_os("MEDSSL_REQUIRE_NCCL").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!(
            "MEDSSL_REQUIRE_NCCL is set, but medssl-torch-ext was built without NCCL: see \
             the build's warning (`make setup` installs the CUDA header wheels)"
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::file(&dir.path().join("store"), 1, TIMEOUT).expect("FileStore");
    assert!(matches!(
        ProcessGroup::nccl(&store, 0, 1, TIMEOUT),
        Err(Error::NcclNotBuilt)
    ));
}

/// Without a GPU the constructor's error comes back; with one, a group of one runs.
#[cfg(medssl_nccl)]
#[test]
fn nccl_needs_a_gpu_and_runs_on_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::file(&dir.path().join("store"), 1, TIMEOUT).expect("FileStore");
    let result = ProcessGroup::nccl(&store, 0, 1, TIMEOUT);
    if !tch::Cuda::is_available() {
        let error = result.expect_err("no GPU").to_string();
        eprintln!("{error}");
        assert!(error.starts_with("NCCL process group (rank 0 of 1)"), "{error}");
        return;
    }
    let pg = result.expect("NCCL group of one");
    let x = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).to_device(Device::Cuda(0));
    let mut reduced = [x.copy()];
    pg.all_reduce_sum(&mut reduced).expect("all_reduce_sum");
    assert_eq!(
        values(&reduced[0].to_device(Device::Cpu)),
        values(&x.to_device(Device::Cpu))
    );
    let gathered = pg.all_gather(&x).expect("all_gather");
    assert_eq!(
        values(&gathered.to_device(Device::Cpu)),
        values(&x.to_device(Device::Cpu))
    );
    pg.barrier().expect("barrier");
}

/// Without a GPU the CUDA memory statistics are an error that says so, not a crash.
#[test]
fn cuda_memory_peaks_need_a_gpu() {
    if tch::Cuda::is_available() {
        let peaks = medssl_torch_ext::cuda_memory_peaks(0).unwrap();
        assert!(peaks.reserved >= peaks.allocated && peaks.allocated >= 0, "{peaks:?}");
        return;
    }
    let error = medssl_torch_ext::cuda_memory_peaks(0).unwrap_err().to_string();
    assert!(
        error.contains("cuda:0") || error.contains("without its CUDA parts"),
        "{error}"
    );
}
