//! Every registered encoder, aggregator, objective and head starts from the initialisation of
//! its reference implementation: each variable, after construction with the component's
//! default config, is checked against what PyTorch, torchvision or the method's own code
//! gives it. Norm scales exactly 1 and shifts 0; linear and conv layers PyTorch's
//! U(-1/sqrt(fan_in), 1/sqrt(fan_in)) unless a rule below names the reference that does
//! otherwise; std within 10% of the expected value for tensors of 256 entries or more.
//!
//! A variable that no rule covers fails the test: a new component states here what its
//! reference starts from.

use medssl_core::aggregator::AggregatorShape;
use medssl_core::config::Section;
use medssl_core::encoder::EncoderShape;
use medssl_core::head::HeadShape;
use medssl_core::objective::ObjectiveShape;
use medssl_core::registry::{self, Registered};
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};

use medssl_plugins as _;

/// What a variable starts as.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Constant(f64),
    /// `torch.nn.Linear` / `ConvNd` weights: U(-b, b), b = 1 / sqrt(fan_in).
    TorchWeight,
    /// `torch.nn.Linear` / `ConvNd` biases, b from the sibling weight's fan_in.
    TorchBias,
    /// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: N(0, 2 / fan_out).
    KaimingNormalFanOut,
    /// `kaiming_uniform_(a=1)`: U(-b, b), b = sqrt(3 / fan_in).
    KaimingUniformGainOne,
    Normal(f64),
    /// Rows of unit L2 norm (SwAV's prototypes, normalised at construction).
    UnitRows,
    /// An int64 index computed from the architecture, not drawn (a Swin's
    /// `relative_position_index`, a MONAI buffer; its values are its component's tests').
    Index,
}

/// Named exceptions to the generic rules: (name contains, expectation, reference).
const EXCEPTIONS: &[(&str, Expect, &str)] = &[
    // MONAI swin_unetr.py WindowAttention: trunc_normal_(std=0.02); the rest of its
    // SwinTransformer (`layers1` .., which the ResNet rule below would also match) keeps
    // PyTorch's defaults.
    (
        "relative_position_bias_table",
        Expect::Normal(0.02),
        "MONAI SwinTransformer",
    ),
    ("encoder.layers", Expect::TorchWeight, "MONAI SwinTransformer"),
    // torchvision resnet.py, ResNet.__init__.
    (
        "encoder.conv1.weight",
        Expect::KaimingNormalFanOut,
        "torchvision ResNet",
    ),
    (
        "encoder.layer",
        Expect::KaimingNormalFanOut,
        "torchvision ResNet (conv weights)",
    ),
    // The U-Net decoder's 3x3 convolutions before batch norm, as torchvision's ResNet.
    ("head.stages.", Expect::KaimingNormalFanOut, "U-Net conv blocks"),
    ("head.start.", Expect::KaimingNormalFanOut, "U-Net conv blocks"),
    // torchvision feature_pyramid_network.py: kaiming_uniform_(a=1), bias 0.
    ("head.fpn.", Expect::KaimingUniformGainOne, "torchvision FPN"),
    // Faster R-CNN Sec. 3.1.3 / torchvision rpn.py RPNHead: N(0, 0.01), bias 0.
    ("head.rpn.", Expect::Normal(0.01), "torchvision RPNHead"),
    // Detectron2 FastRCNNOutputLayers: N(0, 0.01) and N(0, 0.001), bias 0.
    (
        "head.roi_heads.box_predictor.cls_score.",
        Expect::Normal(0.01),
        "Detectron2",
    ),
    (
        "head.roi_heads.box_predictor.bbox_pred.",
        Expect::Normal(0.001),
        "Detectron2",
    ),
    // SwAV main_swav.py normalises the prototypes before training.
    ("prototypes.weight", Expect::UnitRows, "SwAV"),
    // BERT-style embedding std 0.02 (masked prediction's MASK vector).
    ("mask_token", Expect::Normal(0.02), "BERT"),
    // DAT / Swin relative position bias tables: std 0.02.
    ("relative_bias", Expect::Normal(0.02), "Swin / DAT"),
    // MONAI PatchEmbeddingBlock: trunc_normal_(std=0.02, a=-2, b=2) (ViT position embeddings).
    ("position_embeddings", Expect::Normal(0.02), "MONAI ViT"),
];

