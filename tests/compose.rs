//! Component swapping: any registered encoder, aggregator and objective (each in every small
//! variant it declares) compose and train one step with a finite loss and a non-zero
//! gradient on every trainable tensor; and any registered head composes with every encoder
//! (and, for heads of volume tasks, every aggregator) the same way. New plugins join this
//! test by registering; nothing here names them: it links every plugin through
//! `medssl_plugins`, as the binary does, and checks that it sees the whole expected set.
//! Everything runs on `MEDSSL_TEST_DEVICE`'s device (the CPU unless it says `cuda`), so that
//! on a GPU the same compositions show that no component makes a tensor on the CPU.

mod common;

use medssl_core::aggregator::AggregatorShape;
use medssl_core::config::{LoadedConfig, Section};
use medssl_core::detection::ImageTargets;
use medssl_core::encoder::{EncoderShape, SpatialDims};
use medssl_core::head::{HeadInput, HeadShape, Targets, Task};
use medssl_core::registry;
use medssl_core::slice_features::{SliceFeatureConfig, SliceFeatures};
use medssl_core::train::Run;
use proptest::prelude::*;
use tch::{nn, Kind, Tensor};

use medssl_plugins as _;

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

/// A pre-training composition: encoder, aggregator (none for a 3D encoder, which embeds
/// volumes itself) and objective, each a (name, smoke config) pair.
type Combo = [Option<(&'static str, &'static str)>; 3];

/// The crops of a 3D encoder that takes any size (a Swin pads to its windows): small, square
/// in (H, W) as scans are (VoCo turns its base crops in that plane), and sides that are
/// multiples of 32 with one above it, as SwinUNETR asks (its deepest level needs more than one
/// voxel).
const FREE_CROP: [i64; 3] = [32, 64, 64];

/// What the composition needs to know of an encoder variant before building a run: its
/// spatial dimensionality and the input size it fixes (a ViT's crop size).
fn encoder_facts(name: &str, body: &str) -> (SpatialDims, Option<Vec<i64>>) {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let section = Section::inline("encoder", name, body).unwrap();
    let entry = registry::encoders().get(name).unwrap();
    let encoder = (entry.build)(&section, vs.root(), &EncoderShape { in_channels: 1 }).unwrap();
    (encoder.spatial_dims(), encoder.input_size())
}

/// Every 2D encoder variant with every aggregator variant, every 3D encoder variant alone,
/// each with every objective variant; [`probe`] skips the pairs a component declares
/// incompatible (a slice objective on a 3D encoder, a context objective over a pooling
/// aggregator).
fn combinations() -> Vec<Combo> {
    let encoders = variants(&registry::encoders(), |e| e.smoke_configs);
    let aggregators = variants(&registry::aggregators(), |e| e.smoke_configs);
    let objectives = variants(&registry::objectives(), |e| e.smoke_configs);
    let mut all = Vec::new();
    for &e in &encoders {
        let with: Vec<Option<(&str, &str)>> = match encoder_facts(e.0, e.1).0 {
            SpatialDims::Two => aggregators.iter().copied().map(Some).collect(),
            SpatialDims::Three => vec![None],
        };
        for &a in &with {
            for &o in &objectives {
                all.push([Some(e), a, Some(o)]);
            }
        }
    }
    all
}

fn indent(table: &str, name: &str, body: &str) -> String {
    format!("[{table}]\nname = \"{name}\"\n{body}\n")
}

