//! Weights across libraries: `medssl export` writes a run's encoder (or backbone, or whole
//! model) under its reference library's names or medssl's own, with what it is in the
//! file's header, and `encoder.init` starts a run from such a file, strictly unless asked
//! otherwise. Every registered encoder makes the round trip bit for bit; a checkpoint of
//! every demo config exports each part; a ResNet's names and shapes are torchvision's.

mod common;

use medssl_core::assemble::Backbone;
use medssl_core::checkpoint::{self, Checkpoints, TrainingState, FORMAT};
use medssl_core::config::LoadedConfig;
use medssl_core::encoder::{EncoderShape, SpatialDims};
use medssl_core::registry;
use medssl_core::train::Run;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use tch::{Device, Kind, Tensor};

use medssl_plugins as _;

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    checkpoint::read_safetensors(path).unwrap().into_iter().collect()
}

fn latest_checkpoint(run: &Path) -> BTreeMap<String, Tensor> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    tensors(&run.join("checkpoints").join(latest.trim()).join("tensors.safetensors"))
}

/// The encoder's variables of a run prepared from `config` with `overrides`.
fn prepared_encoder(config: &Path, overrides: &[String]) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let cfg = LoadedConfig::load(config, overrides)?;
    let run = Run::prepare(cfg)?;
    Ok(run
        .variables()
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix("encoder.").map(|n| (n.to_string(), t)))
        .collect())
}

#[test]
fn an_exported_resnet_has_torchvision_names_and_starts_a_new_run_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::pretrain(dir.path(), "tiny", common::TINY);
    let out_file = dir.path().join("exported/resnet18.safetensors");
    let out = common::medssl()
        .args([
            "export",
            run.to_str().unwrap(),
            "--format",
            "torchvision",
            "--json",
            "--out",
        ])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    assert_eq!(report["format"], "torchvision");
    assert_eq!(report["encoder"], "resnet18");

    // A bare file name writes into the working folder (its parent is "", synced as ".").
    let bare = common::medssl()
        .current_dir(dir.path())
        .args([
            "export",
            run.to_str().unwrap(),
            "--format",
            "torchvision",
            "--out",
            "bare.safetensors",
        ])
        .output()
        .unwrap();
    assert!(bare.status.success(), "{}", common::stderr(&bare));
    assert_eq!(
        std::fs::read(dir.path().join("bare.safetensors")).unwrap(),
        std::fs::read(&out_file).unwrap()
    );

    let exported = tensors(&out_file);
    assert_eq!(report["tensors"].as_u64().unwrap() as usize, exported.len());
    let checkpoint = latest_checkpoint(&run);
    let encoder: BTreeMap<&str, &Tensor> = checkpoint
        .iter()
        .filter_map(|(n, t)| n.strip_prefix("model.encoder.").map(|n| (n, t)))
        .collect();
    // torchvision's names: conv1, bn1, layer1.0.conv1, ..., each batch norm with its counter.
    for name in [
        "conv1.weight",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer4.1.bn2.weight",
    ] {
        assert!(exported.contains_key(name), "no `{name}` in {:?}", exported.keys());
    }
    let counters = exported.keys().filter(|n| n.ends_with("num_batches_tracked")).count();
    assert_eq!(exported.len(), encoder.len() + counters);
    for (name, t) in &encoder {
        assert!(exported[*name].equal(t), "{name} differs from the checkpoint");
    }

    // A new run starts from the file: its encoder is the exported one, strictly loaded.
    let config = common::write(dir.path(), "again.toml", common::TINY);
    let init = format!("encoder.init={}", out_file.display());
    let started = prepared_encoder(&config, std::slice::from_ref(&init)).unwrap();
    for (name, t) in &encoder {
        assert!(started[*name].equal(t), "{name} was not initialised from the file");
    }
    let fresh = prepared_encoder(&config, &[]).unwrap();
    assert!(
        !fresh["conv1.weight"].equal(&started["conv1.weight"]),
        "without encoder.init the run starts from its own initialisation"
    );
}

