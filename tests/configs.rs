//! Every config shipped under configs/ loads and builds: layered loading, every component
//! built from its section, data sources opened, stages checked against the objectives (what
//! `medssl check` does before its forward pass, which is left out here to stay cheap). A sweep
//! file (a `base` config and `[[variants]]`) is checked as its base with each variant's `set`.
//! A fine-tuning config (one with a `[head]`) is checked with its head on the backbone of
//! configs/demo/joint_swav.toml (a 3D head on that of configs/demo/vit3d_reconstruction.toml or
//! configs/demo/voco.toml) and its two sets opened. Configs that read ../shared/data are
//! skipped, saying so, where that folder is absent.

use medssl_core::config::LoadedConfig;
use medssl_core::finetune::{self, config::LoadedFinetune};
use medssl_core::train::Run;
use std::path::{Path, PathBuf};

use medssl_plugins as _;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("runners/ sits in the repository")
        .to_path_buf()
}

fn toml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            toml_files(&path, found);
        } else if path.extension().is_some_and(|x| x == "toml") {
            found.push(path);
        }
    }
}

/// The run configs a file stands for, each with its `--set` overrides: the file itself, or a
/// sweep's base once per variant.
fn runs_of(file: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let text = std::fs::read_to_string(file).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let Some(base) = table.get("base").and_then(|b| b.as_str()) else {
        return vec![(file.to_path_buf(), Vec::new())];
    };
    let base = file.parent().unwrap().join(base);
    let variants = table
        .get("variants")
        .and_then(|v| v.as_array())
        .unwrap_or_else(|| panic!("{}: a sweep file with no [[variants]]", file.display()));
    variants
        .iter()
        .map(|variant| {
            let set = variant
                .get("set")
                .and_then(|s| s.as_array())
                .map(|s| s.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            (base.clone(), set)
        })
        .collect()
}

#[test]
fn every_shipped_config_loads_and_builds() {
    let root = repository();
    let shared_data = root.join("../shared/data").is_dir();
    let mut files = Vec::new();
    toml_files(&root.join("configs"), &mut files);
    assert!(files.len() >= 3, "found only {files:?}");
    let mut checked = 0;
    for file in files {
        for (config, set) in runs_of(&file) {
            let text = std::fs::read_to_string(&config).unwrap();
            if !shared_data && text.contains("shared/data") {
                eprintln!("skipped {} (reads ../shared/data, absent here)", config.display());
                continue;
            }
            let what = format!("{} (from {}, --set {set:?})", config.display(), file.display());
            if text.contains("\n[head]") {
                // A fine-tuning config: its head on a demo pre-training's backbone, the 2D one
                // or, for a head that reads a 3D encoder, the 3D one.
                let run = LoadedConfig::load(&root.join("configs/demo/joint_swav.toml"), &[]).unwrap();
                let loaded = LoadedFinetune::load(&config, &set).unwrap_or_else(|e| panic!("{what}: {e:#}"));
                match finetune::check(&loaded, &run) {
                    Err(e) if format!("{e:#}").contains("but the run's encoder is 2D") => {
                        // The 3D demos' encoders: a ViT (UNETR) and a Swin (Swin-UNETR).
                        let errors: Vec<String> = ["vit3d_reconstruction", "voco"]
                            .iter()
                            .map(|demo| {
                                let file = root.join(format!("configs/demo/{demo}.toml"));
                                let run3d = LoadedConfig::load(&file, &[]).unwrap();
                                finetune::check(&loaded, &run3d).map_err(|e| format!("{demo}: {e:#}"))
                            })
                            .filter_map(Result::err)
                            .collect();
                        assert!(errors.len() < 2, "{what}: on no 3D demo backbone: {errors:?}");
                    }
                    other => other.map(|_| ()).unwrap_or_else(|e| panic!("{what}: {e:#}")),
                }
                checked += 1;
                continue;
            }
            let loaded = LoadedConfig::load(&config, &set).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            Run::prepare(loaded).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            checked += 1;
        }
    }
    assert!(checked > 0, "no config was checked");
}