fn config(combo: &Combo, seed: u64, batch: usize, slices: usize, precision: &str, size: usize) -> String {
    let [Some((encoder, e)), aggregator, Some((objective, o))] = combo else {
        panic!("{combo:?} is not a composition");
    };
    let crop_size = match encoder_facts(encoder, e) {
        (_, Some(size)) => format!("crop_size = {size:?}"),
        (SpatialDims::Three, None) => format!("crop_size = {FREE_CROP:?}"),
        (SpatialDims::Two, None) => String::new(),
    };
    format!(
        r#"
seed = {seed}
device = "{device}"
[run]
threads = 1
precision = "{precision}"
[data.sources.phantom]
format = "phantom"
count = {batch}
slices = {slices}
size = {source_size}
[data.views]
slice_size = {size}
volume_slices = {slices}
volume_size = {size}
{crop_size}
[data.loader]
batch_size = {batch}
workers = 1
{}
{}
{}
[[stages]]
name = "probe"
epochs = 1
train = {train}
objectives = {{ probe = 1.0 }}
"#,
        indent("encoder", encoder, e),
        aggregator
            .map(|(a, body)| indent("aggregator", a, body))
            .unwrap_or_default(),
        indent("objectives.probe", objective, o),
        source_size = size + 4,
        device = common::test_device_name(),
        train = if aggregator.is_some() {
            r#"["encoder", "aggregator"]"#
        } else {
            r#"["encoder"]"#
        },
    )
}

/// Builds the composition and checks one training step; the message names the combination.
fn probe(combo: &Combo, seed: u64, batch: usize, slices: usize) -> Result<(), String> {
    probe_in(combo, seed, batch, slices, "fp32")
}

