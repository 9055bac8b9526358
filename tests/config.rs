//! Config layering: built-in defaults < file < MEDSSL_ environment variables < --set, with
//! paths resolved against the config file. One test function, because environment
//! variables are process-wide.

mod common;

use medssl_core::config::LoadedConfig;

#[test]
fn layers_override_in_order_and_errors_name_their_source() {
    let tmp = tempfile::tempdir().unwrap();
    let sub = tmp.path().join("configs");
    std::fs::create_dir_all(&sub).unwrap();
    let path = common::write(&sub, "c.toml", &common::TINY.replace("seed = 1\n", ""));

    // Defaults: seed 0 (not in the file), optimizer.momentum 0.9.
    let cfg = LoadedConfig::load(&path, &[]).unwrap();
    assert_eq!(cfg.run.seed, 0);
    assert_eq!(cfg.run.optimizer.momentum, 0.9);
    assert_eq!(cfg.run.optimizer.lr, 0.05, "the file beats the defaults");

    // A relative path from the file resolves against the file's folder; one from --set (or
    // the environment) against the working directory.
    let with_path = common::write(
        &sub,
        "p.toml",
        &common::TINY.replace("count = 8", "count = 8\npath = \"vols\""),
    );
    let cfg = LoadedConfig::load(&with_path, &[]).unwrap();
    let section = cfg.section("data.sources.phantom", "format").unwrap();
    assert_eq!(
        section.resolve_path("path", std::path::Path::new("vols")),
        sub.join("vols")
    );
    let cfg = LoadedConfig::load(&with_path, &["data.sources.phantom.path=elsewhere".into()]).unwrap();
    let section = cfg.section("data.sources.phantom", "format").unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(
        section.resolve_path("path", std::path::Path::new("elsewhere")),
        cwd.join("elsewhere")
    );

    // Array elements are addressed by index.
    let cfg = LoadedConfig::load(
        &path,
        &["stages.1.epochs=5".into(), "stages.0.objectives.slices=2.0".into()],
    )
    .unwrap();
    assert_eq!((cfg.run.stages[0].epochs, cfg.run.stages[1].epochs), (2, 5));
    assert_eq!(cfg.run.stages[0].objectives["slices"], 2.0);
    assert_eq!(cfg.run.stages[1].name, "joint", "the rest of the element is kept");
    let err = LoadedConfig::load(&path, &["stages.7.epochs=1".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("index 7 is out of range") && err.contains("2 element"),
        "{err}"
    );

    // The environment beats the file; --set beats the environment.
    std::env::set_var("MEDSSL_OPTIMIZER__LR", "0.5");
    std::env::set_var("MEDSSL_SEED", "7");
    let cfg = LoadedConfig::load(&path, &[]).unwrap();
    assert_eq!((cfg.run.optimizer.lr, cfg.run.seed), (0.5, 7));
    let cfg = LoadedConfig::load(&path, &["optimizer.lr=0.25".into(), "run.log_every=3".into()]).unwrap();
    assert_eq!(
        (cfg.run.optimizer.lr, cfg.run.seed, cfg.run.options.log_every),
        (0.25, 7, 3)
    );

    // A component key set from the environment, and its error naming the variable.
    std::env::set_var("MEDSSL_ENCODER__BASE_WIDTH", "wide");
    let cfg = LoadedConfig::load(&path, &[]).unwrap();
    let section = cfg.section("encoder", "name").unwrap();
    let err = format!("{:#}", section.parse::<medssl_resnet::ResNetConfig>().unwrap_err());
    assert!(
        err.contains("encoder.base_width") && err.contains("wide") && err.contains("MEDSSL_"),
        "{err}"
    );
    std::env::remove_var("MEDSSL_ENCODER__BASE_WIDTH");

    // The `MEDSSL_` variables of the tests and the build are no config keys: a config loads
    // beside them (`scripts/gpu-check` runs the suite with MEDSSL_TEST_DEVICE set).
    std::env::set_var("MEDSSL_TEST_DEVICE", "cuda");
    std::env::set_var("MEDSSL_REQUIRE_NCCL", "1");
    let loaded = LoadedConfig::load(&path, &[]);
    std::env::remove_var("MEDSSL_TEST_DEVICE");
    std::env::remove_var("MEDSSL_REQUIRE_NCCL");
    assert_eq!(loaded.map_err(|e| format!("{e:#}")).unwrap().run.seed, 7);

    // A --set override is named as the source of a bad value.
    std::env::remove_var("MEDSSL_OPTIMIZER__LR");
    std::env::remove_var("MEDSSL_SEED");
    let err = LoadedConfig::load(&path, &["optimizer.lr=fast".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("optimizer.lr") && err.contains("--set optimizer.lr=fast"),
        "{err}"
    );
    let err = LoadedConfig::load(&path, &["=3".into()]).err().unwrap().to_string();
    assert!(err.contains("not a dotted key"), "{err}");
}