#[test]
fn a_file_of_another_architecture_is_refused_with_its_names_unless_loading_is_lenient() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::pretrain(dir.path(), "tiny", common::TINY);
    let file = dir.path().join("resnet18.safetensors");
    let out = common::medssl()
        .args(["export", run.to_str().unwrap(), "--format", "torchvision", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));

    // resnet34 has three blocks in layer1 where resnet18 has two.
    let config = common::write(dir.path(), "deeper.toml", common::TINY);
    let overrides = vec![
        "encoder.name=resnet34".to_string(),
        format!("encoder.init={}", file.display()),
    ];
    let err = format!("{:#}", prepared_encoder(&config, &overrides).err().unwrap());
    assert!(
        err.contains("encoder.init") && err.contains("80 missing (layer1.2.bn1.bias"),
        "{err}"
    );
    let mut lenient = overrides.clone();
    lenient.push("encoder.init_strict=false".into());
    let started = prepared_encoder(&config, &lenient).unwrap();
    let exported = tensors(&file);
    assert!(started["conv1.weight"].equal(&exported["conv1.weight"]));

    // The exporter refuses a format the encoder does not follow, naming the right one.
    let out = common::medssl()
        .args(["export", run.to_str().unwrap(), "--format", "monai", "--out"])
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    common::assert_fails_with(&out, &["resnet18", "--format torchvision"]);
    assert!(!dir.path().join("x.safetensors").exists());
}

/// Random values in every floating-point tensor, so that no two tensors are equal by
/// accident (batch-norm statistics start at 0 and 1); integer buffers (a Swin's position
/// index) keep theirs.
fn scrambled(variables: impl IntoIterator<Item = (String, Tensor)>) -> Vec<(String, Tensor)> {
    let mut scrambled: Vec<(String, Tensor)> = variables
        .into_iter()
        .map(|(name, t)| {
            let t = match t.is_floating_point() {
                true => Tensor::randn_like(&t),
                false => t.detach().copy(),
            };
            (name, t)
        })
        .collect();
    scrambled.sort_by(|a, b| a.0.cmp(&b.0));
    scrambled
}

fn prefixed(prefix: &str, tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(name, t)| (format!("{prefix}{name}"), t.shallow_clone()))
        .collect()
}

/// A run directory `dir` with `config` as its config.toml and one checkpoint of `tensors`
/// (named as checkpoints name them) at global step `step`, written by the checkpoint code
/// training uses: what `medssl export` reads, without training.
fn run_with_checkpoint(dir: &Path, config: &str, tensors: &[(String, Tensor)], step: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let state = TrainingState {
        format: FORMAT,
        stage: 0,
        stage_step: step,
        global_step: step,
        optimizer_steps: step as i64,
        objectives: BTreeMap::new(),
        model_fingerprint: "written by tests/interop.rs".into(),
        config: None,
        world_size: 1,
        global_step_offset: 0,
        loss_scaler: None,
    };
    Checkpoints::new(dir.join("checkpoints"), 1)
        .save(tensors, &state)
        .unwrap();
    dir.to_path_buf()
}

/// `medssl export RUN ARGS... --out OUT`.
fn export(run: &Path, args: &[&str], out: &Path) -> Output {
    common::medssl()
        .arg("export")
        .arg(run)
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// [`export`], which must succeed, and the tensors it wrote.
fn exported(run: &Path, args: &[&str], out: &Path) -> BTreeMap<String, Tensor> {
    let done = export(run, args, out);
    assert!(done.status.success(), "export {args:?}: {}", common::stderr(&done));
    tensors(out)
}

/// The `__metadata__` of a safetensors file's header, read as Python's `safe_open` reads
/// it: 8 bytes of little-endian header length, then the JSON header.
fn header_metadata(path: &Path) -> serde_json::Map<String, Value> {
    let bytes = std::fs::read(path).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    header["__metadata__"].as_object().cloned().unwrap_or_default()
}

/// A config of one encoder (`body` its settings) and the views it needs; no objective, as
/// only the backbone is built.
fn encoder_config(name: &str, body: &str) -> String {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let section = medssl_core::config::Section::inline("encoder", name, body).unwrap();
    let entry = registry::encoders().get(name).unwrap();
    let encoder = (entry.build)(&section, vs.root(), &EncoderShape { in_channels: 1 }).unwrap();
    let crop = match (encoder.spatial_dims(), encoder.input_size()) {
        (SpatialDims::Three, Some(size)) => format!("crop_size = {size:?}"),
        // A Swin takes any size; SwinUNETR wants multiples of 32.
        (SpatialDims::Three, None) => "crop_size = [32, 64, 64]".to_string(),
        (SpatialDims::Two, _) => String::new(),
    };
    format!(
        "seed = 3\ndevice = \"cpu\"\n[data.sources.phantom]\nformat = \"phantom\"\ncount = 2\n[data.views]\n{crop}\n[encoder]\nname = \"{name}\"\n{body}\n[optimizer]\nname = \"sgd\"\n"
    )
}

/// The encoder variables of a backbone built from `config` with `overrides`, after
/// `encoder.init`.
fn initialised_encoder(config: &Path, overrides: &[String]) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let backbone = Backbone::build(&LoadedConfig::load(config, overrides)?, Device::Cpu)?;
    backbone.apply_init()?;
    Ok(backbone
        .vs
        .variables()
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix("encoder.").map(|n| (n.to_string(), t)))
        .collect())
}

