//! Weights across libraries: `medssl export` writes a run's encoder under its reference
//! library's names, and `encoder.init` starts a run from such a file, strictly unless asked
//! otherwise.

mod common;

use medssl_core::checkpoint;
use medssl_core::config::LoadedConfig;
use medssl_core::train::Run;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

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
