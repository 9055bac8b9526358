//! `medssl bench aggregator-step`: the time and memory of one forward and backward pass of an
//! aggregator on random slice features, at several sequence lengths. The PyTorch eager
//! counterpart, with the same JSON, is `benchmarks/aggregator_step.py`.
//!
//! Memory: each slice count runs in a fresh process (this binary, re-executed), which reads
//! its resident set (`VmRSS`) once the model and the inputs exist and its high-water mark
//! (`VmHWM`) after the timed steps; `step_memory_mib` is the difference, what the steps
//! themselves allocated (activations kept for backward, gradients, temporaries).

use anyhow::{bail, ensure, Context, Result};
use medssl_core::aggregator::AggregatorShape;
use medssl_core::config::Section;
use medssl_core::registry;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// What to measure.
pub struct Options {
    /// `deformable`, `full`, or any registered aggregator's name.
    pub attention: String,
    pub slices: Vec<i64>,
    pub batch: i64,
    pub input_dim: i64,
    pub steps: usize,
    pub warmup: usize,
    /// `key=value` overrides of the aggregator's default config.
    pub set: Vec<String>,
    pub threads: i32,
}

/// One slice count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepTiming {
    pub slices: i64,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub baseline_rss_mib: f64,
    pub peak_rss_mib: f64,
    pub step_memory_mib: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub implementation: String,
    pub aggregator: String,
    /// The aggregator's resolved config.
    pub config: toml::Value,
    pub batch: i64,
    pub input_dim: i64,
    pub threads: i32,
    pub steps: usize,
    pub warmup: usize,
    pub results: Vec<StepTiming>,
}

fn aggregator_name(attention: &str) -> &str {
    match attention {
        "deformable" => "deformable-attention",
        "full" => "full-attention",
        other => other,
    }
}

fn status_mib(field: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no `{field}` in /proc/self/status"))?;
    Ok(kib / 1024.0)
}

fn section(opts: &Options) -> Result<Section> {
    let mut body = String::new();
    for raw in &opts.set {
        let (key, value) = raw
            .split_once('=')
            .with_context(|| format!("--set `{raw}`: expected KEY=VALUE, e.g. --set layers=2"))?;
        body.push_str(&format!("{} = {}\n", key.trim(), value.trim()));
    }
    Section::inline("aggregator", aggregator_name(&opts.attention), &body)
        .with_context(|| format!("--set {}", opts.set.join(" ")))
}

/// Runs the benchmark: in this process for one slice count, else one child process per count.
pub fn run(opts: &Options) -> Result<Report> {
    ensure!(!opts.slices.is_empty(), "--slices: give at least one slice count");
    ensure!(opts.steps > 0, "--steps must be positive");
    ensure!(
        opts.batch > 0 && opts.input_dim > 0,
        "--batch and --input-dim must be positive"
    );
    let name = aggregator_name(&opts.attention);
    let entry = registry::aggregators().get(name).context("--attention")?;
    let section = section(opts)?;
    let config = section.resolved("name", &(entry.default_config)())?;
    if opts.threads > 0 {
        tch::set_num_threads(opts.threads);
    }
    let results = if let [slices] = opts.slices[..] {
        vec![measure(opts, &section, slices)?]
    } else {
        opts.slices
            .iter()
            .map(|&slices| in_child(opts, slices))
            .collect::<Result<_>>()?
    };
    Ok(Report {
        implementation: "medssl".into(),
        aggregator: name.into(),
        config,
        batch: opts.batch,
        input_dim: opts.input_dim,
        threads: tch::get_num_threads(),
        steps: opts.steps,
        warmup: opts.warmup,
        results,
    })
}

fn in_child(opts: &Options, slices: i64) -> Result<StepTiming> {
    // /proc/self/exe still reaches this binary after a rebuild has replaced the file.
    let proc_exe = std::path::Path::new("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else {
        std::env::current_exe().context("locating the medssl binary")?
    };
    let mut command = std::process::Command::new(exe);
    command.args(["bench", "aggregator-step", "--json", "--attention", &opts.attention]);
    for (flag, value) in [
        ("--slices", slices.to_string()),
        ("--batch", opts.batch.to_string()),
        ("--input-dim", opts.input_dim.to_string()),
        ("--steps", opts.steps.to_string()),
        ("--warmup", opts.warmup.to_string()),
        ("--threads", opts.threads.to_string()),
    ] {
        command.args([flag, &value]);
    }
    for set in &opts.set {
        command.args(["--set", set]);
    }
    let out = command.output().context("running the benchmark's child process")?;
    if !out.status.success() {
        bail!(
            "{slices} slices: the child process failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .trim_start_matches("error: ")
        );
    }
    let report: Report = serde_json::from_slice(&out.stdout).context("reading the child's JSON")?;
    report.results.into_iter().next().context("the child measured nothing")
}

fn measure(opts: &Options, section: &Section, slices: i64) -> Result<StepTiming> {
    let entry = registry::aggregators().get(&section.name)?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let shape = AggregatorShape {
        input_dim: opts.input_dim,
        slices,
    };
    let aggregator = (entry.build)(section, vs.root() / "aggregator", &shape)?;
    let options = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([opts.batch, slices, opts.input_dim], options);
    let valid = Tensor::ones([opts.batch, slices], (Kind::Bool, Device::Cpu));
    let probe = Tensor::randn([opts.batch, aggregator.output_dim()], options);
    let parameters = vs.trainable_variables();
    let baseline = status_mib("VmRSS:")?;
    let step = || {
        let started = Instant::now();
        let out = aggregator.forward(&x, Some(&valid), true);
        (out.volume * &probe).sum(Kind::Float).backward();
        for mut p in parameters.iter().map(Tensor::shallow_clone) {
            p.zero_grad();
        }
        started.elapsed().as_secs_f64() * 1e3
    };
    for _ in 0..opts.warmup {
        step();
    }
    let mut times: Vec<f64> = (0..opts.steps).map(|_| step()).collect();
    times.sort_by(f64::total_cmp);
    let median = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
    };
    let peak = status_mib("VmHWM:")?;
    Ok(StepTiming {
        slices,
        median_ms: median,
        min_ms: times[0],
        max_ms: times[times.len() - 1],
        baseline_rss_mib: baseline,
        peak_rss_mib: peak,
        step_memory_mib: peak - baseline,
    })
}

/// The report as a table.
pub fn print(report: &Report) {
    println!(
        "{} ({}), batch {}, input width {}, {} threads, median of {} steps after {} warm-up",
        report.aggregator,
        report.implementation,
        report.batch,
        report.input_dim,
        report.threads,
        report.steps,
        report.warmup
    );
    println!(
        "{:>8} {:>12} {:>12} {:>12}",
        "slices", "median ms", "step MiB", "peak MiB"
    );
    for r in &report.results {
        println!(
            "{:>8} {:>12.1} {:>12.0} {:>12.0}",
            r.slices, r.median_ms, r.step_memory_mib, r.peak_rss_mib
        );
    }
}
