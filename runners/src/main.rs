//! The `medssl` command: pre-training runs, resume, and the component catalogue.
//!
//! It links every plugin crate through `medssl_plugins` (plugins/all, the one plugin link
//! list): a plugin that nothing references is dropped by the linker with its registrations.
//! The registry test (tests/registry.rs) compares `medssl list --json` with the exact set of
//! names, so a plugin missing from that list fails it.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use medssl_core::config::LoadedConfig;
use medssl_core::distributed;
use medssl_core::registry;
use medssl_core::train::{self, Run};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod aggregator_bench;
mod bench_3d;
mod bench_distributed;
mod bench_ssl;
mod boxes;
mod devices;
mod embed;
mod eval;
mod export;
mod finetune;
mod sweep;

use medssl_plugins as _;

#[derive(Parser)]
#[command(
    name = "medssl",
    version,
    about = "Self-supervised pre-training on medical images and volumes"
)]
struct Cli {
    /// Log debug detail (RUST_LOG overrides).
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train as CONFIG says, in a new run directory.
    Run {
        /// The run's TOML config.
        config: PathBuf,
        /// Override a config key: --set optimizer.lr=0.01 (repeatable; beats the file and
        /// MEDSSL_ environment variables).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run directory (default: the config's run.dir, else runs/<config name>).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Replace the run directory if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Check a config without training: build everything, then run one forward and
    /// backward pass of each stage and print its loss and gradient norms.
    Check {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Benchmarks: a config's training throughput, or a fixed pipeline.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Data tools.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Run a base config once per named variant, evaluate each, and write one table
    /// (FILE's name with .md and .json) with a row per variant.
    Sweep {
        /// The sweep file: `base`, `[evaluation]` and `[[variants]]` (see docs/configs.md).
        file: PathBuf,
        /// Override applied to every variant (repeatable), after the file's own.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Where the variants' runs and the table go (default: runs/<sweep file name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Retrain variants that already have a finished run.
        #[arg(long)]
        force: bool,
    },
    /// Frozen-feature evaluation of a run: a linear or kNN probe on the encoder's (and
    /// aggregator's) features of a labelled set, beside the same probe on a randomly
    /// initialised backbone of the same architecture.
    Eval {
        #[command(subcommand)]
        command: eval::EvalCommand,
    },
    /// Fine-tune a pre-trained backbone with a task head (U-Net segmentation, 3D
    /// classification) over several seeds, beside the same protocol from scratch.
    Finetune(finetune::FinetuneArgs),
    /// Frozen features of any readable set, as `medssl eval` computes them, to
    /// .safetensors or .npy (with a .json of sample ids and labels).
    Embed(embed::EmbedArgs),
    /// Write a checkpoint's weights (its encoder, backbone or whole model) under
    /// torchvision's, MONAI's or medssl's own parameter names, with what they are in the
    /// file's header.
    Export(export::ExportArgs),
    /// Continue a run from its latest checkpoint.
    Resume {
        /// The run directory.
        run_dir: PathBuf,
        /// Resume although the run's config.toml was edited since its checkpoint (the keys
        /// are listed in a warning; the run is then no longer an exact resume).
        #[arg(long)]
        allow_config_change: bool,
    },
    /// List the registered components by role.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What this build can run on: CUDA devices, cuDNN, NCCL, CPU threads and bf16.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a component's default config as TOML.
    Example {
        /// The component's registered name, e.g. resnet50.
        name: String,
    },
}

/// Where a 3D benchmark runs, as its Python twin's `--threads` and `--device` say.
#[derive(clap::Args, Debug)]
struct Placement {
    /// libtorch intra-op threads (0: libtorch's default, one a core), as the Python
    /// twin's `--threads`.
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl Placement {
    /// Sets the intra-op threads where given and resolves the device.
    fn apply(&self) -> Result<tch::Device> {
        let threads = self.threads;
        anyhow::ensure!(
            threads >= 0,
            "--threads must be 0 (libtorch's default) or more, got {threads}"
        );
        if threads > 0 {
            tch::set_num_threads(threads);
        }
        medssl_core::device::resolve(&self.device).context("--device")
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One forward and backward pass of an aggregator on random slice features, per slice
    /// count (each in a fresh process): median time and memory.
    AggregatorStep {
        /// `deformable`, `full`, or a registered aggregator's name.
        #[arg(long, default_value = "deformable")]
        attention: String,
        /// Slice counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "64,128,256,512")]
        slices: Vec<i64>,
        #[arg(long, default_value_t = 4)]
        batch: i64,
        /// Width of each slice's features (3904: ResNet-50's multi-level features, Eq. 9).
        #[arg(long, default_value_t = 3904)]
        input_dim: i64,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Override a key of the aggregator's default config: --set layers=2 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// libtorch intra-op threads (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A config's stage: the loader alone, then training steps on in-memory batches.
    Train {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Batches to time (at most one epoch).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Stage to measure (0-based).
        #[arg(long, default_value_t = 0)]
        stage: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Decode every NIfTI volume of a folder, z-score it and make two 3D views of each.
    Loader {
        /// A folder of NIfTI volumes, or a Decathlon folder (its imagesTr is read).
        #[arg(long)]
        data: PathBuf,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 32)]
        slices: i64,
        #[arg(long, default_value_t = 64)]
        size: i64,
        /// Untimed passes over the data first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Timed passes, each with fresh views.
        #[arg(long, default_value_t = 3)]
        epochs: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Data parallelism on this machine: the swav-step workload at one global batch, as one
    /// process with every thread and as `--world` processes over Gloo with a share each,
    /// alternated `--pairs` times; samples/s of each, the speedup, and the all-reduce's
    /// share of the step.
    Distributed {
        /// Global batch (each of the processes takes batch / world).
        #[arg(long, default_value_t = 16)]
        batch: i64,
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Threads of the one process, shared out among the processes (default: the
        /// machine's cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Alternating runs of each kind; medians are reported.
        #[arg(long, default_value_t = 3)]
        pairs: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One SwAV training step: ResNet-50 (3 channels), projection 2048-2048-128, 3000
    /// prototypes, crops 2 x 96 px + 4 x 48 px, SGD; median time per step and peak memory.
    /// Under a launcher (torchrun's variables), the data-parallel step.
    SwavStep {
        #[arg(long, default_value_t = 16)]
        batch: i64,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The encoder's `memory_format`: contiguous or channels_last.
        #[arg(long, default_value = "contiguous")]
        memory_format: medssl_core::memory_format::MemoryFormat,
        /// fp32, bf16 (CPU or CUDA) or fp16 (CUDA): the encoder under autocast, as `run.precision`.
        #[arg(long, default_value = "fp32")]
        precision: medssl_core::precision::Precision,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One training step of the `reconstruction` objective with `vit3d` (ViT-B/16 by
    /// default): corruption, encoder, decoder, L1 + contrastive, backward, Adam.
    ReconstructionStep {
        /// Crops a step, each corrupted twice.
        #[arg(long, default_value_t = 2)]
        batch: i64,
        /// Crop side (and the ViT's `img_size`).
        #[arg(long, default_value_t = 96)]
        size: i64,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[command(flatten)]
        placement: Placement,
        #[arg(long)]
        json: bool,
    },
    /// One training step of the `voco` objective (its defaults) with `swin3d` (use_v2):
    /// crops cut from each volume's region, the encoder on all of them, student and EMA
    /// teacher heads, intra + inter + regulariser, backward, AdamW (amsgrad).
    VocoStep {
        /// Volumes a step, one region each.
        #[arg(long, default_value_t = 2)]
        batch: i64,
        /// Side of a base crop (the region is crop x grid·crop x grid·crop, D x H x W).
        #[arg(long, default_value_t = 64)]
        crop: i64,
        /// Base crops along H and along W of each region.
        #[arg(long, default_value_t = 3)]
        grid: i64,
        /// swin3d's `feature_size`.
        #[arg(long, default_value_t = 48)]
        feature_size: i64,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[command(flatten)]
        placement: Placement,
        #[arg(long)]
        json: bool,
    },
    /// UNETR (vit3d + unetr, 14 classes) over one volume by sliding windows.
    SlidingWindow {
        /// Side of the (cubic) volume.
        #[arg(long, default_value_t = 160)]
        volume: i64,
        /// Side of a window (the ViT's `img_size`).
        #[arg(long, default_value_t = 96)]
        window: i64,
        #[arg(long, default_value_t = 0.25)]
        overlap: f64,
        /// Timed passes over the volume (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[command(flatten)]
        placement: Placement,
        #[arg(long)]
        json: bool,
    },
    /// DeepCluster-v2's clustering: spherical k-means of a bank of unit embeddings into
    /// each prototype set.
    Kmeans {
        #[arg(long, default_value_t = 20000)]
        samples: i64,
        #[arg(long, default_value_t = 128)]
        dim: i64,
        /// Cluster count of each prototype set (repeatable or comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [3000, 3000, 3000])]
        clusters: Vec<i64>,
        #[arg(long, default_value_t = 10)]
        iterations: usize,
        /// Times the whole clustering is repeated (the median is reported).
        #[arg(long, default_value_t = 1)]
        repeats: usize,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print as JSON what a file or folder holds: format, samples, shapes, stored type,
    /// spacing, intensity range and label values.
    Inspect {
        path: PathBuf,
        /// Reader to use (default: recognised from the path).
        #[arg(long)]
        format: Option<String>,
        /// Decode at most this many samples.
        #[arg(long, default_value_t = 32)]
        limit: usize,
    },
    /// Per-slice boxes of the connected components of a Decathlon task's masks, as COCO
    /// JSON (a 2D detection set for Faster R-CNN).
    BoxesFromMasks(boxes::BoxesArgs),
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        // `println!` panics when standard output fails: a closed pipe (`medssl list | head`)
        // ends the command quietly, like any Unix tool; any other failure (a full disk) is
        // an ordinary error.
        if let Some(cause) = message.strip_prefix("failed printing to stdout: ") {
            if cause.contains("Broken pipe") {
                std::process::exit(0);
            }
            eprintln!("error: cannot write to standard output: {cause}");
            std::process::exit(1);
        }
        // libtorch's allocation failures reach us as tch panics (and, from several loader
        // threads at once, more than once: one report is enough).
        if medssl_core::activity::is_out_of_memory(message) {
            static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if REPORTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let during = medssl_core::activity::current()
                .map(|a| format!(" during {a}"))
                .unwrap_or_default();
            // libtorch's message, Debug-formatted inside tch's error, carries its C++ stack
            // after an escaped newline: the reason is what comes before it.
            let first = message.lines().next().unwrap_or(message);
            let first = first.split("\\n").next().unwrap_or(first);
            // On a GPU mixed precision roughly halves the activations' memory.
            let precision = if message.contains("CUDA") {
                ", or train in `run.precision = \"bf16\"`"
            } else {
                ""
            };
            if BENCHMARKING.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!("error: out of memory{during}: {first}\nlower the benchmark's sizes (its --batch, --size or --crop, --feature-size or --grid; `medssl bench COMMAND --help` lists them){precision}");
            } else {
                eprintln!("error: out of memory{during}: {first}\nlower `data.loader.batch_size` (or the stage's `batch_size`), the view sizes (`data.views.*`) or the model's width{precision}; the checkpoints already written are intact, and a resume continues from the last one");
            }
            std::process::exit(1);
        }
        eprintln!("error: internal failure{location}: {message}\n(this is a bug in medssl or a plugin; please report it with the command and config)");
    }));
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: bool) {
    // The JPEG 2000 decoder (the `jpeg2k` crate over openjp2) logs every codestream it reads
    // at info level through the `log` bridge ("Start to read j2k main header"): debug
    // detail, shown with `--verbose` or RUST_LOG, not on every run's console.
    let default = if verbose { "debug" } else { "info,jpeg2k=warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

/// Joins the multi-process launch the environment describes (torchrun, srun, mpirun), if
/// any: training is then data-parallel over its ranks ([`distributed`]).
fn start_distributed(cfg: &LoadedConfig) -> Result<()> {
    let device = medssl_core::device::resolve(&cfg.run.device).context("config key `device`")?;
    let launch = distributed::init(&cfg.run.options.distributed, device)?;
    if launch.is_distributed() {
        tracing::info!(
            "data-parallel: rank {} of {} ({}), per-rank batch {}, global batch {}",
            launch.rank,
            launch.world_size,
            launch.launcher,
            cfg.run.data.loader.batch_size,
            cfg.run.data.loader.batch_size * launch.world_size
        );
    }
    Ok(())
}

/// Fine-tuning and evaluation run in one process: under a launcher every rank would run the
/// whole protocol and write the same files, so they refuse to start instead.
fn single_process(command: &str) -> Result<()> {
    let launch = distributed::Launch::from_env()?;
    anyhow::ensure!(
        !launch.is_distributed(),
        "`medssl {command}` runs in one process, but {} started {} (this is rank {}): run it without a launcher; only `medssl run` and `medssl resume` train data-parallel",
        launch.launcher,
        launch.world_size,
        launch.rank
    );
    Ok(())
}

/// Set while a fixed-pipeline `medssl bench` command runs (not `bench train`, which runs a
/// config): its sizes are flags, not config keys, and the out-of-memory message names those.
static BENCHMARKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn execute(command: Command) -> Result<()> {
    if matches!(&command, Command::Bench { command } if !matches!(command, BenchCommand::Train { .. })) {
        BENCHMARKING.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    match command {
        Command::Run {
            config,
            set,
            run_dir,
            force,
        } => {
            let cfg = LoadedConfig::load(&config, &set)?;
            let dir = run_dir.or_else(|| cfg.run.options.dir.clone()).unwrap_or_else(|| {
                Path::new("runs").join(
                    config
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "run".into()),
                )
            });
            start_distributed(&cfg)?;
            let run = Run::prepare(cfg)?;
            // Held until the run ends: a second writer is refused with this pid. Rank 0
            // alone writes; the others wait until the folder is there.
            let _lock = match distributed::is_writer() {
                true => {
                    let lock = train::create_run_dir(&dir, force)?;
                    medssl_core::checkpoint::write_atomic(
                        &dir.join(medssl_core::run_dir::CONFIG_FILE),
                        run.resolved_config().as_bytes(),
                    )?;
                    Some(lock)
                }
                false => None,
            };
            distributed::communicator()
                .barrier()
                .map_err(|e| distributed::collective_failed(e, "waiting for rank 0 to create the run directory"))?;
            tracing::info!("run directory: {}", dir.display());
            report(run.train(&dir, false)?);
            Ok(())
        }
        Command::Devices { json } => {
            let devices = devices::devices();
            if json {
                println!("{}", serde_json::to_string(&devices)?);
            } else {
                print!("{}", devices.table());
            }
            Ok(())
        }
        Command::Sweep { file, set, out, force } => {
            let out = out.unwrap_or_else(|| {
                Path::new("runs").join(
                    file.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "sweep".into()),
                )
            });
            sweep::run(&file, &out, &set, force)
        }
        Command::Check { config, set } => {
            let mut run = Run::prepare(LoadedConfig::load(&config, &set)?)?;
            for stage in 0..run.stage_count() {
                if run.stage_epochs(stage) == 0 {
                    println!("stage {stage}: epochs = 0, skipped");
                    continue;
                }
                let probe = run.probe_step(stage)?;
                println!("stage {stage}: loss {:.4}", probe.loss);
                for g in &probe.groups {
                    println!(
                        "  {:24} gradient norm {:.3e} ({} of {} tensors with a gradient)",
                        g.group, g.norm, g.with_gradient, g.parameters
                    );
                }
                anyhow::ensure!(probe.loss.is_finite(), "stage {stage}: the loss is not finite");
                for g in &probe.groups {
                    anyhow::ensure!(
                        g.norm.is_finite() && g.norm > 0.0,
                        "stage {stage}: `{}` is trained but its gradient norm is {} on the first batch: nothing would learn (is the batch too small for its objectives?)",
                        g.group,
                        g.norm
                    );
                }
            }
            println!("config `{}` is valid and trains", config.display());
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Distributed {
                    batch,
                    world,
                    threads,
                    warmup,
                    steps,
                    pairs,
                    json,
                },
        } => {
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let report = bench_distributed::run(&bench_distributed::DistributedBench {
                batch,
                world,
                threads,
                warmup,
                steps,
                pairs,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for side in [&report.single, &report.parallel] {
                    println!(
                        "{} process(es) x {} thread(s), batch {} each: {:.0} ms a step, {:.2} samples/s (all-reduce {:.0} ms)",
                        side.world_size,
                        side.threads_per_process,
                        side.batch_per_process,
                        side.ms_per_step,
                        side.samples_per_s,
                        side.allreduce_ms
                    );
                }
                println!(
                    "speedup {:.2}, all-reduce {:.1}% of the step at {} processes (medians of {} pairs)",
                    report.speedup,
                    100.0 * report.allreduce_fraction,
                    world,
                    report.pairs
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Train {
                    config,
                    set,
                    steps,
                    stage,
                    json,
                },
        } => {
            let mut run = Run::prepare(LoadedConfig::load(&config, &set)?)?;
            anyhow::ensure!(
                stage < run.stage_count(),
                "--stage {stage}: the config has {} stage(s)",
                run.stage_count()
            );
            let bench = run.bench(stage, steps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&bench)?);
            } else {
                println!(
                    "stage `{}`, batch {}, {} timed steps on {} ({} threads, {} loader workers)",
                    bench.stage, bench.batch_size, bench.steps, bench.device, bench.threads, bench.loader_workers
                );
                println!("  loader alone:    {:8.1} samples/s", bench.data_samples_per_s);
                println!(
                    "  training steps:  {:8.1} samples/s ({:.2} steps/s)",
                    bench.train_samples_per_s, bench.train_steps_per_s
                );
                if let Some(rss) = bench.peak_rss_mib {
                    println!("  peak memory:     {rss:8.0} MiB");
                }
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Loader {
                    data,
                    threads,
                    slices,
                    size,
                    warmup,
                    epochs,
                    json,
                },
        } => {
            let bench = medssl_core::bench::loader(&data, threads, slices, size, warmup, epochs)?;
            if json {
                println!("{}", serde_json::to_string(&bench)?);
            } else {
                println!(
                    "{} volumes ({} epochs) in {:.2} s: {:.1} volumes/s on {} threads; peak memory {:.0} MiB",
                    bench.volumes,
                    bench.epochs,
                    bench.seconds,
                    bench.volumes_per_s,
                    bench.threads,
                    bench.peak_rss_mib.unwrap_or(f64::NAN)
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::SwavStep {
                    batch,
                    warmup,
                    steps,
                    device,
                    memory_format,
                    precision,
                    json,
                },
        } => {
            anyhow::ensure!(
                batch >= 2 && steps >= 1,
                "--batch must be at least 2 (batch norm) and --steps at least 1"
            );
            let device = medssl_core::device::resolve(&device).context("--device")?;
            precision.check_device(device, "--precision")?;
            anyhow::ensure!(
                precision != medssl_core::precision::Precision::Fp64,
                "--precision fp64 is not benchmarked: use fp32, bf16 or fp16"
            );
            distributed::init(&Default::default(), device)?;
            let bench = bench_ssl::swav_step(&bench_ssl::SwavStep {
                batch,
                warmup,
                steps,
                device,
                memory_format,
                precision,
            })?;
            if json {
                println!("{}", serde_json::to_string(&bench)?);
            } else {
                println!(
                    "swav step, batch {batch}: {:.1} ms median of {steps} (min {:.1}, max {:.1}); peak memory {:.0} MiB",
                    bench.ms_per_step,
                    bench.min_ms,
                    bench.max_ms,
                    bench.peak_rss_mib.unwrap_or(f64::NAN)
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::ReconstructionStep {
                    batch,
                    size,
                    warmup,
                    steps,
                    placement,
                    json,
                },
        } => {
            anyhow::ensure!(batch >= 1 && steps >= 1, "--batch and --steps must be at least 1");
            let device = placement.apply()?;
            let report = bench_3d::reconstruction_step(batch, size, warmup, steps, device)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "reconstruction step, {batch} crops of {size}^3: {:.1} ms median of {steps} (min {:.1}, max {:.1}); peak memory {:.0} MiB",
                    report.ms_per_step,
                    report.min_ms,
                    report.max_ms,
                    report.peak_rss_mb.unwrap_or(f64::NAN)
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::VocoStep {
                    batch,
                    crop,
                    grid,
                    feature_size,
                    warmup,
                    steps,
                    placement,
                    json,
                },
        } => {
            anyhow::ensure!(steps >= 1, "--steps must be at least 1");
            let device = placement.apply()?;
            let settings = bench_3d::VocoStepSettings {
                batch,
                crop,
                grid,
                feature_size,
            };
            let report = bench_3d::voco_step(settings, warmup, steps, device)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                let side = grid * crop;
                println!(
                    "voco step, {batch} regions of {crop} x {side} x {side} ({grid} x {grid} base crops of {crop}^3), feature size {feature_size}: {:.1} ms median of {steps} (min {:.1}, max {:.1}); peak memory {:.0} MiB",
                    report.ms_per_step,
                    report.min_ms,
                    report.max_ms,
                    report.peak_rss_mb.unwrap_or(f64::NAN)
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::SlidingWindow {
                    volume,
                    window,
                    overlap,
                    repeats,
                    placement,
                    json,
                },
        } => {
            let device = placement.apply()?;
            let report = bench_3d::sliding_window(volume, window, overlap, repeats, device)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "UNETR sliding window, {volume}^3 by {window}^3 windows: {:.1} ms median of {repeats}; peak memory {:.0} MiB",
                    report.ms_per_step,
                    report.peak_rss_mb.unwrap_or(f64::NAN)
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Kmeans {
                    samples,
                    dim,
                    clusters,
                    iterations,
                    repeats,
                    device,
                    json,
                },
        } => {
            anyhow::ensure!(
                samples >= 1
                    && dim >= 1
                    && !clusters.is_empty()
                    && clusters.iter().all(|&k| (1..=samples).contains(&k)),
                "--samples and --dim must be positive and every --clusters value between 1 and --samples"
            );
            let device = medssl_core::device::resolve(&device).context("--device")?;
            let bench = bench_ssl::kmeans(&bench_ssl::KmeansBench {
                samples,
                dim,
                clusters,
                iterations,
                repeats,
                device,
            })?;
            if json {
                println!("{}", serde_json::to_string(&bench)?);
            } else {
                println!(
                    "k-means of {samples} x {dim} into {:?}, {iterations} iterations: {:.0} ms (median of {}); peak memory {:.0} MiB",
                    bench.clusters,
                    bench.ms,
                    bench.repeats,
                    bench.peak_rss_mib.unwrap_or(f64::NAN)
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::AggregatorStep {
                    attention,
                    slices,
                    batch,
                    input_dim,
                    steps,
                    warmup,
                    set,
                    threads,
                    json,
                },
        } => {
            let report = aggregator_bench::run(&aggregator_bench::Options {
                attention,
                slices,
                batch,
                input_dim,
                steps,
                warmup,
                set,
                threads,
            })?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                aggregator_bench::print(&report);
            }
            Ok(())
        }
        Command::Data {
            command: DataCommand::Inspect { path, format, limit },
        } => {
            let report = medssl_core::inspect::inspect(&path, format.as_deref(), limit)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Data {
            command: DataCommand::BoxesFromMasks(args),
        } => boxes::run(args),
        Command::Eval { command } => {
            single_process("eval")?;
            eval::run(command)
        }
        Command::Embed(args) => {
            single_process("embed")?;
            embed::run(args)
        }
        Command::Export(args) => export::run(args),
        Command::Finetune(args) => {
            single_process("finetune")?;
            finetune::run(args)
        }
        Command::Resume {
            run_dir,
            allow_config_change,
        } => {
            let config = run_dir.join(medssl_core::run_dir::CONFIG_FILE);
            let cfg = LoadedConfig::load_resolved(&config)
                .with_context(|| format!("cannot resume `{}`", run_dir.display()))?;
            start_distributed(&cfg)?;
            let _lock = match distributed::is_writer() {
                true => Some(medssl_core::run_dir::RunLock::acquire(&run_dir)?),
                false => None,
            };
            let mut run = Run::prepare(cfg)?;
            if allow_config_change {
                run.allow_config_change();
            }
            report(run.train(&run_dir, true)?);
            Ok(())
        }
        Command::List { json } => {
            let catalogue = registry::catalogue()?;
            if json {
                let object: serde_json::Map<String, serde_json::Value> = catalogue
                    .into_iter()
                    .map(|(role, rows)| (role.to_string(), serde_json::json!(rows)))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&object)?);
            } else {
                for (role, rows) in catalogue {
                    println!("{role}:");
                    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
                    for row in rows {
                        println!("  {:width$}  {}", row.name, row.about);
                    }
                }
            }
            Ok(())
        }
        Command::Example { name } => {
            print!("{}", registry::example(&name)?);
            Ok(())
        }
    }
}

fn report(summary: train::Summary) {
    let loss: String = summary
        .stages
        .iter()
        .map(|(name, loss)| match loss {
            Some((a, b)) => format!("; {name} loss {a:.4} -> {b:.4}"),
            None => format!("; {name} skipped"),
        })
        .collect();
    println!(
        "finished {} steps in {:.1} s{loss}; report: {}",
        summary.steps,
        summary.seconds,
        summary.run_dir.join(medssl_core::run_dir::REPORT_FILE).display()
    );
}