/// Buffers that are state, not parameters: (name contains, value).
const STATE: &[(&str, f64)] = &[
    ("queue", 0.0),
    ("memory_embeddings", 0.0),
    ("memory_filled", 0.0),
    ("assignments", -1.0),
];

fn fan_in(weight: &[i64]) -> f64 {
    (weight[1] * weight[2..].iter().product::<i64>()) as f64
}

fn fan_out(weight: &[i64]) -> f64 {
    (weight[0] * weight[2..].iter().product::<i64>()) as f64
}

/// The expectation for `name`, or `None` when no rule covers it.
fn expectation(name: &str, vars: &BTreeMap<String, Tensor>) -> Option<(Expect, Vec<i64>)> {
    let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    let sibling = |leaf: &str| vars.get(&format!("{module}.{leaf}"));
    let weight_shape = sibling("weight").map(|w| w.size()).unwrap_or_default();
    // DeepCluster-v2's prototypes (`prototypes.H.weight`) are set by k-means before first use.
    if name.contains("prototypes.") && !name.ends_with("prototypes.weight") {
        return Some((Expect::Constant(0.0), weight_shape));
    }
    for (pattern, value) in STATE {
        if name.contains(pattern) {
            return Some((Expect::Constant(*value), weight_shape));
        }
    }
    match leaf {
        "running_mean" | "num_batches_tracked" => return Some((Expect::Constant(0.0), weight_shape)),
        "relative_position_index" => return Some((Expect::Index, weight_shape)),
        "running_var" => return Some((Expect::Constant(1.0), weight_shape)),
        _ => {}
    }
    let is_norm = weight_shape.len() == 1;
    if is_norm && leaf == "weight" {
        return Some((Expect::Constant(1.0), weight_shape));
    }
    if is_norm && leaf == "bias" {
        return Some((Expect::Constant(0.0), weight_shape));
    }
    for (pattern, expect, _) in EXCEPTIONS {
        if name.contains(pattern) {
            return match (leaf, expect) {
                ("bias", Expect::KaimingUniformGainOne | Expect::Normal(_)) => {
                    Some((Expect::Constant(0.0), weight_shape))
                }
                ("bias", _) => Some((Expect::TorchBias, weight_shape)),
                _ => Some((*expect, weight_shape)),
            };
        }
    }
    match leaf {
        "weight" if weight_shape.len() >= 2 => Some((Expect::TorchWeight, weight_shape)),
        "bias" if weight_shape.len() >= 2 => Some((Expect::TorchBias, weight_shape)),
        _ => None,
    }
}