#[test]
fn every_registered_encoder_round_trips_bit_for_bit_in_its_reference_format_and_in_medssls() {
    let dir = tempfile::tempdir().unwrap();
    let encoders = registry::encoders();
    assert_eq!(
        encoders.entries.len(),
        common::COMPONENTS[0].1.len(),
        "every registered encoder is here"
    );
    tch::manual_seed(11);
    for entry in encoders.entries.iter() {
        let name = entry.name;
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        let config = encoder_config(name, entry.smoke_configs.first().copied().unwrap_or(""));
        let config_file = common::write(&root, "c.toml", &config);
        let backbone = Backbone::build(&LoadedConfig::load(&config_file, &[]).unwrap(), Device::Cpu).unwrap();
        let variables = scrambled(backbone.vs.variables());
        let run = run_with_checkpoint(&root.join("run"), &config, &prefixed("model.", &variables), 7);
        let encoder: BTreeMap<String, Tensor> = variables
            .iter()
            .filter_map(|(n, t)| n.strip_prefix("encoder.").map(|n| (n.to_string(), t.shallow_clone())))
            .collect();
        let mut formats = vec!["medssl".to_string()];
        formats.extend(backbone.encoder.reference_library().map(|l| l.to_string()));
        for format in &formats {
            let what = format!("{name} as {format}");
            let file = root.join(format!("{format}.safetensors"));
            let written = exported(&run, &["--format", format], &file);
            let inner = if format == "medssl" { "model.encoder." } else { "" };
            let names: BTreeSet<&str> = written
                .keys()
                .filter(|n| !n.ends_with("num_batches_tracked"))
                .map(|n| n.strip_prefix(inner).unwrap_or_else(|| panic!("{what}: `{n}`")))
                .collect();
            assert_eq!(names, encoder.keys().map(String::as_str).collect(), "{what}");
            for (n, t) in &encoder {
                assert!(written[&format!("{inner}{n}")].equal(t), "{what}: {n} differs");
            }

            let meta = header_metadata(&file);
            for (key, value) in [
                ("medssl.encoder", name),
                ("medssl.format", format.as_str()),
                ("medssl.part", "encoder"),
                ("medssl.global_step", "7"),
                ("medssl.stage", "0"),
                ("medssl.version", env!("CARGO_PKG_VERSION")),
                ("format", "pt"),
            ] {
                assert_eq!(meta[key], value, "{what}: metadata {key}");
            }
            let encoder_config: toml::Table = toml::from_str(meta["medssl.encoder_config"].as_str().unwrap()).unwrap();
            assert_eq!(encoder_config["name"].as_str(), Some(name), "{what}");
            assert_eq!(meta["medssl.config"], config, "{what}: the run's config");
            let checkpoint = std::fs::canonicalize(run.join("checkpoints/step-00000007/tensors.safetensors")).unwrap();
            assert_eq!(meta["medssl.checkpoint"], checkpoint.display().to_string(), "{what}");
            assert_eq!(
                meta["medssl.run_dir"],
                std::fs::canonicalize(&run).unwrap().display().to_string(),
                "{what}"
            );

            // A new encoder from the file: every tensor the checkpoint's, bit for bit.
            let overrides = [
                format!("encoder.init={}", file.display()),
                format!("encoder.init_format={format}"),
            ];
            let started = initialised_encoder(&config_file, &overrides).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert_eq!(started.len(), encoder.len());
            for (n, t) in &encoder {
                assert!(started[n].equal(t), "{what}: {n} was not loaded bit for bit");
            }
        }
    }
}

