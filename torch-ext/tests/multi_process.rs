//! Two Gloo ranks on loopback, each a child process of this test binary (see support/).

mod support;

use std::time::{Duration, Instant};

use medssl_torch_ext::{GlooDevice, ProcessGroup, Store, TcpStoreOptions};
use support::{free_port, run_ranks, this_rank, Rank};
use tch::{Device, Kind, Tensor};

const WORLD: usize = 2;
/// How long a whole run may take before its ranks are killed (loading libtorch is most of it).
const DEADLINE: Duration = Duration::from_secs(120);
const TIMEOUT: Duration = Duration::from_secs(30);

fn tcp_store(r: &Rank, agent_store: bool) -> Store {
    let mut options = TcpStoreOptions::for_rank("127.0.0.1", r.port, r.rank, r.world, agent_store);
    options.timeout = TIMEOUT;
    Store::tcp(&options)
        .expect("TCPStore")
        .with_prefix("test")
        .expect("PrefixStore")
}

/// A Gloo group on loopback. The ranks first meet on the store (whose timeout is long), so a
/// rank that started late cannot use up a short group timeout in the group's own rendezvous.
fn gloo(store: &Store, r: &Rank, timeout: Duration) -> ProcessGroup {
    store.set(&format!("started/{}", r.rank), b"").expect("announce");
    for other in 0..r.world {
        store
            .get(&format!("started/{other}"))
            .expect("wait for the other ranks");
    }
    let loopback = GlooDevice::Hostname("127.0.0.1".into());
    ProcessGroup::gloo_with_device(store, r.rank, r.world, timeout, &loopback).expect("Gloo process group")
}

fn floats(values: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(values.to_kind(Kind::Double).flatten(0, -1)).expect("f64 values")
}

/// Every blocking collective and the store helpers, with exact expected values.
fn check_collectives(pg: &ProcessGroup, store: &Store) {
    let rank = pg.rank();
    assert_eq!(pg.world_size(), WORLD);
    let r = rank as f64;

    // One call, one bucket: a contiguous tensor and a transposed (strided) view.
    let base = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) + 10.0 * r;
    let mut tensors = vec![Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (r + 1.0), base.tr()];
    pg.all_reduce_sum(&mut tensors).expect("all_reduce_sum");
    assert_eq!(floats(&tensors[0]), [3.0, 6.0, 9.0]);
    // arange + (arange + 10), seen through the transpose; written through into `base`.
    let summed = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) * 2.0 + 10.0;
    assert_eq!(floats(&tensors[1]), floats(&summed.tr()));
    assert_eq!(floats(&base), floats(&summed));

    let mut ints = vec![Tensor::from_slice(&[rank as i64, 100])];
    pg.all_reduce_sum(&mut ints).expect("all_reduce_sum i64");
    assert_eq!(Vec::<i64>::try_from(&ints[0]).expect("i64"), [1, 200]);

    let local = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) + 100.0 * r;
    let gathered = pg.all_gather(&local).expect("all_gather");
    assert_eq!(gathered.size(), [4, 3]);
    let expected: Vec<f64> = (0..6)
        .map(f64::from)
        .chain((0..6).map(|i| f64::from(i) + 100.0))
        .collect();
    assert_eq!(floats(&gathered), expected);

    let mut shared = if rank == 1 {
        Tensor::from_slice(&[7.0f64, 8.0, 9.0])
    } else {
        Tensor::zeros([3], (Kind::Double, Device::Cpu))
    };
    pg.broadcast(&mut shared, 1).expect("broadcast");
    assert_eq!(floats(&shared), [7.0, 8.0, 9.0]);

    pg.barrier().expect("barrier");

    // Each rank publishes a value and reads the other's (how ranks compare config hashes).
    store
        .set(&format!("hash/{rank}"), format!("config-{rank}").as_bytes())
        .expect("set");
    let other = 1 - rank;
    assert_eq!(
        store.get(&format!("hash/{other}")).expect("get"),
        format!("config-{other}").as_bytes()
    );

    // Prefixes isolate: one key name, two values.
    let (a, b) = (
        store.with_prefix("a").expect("prefix a"),
        store.with_prefix("b").expect("prefix b"),
    );
    if rank == 0 {
        a.set("key", b"in a").expect("set a");
        b.set("key", b"in b").expect("set b");
    }
    assert_eq!(a.get("key").expect("get a"), b"in a");
    assert_eq!(b.get("key").expect("get b"), b"in b");
    pg.barrier().expect("final barrier");
}

