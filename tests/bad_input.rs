//! The bad-input suite: one table of inputs a user can get wrong (configs, data files,
//! checkpoints, the command line), each with the exit code and the words its message must
//! hold. Every row also checks that nothing panicked and, where a run directory exists, that
//! every file under its `checkpoints/` is byte for byte what it was before the command.
//!
//! The table is the one place that lists them all; tests/cli.rs, tests/data.rs,
//! tests/resume.rs and tests/eval.rs check some of the same inputs in more depth.

mod common;

use common::{medssl, write, TINY};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A row's folder, and a finished TINY run to copy from.
struct Ctx {
    dir: PathBuf,
    base: PathBuf,
}

impl Ctx {
    /// `dir/name`, as a string argument.
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A new folder `dir/name`.
    fn folder(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// `text` as `dir/c.toml`.
    fn config(&self, text: &str) -> String {
        write(&self.dir, "c.toml", text).display().to_string()
    }

    /// TINY with `from` replaced by `to` (which must occur), as `dir/c.toml`.
    fn tiny(&self, from: &str, to: &str) -> String {
        assert!(TINY.contains(from), "TINY has no `{from}`");
        self.config(&TINY.replacen(from, to, 1))
    }

    /// TINY reading `format` from `path` instead of the phantom, as `dir/c.toml`.
    fn source(&self, format: &str, path: &Path) -> String {
        self.tiny(
            "format = \"phantom\"\ncount = 8\nslices = 6\nsize = 24",
            &format!("format = \"{format}\"\npath = {:?}", path.display().to_string()),
        )
    }

    /// A copy of the finished run, as `dir/run`.
    fn run(&self) -> PathBuf {
        let run = self.dir.join("run");
        copy_tree(&self.base, &run);
        run
    }

    /// The run copy's newest checkpoint folder.
    fn checkpoint(&self) -> PathBuf {
        self.dir.join("run/checkpoints/step-00000008")
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else if entry.file_name() != ".lock" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file under `dir`, by path, with its bytes.
fn tree_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(tree_bytes(&path));
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// `medssl run CONFIG --run-dir dir/out`.
fn run_args(ctx: &Ctx, config: String) -> Vec<String> {
    vec!["run".into(), config, "--run-dir".into(), ctx.path("out")]
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Writes `data` as a C-order `.npy` array of `shape`.
fn npy<T: npyz::AutoSerialize>(path: &Path, shape: &[u64], data: impl IntoIterator<Item = T>) {
    use npyz::WriterBuilder;
    let file = std::fs::File::create(path).unwrap();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(file)
        .begin_nd()
        .unwrap();
    w.extend(data).unwrap();
    w.finish().unwrap();
}

/// A folder `name` of 8 float32 `.npy` volumes of 24 x 24 x 6 from `value(file, voxel)`.
fn npy_folder(ctx: &Ctx, name: &str, value: fn(usize, usize) -> f32) -> PathBuf {
    let folder = ctx.folder(name);
    for i in 0..8 {
        npy(
            &folder.join(format!("v{i}.npy")),
            &[24, 24, 6],
            (0..24 * 24 * 6).map(|v| value(i, v)),
        );
    }
    folder
}

fn ramp(i: usize, v: usize) -> f32 {
    ((i * 7 + v * 13) % 101) as f32
}

/// Two NaN and one infinite voxel in every file.
fn damaged(i: usize, v: usize) -> f32 {
    match v {
        0 | 5 => f32::NAN,
        9 => f32::INFINITY,
        _ => ramp(i, v),
    }
}

/// A folder `name` holding `file` with `bytes` in each of 8 copies (`{i}` in `file` is the
/// copy's index).
fn bytes_folder(ctx: &Ctx, name: &str, file: &str, bytes: &[u8]) -> PathBuf {
    let folder = ctx.folder(name);
    for i in 0..8 {
        let path = folder.join(file.replace("{i}", &i.to_string()));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    folder
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// A symbolic link `name` in `dir` that points at itself.
fn link_loop(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::os::unix::fs::symlink(&path, &path).unwrap();
    path
}

/// An `.npz` archive whose `train_images` is a 1D array.
fn flat_npz(path: &Path) {
    use npyz::WriterBuilder;
    let mut npz = npyz::npz::NpzWriter::create(path).unwrap();
    let mut w = npz
        .array::<u8>("train_images", Default::default())
        .unwrap()
        .default_dtype()
        .shape(&[24])
        .begin_nd()
        .unwrap();
    w.extend(0..24u8).unwrap();
    w.finish().unwrap();
}

/// The finished run's `tensors.safetensors` with tensor `model.encoder.bn1.bias` renamed:
/// a checkpoint of the right size that lacks one tensor the config builds.
fn rename_a_tensor(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entry = header.remove("model.encoder.bn1.bias").expect("TINY has encoder.bn1");
    header.insert("model.encoder.bn1.bias_renamed".into(), entry);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

/// A fine-tuning config (U-Net segmentation) on a generated Decathlon task in `dir/task`.
fn finetune_config(ctx: &Ctx) -> String {
    let task = common::decathlon::decathlon(&ctx.dir, 4, 2);
    write(
        &ctx.dir,
        "ft.toml",
        &format!(
            r#"
seed = 3
threads = 1
runs = 1
classes = 3
[data.train]
format = "decathlon"
path = {path:?}
ids = ["case_001", "case_002"]
[data.eval]
format = "decathlon"
path = {path:?}
ids = ["case_003", "case_004"]
[input]
image_size = 16
workers = 1
[head]
name = "unet"
channels = [8, 8, 8, 8, 8]
[train]
epochs = 1
batch_size = 2
[optimizer]
name = "adamw"
lr = 0.01
"#,
            path = task.display().to_string()
        ),
    )
    .display()
    .to_string()
}

/// `medssl eval linear CHECKPOINT` with `set` for training and scoring, on the CPU.
fn eval_args(checkpoint: &str, set: &str) -> Vec<String> {
    strings(&[
        "eval", "linear", checkpoint, "--train", set, "--eval", set, "--device", "cpu", "--epochs", "2",
    ])
}

/// One bad input: how to make it, the command, and what must come back.
struct Row {
    name: &'static str,
    /// Writes the row's files into its folder and returns the command's arguments.
    setup: fn(&Ctx) -> Vec<String>,
    /// Environment variables of the command.
    env: &'static [(&'static str, &'static str)],
    code: i32,
    /// Words stderr must contain.
    words: &'static [&'static str],
}

const fn row(name: &'static str, setup: fn(&Ctx) -> Vec<String>, code: i32, words: &'static [&'static str]) -> Row {
    Row {
        name,
        setup,
        env: &[],
        code,
        words,
    }
}

fn rows() -> Vec<Row> {
    vec![
        // ---- config ----
        row(
            "config: malformed TOML",
            |c| run_args(c, c.config("seed = 1\n[encoder\nname = \"resnet18\"\n")),
            1,
            &["c.toml", "is not valid TOML", "line 2"],
        ),
        row(
            "config: unknown top-level key",
            |c| run_args(c, c.config(&format!("sede = 3\n{TINY}"))),
            1,
            &["sede", "c.toml"],
        ),
        row(
            "config: unknown key of a component",
            |c| run_args(c, c.tiny("hidden_dim = 16", "hiden_dim = 16")),
            1,
            &["objectives.slices.hiden_dim", "hidden_dim", "c.toml"],
        ),
        row(
            "config: unknown key of [run]",
            |c| run_args(c, c.tiny("checkpoint_every = 1", "checkpoint_evry = 1")),
            1,
            &["run.checkpoint_evry", "checkpoint_every"],
        ),
        row(
            "config: wrong type of a top-level key",
            |c| run_args(c, c.tiny("lr = 0.05", "lr = \"fast\"")),
            1,
            &["optimizer.lr", "\"fast\"", "c.toml"],
        ),
        row(
            "config: wrong type in a stage",
            |c| run_args(c, c.tiny("epochs = 2", "epochs = \"two\"")),
            1,
            &["stages", "epochs", "\"two\""],
        ),
        row(
            "config: a component name that is no string",
            |c| run_args(c, c.tiny("name = \"resnet18\"", "name = 3")),
            1,
            &["encoder.name", "must be a string", "the number 3"],
        ),
        row(
            "config: a section without its name",
            |c| run_args(c, c.tiny("name = \"mean-pool\"", "")),
            1,
            &["[aggregator]", "no `name` key"],
        ),
        row(
            "config: unknown encoder in the file",
            |c| run_args(c, c.tiny("name = \"resnet18\"", "name = \"resnet51\"")),
            1,
            &[
                "unknown encoder `resnet51`",
                "resnet50",
                "config key `encoder.name` (from file",
                "c.toml",
            ],
        ),
        row(
            "config: unknown encoder from --set",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "encoder.name=resnet51"]));
                a
            },
            1,
            &[
                "unknown encoder `resnet51`",
                "config key `encoder.name` (from command-line override `--set encoder.name=resnet51`)",
            ],
        ),
        Row {
            env: &[("MEDSSL_ENCODER__NAME", "resnet51")],
            ..row(
                "config: unknown encoder from an environment variable",
                |c| run_args(c, c.config(TINY)),
                1,
                &[
                    "unknown encoder `resnet51`",
                    "environment variable `MEDSSL_ENCODER__NAME`",
                ],
            )
        },
        row(
            "config: unknown aggregator",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "aggregator.name=transformer"]));
                a
            },
            1,
            &[
                "unknown aggregator `transformer`",
                "mean-pool",
                "--set aggregator.name=transformer",
            ],
        ),
        row(
            "config: unknown objective",
            |c| run_args(c, c.tiny("name = \"ntxent\"", "name = \"simclr\"")),
            1,
            &[
                "unknown objective `simclr`",
                "vicreg",
                "config key `objectives.slices.name` (from file",
            ],
        ),
        row(
            "config: unknown dataset format",
            |c| run_args(c, c.tiny("format = \"phantom\"", "format = \"png\"")),
            1,
            &[
                "unknown dataset format `png`",
                "image-folder",
                "config key `data.sources.phantom.format` (from file",
            ],
        ),
        row(
            "config: unknown optimizer",
            |c| run_args(c, c.tiny("name = \"sgd\"", "name = \"adam\"")),
            1,
            &["optimizer.name", "\"adam\"", "(from file", "one of: sgd, lars, adamw"],
        ),
        row(
            "config: keep_checkpoints = 0",
            |c| run_args(c, c.tiny("keep_checkpoints = 2", "keep_checkpoints = 0")),
            1,
            &["run.keep_checkpoints", "at least 1"],
        ),
        row(
            "config: unknown head (fine-tuning)",
            |c| {
                let run = c.run();
                let ft = finetune_config(c);
                strings(&[
                    "finetune",
                    &ft,
                    "--pretrained",
                    &run.display().to_string(),
                    "--out",
                    &c.path("ft"),
                    "--set",
                    "head.name=nonesuch",
                ])
            },
            1,
            &["unknown head `nonesuch`", "unet", "--set head.name=nonesuch"],
        ),
        row(
            "config: --set without =",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "optimizer.lr"]));
                a
            },
            1,
            &["--set `optimizer.lr`", "KEY=VALUE"],
        ),
        row(
            "config: --set with an empty key part",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "optimizer..lr=1"]));
                a
            },
            1,
            &["optimizer..lr", "not a dotted key"],
        ),
        row(
            "config: --set past the end of an array",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "stages.5.epochs=1"]));
                a
            },
            1,
            &["stages.5.epochs", "index 5 is out of range", "2 element(s)"],
        ),
        row(
            "config: --set of a wrong type",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "data.loader.batch_size=many"]));
                a
            },
            1,
            &["data.loader.batch_size", "--set data.loader.batch_size=many"],
        ),
        row(
            "config: missing [encoder]",
            |c| {
                run_args(
                    c,
                    c.tiny(
                        "[encoder]\nname = \"resnet18\"\nbase_width = 4\nsmall_input = true\n",
                        "",
                    ),
                )
            },
            1,
            &["missing required key `encoder`"],
        ),
        row(
            "config: no stages",
            |c| run_args(c, c.config(&TINY[..TINY.find("[[stages]]").unwrap()])),
            1,
            &["no `[[stages]]`"],
        ),
        row(
            "config: a stage naming an undefined objective",
            |c| {
                run_args(
                    c,
                    c.tiny("objectives = { slices = 1.0 }", "objectives = { slicez = 1.0 }"),
                )
            },
            1,
            &["stages[0]", "objective `slicez` is not defined", "slices, volumes"],
        ),
        row(
            "config: a stage training an unknown module",
            |c| run_args(c, c.tiny("train = [\"encoder\"]", "train = [\"decoder\"]")),
            1,
            &["stages[0]", "`decoder`", "`encoder` or `aggregator`"],
        ),
        row(
            "config: a stage drawing from an undefined source",
            |c| {
                run_args(
                    c,
                    c.tiny(
                        "objectives = { slices = 1.0 }",
                        "objectives = { slices = 1.0 }\nsources = [\"ct\"]",
                    ),
                )
            },
            1,
            &["stages[0]", "no data source `ct`", "phantom"],
        ),
        row(
            "config: negative epochs",
            |c| run_args(c, c.tiny("epochs = 2", "epochs = -2")),
            1,
            &["epochs", "-2", "expected usize"],
        ),
        row(
            "config: negative seed",
            |c| run_args(c, c.tiny("seed = 1", "seed = -1")),
            1,
            &["key `seed`", "-1", "expected u64"],
        ),
        row(
            "config: learning rate 0",
            |c| run_args(c, c.tiny("lr = 0.05", "lr = 0.0")),
            1,
            &["optimizer.lr", "positive"],
        ),
        row(
            "config: a negative momentum",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "optimizer.momentum=-0.9"]));
                a
            },
            1,
            &[
                "optimizer.momentum",
                "--set optimizer.momentum=-0.9",
                "a finite number >= 0",
            ],
        ),
        row(
            "config: a negative weight decay in a stage's optimizer",
            |c| {
                run_args(
                    c,
                    c.tiny(
                        "optimizer = { name = \"adamw\", lr = 0.001 }",
                        "optimizer = { name = \"adamw\", lr = 0.001, weight_decay = -0.05 }",
                    ),
                )
            },
            1,
            &["stages[1].optimizer.weight_decay", "-0.05", "a finite number >= 0"],
        ),
        row(
            "config: a beta of 1 or more",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "optimizer.betas=[0.9, 1.5]"]));
                a
            },
            1,
            &["optimizer.betas", "1.5", "each in [0, 1)"],
        ),
        row(
            "config: a negative warm-up",
            |c| run_args(c, c.tiny("warmup_epochs = 0.5", "warmup_epochs = -1")),
            1,
            &["optimizer.warmup_epochs", "a finite number >= 0", "c.toml"],
        ),
        row(
            "config: a negative thread count",
            |c| run_args(c, c.tiny("threads = 1", "threads = -2")),
            1,
            &["run.threads", "-2", "0 (libtorch's default) or more"],
        ),
        row(
            "config: batch size 0",
            |c| run_args(c, c.tiny("batch_size = 4", "batch_size = 0")),
            1,
            &["data.loader.batch_size", "at least 1"],
        ),
        row(
            "config: a negative objective weight",
            |c| {
                run_args(
                    c,
                    c.tiny("objectives = { slices = 1.0 }", "objectives = { slices = -1.0 }"),
                )
            },
            1,
            &["stages[0]", "weight -1", ">= 0"],
        ),
        row(
            "config: every objective weight 0",
            |c| {
                run_args(
                    c,
                    c.tiny("objectives = { slices = 1.0 }", "objectives = { slices = 0.0 }"),
                )
            },
            1,
            &["stages[0]", "every objective has weight 0", "epochs = 0"],
        ),
        row(
            "config: encoder width 0",
            |c| run_args(c, c.tiny("base_width = 4", "base_width = 0")),
            1,
            &["base_width", "at least 1"],
        ),
        row(
            "config: temperature 0",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.extend(strings(&["--set", "objectives.slices.temperature=0"]));
                a
            },
            1,
            &["ntxent", "temperature", "positive"],
        ),
        row(
            "config: view size 0",
            |c| run_args(c, c.tiny("slice_size = 24", "slice_size = 0")),
            1,
            &["slice_size", "at least 8"],
        ),
        row(
            "config: a phantom source of no volumes",
            |c| run_args(c, c.tiny("count = 8", "count = 0")),
            1,
            &["data.sources.phantom.count", "at least 1"],
        ),
        row(
            "config: an unknown device",
            |c| run_args(c, c.tiny("device = \"cpu\"", "device = \"gpu\"")),
            1,
            &["gpu", "cpu, cuda, cuda:N or auto"],
        ),
        row(
            "config: the config path is a folder",
            |c| strings(&["run", &c.folder("cfg").display().to_string()]),
            1,
            &["config file", "does not exist or is not a file"],
        ),
        // ---- data formats ----
        row(
            "data: a missing folder",
            |c| run_args(c, c.source("npy", &c.dir.join("absent"))),
            1,
            &["data.sources.phantom.path", "absent", "does not exist"],
        ),
        row(
            "data: a data path that is a FIFO",
            |c| {
                let fifo = c.dir.join("pipe");
                mkfifo(&fifo);
                run_args(c, c.source("nifti", &fifo))
            },
            1,
            &["data.sources.phantom.path", "pipe", "is a FIFO (named pipe)"],
        ),
        row(
            "data: a data path that is a symbolic link loop",
            |c| {
                let l = link_loop(&c.dir, "volumes");
                run_args(c, c.source("npy", &l))
            },
            1,
            &["data.sources.phantom.path", "symbolic link loop"],
        ),
        row(
            "data: an empty NPY folder",
            |c| run_args(c, c.source("npy", &c.folder("empty"))),
            1,
            &["empty", "holds no .npy file"],
        ),
        row(
            "data: an empty NIfTI folder",
            |c| run_args(c, c.source("nifti", &c.folder("empty"))),
            1,
            &["empty", "holds no .nii or .nii.gz file"],
        ),
        row(
            "data: an empty PNG folder",
            |c| run_args(c, c.source("image-folder", &c.folder("empty"))),
            1,
            &["empty", "holds no .png, .jpg or .jpeg image"],
        ),
        row(
            "data: an empty DICOM folder",
            |c| run_args(c, c.source("dicom", &c.folder("empty"))),
            1,
            &["empty", "holds no DICOM file"],
        ),
        row(
            "data: a Decathlon folder without imagesTr",
            |c| run_args(c, c.source("decathlon", &c.folder("task"))),
            1,
            &["task", "has no imagesTr/ folder"],
        ),
        row(
            "data: a folder whose only volume is a link loop",
            |c| {
                let f = c.folder("volumes");
                link_loop(&f, "a.nii");
                run_args(c, c.source("nifti", &f))
            },
            1,
            &["a.nii", "symbolic link loop"],
        ),
        row(
            "data: truncated NPY files",
            |c| {
                let f = npy_folder(c, "npy", ramp);
                for e in std::fs::read_dir(&f).unwrap() {
                    let p = e.unwrap().path();
                    let b = std::fs::read(&p).unwrap();
                    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
                }
                run_args(c, c.source("npy", &f))
            },
            1,
            &["cannot decode NPY file", ".npy`", "failed to fill whole buffer"],
        ),
        row(
            "data: NPY files that are not NPY",
            |c| run_args(c, c.source("npy", &bytes_folder(c, "npy", "v{i}.npy", b"hello world"))),
            1,
            &["cannot decode NPY file", "v5.npy", "magic"],
        ),
        row(
            "data: NPY arrays of 4 axes",
            |c| {
                let f = c.folder("npy");
                for i in 0..8 {
                    npy(
                        &f.join(format!("v{i}.npy")),
                        &[2, 3, 24, 24],
                        (0..2 * 3 * 24 * 24).map(|v| v as f32),
                    );
                }
                run_args(c, c.source("npy", &f))
            },
            1,
            &["cannot decode NPY file", "shape [2, 3, 24, 24]", "expected 2 or 3 axes"],
        ),
        row(
            "data: NPY arrays of a zero-length axis",
            |c| {
                let f = c.folder("npy");
                for i in 0..8 {
                    npy(&f.join(format!("v{i}.npy")), &[0, 24, 6], std::iter::empty::<f32>());
                }
                run_args(c, c.source("npy", &f))
            },
            1,
            &["holds no voxels", "an axis of length 0", ".npy"],
        ),
        row(
            "data: NPY arrays of complex numbers",
            |c| {
                let f = c.folder("npy");
                let mut header = b"\x93NUMPY\x01\x00".to_vec();
                let dict = "{'descr': '<c8', 'fortran_order': False, 'shape': (4, 4, 2), }";
                let pad = 64 - (10 + dict.len() + 1) % 64;
                header.extend(((dict.len() + pad + 1) as u16).to_le_bytes());
                header.extend(dict.bytes());
                header.extend(std::iter::repeat_n(b' ', pad));
                header.push(b'\n');
                header.extend([0u8; 4 * 4 * 2 * 8]);
                for i in 0..8 {
                    std::fs::write(f.join(format!("v{i}.npy")), &header).unwrap();
                }
                run_args(c, c.source("npy", &f))
            },
            1,
            &["cannot decode NPY file", "dtype <c8 is not supported", "floats"],
        ),
        row(
            "data: NIfTI files that are not gzip",
            |c| {
                run_args(
                    c,
                    c.source("nifti", &bytes_folder(c, "nii", "v{i}.nii.gz", b"not a nifti file")),
                )
            },
            1,
            &["cannot decode NIfTI file", ".nii.gz", "gzip"],
        ),
        row(
            "data: NIfTI files whose gzip stream is damaged",
            |c| {
                // A gzip header, then bytes that are no deflate stream.
                let mut bytes = vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0, 0xff];
                bytes.extend((0..300u32).map(|i| (i * 97 % 251) as u8));
                run_args(c, c.source("nifti", &bytes_folder(c, "nii", "v{i}.nii.gz", &bytes)))
            },
            1,
            &[
                "cannot decode NIfTI file",
                ".nii.gz",
                "truncated or damaged",
                "corrupt deflate stream",
            ],
        ),
        row(
            "data: NPY files with bytes after the array",
            |c| {
                let f = npy_folder(c, "npy", ramp);
                for e in std::fs::read_dir(&f).unwrap() {
                    let p = e.unwrap().path();
                    let mut b = std::fs::read(&p).unwrap();
                    b.extend_from_slice(&[0u8; 16]);
                    std::fs::write(&p, &b).unwrap();
                }
                run_args(c, c.source("npy", &f))
            },
            1,
            &[
                "cannot decode NPY file",
                "16 bytes follow the array's data",
                "shape [24, 24, 6]",
            ],
        ),
        row(
            "data: NIfTI files of zeros",
            |c| run_args(c, c.source("nifti", &bytes_folder(c, "nii", "v{i}.nii", &[0u8; 400]))),
            1,
            &["cannot decode NIfTI file", ".nii`"],
        ),
        row(
            "data: truncated PNG files",
            |c| {
                run_args(
                    c,
                    c.source(
                        "image-folder",
                        &bytes_folder(c, "png", "i{i}.png", b"\x89PNG\r\n\x1a\nbroken"),
                    ),
                )
            },
            1,
            &["cannot decode image", ".png"],
        ),
        row(
            "data: DICOM series of files that are not DICOM",
            |c| {
                run_args(
                    c,
                    c.source("dicom", &bytes_folder(c, "dicom", "s{i}/a.dcm", &[0u8; 300])),
                )
            },
            1,
            &["cannot decode DICOM file", "a.dcm", "Invalid DICOM file"],
        ),
        row(
            "data: an .npz that is no zip archive",
            |c| {
                run_args(
                    c,
                    c.source("medmnist", Path::new(&write(&c.dir, "bad.npz", "PK\x03\x04garbage"))),
                )
            },
            1,
            &["bad.npz", "not a readable .npz archive"],
        ),
        row(
            "data: an .npz without the split",
            |c| {
                run_args(
                    c,
                    c.tiny(
                        "format = \"phantom\"\ncount = 8\nslices = 6\nsize = 24",
                        &format!(
                            "format = \"medmnist\"\npath = {:?}\nsplit = \"test\"",
                            common::archive::archive(&c.dir, "a.npz", 0, true).display().to_string()
                        ),
                    ),
                )
            },
            1,
            &["a.npz", "split", "no array `test_images`", "train, val"],
        ),
        row(
            "data: an .npz of the wrong shape",
            |c| {
                let p = c.dir.join("flat.npz");
                flat_npz(&p);
                run_args(c, c.source("medmnist", &p))
            },
            1,
            &["flat.npz", "`train_images` has shape [24]", "expected [N, H, W]"],
        ),
        row(
            "data: NaN and infinite voxels (warned, read as 0)",
            |c| {
                let f = npy_folder(c, "npy", damaged);
                strings(&["data", "inspect", &f.display().to_string()])
            },
            0,
            &[
                "v0.npy`: 3 of 3456 voxels are not finite (2 NaN, 1 infinite); they are read as 0",
                "v7.npy`: 3 of 3456",
            ],
        ),
        row(
            "data inspect: a FIFO",
            |c| {
                let fifo = c.dir.join("pipe.nii");
                mkfifo(&fifo);
                strings(&["data", "inspect", &fifo.display().to_string()])
            },
            1,
            &["pipe.nii", "is a FIFO (named pipe)"],
        ),
        row(
            "data inspect: /dev/zero",
            |_| strings(&["data", "inspect", "/dev/zero"]),
            1,
            &["`/dev/zero` is a character device"],
        ),
        row(
            "data inspect: a symbolic link loop",
            |c| {
                let l = link_loop(&c.dir, "loop.nii.gz");
                strings(&["data", "inspect", &l.display().to_string()])
            },
            1,
            &["loop.nii.gz", "is a symbolic link loop"],
        ),
        row(
            "data inspect: a dangling symbolic link",
            |c| {
                let p = c.dir.join("gone.nii");
                std::os::unix::fs::symlink(c.dir.join("moved.nii"), &p).unwrap();
                strings(&["data", "inspect", &p.display().to_string()])
            },
            1,
            &["gone.nii", "symbolic link to", "moved.nii", "which does not exist"],
        ),
        row(
            "data inspect: a folder whose only file is a FIFO",
            |c| {
                let f = c.folder("npy");
                mkfifo(&f.join("a.npy"));
                strings(&["data", "inspect", &f.display().to_string()])
            },
            1,
            &["a.npy", "is a FIFO", "holds no readable file"],
        ),
        row(
            "data inspect: a missing path",
            |c| strings(&["data", "inspect", &c.path("absent.nii.gz")]),
            1,
            &["absent.nii.gz", "does not exist"],
        ),
        row(
            "data inspect: an unknown --format",
            |c| {
                strings(&[
                    "data",
                    "inspect",
                    &c.folder("npy").display().to_string(),
                    "--format",
                    "nosuch",
                ])
            },
            1,
            &["--format `nosuch`", "unknown dataset format", "npy"],
        ),
        row(
            "data inspect: a file of an unknown kind",
            |c| {
                strings(&[
                    "data",
                    "inspect",
                    &write(&c.dir, "notes.txt", "x").display().to_string(),
                ])
            },
            1,
            &["notes.txt", "cannot tell the format", ".nii"],
        ),
        // ---- checkpoints (copies of a finished TINY run) ----
        row(
            "checkpoint: truncated safetensors",
            |c| {
                let run = c.run();
                let p = c.checkpoint().join("tensors.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 3]).unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["step-00000008/tensors.safetensors", "truncated or corrupt"],
        ),
        row(
            "checkpoint: empty safetensors",
            |c| {
                let run = c.run();
                std::fs::write(c.checkpoint().join("tensors.safetensors"), "").unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["tensors.safetensors", "not a valid safetensors file"],
        ),
        row(
            "checkpoint: missing safetensors",
            |c| {
                let run = c.run();
                std::fs::remove_file(c.checkpoint().join("tensors.safetensors")).unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["step-00000008/tensors.safetensors", "No such file"],
        ),
        row(
            "checkpoint: a tensor missing",
            |c| {
                let run = c.run();
                rename_a_tensor(&c.checkpoint().join("tensors.safetensors"));
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &[
                "step-00000008",
                "no tensor `model.encoder.bn1.bias`",
                "another architecture",
            ],
        ),
        row(
            "checkpoint: state.json that is not JSON",
            |c| {
                let run = c.run();
                std::fs::write(c.checkpoint().join("state.json"), "{not json").unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["step-00000008/state.json", "is corrupt", "line 1"],
        ),
        row(
            "checkpoint: state.json without its fields",
            |c| {
                let run = c.run();
                std::fs::write(c.checkpoint().join("state.json"), "{}").unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["step-00000008/state.json", "is corrupt", "missing field"],
        ),
        row(
            "checkpoint: state.json missing",
            |c| {
                let run = c.run();
                std::fs::remove_file(c.checkpoint().join("state.json")).unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["step-00000008` is not a checkpoint", "state.json"],
        ),
        row(
            "checkpoint: a state this config cannot have written",
            |c| {
                let run = c.run();
                edit(&c.checkpoint().join("state.json"), "\"stage\": 2", "\"stage\": 9");
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["step-00000008/state.json", "stage index 9"],
        ),
        row(
            "checkpoint: another architecture",
            |c| {
                let run = c.run();
                edit(&run.join("config.toml"), "base_width = 4", "base_width = 8");
                strings(&["resume", &run.display().to_string(), "--allow-config-change"])
            },
            1,
            &["incompatible"],
        ),
        row(
            "checkpoint: an edited config",
            |c| {
                let run = c.run();
                edit(&run.join("config.toml"), "lr = 0.05", "lr = 0.5");
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["optimizer.lr", "--allow-config-change"],
        ),
        row(
            "checkpoint: an empty config.toml",
            |c| {
                let run = c.run();
                std::fs::write(run.join("config.toml"), "").unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["cannot resume", "missing required key `encoder`"],
        ),
        row(
            "checkpoint: a config.toml that is not TOML",
            |c| {
                let run = c.run();
                std::fs::write(run.join("config.toml"), "seed = [").unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["cannot resume", "config.toml", "TOML parse error"],
        ),
        row(
            "checkpoint: latest pointing outside",
            |c| {
                let run = c.run();
                std::fs::write(run.join("checkpoints/latest"), "../../x").unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            1,
            &["checkpoints/latest", "../../x", "not a checkpoint of this folder"],
        ),
        row(
            "checkpoint: latest naming a step that is gone (falls back, warned)",
            |c| {
                let run = c.run();
                std::fs::write(run.join("checkpoints/latest"), "step-00000099").unwrap();
                strings(&["resume", &run.display().to_string()])
            },
            0,
            &["step-00000099", "newest complete checkpoint", "step-00000008"],
        ),
        row(
            "checkpoint: eval of a truncated checkpoint",
            |c| {
                c.run();
                let p = c.checkpoint().join("tensors.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..100]).unwrap();
                let set = common::archive::archive(&c.dir, "images.npz", 0, true);
                eval_args(&c.path("run"), &set.display().to_string())
            },
            1,
            &["tensors.safetensors", "truncated or corrupt"],
        ),
        row(
            "checkpoint: eval with another architecture's config",
            |c| {
                c.run();
                let other = c.tiny("base_width = 4", "base_width = 8");
                let set = common::archive::archive(&c.dir, "images.npz", 0, true);
                let mut a = eval_args(&c.path("run"), &set.display().to_string());
                a.extend(["--config".into(), other]);
                a
            },
            1,
            &["has shape", "another architecture"],
        ),
        row(
            "checkpoint: fine-tuning from a truncated checkpoint",
            |c| {
                let run = c.run();
                let p = c.checkpoint().join("tensors.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..100]).unwrap();
                let ft = finetune_config(c);
                strings(&[
                    "finetune",
                    &ft,
                    "--pretrained",
                    &run.display().to_string(),
                    "--out",
                    &c.path("ft"),
                ])
            },
            1,
            &["tensors.safetensors", "truncated or corrupt"],
        ),
        // ---- command line ----
        row("cli: run without a config", |_| strings(&["run"]), 2, &["<CONFIG>"]),
        row(
            "cli: an unknown subcommand",
            |_| strings(&["frobnicate"]),
            2,
            &["unrecognized subcommand", "frobnicate"],
        ),
        row(
            "cli: --set without a value",
            |c| {
                let mut a = run_args(c, c.config(TINY));
                a.push("--set".into());
                a
            },
            2,
            &["--set <KEY=VALUE>", "a value is required"],
        ),
        row(
            "cli: a run directory that is a file",
            |c| {
                strings(&[
                    "run",
                    &c.config(TINY),
                    "--run-dir",
                    &write(&c.dir, "file", "x").display().to_string(),
                ])
            },
            1,
            &["exists and is not a folder"],
        ),
        row(
            "cli: resume of a missing folder",
            |c| strings(&["resume", &c.path("absent")]),
            1,
            &["cannot resume", "absent/config.toml", "is missing", "run directory"],
        ),
        row(
            "cli: eval of a missing checkpoint",
            |c| {
                let set = common::archive::archive(&c.dir, "images.npz", 0, true);
                eval_args(&c.path("absent"), &set.display().to_string())
            },
            1,
            &["absent", "does not exist"],
        ),
        row(
            "cli: eval of a checkpoint folder that is gone",
            |c| {
                c.run();
                let set = common::archive::archive(&c.dir, "images.npz", 0, true);
                eval_args(&c.path("run/checkpoints/step-00000099"), &set.display().to_string())
            },
            1,
            &["step-00000099", "does not exist"],
        ),
        row(
            "cli: eval of a file that is no checkpoint",
            |c| {
                c.run();
                let set = common::archive::archive(&c.dir, "images.npz", 0, true);
                eval_args(&c.config(TINY), &set.display().to_string())
            },
            1,
            &["c.toml", "config.toml", "pass --config"],
        ),
        row(
            "cli: eval of a missing labelled set",
            |c| {
                c.run();
                eval_args(&c.path("run"), &c.path("absent.npz"))
            },
            1,
            &["--train", "absent.npz", "does not exist"],
        ),
        row(
            "cli: eval with --seeds that is no number",
            |c| {
                c.run();
                let mut a = eval_args(&c.path("run"), &c.path("x.npz"));
                a.extend(strings(&["--seeds", "zero"]));
                a
            },
            2,
            &["invalid value 'zero'", "--seeds"],
        ),
        row(
            "cli: eval with --seeds 0",
            |c| {
                c.run();
                let set = common::archive::archive(&c.dir, "images.npz", 0, true);
                let mut a = eval_args(&c.path("run"), &set.display().to_string());
                a.extend(strings(&["--seeds", "0"]));
                a
            },
            1,
            &["--seeds 0", "at least 1"],
        ),
        row(
            "cli: eval with --batch-size 0",
            |c| {
                c.run();
                let set = common::archive::archive(&c.dir, "images.npz", 0, true);
                let mut a = eval_args(&c.path("run"), &set.display().to_string());
                a.extend(strings(&["--batch-size", "0"]));
                a
            },
            1,
            &["--batch-size", "at least 1"],
        ),
        row(
            "cli: eval with an unknown device",
            |c| {
                c.run();
                let set = common::archive::archive(&c.dir, "images.npz", 0, true);
                let mut a = eval_args(&c.path("run"), &set.display().to_string());
                let at = a.iter().position(|x| x == "cpu").unwrap();
                a[at] = "gpu".into();
                a
            },
            1,
            &["--device", "`gpu` is not a device"],
        ),
        row(
            "cli: finetune of a missing config",
            |c| {
                let run = c.run();
                strings(&[
                    "finetune",
                    &c.path("absent.toml"),
                    "--pretrained",
                    &run.display().to_string(),
                ])
            },
            1,
            &["absent.toml", "does not exist"],
        ),
        row(
            "cli: finetune from a missing run",
            |c| {
                let ft = finetune_config(c);
                strings(&[
                    "finetune",
                    &ft,
                    "--pretrained",
                    &c.path("absent"),
                    "--out",
                    &c.path("ft"),
                ])
            },
            1,
            &["--pretrained", "absent", "does not exist"],
        ),
        row(
            "cli: data inspect with a negative --limit",
            |c| strings(&["data", "inspect", &c.path("x"), "--limit", "-3"]),
            2,
            &["unexpected argument '-3'"],
        ),
        row(
            "cli: bench loader of a missing folder",
            |c| strings(&["bench", "loader", "--data", &c.path("absent")]),
            1,
            &["absent", "does not exist"],
        ),
        row(
            "cli: example of an unknown component",
            |_| strings(&["example", "resnet51"]),
            1,
            &["no component named `resnet51`", "resnet50"],
        ),
    ]
}

#[test]
fn every_bad_input_is_a_named_error_and_leaves_the_checkpoints_as_they_were() {
    let base_dir = tempfile::tempdir().unwrap();
    let base = common::pretrain(base_dir.path(), "base", TINY);
    let rows = rows();
    // A few rows at a time: most of a row's time is the process starting libtorch.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(row) = rows.get(i) else { break };
                if let Some(failure) = check(row, &base) {
                    failures.lock().unwrap().push(failure);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(rows.len() >= 40, "{} rows", rows.len());
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// Runs `row` in a fresh folder; what went wrong, if anything.
fn check(row: &Row, base: &Path) -> Option<String> {
    {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Ctx {
            dir: dir.path().to_path_buf(),
            base: base.to_path_buf(),
        };
        let args = (row.setup)(&ctx);
        let checkpoints = ctx.dir.join("run/checkpoints");
        let before = tree_bytes(&checkpoints);
        let mut cmd = medssl();
        cmd.args(&args);
        for (key, value) in row.env {
            cmd.env(key, value);
        }
        let out = cmd.output().unwrap();
        let err = common::stderr(&out);
        let mut problems = Vec::new();
        if out.status.code() != Some(row.code) {
            problems.push(format!("exit code {:?}, expected {}", out.status.code(), row.code));
        }
        for word in row.words {
            if !err.contains(word) {
                problems.push(format!("no `{word}` in the message"));
            }
        }
        // The last two are Rust's debug forms of errors, which say nothing to a user.
        for bad in [
            "internal failure",
            "panicked",
            "RUST_BACKTRACE",
            "Custom { kind",
            "Os { code",
        ] {
            if err.contains(bad) {
                problems.push(format!("`{bad}` in the message"));
            }
        }
        if tree_bytes(&checkpoints) != before {
            problems.push("the checkpoints changed".into());
        }
        (!problems.is_empty()).then(|| {
            format!(
                "{}: {}\n  medssl {}\n  stderr: {}",
                row.name,
                problems.join("; "),
                args.join(" "),
                err.trim_end().replace('\n', "\n          ")
            )
        })
    }
}

/// NaN and infinite voxels are read as 0 with one warning per file, however often the file
/// is read (here: 2 stages x 2 epochs).
#[test]
fn non_finite_voxels_are_warned_once_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Ctx {
        dir: dir.path().to_path_buf(),
        base: PathBuf::new(),
    };
    let folder = npy_folder(&ctx, "npy", damaged);
    let config = ctx.source("npy", &folder);
    let out = medssl().args(run_args(&ctx, config)).output().unwrap();
    let err = common::stderr(&out);
    assert!(out.status.success(), "{err}");
    for i in 0..8 {
        let warning = format!("v{i}.npy`: 3 of 3456 voxels are not finite");
        assert_eq!(err.matches(&warning).count(), 1, "{warning}:\n{err}");
    }
}
