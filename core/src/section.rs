//! A component's config section: the component it names and its own keys, parsed by the
//! component into its serde struct, with errors that name the dotted key, the value and the
//! layer it came from (the file, an environment variable, a `--set`). A leaf module: the
//! dataset, objective and encoder traits take a `Section`, and the config module builds
//! them, so it depends on neither.

use anyhow::{anyhow, bail, Context, Result};
use figment::providers::Serialized;
use figment::value::{Dict, Value};
use figment::Figment;
use serde::de::DeserializeOwned;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Nests a dotted key's value: `a.b.c = v` becomes `{a: {b: {c: v}}}`.
pub(crate) fn nest(key: &str, value: Value) -> Dict {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut dict = Dict::new();
    dict.insert(last.to_string(), value);
    for part in parts.into_iter().rev() {
        let mut outer = Dict::new();
        outer.insert(part.to_string(), Value::from(dict));
        dict = outer;
    }
    dict
}

/// The component section at dotted `key` of `figment`, whose component is picked by
/// `selector` (`name` for models and objectives, `format` for datasets).
pub fn section_of(figment: &Figment, key: &str, selector: &'static str) -> Result<Section> {
    let value = figment
        .find_value(key)
        .map_err(|_| anyhow!("config: the section `[{key}]` is missing"))?;
    let Value::Dict(tag, mut dict) = value else {
        bail!("config: `{key}` must be a table with a `{selector}` key");
    };
    let name = match dict.remove(selector) {
        Some(Value::String(_, name)) => name,
        Some(other) => bail!(
            "config key `{key}.{selector}` must be a string naming a component, found {}",
            describe_value(&other)
        ),
        None => bail!("config section `[{key}]` has no `{selector}` key naming its component"),
    };
    let selector_key = format!("{key}.{selector}");
    let source = figment
        .find_metadata(&selector_key)
        .map(|m| format!(" (from {})", describe_source(m, &selector_key)))
        .unwrap_or_default();
    Ok(Section {
        key: key.to_string(),
        name,
        body: Value::Dict(tag, dict),
        figment: figment.clone(),
        paths: Default::default(),
        origin: Some(format!("config key `{selector_key}`{source}")),
    })
}

/// A component section: the chosen component's name and its own keys, not yet parsed.
#[derive(Clone)]
pub struct Section {
    /// Dotted key of the section, for messages.
    pub key: String,
    /// The selected component.
    pub name: String,
    body: Value,
    figment: Figment,
    /// Paths this section's component resolved, by field: the run directory records them
    /// absolute, so `resume` finds the data from any working directory.
    paths: Rc<RefCell<BTreeMap<String, PathBuf>>>,
    /// The key that named the component and the layer it came from, for messages about the
    /// name (`config key `encoder.name` (from command-line override `--set ...`)`).
    origin: Option<String>,
}

impl Section {
    /// A section built in code (tests, sweeps): the component `name` with `body` as its
    /// TOML keys.
    pub fn inline(key: &str, name: &str, body: &str) -> Result<Section> {
        let table: toml::Table = toml::from_str(body).with_context(|| format!("inline config of `{key}`"))?;
        let figment = Figment::from(Serialized::defaults(Value::serialize(nest(
            key,
            Value::serialize(table)?,
        ))?));
        let value = figment.find_value(key).unwrap_or_else(|_| Value::from(Dict::new()));
        Ok(Section {
            key: key.to_string(),
            name: name.to_string(),
            body: value,
            figment,
            paths: Default::default(),
            origin: None,
        })
    }

    /// The key that named this section's component, with the layer it came from (the file,
    /// an environment variable, a `--set`): the context of an unknown name.
    pub fn selector_context(&self) -> String {
        self.origin
            .clone()
            .unwrap_or_else(|| format!("config section `[{}]`", self.key))
    }

    /// Moves `keys` out of this section into a new one with the same key and sources, for
    /// options that core reads beside a component's own (a data source's `weight`, ...).
    pub fn take(&mut self, keys: &[&str]) -> Section {
        let mut taken = Dict::new();
        if let Value::Dict(_, dict) = &mut self.body {
            for key in keys {
                if let Some(value) = dict.remove(*key) {
                    taken.insert(key.to_string(), value);
                }
            }
        }
        Section {
            body: Value::from(taken),
            paths: Default::default(),
            ..self.clone()
        }
    }