#[test]
fn collectives_over_tcp_store() {
    let Some(run) = run_ranks("collectives_over_tcp_store", WORLD, free_port(), DEADLINE, |r| {
        let store = tcp_store(r, false);
        check_collectives(&gloo(&store, r, TIMEOUT), &store);
    }) else {
        return;
    };
    run.assert_all_finished();
}

#[test]
fn collectives_over_file_store() {
    let Some(run) = run_ranks("collectives_over_file_store", WORLD, 0, DEADLINE, |r| {
        let store = Store::file(&r.dir.join("store"), r.world, TIMEOUT).expect("FileStore");
        let store = store.with_prefix("test").expect("PrefixStore");
        check_collectives(&gloo(&store, r, TIMEOUT), &store);
    }) else {
        return;
    };
    run.assert_all_finished();
}

/// torchrun with TORCHELASTIC_USE_AGENT_STORE=True: the agent (here, this parent) serves the
/// store and every rank, rank 0 included, is a client.
#[test]
fn ranks_as_clients_of_an_agent_store() {
    let agent = this_rank().is_none().then(|| {
        let mut options = TcpStoreOptions::server("127.0.0.1", 0, WORLD);
        options.world_size = None;
        options.wait_workers = false;
        Store::tcp(&options).expect("agent store")
    });
    let port = agent.as_ref().and_then(Store::port).unwrap_or(0);
    let Some(run) = run_ranks("ranks_as_clients_of_an_agent_store", WORLD, port, DEADLINE, |r| {
        let store = tcp_store(r, true);
        check_collectives(&gloo(&store, r, TIMEOUT), &store);
    }) else {
        return;
    };
    assert_ne!(port, 0, "the agent store reports the port it bound");
    run.assert_all_finished();
}

/// Rows of a fixed, rank-dependent f64 block.
fn block(rank: usize, rows: i64, cols: i64) -> Tensor {
    let values: Vec<f64> = (0..rows * cols)
        .map(|i| ((i * 7 + rank as i64 * 13) % 11) as f64 / 10.0 - 0.5)
        .collect();
    Tensor::from_slice(&values).view([rows, cols])
}

/// Rank `rank`'s loss on the collective's output: different on every rank, nonlinear, and
/// coupling all rows (as a contrastive loss over gathered embeddings does).
fn local_loss(rank: usize, y: &Tensor) -> Tensor {
    let size = y.size();
    let weights = block(rank + 5, size[0], size[1]);
    (y.tanh() * weights).sum(Kind::Double)
        + y.matmul(&y.tr()).pow_tensor_scalar(2).sum(Kind::Double) * (0.1 * (rank as f64 + 1.0))
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let diff = (got - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1.0);
    assert!(
        diff <= 1e-12 * scale,
        "{what}: max |difference| {diff:e}\ngot {got}\nwant {want}"
    );
}

/// The gradient of the sum of both ranks' losses, computed in one process from `inputs`
/// (both ranks' tensors) combined by `combine` (what the collective computes).
fn single_process_gradient(rank: usize, inputs: &[Tensor], combine: impl Fn(&[Tensor]) -> Tensor) -> Tensor {
    let leaves: Vec<Tensor> = inputs.iter().map(|t| t.set_requires_grad(true)).collect();
    let y = combine(&leaves);
    let total = (0..WORLD)
        .map(|r| local_loss(r, &y))
        .reduce(|a, b| a + b)
        .expect("two losses");
    total.backward();
    leaves[rank].grad()
}

#[test]
fn differentiable_all_gather_matches_single_process() {
    let Some(run) = run_ranks(
        "differentiable_all_gather_matches_single_process",
        WORLD,
        free_port(),
        DEADLINE,
        |r| {
            let store = tcp_store(r, false);
            let pg = gloo(&store, r, TIMEOUT);
            let blocks: Vec<Tensor> = (0..WORLD).map(|rank| block(rank, 3, 4)).collect();

            let x = blocks[r.rank].copy().set_requires_grad(true);
            let y = pg.differentiable_all_gather(&x).expect("differentiable_all_gather");
            assert_eq!(floats(&y), floats(&Tensor::cat(&blocks, 0)));
            local_loss(r.rank, &y).backward();

            let want = single_process_gradient(r.rank, &blocks, |xs| Tensor::cat(xs, 0));
            assert_close("all-gather gradient", &x.grad(), &want);
        },
    ) else {
        return;
    };
    run.assert_all_finished();
}