/// torchvision's ResNet `state_dict` (torchvision/models/resnet.py, `ResNet`, `BasicBlock`,
/// `Bottleneck`), every name with its shape: the stem `conv1` (7x7 over 3 channels) and
/// `bn1`; `layer1` to `layer4` of `depths` blocks with `planes` base, 2 base, 4 base, 8 base
/// (base 64 in torchvision): a basic block `conv1`, `bn1`, `conv2`, `bn2` (3x3), a
/// bottleneck `conv1` (1x1), `conv2` (3x3), `conv3` (1x1 to 4 planes) with `bn1` to `bn3`;
/// where a layer's first block changes the stride or the width, `downsample.0` (1x1 conv)
/// and `downsample.1` (norm); each norm's `weight`, `bias`, `running_mean`, `running_var`
/// and `num_batches_tracked`; then `fc`.
fn torchvision_resnet(depths: [i64; 4], bottleneck: bool, base: i64, classes: i64) -> Vec<(String, Vec<i64>)> {
    fn conv(sd: &mut Vec<(String, Vec<i64>)>, name: &str, out: i64, inp: i64, k: i64) {
        sd.push((format!("{name}.weight"), vec![out, inp, k, k]));
    }
    fn norm(sd: &mut Vec<(String, Vec<i64>)>, name: &str, c: i64) {
        for leaf in ["weight", "bias", "running_mean", "running_var"] {
            sd.push((format!("{name}.{leaf}"), vec![c]));
        }
        sd.push((format!("{name}.num_batches_tracked"), vec![]));
    }
    let expansion = if bottleneck { 4 } else { 1 };
    let mut sd = Vec::new();
    conv(&mut sd, "conv1", base, 3, 7);
    norm(&mut sd, "bn1", base);
    let mut inplanes = base;
    for (i, depth) in depths.iter().enumerate() {
        let planes = base << i;
        for b in 0..*depth {
            let p = format!("layer{}.{b}", i + 1);
            if bottleneck {
                conv(&mut sd, &format!("{p}.conv1"), planes, inplanes, 1);
                norm(&mut sd, &format!("{p}.bn1"), planes);
                conv(&mut sd, &format!("{p}.conv2"), planes, planes, 3);
                norm(&mut sd, &format!("{p}.bn2"), planes);
                conv(&mut sd, &format!("{p}.conv3"), planes * 4, planes, 1);
                norm(&mut sd, &format!("{p}.bn3"), planes * 4);
            } else {
                conv(&mut sd, &format!("{p}.conv1"), planes, inplanes, 3);
                norm(&mut sd, &format!("{p}.bn1"), planes);
                conv(&mut sd, &format!("{p}.conv2"), planes, planes, 3);
                norm(&mut sd, &format!("{p}.bn2"), planes);
            }
            if b == 0 && (i > 0 || inplanes != planes * expansion) {
                conv(&mut sd, &format!("{p}.downsample.0"), planes * expansion, inplanes, 1);
                norm(&mut sd, &format!("{p}.downsample.1"), planes * expansion);
            }
            inplanes = planes * expansion;
        }
    }
    sd.push(("fc.weight".into(), vec![classes, inplanes]));
    sd.push(("fc.bias".into(), vec![classes]));
    sd.sort();
    sd
}