    /// Parses the section into the component's config struct. Missing keys take the
    /// struct's defaults; unknown keys and wrong types are errors naming the key, the value
    /// and its source.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.body).map_err(|e| {
            describe_error(&self.figment, e, &self.key).context(format!(
                "invalid config for `{}` in section `[{}]`",
                self.name, self.key
            ))
        })
    }

    /// The section as the run directory records it: the component's default config with
    /// the user's keys laid over it, the selector key, and every path the component resolved
    /// made absolute. Call it after building the component.
    pub fn resolved(&self, selector: &str, default_toml: &str) -> Result<toml::Value> {
        let mut table: toml::Table = toml::from_str(default_toml)
            .with_context(|| format!("default config of `{}` is not valid TOML", self.name))?;
        let user = toml::Value::try_from(&self.body).with_context(|| format!("section `[{}]`", self.key))?;
        if let toml::Value::Table(user) = user {
            overlay(&mut table, user);
        }
        for (field, path) in self.paths.borrow().iter() {
            table.insert(field.clone(), toml::Value::String(path.display().to_string()));
        }
        table.insert(selector.to_string(), toml::Value::String(self.name.clone()));
        Ok(toml::Value::Table(table))
    }

    /// Resolves the path in this section's key `field`: a relative path from a config file
    /// is relative to that file's folder; one from an environment variable or `--set` is
    /// relative to the working directory, as on any command line.
    pub fn resolve_path(&self, field: &str, path: &Path) -> PathBuf {
        let resolved = if path.is_absolute() {
            path.to_path_buf()
        } else {
            let key = format!("{}.{field}", self.key);
            let base = match self.figment.find_metadata(&key).and_then(|m| m.source.as_ref()) {
                Some(figment::Source::File(file)) => file.parent().map(Path::to_path_buf).unwrap_or_default(),
                _ => PathBuf::new(),
            };
            let joined = base.join(path);
            std::path::absolute(&joined).unwrap_or(joined)
        };
        self.paths.borrow_mut().insert(field.to_string(), resolved.clone());
        resolved
    }
}

/// Lays `top` over `base`, recursing into tables.
fn overlay(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => overlay(b, t),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

pub(crate) fn describe_value(value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("the string \"{s}\""),
        Value::Char(_, c) => format!("the character '{c}'"),
        Value::Bool(_, b) => format!("the boolean {b}"),
        Value::Num(_, n) => match (n.to_i128(), n.to_f64()) {
            (Some(i), _) => format!("the number {i}"),
            (None, Some(f)) => format!("the number {f}"),
            _ => format!("the number {n:?}"),
        },
        Value::Empty(_, _) => "an empty value".into(),
        Value::Dict(_, _) => "a table".into(),
        Value::Array(_, _) => "an array".into(),
    }
}

/// Turns a figment error into one that names the full dotted key, the value found, what
/// was expected and which layer (file, environment variable, `--set`) supplied it.
pub fn describe_error(figment: &Figment, error: figment::Error, prefix: &str) -> anyhow::Error {
    use figment::error::Kind;
    let mut messages = Vec::new();
    for e in error {
        let mut path = e.path.clone();
        if let Kind::UnknownField(field, _) = &e.kind {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
        }
        let key = if prefix.is_empty() {
            path.join(".")
        } else if path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", path.join("."))
        };
        let source = e
            .metadata
            .as_ref()
            .map(|m| describe_source(m, &key))
            .or_else(|| figment.find_metadata(&key).map(|m| describe_source(m, &key)));
        let what = match &e.kind {
            Kind::UnknownField(field, expected) => format!(
                "unknown key `{field}`; expected one of: {}",
                expected.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
            ),
            Kind::MissingField(field) => format!("missing required key `{field}`"),
            Kind::InvalidType(actual, expected) => format!("found {actual}, expected {expected}"),
            Kind::InvalidValue(actual, expected) => format!("invalid value {actual}, expected {expected}"),
            other => other.to_string(),
        };
        let location = match source {
            Some(source) => format!(" (from {source})"),
            None => String::new(),
        };
        let key_text = if key.is_empty() {
            "top level".to_string()
        } else {
            format!("key `{key}`")
        };
        messages.push(format!("config {key_text}{location}: {what}"));
    }
    anyhow!(messages.join("\n"))
}

/// The layer `metadata` describes, for the value at dotted `key`: the file, the environment
/// variable by name (`MEDSSL_` keys split at `__`), or the `--set`.
fn describe_source(metadata: &figment::Metadata, key: &str) -> String {
    match &metadata.source {
        Some(figment::Source::File(path)) => format!("file `{}`", path.display()),
        Some(figment::Source::Custom(custom)) => custom.clone(),
        _ if metadata.name.ends_with("environment variable(s)") && !key.is_empty() => {
            format!(
                "environment variable `MEDSSL_{}`",
                key.replace('.', "__").to_uppercase()
            )
        }
        _ => metadata.name.to_string(),
    }
}