/// Checks `t` against `expect`; `weight` is the shape of the layer's weight.
fn check(name: &str, t: &Tensor, expect: Expect, weight: &[i64]) -> Result<(), String> {
    if let Expect::Index = expect {
        let lowest = t.min().int64_value(&[]);
        if t.kind() != Kind::Int64 || lowest != 0 {
            return Err(format!(
                "{name}: expected an int64 index from 0, got {:?} from {lowest}",
                t.kind()
            ));
        }
        return Ok(());
    }
    let t = t.to_kind(Kind::Double);
    let n = t.numel() as f64;
    let std = if n > 1.0 { t.std(true).double_value(&[]) } else { 0.0 };
    let max = t.abs().max().double_value(&[]);
    let uniform = |bound: f64| -> Result<(), String> {
        if max > bound * (1.0 + 1e-6) {
            return Err(format!(
                "{name}: |w| reaches {max:.4}, beyond U(-{bound:.4}, {bound:.4})"
            ));
        }
        within(name, std, bound / 3f64.sqrt(), n)
    };
    match expect {
        Expect::Constant(c) => {
            let off = (&t - c).abs().max().double_value(&[]);
            if off != 0.0 {
                return Err(format!("{name}: expected every entry {c}, off by up to {off}"));
            }
            Ok(())
        }
        Expect::TorchWeight => uniform(1.0 / fan_in(weight).sqrt()),
        Expect::TorchBias => {
            let bound = 1.0 / fan_in(weight).sqrt();
            if max > bound * (1.0 + 1e-6) || (n >= 8.0 && max == 0.0) {
                return Err(format!(
                    "{name}: bias |b| up to {max:.4}, expected U(-{bound:.4}, {bound:.4})"
                ));
            }
            Ok(())
        }
        Expect::KaimingUniformGainOne => uniform((3.0 / fan_in(weight)).sqrt()),
        Expect::KaimingNormalFanOut => within(name, std, (2.0 / fan_out(weight)).sqrt(), n),
        Expect::Normal(s) => within(name, std, s, n),
        Expect::Index => unreachable!("checked above"),
        Expect::UnitRows => {
            let norms = t.flatten(1, -1).norm_scalaropt_dim(2.0, [1], false);
            let off = (norms - 1.0).abs().max().double_value(&[]);
            if off > 1e-5 {
                return Err(format!("{name}: rows should have unit norm, off by {off}"));
            }
            Ok(())
        }
    }
}

fn within(name: &str, std: f64, expected: f64, n: f64) -> Result<(), String> {
    if n >= 256.0 && (std / expected - 1.0).abs() > 0.1 {
        return Err(format!("{name}: std {std:.5}, expected {expected:.5} (+-10%)"));
    }
    Ok(())
}

/// Checks every variable of `vs` below `prefix`; failures name the component.
fn check_store(component: &str, vs: &nn::VarStore, failures: &mut Vec<String>) -> usize {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    for (name, t) in &vars {
        match expectation(name, &vars) {
            Some((expect, weight)) => {
                if let Err(e) = check(name, t, expect, &weight) {
                    failures.push(format!("{component}: {e}"));
                }
            }
            None => failures.push(format!(
                "{component}: no expected initialisation for `{name}` {:?}: add a rule with its reference to tests/init.rs",
                t.size()
            )),
        }
    }
    vars.len()
}

fn default_section<E: Registered>(key: &str, entry: &E, default: fn() -> String) -> Section {
    Section::inline(key, entry.name(), &default()).unwrap()
}