#[test]
fn resnets_export_torchvisions_names_and_shapes_with_a_fresh_classifier_and_back_with_a_summed_stem() {
    // `len(torchvision.models.resnetNN().state_dict())`.
    let resnets = [
        ("resnet18", [2, 2, 2, 2], false, 122),
        ("resnet34", [3, 4, 6, 3], false, 218),
        ("resnet50", [3, 4, 6, 3], true, 320),
    ];
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(12);
    for (name, depths, bottleneck, tensors_at_64) in resnets {
        assert_eq!(
            torchvision_resnet(depths, bottleneck, 64, 1000).len(),
            tensors_at_64,
            "{name}"
        );
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        // torchvision's stem (7x7 stride 2 over 3 channels) at a base width of 4 instead of 64:
        // the same names, every width divided by 16.
        let config = encoder_config(name, "base_width = 4\ninput_channels = 3");
        let config_file = common::write(&root, "c.toml", &config);
        let backbone = Backbone::build(&LoadedConfig::load(&config_file, &[]).unwrap(), Device::Cpu).unwrap();
        let variables = scrambled(backbone.vs.variables());
        let run = run_with_checkpoint(&root.join("run"), &config, &prefixed("model.", &variables), 1);

        let file = root.join("with_fc.safetensors");
        let written = exported(
            &run,
            &["--format", "torchvision", "--with-fc", "--fc-classes", "5"],
            &file,
        );
        let shapes: Vec<(String, Vec<i64>)> = written.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        assert_eq!(shapes, torchvision_resnet(depths, bottleneck, 4, 5), "{name}");
        assert!(written
            .iter()
            .all(|(n, t)| n.ends_with("num_batches_tracked") == (t.kind() == Kind::Int64)));
        // nn.Linear's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight and bias.
        let bound = 1.0 / (written["fc.weight"].size()[1] as f64).sqrt();
        for leaf in ["fc.weight", "fc.bias"] {
            let largest = written[leaf].abs().max().double_value(&[]);
            assert!(
                largest <= bound && largest > 0.5 * bound,
                "{name} {leaf}: {largest} for bound {bound}"
            );
        }
        assert_eq!(header_metadata(&file)["medssl.fc_classes"], "5");
        let without = exported(&run, &["--format", "torchvision"], &root.join("plain.safetensors"));
        let mut names: Vec<&String> = written.keys().filter(|n| !n.starts_with("fc.")).collect();
        names.sort();
        assert_eq!(
            without.keys().collect::<Vec<_>>(),
            names,
            "{name}: without --with-fc, all but fc"
        );
        if name != "resnet18" {
            continue;
        }
        let again = exported(
            &run,
            &["--format", "torchvision", "--with-fc", "--fc-classes", "5"],
            &root.join("again.safetensors"),
        );
        assert!(
            again["fc.weight"].equal(&written["fc.weight"]),
            "the classifier is drawn from the run's seed"
        );
        let out = export(&run, &["--format", "medssl", "--with-fc"], &root.join("x.safetensors"));
        common::assert_fails_with(&out, &["--with-fc", "torchvision"]);

        // Back into a grey-scale ResNet: the 3-channel stem is refused, naming it, or summed.
        let grey = common::write(&root, "grey.toml", &encoder_config(name, "base_width = 4"));
        let from_file = [
            format!("encoder.init={}", file.display()),
            "encoder.init_format=torchvision".to_string(),
        ];
        let err = format!("{:#}", initialised_encoder(&grey, &from_file).unwrap_err());
        assert!(
            err.contains("conv1.weight: file [4, 3, 7, 7], encoder [4, 1, 7, 7]")
                && err.contains("init_stem = \"sum\""),
            "{err}"
        );
        let mut summing = from_file.to_vec();
        summing.push("encoder.init_stem=sum".into());
        let started = initialised_encoder(&grey, &summing).unwrap();
        assert!(started["conv1.weight"].equal(&written["conv1.weight"].sum_dim_intlist(1, true, Kind::Float)));
        assert!(started["layer4.1.bn2.running_var"].equal(&written["layer4.1.bn2.running_var"]));

        // The run's own checkpoint file is medssl's names: refused as torchvision's, with
        // the setting that reads it; read with it.
        let checkpoint = run.join("checkpoints/step-00000001/tensors.safetensors");
        let raw = [format!("encoder.init={}", checkpoint.display())];
        let err = format!("{:#}", initialised_encoder(&config_file, &raw).unwrap_err());
        assert!(
            err.contains("this looks like a medssl checkpoint") && err.contains("init_format = \"medssl\""),
            "{err}"
        );
        let mut medssl = raw.to_vec();
        medssl.push("encoder.init_format=medssl".into());
        let started = initialised_encoder(&config_file, &medssl).unwrap();
        assert!(started["conv1.weight"].equal(&written["conv1.weight"]));
    }
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Each demo's checkpoint exports whole in medssl's names; each distinct encoder among them
/// in its library's; the backbone and the refusals of what a library cannot name, on the
/// first demo with an aggregator and the first without (each export is a process start,
/// about a second on a loaded 2-core machine, so repeats are left out).
#[test]
fn a_checkpoint_of_every_demo_config_exports_every_part() {
    let root = repository();
    let shared_data = root.join("../shared/data").is_dir();
    let mut demos: Vec<PathBuf> = std::fs::read_dir(root.join("configs/demo"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    demos.sort();
    assert!(demos.len() >= 3, "{demos:?}");
    let dir = tempfile::tempdir().unwrap();
    let (mut encoders_seen, mut aggregator_seen, mut encoder_only_seen) = (BTreeSet::new(), false, false);
    let mut exported_demos = 0;
    for demo in demos {
        let name = demo.file_stem().unwrap().to_str().unwrap().to_string();
        if !shared_data && std::fs::read_to_string(&demo).unwrap().contains("shared/data") {
            eprintln!("skipped {} (reads ../shared/data, absent here)", demo.display());
            continue;
        }
        let prepared =
            Run::prepare(LoadedConfig::load(&demo, &[]).unwrap()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let model = prefixed("model.", &prepared.variables());
        let mut checkpoint = prefixed("", &model);
        // An optimizer buffer: a checkpoint holds them, no part exports them.
        checkpoint.push((
            "optim.model.encoder.moment".into(),
            Tensor::ones([2], (Kind::Float, Device::Cpu)),
        ));
        let run = run_with_checkpoint(&dir.path().join(&name), prepared.resolved_config(), &checkpoint, 3);
        let model: BTreeMap<String, Tensor> = model.into_iter().collect();
        let under = |prefixes: &[&str]| -> BTreeSet<String> {
            model
                .keys()
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
                .cloned()
                .collect()
        };
        let out = |what: &str| dir.path().join(format!("{name}_{what}.safetensors"));

        let all = exported(&run, &["--format", "medssl", "--part", "all"], &out("all"));
        assert_eq!(
            all.keys().cloned().collect::<BTreeSet<_>>(),
            under(&["model."]),
            "{name}"
        );
        for (n, t) in &all {
            assert!(t.equal(&model[n]), "{name}: {n}");
        }
        assert!(
            all.keys().any(|n| n.starts_with("model.objectives.")),
            "{name}: the objectives' tensors are part of `all`"
        );
        exported_demos += 1;

        let cfg = LoadedConfig::load_resolved(&run.join("config.toml")).unwrap();
        let encoder_section = format!("{:?}", cfg.run.encoder);
        let library = Backbone::build(&cfg, Device::Cpu)
            .unwrap()
            .encoder
            .reference_library()
            .unwrap();
        let format = library.to_string();
        if encoders_seen.insert(encoder_section) {
            let encoder = exported(&run, &["--format", &format], &out(&format));
            let names: BTreeSet<String> = encoder
                .keys()
                .filter(|n| !n.ends_with("num_batches_tracked"))
                .map(|n| format!("model.encoder.{n}"))
                .collect();
            assert_eq!(names, under(&["model.encoder."]), "{name}");
        }
        let backbone_names = under(&["model.encoder.", "model.aggregator."]);
        let with_aggregator = backbone_names.iter().any(|n| n.starts_with("model.aggregator."));
        if with_aggregator && !aggregator_seen {
            aggregator_seen = true;
            let file = out("backbone");
            let backbone = exported(&run, &["--format", "medssl", "--part", "backbone"], &file);
            assert_eq!(
                backbone.keys().cloned().collect::<BTreeSet<_>>(),
                backbone_names,
                "{name}"
            );
            assert_eq!(header_metadata(&file)["medssl.part"], "backbone");
            let refused = export(&run, &["--format", &format, "--part", "backbone"], &out("x"));
            common::assert_fails_with(&refused, &["--part backbone", "`model.aggregator.", "--format medssl"]);
            let refused = export(&run, &["--format", &format, "--part", "all"], &out("x"));
            common::assert_fails_with(
                &refused,
                &[&format!("--format {format}"), "--part all", "--format medssl"],
            );
            assert!(!out("x").exists());
        }
        if !with_aggregator && !encoder_only_seen {
            encoder_only_seen = true;
            // Without an aggregator (or one without parameters) the backbone is the encoder.
            let backbone = exported(&run, &["--format", &format, "--part", "backbone"], &out("backbone"));
            let names: BTreeSet<String> = backbone
                .keys()
                .filter(|n| !n.ends_with("num_batches_tracked"))
                .map(|n| format!("model.encoder.{n}"))
                .collect();
            assert_eq!(names, backbone_names, "{name}");
        }
    }
    assert!(exported_demos > 0, "no demo config was exported");
}