#[test]
fn differentiable_all_reduce_matches_single_process() {
    let Some(run) = run_ranks(
        "differentiable_all_reduce_matches_single_process",
        WORLD,
        free_port(),
        DEADLINE,
        |r| {
            let store = tcp_store(r, false);
            let pg = gloo(&store, r, TIMEOUT);
            let blocks: Vec<Tensor> = (0..WORLD).map(|rank| block(rank, 3, 4)).collect();

            let x = blocks[r.rank].copy().set_requires_grad(true);
            let y = pg
                .differentiable_all_reduce_sum(&x)
                .expect("differentiable_all_reduce_sum");
            assert_eq!(floats(&y), floats(&(&blocks[0] + &blocks[1])));
            local_loss(r.rank, &y).backward();

            let want = single_process_gradient(r.rank, &blocks, |xs| &xs[0] + &xs[1]);
            assert_close("all-reduce gradient", &x.grad(), &want);
        },
    ) else {
        return;
    };
    run.assert_all_finished();
}

/// Runs a collective on rank 0 while rank 1 does `rank1` instead; returns rank 0's error and
/// how long the collective took to fail.
fn failed_collective(test: &str, timeout: Duration, rank1: fn()) -> (String, Duration) {
    let Some(run) = run_ranks(test, WORLD, free_port(), DEADLINE, |r| {
        let store = tcp_store(r, false);
        let pg = gloo(&store, r, timeout);
        pg.barrier().expect("both ranks connected");
        if r.rank == 1 {
            rank1();
            return;
        }
        let start = Instant::now();
        let result = pg.all_reduce_sum(&mut [Tensor::ones([1024], (Kind::Float, Device::Cpu))]);
        let elapsed = start.elapsed();
        let error = result.expect_err("a collective without its peer must fail");
        std::fs::write(r.dir.join("error"), format!("{}\n{error}", elapsed.as_secs_f64())).expect("write error");
    }) else {
        return (String::new(), Duration::ZERO);
    };
    assert!(
        run.outcomes[0].finished && run.outcomes[0].status.success(),
        "rank 0 failed:\n{}",
        run.report()
    );
    let text = std::fs::read_to_string(run.dir.path().join("error")).expect("rank 0's error");
    let (secs, error) = text.split_once('\n').expect("elapsed and error");
    (
        error.to_owned(),
        Duration::from_secs_f64(secs.parse().expect("seconds")),
    )
}

#[test]
fn lost_rank_fails_the_collective_of_the_other() {
    let timeout = Duration::from_secs(3);
    let (error, elapsed) = failed_collective("lost_rank_fails_the_collective_of_the_other", timeout, || {
        std::process::exit(0)
    });
    if this_rank().is_some() {
        return;
    }
    eprintln!("lost rank: failed after {elapsed:?}: {error}");
    assert!(error.contains("all_reduce_sum"), "error names the operation: {error}");
    assert!(elapsed < timeout + Duration::from_secs(5), "took {elapsed:?}");
}

#[test]
fn silent_rank_times_out_the_collective_of_the_other() {
    let timeout = Duration::from_secs(2);
    let (error, elapsed) = failed_collective("silent_rank_times_out_the_collective_of_the_other", timeout, || {
        std::thread::sleep(Duration::from_secs(6))
    });
    if this_rank().is_some() {
        return;
    }
    eprintln!("silent rank: failed after {elapsed:?}: {error}");
    assert!(
        elapsed >= timeout - Duration::from_millis(100),
        "failed before the timeout: {elapsed:?}"
    );
    assert!(elapsed < timeout + Duration::from_secs(3), "took {elapsed:?}");
}

/// Prints (does not assert) how long summing a 1M-f32 bucket over two ranks takes.
#[test]
fn all_reduce_timing_1m_f32() {
    let Some(run) = run_ranks("all_reduce_timing_1m_f32", WORLD, free_port(), DEADLINE, |r| {
        let store = tcp_store(r, false);
        let pg = gloo(&store, r, TIMEOUT);
        let mut bucket = [Tensor::ones([1 << 20], (Kind::Float, Device::Cpu))];
        for _ in 0..3 {
            pg.all_reduce_sum(&mut bucket).expect("warm-up");
        }
        pg.barrier().expect("barrier");
        let mut times: Vec<Duration> = (0..20)
            .map(|_| {
                let start = Instant::now();
                pg.all_reduce_sum(&mut bucket).expect("all_reduce_sum");
                start.elapsed()
            })
            .collect();
        times.sort();
        if r.rank == 0 {
            let line = format!(
                "all_reduce_sum of 1M f32 over 2 Gloo ranks: median {:?}, min {:?}, max {:?}",
                times[10], times[0], times[19]
            );
            std::fs::write(r.dir.join("timing"), line).expect("write timing");
        }
    }) else {
        return;
    };
    run.assert_all_finished();
    eprintln!(
        "{}",
        std::fs::read_to_string(run.dir.path().join("timing")).expect("timing")
    );
}
