//! Component swapping: any registered encoder, aggregator and objective (each in every small
//! variant it declares) compose and train one step with a finite loss and a non-zero
//! gradient on every trainable tensor. New plugins join this test by registering; nothing
//! here names them.

use medssl_core::config::LoadedConfig;
use medssl_core::registry;
use medssl_core::train::Run;
use proptest::prelude::*;

use medssl_attention_pool as _;
use medssl_classifier as _;
use medssl_deepcluster_v2 as _;
use medssl_masked_prediction as _;
use medssl_mean_pool as _;
use medssl_nifti_reader as _;
use medssl_ntxent as _;
use medssl_phantom as _;
use medssl_readers as _;
use medssl_resnet as _;
use medssl_slice_transformer as _;
use medssl_swav as _;
use medssl_unet as _;
use medssl_vicreg as _;

/// Every (role name, smoke config) pair of one role.
fn variants<E: registry::Registered>(
    role: &registry::Role<E>,
    smoke: impl Fn(&E) -> &'static [&'static str],
) -> Vec<(&'static str, &'static str)> {
    role.entries
        .iter()
        .flat_map(|e| smoke(e).iter().map(move |c| (e.name(), *c)))
        .collect()
}

fn combinations() -> Vec<[(&'static str, &'static str); 3]> {
    let encoders = variants(&registry::encoders(), |e| e.smoke_configs);
    let aggregators = variants(&registry::aggregators(), |e| e.smoke_configs);
    let objectives = variants(&registry::objectives(), |e| e.smoke_configs);
    let mut all = Vec::new();
    for &e in &encoders {
        for &a in &aggregators {
            for &o in &objectives {
                all.push([e, a, o]);
            }
        }
    }
    all
}

fn indent(table: &str, name: &str, body: &str) -> String {
    format!("[{table}]\nname = \"{name}\"\n{body}\n")
}

fn config(combo: &[(&str, &str); 3], seed: u64, batch: usize, slices: usize) -> String {
    let [(encoder, e), (aggregator, a), (objective, o)] = combo;
    format!(
        r#"
seed = {seed}
[run]
threads = 1
[data.sources.phantom]
format = "phantom"
count = {batch}
slices = {slices}
size = 20
[data.views]
slice_size = 16
volume_slices = {slices}
volume_size = 16
[data.loader]
batch_size = {batch}
workers = 1
{}
{}
{}
[[stages]]
name = "probe"
epochs = 1
train = ["encoder", "aggregator"]
objectives = {{ probe = 1.0 }}
"#,
        indent("encoder", encoder, e),
        indent("aggregator", aggregator, a),
        indent("objectives.probe", objective, o),
    )
}

/// Builds the composition and checks one training step; the message names the combination.
fn probe(combo: &[(&str, &str); 3], seed: u64, batch: usize, slices: usize) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config(combo, seed, batch, slices)).unwrap();
    let cfg = LoadedConfig::load(&path, &[]).map_err(|e| format!("{combo:?}: {e:#}"))?;
    let mut run = match Run::prepare(cfg) {
        Ok(run) => run,
        // A declared incompatibility (a context objective over a pooling aggregator) is a
        // config error, not a failure to compose.
        Err(e) if format!("{e:#}").contains("treats each slice alone") => return Ok(()),
        Err(e) => return Err(format!("{combo:?}: {e:#}")),
    };
    let probe = run.probe_step(0).map_err(|e| format!("{combo:?}: {e:#}"))?;
    if !probe.loss.is_finite() {
        return Err(format!("{combo:?}: loss {}", probe.loss));
    }
    if !probe.groups.iter().any(|g| g.group == "encoder") {
        return Err(format!("{combo:?}: the encoder is not trained"));
    }
    for g in &probe.groups {
        if !(g.norm > 0.0 && g.norm.is_finite()) || g.with_gradient != g.parameters {
            return Err(format!(
                "{combo:?}: {} has gradient norm {} with {} of {} tensors reached",
                g.group, g.norm, g.with_gradient, g.parameters
            ));
        }
    }
    Ok(())
}

#[test]
fn every_composition_trains_one_step() {
    let failures: Vec<String> = combinations()
        .iter()
        .filter_map(|combo| probe(combo, 0, 3, 3).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_role_offers_a_variant() {
    assert!(combinations().len() >= 2 * 2 * 2, "{}", combinations().len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn any_compatible_composition_trains_one_step(
        pick in 0usize..10_000, seed in 0u64..1_000, batch in 2usize..5, slices in 2usize..5,
    ) {
        let combos = combinations();
        let result = probe(&combos[pick % combos.len()], seed, batch, slices);
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}
