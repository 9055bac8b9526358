//! Link-time component registries, one per role.
//!
//! Every plugin crate adds a `const` entry to a [`linkme::distributed_slice`]; the linker
//! gathers the entries of every crate that the binary links into one slice per role. We use
//! linkme rather than inventory because an entry is a plain `static` placed in a link
//! section: no code runs before `main`, the entries are `const`, and iteration is a slice.
//! The price is shared by both crates: a plugin crate that nothing references is dropped by
//! the linker, so one facade crate (`medssl-plugins`, plugins/all) names each plugin
//! (`use medssl_resnet as _;`), binaries and tests reference the facade, and a test asserts
//! the exact set of names.

use anyhow::{bail, Result};
use std::collections::BTreeMap;

pub use linkme;

use crate::aggregator::AggregatorEntry;
use crate::dataset::DatasetEntry;
use crate::encoder::EncoderEntry;
use crate::head::HeadEntry;
use crate::objective::ObjectiveEntry;

/// Registered encoders (slice or volume embedders).
#[linkme::distributed_slice]
pub static ENCODERS: [EncoderEntry];
/// Registered aggregators (slice sequence to volume embedding).
#[linkme::distributed_slice]
pub static AGGREGATORS: [AggregatorEntry];
/// Registered self-supervised objectives.
#[linkme::distributed_slice]
pub static OBJECTIVES: [ObjectiveEntry];
/// Registered downstream heads.
#[linkme::distributed_slice]
pub static HEADS: [HeadEntry];
/// Registered dataset readers (formats).
#[linkme::distributed_slice]
pub static DATASETS: [DatasetEntry];

/// What every entry of every role has: a name, a one-line description and its default
/// config as TOML.
pub trait Registered: Sync + 'static {
    fn name(&self) -> &'static str;
    fn about(&self) -> &'static str;
    fn default_config(&self) -> String;
}

/// One role: a name for messages and its entries.
pub struct Role<E: 'static> {
    /// Plural name used in messages, `medssl list` and its JSON (`encoders`, ...).
    pub plural: &'static str,
    /// Singular name used in messages (`encoder`, ...).
    pub singular: &'static str,
    pub entries: &'static [E],
}

pub fn encoders() -> Role<EncoderEntry> {
    Role {
        plural: "encoders",
        singular: "encoder",
        entries: &ENCODERS,
    }
}
pub fn aggregators() -> Role<AggregatorEntry> {
    Role {
        plural: "aggregators",
        singular: "aggregator",
        entries: &AGGREGATORS,
    }
}
pub fn objectives() -> Role<ObjectiveEntry> {
    Role {
        plural: "objectives",
        singular: "objective",
        entries: &OBJECTIVES,
    }
}
pub fn heads() -> Role<HeadEntry> {
    Role {
        plural: "heads",
        singular: "head",
        entries: &HEADS,
    }
}
pub fn datasets() -> Role<DatasetEntry> {
    Role {
        plural: "datasets",
        singular: "dataset format",
        entries: &DATASETS,
    }
}

impl<E: Registered> Role<E> {
    /// The entry registered under `name`. Fails on an unknown name (listing the registered
    /// ones) and on a name registered twice (naming both registrations).
    pub fn get(&self, name: &str) -> Result<&'static E> {
        self.check_unique()?;
        match self.entries.iter().find(|e| e.name() == name) {
            Some(entry) => Ok(entry),
            None => bail!(
                "unknown {} `{name}`; registered {}: {}",
                self.singular,
                self.plural,
                self.names().join(", ")
            ),
        }
    }

    /// Sorted names of the registered entries.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.entries.iter().map(|e| e.name()).collect();
        names.sort_unstable();
        names
    }

    /// Fails if two entries share a name, naming both (by their descriptions, since an entry
    /// knows no more about where it came from).
    pub fn check_unique(&self) -> Result<()> {
        let mut seen: BTreeMap<&str, &E> = BTreeMap::new();
        for entry in self.entries {
            if let Some(first) = seen.insert(entry.name(), entry) {
                bail!(
                    "{} `{}` is registered twice: \"{}\" and \"{}\"; rename one of them",
                    self.singular,
                    entry.name(),
                    first.about(),
                    entry.about()
                );
            }
        }
        Ok(())
    }

    /// (name, about) pairs, sorted by name.
    pub fn describe(&self) -> Vec<(&'static str, &'static str)> {
        let mut rows: Vec<_> = self.entries.iter().map(|e| (e.name(), e.about())).collect();
        rows.sort_unstable();
        rows
    }
}

/// A component's name and description, as `medssl list` shows them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing {
    pub name: &'static str,
    pub about: &'static str,
}

/// Every role with its entries, in the order `medssl list` prints them.
pub fn catalogue() -> Result<Vec<(&'static str, Vec<Listing>)>> {
    fn rows<E: Registered>(role: Role<E>) -> Result<(&'static str, Vec<Listing>)> {
        role.check_unique()?;
        let listed = role
            .describe()
            .into_iter()
            .map(|(name, about)| Listing { name, about })
            .collect();
        Ok((role.plural, listed))
    }
    Ok(vec![
        rows(encoders())?,
        rows(aggregators())?,
        rows(objectives())?,
        rows(heads())?,
        rows(datasets())?,
    ])
}

/// The default config (TOML) of the component called `name`, whatever its role.
pub fn example(name: &str) -> Result<String> {
    fn find<E: Registered>(role: Role<E>, name: &str) -> Option<(String, &'static str)> {
        role.entries
            .iter()
            .find(|e| e.name() == name)
            .map(|e| (e.default_config(), role.singular))
    }
    let found = [
        find(encoders(), name),
        find(aggregators(), name),
        find(objectives(), name),
        find(heads(), name),
        find(datasets(), name),
    ];
    match found.into_iter().flatten().next() {
        Some((toml, singular)) => Ok(format!("# {singular} `{name}`\n{toml}")),
        None => {
            let all: Vec<String> = catalogue()?
                .into_iter()
                .flat_map(|(_, rows)| rows.into_iter().map(|r| r.name.to_string()))
                .collect();
            bail!("no component named `{name}`; registered: {}", all.join(", "))
        }
    }
}

/// Implements [`Registered`] for an entry struct with `name`, `about` and
/// `default_config: fn() -> String` fields.
#[macro_export]
macro_rules! impl_registered {
    ($entry:ty) => {
        impl $crate::registry::Registered for $entry {
            fn name(&self) -> &'static str {
                self.name
            }
            fn about(&self) -> &'static str {
                self.about
            }
            fn default_config(&self) -> String {
                (self.default_config)()
            }
        }
    };
}

/// Serialises a component's default config to TOML, for `default_config` entries.
pub fn default_toml<C: serde::Serialize + Default>() -> String {
    toml::to_string_pretty(&C::default()).unwrap_or_else(|e| format!("# unserialisable: {e}\n"))
}

/// Registers a component: `register!(ENCODERS, RESNET18: EncoderEntry = EncoderEntry { .. });`
/// places the entry in that role's link-time slice.
#[macro_export]
macro_rules! register {
    ($slice:ident, $static_name:ident : $ty:ty = $value:expr) => {
        #[$crate::registry::linkme::distributed_slice($crate::registry::$slice)]
        #[linkme(crate = $crate::registry::linkme)]
        static $static_name: $ty = $value;
    };
}