#[test]
fn every_component_starts_as_its_reference() {
    tch::manual_seed(0);
    let mut failures = Vec::new();
    let mut checked = 0;

    // The reference encoder shape every other component is built against.
    let encoder_vs = nn::VarStore::new(Device::Cpu);
    let resnet = registry::encoders().get("resnet18").unwrap();
    let reference = (resnet.build)(
        &default_section("encoder", resnet, resnet.default_config),
        encoder_vs.root() / "encoder",
        &EncoderShape { in_channels: 1 },
    )
    .unwrap();

    for entry in registry::encoders().entries {
        let vs = nn::VarStore::new(Device::Cpu);
        let section = default_section("encoder", entry, entry.default_config);
        (entry.build)(&section, vs.root() / "encoder", &EncoderShape { in_channels: 1 }).unwrap();
        checked += check_store(&format!("encoder {}", entry.name()), &vs, &mut failures);
    }
    for entry in registry::aggregators().entries {
        let vs = nn::VarStore::new(Device::Cpu);
        let section = default_section("aggregator", entry, entry.default_config);
        let shape = AggregatorShape {
            input_dim: 960,
            slices: 32,
        };
        (entry.build)(&section, vs.root() / "aggregator", &shape).unwrap();
        checked += check_store(&format!("aggregator {}", entry.name()), &vs, &mut failures);
    }
    for entry in registry::objectives().entries {
        let vs = nn::VarStore::new(Device::Cpu);
        let section = default_section("objectives.o", entry, entry.default_config);
        let shape = ObjectiveShape {
            spatial_dims: medssl_core::encoder::SpatialDims::Two,
            in_channels: 1,
            deepest_level: (reference.embedding_dim(), 32),
            levels: reference.levels().to_vec(),
            input_size: None,
            slice_dim: reference.embedding_dim(),
            volume_dim: Some(256),
            sequence_dim: Some(960),
            num_samples: 4096,
            global_slice_views: 2,
            local_slice_views: 6,
            volume_views: 2,
            seed: 0,
        };
        // Objectives of 3D encoders (reconstruction, voco) on ViT-B/16's levels instead.
        let vit_level = |name: &str| medssl_core::encoder::Level {
            name: name.into(),
            channels: 768,
            stride: 16,
        };
        let volume_shape = ObjectiveShape {
            spatial_dims: medssl_core::encoder::SpatialDims::Three,
            deepest_level: (768, 16),
            levels: ["hidden_states_3", "hidden_states_6", "hidden_states_9", "norm"]
                .map(vit_level)
                .to_vec(),
            input_size: Some(vec![96, 96, 96]),
            slice_dim: 768,
            volume_dim: Some(768),
            sequence_dim: None,
            ..shape.clone()
        };
        match (entry.build)(&section, vs.root() / "objectives" / "o", &shape) {
            Ok(_) => {}
            Err(e) if format!("{e:#}").contains("but the run's encoder is 2D") => {
                (entry.build)(&section, vs.root() / "objectives" / "o", &volume_shape)
                    .unwrap_or_else(|e| panic!("objective {}: {e:#}", entry.name()));
            }
            Err(e) => panic!("objective {}: {e:#}", entry.name()),
        }
        checked += check_store(&format!("objective {}", entry.name()), &vs, &mut failures);
    }
    // Heads serve 2D or 3D encoders: each is built on every reference (a ResNet, a ViT and a
    // Swin), and must build on one.
    let volume_vs = nn::VarStore::new(Device::Cpu);
    let vit = registry::encoders().get("vit3d").unwrap();
    let volume_reference = (vit.build)(
        &default_section("encoder", vit, vit.default_config),
        volume_vs.root() / "encoder",
        &EncoderShape { in_channels: 1 },
    )
    .unwrap();
    let swin_vs = nn::VarStore::new(Device::Cpu);
    let swin = registry::encoders().get("swin3d").unwrap();
    let swin_reference = (swin.build)(
        &default_section("encoder", swin, swin.default_config),
        swin_vs.root() / "encoder",
        &EncoderShape { in_channels: 1 },
    )
    .unwrap();
    for entry in registry::heads().entries {
        let mut errors = Vec::new();
        let references = [&reference, &volume_reference, &swin_reference];
        for encoder in references {
            let vs = nn::VarStore::new(Device::Cpu);
            let section = default_section("head", entry, entry.default_config);
            let shape = HeadShape {
                in_channels: encoder.in_channels(),
                spatial_dims: encoder.spatial_dims(),
                levels: encoder.levels().to_vec(),
                embedding_dim: encoder.embedding_dim(),
                volume_dim: Some(256),
                num_classes: 3,
            };
            match (entry.build)(&section, vs.root() / "head", &shape) {
                Ok(_) => checked += check_store(&format!("head {}", entry.name()), &vs, &mut failures),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        assert!(
            errors.len() < references.len(),
            "head {} builds on no reference encoder: {errors:?}",
            entry.name()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} variables:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 100, "{checked}");
}

#[test]
fn zero_init_residual_is_honoured_by_every_resnet() {
    for name in ["resnet18", "resnet50"] {
        let entry = registry::encoders().get(name).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let section = Section::inline("encoder", name, "zero_init_residual = true").unwrap();
        (entry.build)(&section, vs.root() / "encoder", &EncoderShape { in_channels: 1 }).unwrap();
        let zeroed = vs
            .variables()
            .into_iter()
            .filter(|(n, t)| {
                n.ends_with(".weight") && t.dim() == 1 && t.abs().sum(Kind::Double).double_value(&[]) == 0.0
            })
            .count();
        // One a residual block: 8 in ResNet-18, 16 in ResNet-50.
        assert_eq!(zeroed, if name == "resnet18" { 8 } else { 16 }, "{name}");
    }
}
