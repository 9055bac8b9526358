//! Registry completeness: the exact set of components the `medssl` binary links. A plugin
//! crate dropped by the linker (nothing referenced it) fails here instead of vanishing.

mod common;

use medssl_core::registry;

use medssl_attention_pool as _;
use medssl_classifier as _;
use medssl_deepcluster_v2 as _;
use medssl_faster_rcnn as _;
use medssl_masked_prediction as _;
use medssl_mean_pool as _;
use medssl_ntxent as _;
use medssl_phantom as _;
use medssl_readers as _;
use medssl_resnet as _;
use medssl_slice_transformer as _;
use medssl_swav as _;
use medssl_unet as _;
use medssl_vicreg as _;

#[test]
fn the_exact_set_of_components_is_registered() {
    assert_eq!(registry::encoders().names(), ["resnet18", "resnet34", "resnet50"]);
    assert_eq!(
        registry::aggregators().names(),
        ["attention-pool", "deformable-attention", "full-attention", "mean-pool"]
    );
    assert_eq!(
        registry::objectives().names(),
        ["deepcluster-v2", "masked-prediction", "ntxent", "swav", "vicreg"]
    );
    assert_eq!(registry::heads().names(), ["faster-rcnn", "unet", "volume-classifier"]);
    assert_eq!(
        registry::datasets().names(),
        [
            "decathlon",
            "dicom",
            "image-folder",
            "medmnist",
            "nifti",
            "npy",
            "phantom"
        ]
    );
    registry::catalogue().expect("no duplicate names");
}

#[test]
fn every_default_config_is_valid_toml() {
    for (_, rows) in registry::catalogue().unwrap() {
        for row in rows {
            let text = registry::example(row.name).unwrap();
            toml::from_str::<toml::Table>(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", row.name));
        }
    }
}

#[test]
fn an_unknown_name_lists_the_registered_ones() {
    let err = registry::encoders().get("resnet51").err().unwrap().to_string();
    assert!(
        err.contains("unknown encoder `resnet51`") && err.contains("resnet18, resnet34, resnet50"),
        "{err}"
    );
}

#[test]
fn list_prints_every_role_as_text_and_json() {
    let out = common::medssl().args(["list", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for role in ["encoders", "aggregators", "objectives", "heads", "datasets"] {
        assert!(json[role].is_array(), "missing role {role}: {json}");
    }
    assert_eq!(json["encoders"][2]["name"], "resnet50");
    assert!(json["encoders"][2]["about"].as_str().unwrap().contains("ResNet-50"));

    let out = common::medssl().arg("list").output().unwrap();
    let text = common::stdout(&out);
    assert!(
        text.contains("encoders:") && text.contains("  resnet50") && text.contains("ntxent"),
        "{text}"
    );
}

#[test]
fn example_prints_a_default_config_and_rejects_unknown_names() {
    let out = common::medssl().args(["example", "resnet50"]).output().unwrap();
    let text = common::stdout(&out);
    assert!(out.status.success() && text.contains("base_width = 64"), "{text}");
    let out = common::medssl().args(["example", "vit"]).output().unwrap();
    common::assert_fails_with(&out, &["no component named `vit`", "resnet18"]);
}
