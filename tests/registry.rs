//! Registry completeness: the exact set of components (tests/common's `COMPONENTS`) that
//! this test binary and the `medssl` binary link, both through `medssl_plugins`. A plugin
//! crate dropped by the linker (nothing referenced it) fails here instead of vanishing.

mod common;

use medssl_core::registry;

use medssl_plugins as _;

#[test]
fn the_exact_set_of_components_is_registered() {
    assert_eq!(common::registered(), common::expected_components());
}

/// The real binary links what this test binary links: a plugin missing from
/// `medssl_plugins`, or a `medssl` that does not reference that crate, fails here.
#[test]
fn the_binary_lists_the_exact_set_of_components() {
    let out = common::medssl().args(["list", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let roles = json.as_object().expect("a JSON object of roles");
    assert_eq!(roles.len(), common::COMPONENTS.len(), "roles: {json}");
    for &(role, expected) in common::COMPONENTS {
        let names: Vec<&str> = roles[role]
            .as_array()
            .unwrap_or_else(|| panic!("missing role {role}: {json}"))
            .iter()
            .map(|row| row["name"].as_str().expect("a name"))
            .collect();
        assert_eq!(names, expected, "{role} listed by `medssl list --json`");
    }
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