/// [`probe`] under `run.precision = precision`; the loss must come in that precision's kind
/// (fp32 under mixed precision, whose objectives run outside autocast). Views are 16 px,
/// except under bf16: a ResNet-50 sees 16 px as 1 x 1 from its third stage on, where batch
/// norm over a handful of values gives gradient norms of 1e9 already in fp32 and NaN in
/// bf16; at 32 px they are 1e5 and bf16 trains.
fn probe_in(combo: &Combo, seed: u64, batch: usize, slices: usize, precision: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let size = if precision == "bf16" { 32 } else { 16 };
    std::fs::write(&path, config(combo, seed, batch, slices, precision, size)).unwrap();
    let cfg = LoadedConfig::load(&path, &[]).map_err(|e| format!("{combo:?}: {e:#}"))?;
    let mut run = match Run::prepare(cfg) {
        Ok(run) => run,
        // A declared incompatibility (a context objective over a pooling aggregator, a slice
        // objective on a 3D encoder, a 3D objective on a 2D one) is a config error, not a
        // failure to compose.
        Err(e) if declared_incompatible(&format!("{e:#}")) => return Ok(()),
        Err(e) => return Err(format!("{combo:?}: {e:#}")),
    };
    let probe = run.probe_step(0).map_err(|e| format!("{combo:?}: {e:#}"))?;
    if !probe.loss.is_finite() {
        return Err(format!("{combo:?}: loss {}", probe.loss));
    }
    let kind = if precision == "fp64" { Kind::Double } else { Kind::Float };
    if probe.loss_kind != kind {
        return Err(format!(
            "{combo:?}: a {precision} run's loss came in {:?}",
            probe.loss_kind
        ));
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

/// Whether a refusal is one a component declares (see [`combinations`]).
fn declared_incompatible(message: &str) -> bool {
    message.contains("treats each slice alone")
        || message.contains("needs a 2D encoder, but encoder")
        || message.contains("needs a 3D encoder, but encoder")
        || message.contains("but the run's encoder is 2D")
        || message.contains("but the run's encoder is 3D")
        // The reconstruction decoder's two equal upsamplings need a square deepest stride
        // (a ViT's 16), which a Swin's 32 is not.
        || message.contains("which needs a square patch size")
}

/// Every plugin takes part: this binary registers the exact set the registry test expects.
#[test]
fn every_plugin_is_linked_here() {
    assert_eq!(common::registered(), common::expected_components());
}

#[test]
fn every_composition_trains_one_step() {
    let failures: Vec<String> = combinations()
        .iter()
        .filter_map(|combo| probe(combo, 0, 3, 3).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Under `run.precision = "fp64"` every composition runs in f64 end to end: no component
/// makes an fp32 tensor that its f64 input would meet (libtorch refuses to mix the two in a
/// matmul), and the loss comes out f64.
#[test]
fn every_composition_trains_one_step_in_f64() {
    let failures: Vec<String> = combinations()
        .iter()
        .filter_map(|combo| probe_in(combo, 0, 3, 3, "fp64").err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Under `run.precision = "bf16"` (the encoder and aggregator in bf16 autocast on the CPU)
/// every composition trains one step, with its loss in fp32.
#[test]
fn every_composition_trains_one_step_in_bf16() {
    let failures: Vec<String> = combinations()
        .iter()
        .filter_map(|combo| probe_in(combo, 0, 3, 3, "bf16").err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_role_offers_a_variant() {
    assert!(combinations().len() >= 2 * 2 * 2, "{}", combinations().len());
}

/// The 3D encoders train with the objectives meant for them: every objective that reads
/// volume views or crops composes with every 3D encoder variant (a probe that was skipped as
/// incompatible would hide a broken pairing).
#[test]
fn three_d_encoders_train_with_crop_and_volume_objectives() {
    let mut trained = std::collections::BTreeSet::new();
    for combo in combinations().iter().filter(|c| c[1].is_none()) {
        let [Some(e), _, Some(o)] = combo else { unreachable!() };
        let volume_level = o.1.contains("level = \"volume\"") || ["reconstruction", "voco"].contains(&o.0);
        if volume_level {
            probe(combo, 1, 2, 3).unwrap();
            trained.insert((e.0, o.0));
        }
    }
    assert!(trained.contains(&("vit3d", "reconstruction")), "{trained:?}");
    assert!(trained.contains(&("vit3d", "ntxent")), "{trained:?}");
    assert!(trained.contains(&("swin3d", "ntxent")), "{trained:?}");
    assert!(trained.contains(&("vit3d", "voco")), "{trained:?}");
    assert!(trained.contains(&("swin3d", "voco")), "{trained:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn any_compatible_composition_trains_one_step(
        pick in 0usize..10_000, seed in 0u64..1_000, batch in 2usize..5, slices in 2usize..5,
        // Read as the strategies are built, before any case runs: a bad MEDSSL_TEST_DEVICE
        // fails plainly, not as a shrunk case saved to a proptest-regressions file.
        _device in Just(common::test_device()),
    ) {
        let combos = combinations();
        let result = probe(&combos[pick % combos.len()], seed, batch, slices);
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

/// A head composition: encoder, aggregator (where the head's task reads volumes) and head,
/// each a (name, smoke config) pair.
type HeadCombo = [Option<(&'static str, &'static str)>; 3];

/// Every encoder variant with every head variant, and with no aggregator or each aggregator
/// variant; [`head_probe`] keeps those whose aggregator matches the head's task.
fn head_combinations() -> Vec<HeadCombo> {
    let encoders = variants(&registry::encoders(), |e| e.smoke_configs);
    let aggregators = variants(&registry::aggregators(), |e| e.smoke_configs);
    let heads = variants(&registry::heads(), |e| e.smoke_configs);
    let mut all = Vec::new();
    for &e in &encoders {
        for &h in &heads {
            for a in std::iter::once(None).chain(aggregators.iter().copied().map(Some)) {
                all.push([Some(e), a, Some(h)]);
            }
        }
    }
    all
}

/// Classes of the probe tasks (background included for segmentation).
const HEAD_CLASSES: i64 = 3;

/// Builds the composition, runs it on `volumes` volumes of `slices` slices of an odd size
/// and checks the loss and the gradients. `Ok(false)` where the head's task does not match
/// the presence of an aggregator (nothing to test); the message names the combination.
fn head_probe(combo: &HeadCombo, volumes: i64, slices: i64) -> Result<bool, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{combo:?}: {e:#}");
    let [Some((encoder, e)), aggregator, Some((head, h))] = *combo else {
        return Err(format!("{combo:?}: not a head composition"));
    };
    // Seeded, so that a failure reproduces.
    tch::manual_seed(0);
    let device = common::test_device();
    let vs = nn::VarStore::new(device);
    let section = Section::inline("encoder", encoder, e).map_err(|e| fail(&e))?;
    let entry = registry::encoders().get(encoder).map_err(|e| fail(&e))?;
    let encoder =
        (entry.build)(&section, vs.root() / "encoder", &EncoderShape { in_channels: 1 }).map_err(|e| fail(&e))?;
    let features = SliceFeatures::new(&SliceFeatureConfig::default(), encoder.as_ref()).map_err(|e| fail(&e))?;
    let aggregator = match aggregator {
        Some((name, body)) => {
            let section = Section::inline("aggregator", name, body).map_err(|e| fail(&e))?;
            let entry = registry::aggregators().get(name).map_err(|e| fail(&e))?;
            let shape = AggregatorShape {
                input_dim: features.dim(),
                slices,
            };
            Some((entry.build)(&section, vs.root() / "aggregator", &shape).map_err(|e| fail(&e))?)
        }
        None => None,
    };
    let shape = HeadShape {
        in_channels: encoder.in_channels(),
        spatial_dims: encoder.spatial_dims(),
        levels: encoder.levels().to_vec(),
        embedding_dim: encoder.embedding_dim(),
        // As fine-tuning builds it: a 3D encoder's pooled embedding is the volume embedding.
        volume_dim: match encoder.spatial_dims() {
            SpatialDims::Two => aggregator.as_ref().map(|a| a.output_dim()),
            SpatialDims::Three => Some(encoder.embedding_dim()),
        },
        num_classes: HEAD_CLASSES,
    };
    let section = Section::inline("head", head, h).map_err(|e| fail(&e))?;
    let entry = registry::heads().get(head).map_err(|e| fail(&e))?;
    let dims = encoder.spatial_dims();
    let head = match (entry.build)(&section, vs.root() / "head", &shape) {
        Ok(head) => head,
        // A volume head without an aggregator, a 2D head on a 3D encoder and the reverse, and
        // a 3D decoder built for another encoder's levels (UNETR's four at stride 16 on a
        // Swin's five) are declared config errors, not failures to compose.
        Err(e) if aggregator.is_none() && format!("{e:#}").contains("needs an aggregator") => return Ok(false),
        Err(e) if format!("{e:#}").contains(&format!("the run's encoder is {dims}")) => return Ok(false),
        Err(e) if dims == SpatialDims::Three && format!("{e:#}").contains("level(s): [") => return Ok(false),
        Err(e) => return Err(fail(&e)),
    };
    if head.task().spatial_dims().is_some_and(|d| d != dims) {
        return Err(format!("{combo:?}: a {:?} head built on a {dims} encoder", head.task()));
    }
    // A 2D encoder's volume heads read an aggregator; a 3D encoder has none.
    if dims == SpatialDims::Two && head.task().needs_aggregator() != aggregator.is_some() {
        return Ok(false);
    }
    if dims == SpatialDims::Three && aggregator.is_some() {
        return Ok(false);
    }

    let [height, width] = [17, 15];
    let (images, image_size) = if dims == SpatialDims::Three {
        let size = encoder.input_size().unwrap_or(FREE_CROP.to_vec());
        let mut shape = vec![volumes, 1];
        shape.extend(&size);
        (Tensor::randn(shape, (Kind::Float, device)), [size[1], size[2]])
    } else {
        (
            Tensor::randn([volumes * slices, 1, height, width], (Kind::Float, device)),
            [height, width],
        )
    };
    let out = encoder.forward(&images, true);
    let volume = match (&aggregator, dims) {
        (_, SpatialDims::Three) => Some(out.pooled.shallow_clone()),
        (Some(a), _) => {
            let sequence = features.compute(&out).reshape([volumes, slices, -1]);
            Some(a.forward(&sequence, None, true).volume)
        }
        (None, _) => None,
    };
    let input = HeadInput {
        encoder: &out,
        volume: volume.as_ref(),
        image_size,
        images: (dims == SpatialDims::Three).then_some(&images),
    };
    let targets = match head.task() {
        Task::VolumeClassification => {
            Targets::Classes(Tensor::arange(volumes, (Kind::Int64, device)).remainder(HEAD_CLASSES))
        }
        Task::VolumeSegmentation => {
            let mut shape = images.size();
            shape.remove(1);
            Targets::Classes(Tensor::randint(HEAD_CLASSES, shape, (Kind::Int64, device)))
        }
        Task::Segmentation => Targets::Classes(Tensor::randint(
            HEAD_CLASSES,
            [volumes * slices, height, width],
            (Kind::Int64, device),
        )),
        // One object an image, of each object class in turn, inside the image; on the
        // device, as the fine-tuning loop hands them over.
        Task::Detection => Targets::Boxes(
            (0..volumes * slices)
                .map(|i| ImageTargets::new(&[[2.0, 3.0, 11.0, 14.0]], &[1 + i % (HEAD_CLASSES - 1)]).to_device(device))
                .collect(),
        ),
    };
    let loss = head.loss(&input, &targets, 0).map_err(|e| fail(&e))?;
    let value = loss.double_value(&[]);
    if !value.is_finite() {
        return Err(format!("{combo:?}: loss {value}"));
    }
    loss.backward();
    // (squared norm, tensors, tensors with a non-zero gradient) by group.
    let mut groups: std::collections::BTreeMap<String, (f64, usize, usize)> = Default::default();
    for (name, var) in vs.variables() {
        if !var.requires_grad() {
            continue;
        }
        let group = name.split('.').next().unwrap_or_default().to_string();
        let grad = var.grad();
        let norm = if grad.defined() {
            grad.norm().double_value(&[])
        } else {
            0.0
        };
        let entry = groups.entry(group).or_insert((0.0, 0, 0));
        entry.0 += norm * norm;
        entry.1 += 1;
        entry.2 += usize::from(norm > 0.0);
    }
    for group in ["encoder", "head"] {
        if !groups.contains_key(group) {
            return Err(format!("{combo:?}: no {group} parameter is trained"));
        }
    }
    for (group, (squares, parameters, with_gradient)) in &groups {
        let norm = squares.sqrt();
        if !(norm > 0.0 && norm.is_finite()) || with_gradient != parameters {
            return Err(format!(
                "{combo:?}: {group} has gradient norm {norm} with {with_gradient} of {parameters} tensors reached"
            ));
        }
    }
    Ok(true)
}

#[test]
fn every_head_composition_trains_one_step() {
    let mut ran = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for combo in head_combinations() {
        match head_probe(&combo, 2, 3) {
            Ok(true) => {
                ran.insert((combo[0], combo[2]));
            }
            Ok(false) => {}
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every head variant ran on an encoder variant, and every encoder variant with a head
    // (with an aggregator or without, 2D or 3D, as its task asks); 2D heads on every 2D
    // encoder variant.
    let encoders = variants(&registry::encoders(), |e| e.smoke_configs);
    let heads = variants(&registry::heads(), |e| e.smoke_configs);
    assert!(heads.len() >= 2, "{} head variants", heads.len());
    for h in &heads {
        assert!(
            ran.iter().any(|(_, rh)| *rh == Some(*h)),
            "head {h:?} never ran: {ran:?}"
        );
    }
    for e in &encoders {
        assert!(
            ran.iter().any(|(re, _)| *re == Some(*e)),
            "encoder {e:?} never ran: {ran:?}"
        );
    }
    let two_d = encoders
        .iter()
        .filter(|e| encoder_facts(e.0, e.1).0 == SpatialDims::Two)
        .count();
    for h in heads.iter().filter(|h| h.0 == "unet" || h.0 == "faster-rcnn") {
        assert_eq!(ran.iter().filter(|(_, rh)| *rh == Some(*h)).count(), two_d, "{h:?}");
    }
}
