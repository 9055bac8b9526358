//! medssl-plugins: the one list of plugin crates. The `medssl` binary and every test crate
//! that needs the registered components depend on this crate instead of naming each plugin.
//!
//! A plugin registers its components with linkme, in a link section: nothing calls into the
//! crate, and rustc leaves out a dependency that no code references, dropping its
//! registrations with it, silently (see DESIGN.md, "Registry"). Each line below references
//! one plugin crate, so whatever references this crate links them all. A new plugin is one
//! line here and one dependency in Cargo.toml; `tests/registry.rs` asserts the exact set of
//! names, in its own test binary and in the `medssl` binary's `list --json`.

use medssl_attention_pool as _;
use medssl_classifier as _;
use medssl_deepcluster_v2 as _;
use medssl_faster_rcnn as _;
use medssl_masked_prediction as _;
use medssl_mean_pool as _;
use medssl_ntxent as _;
use medssl_phantom as _;
use medssl_readers as _;
use medssl_reconstruction as _;
use medssl_resnet as _;
use medssl_slice_transformer as _;
use medssl_swav as _;
use medssl_swin3d as _;
use medssl_swin_unetr as _;
use medssl_unet as _;
use medssl_unetr as _;
use medssl_vicreg as _;
use medssl_vit3d as _;
use medssl_voco as _;

/// Links every plugin crate, and with them their registrations. Call it (or write
/// `use medssl_plugins as _;`) in a binary or test crate that looks components up by name:
/// the reference is what keeps the linker from dropping this crate and the plugins behind it.
pub fn link() {}
